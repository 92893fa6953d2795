"""Evaluation policies -> per-row action probabilities ``pi_e(a_i | x_i)`` for the logged rows.

Why per row: the estimators only need, for each logged (context, action) row, the evaluation
policy's probability of that action and the policy-weighted reward-model prediction. So a
policy is a DataFrame transform that adds two columns, ``pi_e__<name>`` and
``q_hat_pi__<name>``, computed with joins and window aggregates over the catalogue (never a
dense users x items matrix on the driver).

Built-in strategies (each a distribution over the row's action set ``A(x)``, the items of
the row's (stratum, slot) in ``item_q``; ``pi_e`` and ``q_hat_pi`` describe the SAME
distribution, as the DR-type estimators require: ``q_hat_pi = sum_a pi_e(a|x) q_hat(x, a)``):

* ``random``  - uniform over the action set of the row's context (slot): ``1 / |A(x)|``;
* ``popular`` - deterministic: the most-clicked action in the training log (per slot when
  the data has positions);
* ``score:<column>`` - deterministic: the user's best-scoring item among ``A(x)``; uniform over
  ``A(x)`` when the user has no score for any item of it;
* ``recommendations`` - the top-K list ``L_u`` of the ``recommendations`` table, restricted to
  the action set: uniform over ``L_u & A(x)`` (``1/|L_u & A(x)|`` for a listed item, 0
  otherwise); uniform over ``A(x)`` when that intersection is empty or the user has no list.
  Restricting matters when action sets differ by stratum (OBD item ids are per campaign, while
  a user's list spans campaigns): a listed item outside ``A(x)`` cannot be shown there.

User lists and scores are joined with the (small) action-set table per (stratum, slot), never
crossed with every item.

Slates / positions: when rows carry a ``position`` (OBD: 3 slots), the unit is (context,
position) and every probability is position-specific, as in obp.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def pi_e_col(name: str) -> str:
    return f"pi_e__{name}"


def q_hat_pi_col(name: str) -> str:
    return f"q_hat_pi__{name}"


# -------------------------------------------------------------------- local (numpy) slate adapter


def rows_from_action_dist(action: np.ndarray, position: np.ndarray, action_dist: np.ndarray,
                          q_hat: Optional[np.ndarray] = None) -> dict:
    """obp-shaped inputs -> per-row quantities.

    ``action_dist``/``q_hat``: (n, n_actions, len_list) arrays (obp's layout); the row's unit
    is (context i, position_i), so ``pi_e = action_dist[i, a_i, pos_i]`` and
    ``q_hat_pi = sum_a action_dist[i, a, pos_i] * q_hat[i, a, pos_i]``.
    """
    n = action.shape[0]
    if action_dist.ndim != 3 or action_dist.shape[0] != n:
        raise ValueError(f"action_dist must have shape (n_rounds={n}, n_actions, len_list), got {action_dist.shape}")
    idx = np.arange(n)
    pi = action_dist[idx, :, position]  # (n, n_actions): the policy at the row's slot
    out = {"pi_e": action_dist[idx, action, position]}
    if q_hat is not None:
        qp = q_hat[idx, :, position]
        out["q_hat"] = q_hat[idx, action, position]
        out["q_hat_pi"] = (pi * qp).sum(axis=1)
    return out


# -------------------------------------------------------------------- Spark policies over logged rows
#
# Inputs shared by every policy:
#   rows    - one row per logged unit: row_id, user_id, item_id, stratum, slot, reward, pscore, q_hat
#   item_q  - the action set with the reward model: stratum, slot, item_id, q_hat_item
# ``stratum`` separates action sets (OBD campaigns); ``slot`` is the position (0 when none).


def unit_summary(item_q):
    """Per (stratum, slot): number of actions and the mean reward-model value (the uniform policy's q_hat_pi)."""
    from pyspark.sql import functions as F

    return item_q.groupBy("stratum", "slot").agg(F.count("*").alias("n_actions"), F.avg("q_hat_item").alias("q_mean"))


def add_random_policy(rows, item_q, name: str = "random"):
    """Uniform over the row's action set: pi_e = 1 / |A(stratum, slot)|."""
    from pyspark.sql import functions as F

    u = unit_summary(item_q)
    j = rows.join(F.broadcast(u), ["stratum", "slot"], "left")
    j = j.withColumn(pi_e_col(name), 1.0 / F.col("n_actions")).withColumn(q_hat_pi_col(name), F.col("q_mean"))
    return j.drop("n_actions", "q_mean")


def _add_choice(rows, choice, item_q, keys: list, name: str):
    """Deterministic policy from ``choice`` (keys..., chosen): pi_e = 1{a_i == chosen},
    q_hat_pi = q_hat(chosen); uniform over A(x) (the random policy) where there is no choice in
    A(x), so pi_e and q_hat_pi stay one distribution over the action set."""
    from pyspark.sql import functions as F

    u = unit_summary(item_q)
    iq = item_q.select("stratum", "slot", F.col("item_id").alias("chosen"), F.col("q_hat_item").alias("q_chosen"))
    j = rows.join(choice, keys, "left").join(F.broadcast(iq), ["stratum", "slot", "chosen"], "left") \
        .join(F.broadcast(u), ["stratum", "slot"], "left")
    none = F.col("q_chosen").isNull()  # no choice, or a choice outside the row's action set
    j = j.withColumn(pi_e_col(name), F.when(none, 1.0 / F.col("n_actions"))
                     .otherwise(F.when(F.col("item_id") == F.col("chosen"), 1.0).otherwise(0.0)))
    j = j.withColumn(q_hat_pi_col(name), F.when(none, F.col("q_mean")).otherwise(F.col("q_chosen")))
    return j.drop("chosen", "q_chosen", "n_actions", "q_mean")


def add_popular_policy(rows, item_q, name: str = "popular"):
    """Always show the action with the most positive rewards in the log (per stratum and slot)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    counts = rows.groupBy("stratum", "slot", "item_id").agg(F.sum("reward").alias("pos"), F.count("*").alias("n"))
    w = Window.partitionBy("stratum", "slot").orderBy(F.desc("pos"), F.desc("n"), F.asc("item_id"))
    top = counts.withColumn("rk", F.row_number().over(w)).where("rk = 1") \
        .select("stratum", "slot", F.col("item_id").alias("chosen"))
    return _add_choice(rows, F.broadcast(top), item_q, ["stratum", "slot"], name)


def add_score_policy(rows, scores, column: str, item_q, name: Optional[str] = None):
    """Deterministic: per (user, stratum, slot), the argmax of the score table's ``column`` over
    the row's action set (null scores ignored); uniform over A(x) when the user has no score for
    any of its items (see :func:`_add_choice`)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if column not in scores.columns:
        raise ValueError(f"score policy: column {column!r} is not in the score table (columns {scores.columns})")
    sc = scores.select("user_id", "item_id", F.col(column).alias("s")).where(F.col("s").isNotNull())
    in_a = sc.join(F.broadcast(item_q.select("stratum", "slot", "item_id")), "item_id")
    w = Window.partitionBy("user_id", "stratum", "slot").orderBy(F.desc("s"), F.asc("item_id"))
    best = in_a.withColumn("rk", F.row_number().over(w)).where("rk = 1") \
        .select("user_id", "stratum", "slot", F.col("item_id").alias("chosen"))
    return _add_choice(rows, best, item_q, ["user_id", "stratum", "slot"], name or f"score_{column}")


def add_topk_policy(rows, topk, item_q, name: str = "recommendations"):
    """Uniform over each user's top-K list within the row's action set (``topk``: user_id, item_id[, rank]).

    With ``L = L_u & A(stratum, slot)``: pi_e = 1{a_i in L} / |L| and q_hat_pi = mean q_hat over L.
    When L is empty (no listed item can be shown there) or the user has no list: the uniform
    random policy over A (stated, so the value is defined for every logged row).
    """
    from pyspark.sql import functions as F

    lists = topk.select("user_id", "item_id").distinct()
    # the user's listed items that are in each action set: lists x the small action-set table
    inter = lists.join(F.broadcast(item_q.select("stratum", "slot", "item_id", "q_hat_item")), "item_id")
    per_unit = inter.groupBy("user_id", "stratum", "slot").agg(
        F.count("*").alias("k_list"), F.avg("q_hat_item").alias("q_list"))
    listed = inter.select("user_id", "stratum", "slot", "item_id", F.lit(1.0).alias("listed"))
    u = unit_summary(item_q)
    j = rows.join(per_unit, ["user_id", "stratum", "slot"], "left") \
        .join(listed, ["user_id", "stratum", "slot", "item_id"], "left") \
        .join(F.broadcast(u), ["stratum", "slot"], "left")
    none = F.col("k_list").isNull()
    j = j.withColumn(pi_e_col(name), F.when(none, 1.0 / F.col("n_actions"))
                     .otherwise(F.coalesce(F.col("listed"), F.lit(0.0)) / F.col("k_list")))
    j = j.withColumn(q_hat_pi_col(name), F.when(none, F.col("q_mean")).otherwise(F.col("q_list")))
    return j.drop("k_list", "listed", "q_list", "n_actions", "q_mean")
