r"""A causal simulator: a logged recommendation world with known ground truth, at any scale.

Why: on real logs nobody knows what would have happened had the logging policy acted
differently. Here every estimator (exposure propensities, IPS/DR off-policy values,
uplift) can be checked against the truth the data was generated from.

Everything is generated inside Spark from ``spark.range`` with counter-based
randomness: each random draw is ``U(tag, keys) = xxhash64(seed, tag, keys) / 2^64``
(53 bits), so a value depends only on the seed and the row's keys - never on
partitioning or execution order - and the same seed gives the same tables at any
parallelism. Nothing event-sized is held on the driver.

Generating process (``d = n_latent``, ``s`` = :class:`causalrec.config.SimulatorConfig`):

**Users** ``u = 0..n_users-1``: latent taste :math:`\theta_u \sim N(0, I_d)`; observable
attributes ``taste:<category of argmax θ_u[:C]>`` and ``activity:<low|mid|high>``.

**Items** ``i = 0..n_items-1``: latent :math:`\phi_i \sim N(0, I_d)`; ``category`` =
the category of :math:`\arg\max \phi_i[:C]` (so a user's ``taste`` attribute predicts
preference), a colour and a price (log-normal); text composed from them ("red outdoor
item, mid-priced"). Popularity is Zipf in the item index: :math:`q_i = 1/(i+1)`.
Effect type :math:`k_i \in` {sure thing 25%, persuadable 50%, sleeping dog 10%, lost cause 15%}.

**Candidate pairs**: ``n_pairs`` distinct (u, i) pairs, an affine permutation of the
user x item grid (``n_pairs`` is chosen so the expected event count is ``n_events``).
For each pair:

* true preference :math:`s_{ui} = \theta_u \cdot \phi_i / \sqrt d` (≈ N(0, 1))
* exposure (MNAR: popular and preferred items are seen more),

  .. math:: e_{ui} = \min\Big(1,\; \rho\, \frac{q_i^{\beta}}{\overline{q^{\beta}}}\,
            \frac{e^{\gamma s_{ui}}}{(1-\gamma^2/d)^{-d/2}}\Big)

  with :math:`\rho` = ``exposure_rate``, :math:`\beta` = ``popularity_bias``,
  :math:`\gamma` = ``selection_on_preference`` (the denominator is
  :math:`E[e^{\gamma s}]`, so the mean before clipping is :math:`\rho`);
  observed :math:`O_{ui} \sim \mathrm{Bern}(e_{ui})`.
* treatment (the logging policy recommends the exposed item), probability
  :math:`\pi_{ui}` clipped to [0.01, 0.99], ``r`` = ``recommend_rate``:

  - ``uniform``: :math:`\pi = r`
  - ``popularity``: :math:`\pi = r\, q_i / \bar q`
  - ``epsilon_greedy``: :math:`\pi = \epsilon r + (1-\epsilon)\,1[s_{ui} > \Phi^{-1}(1-r)]`
  - ``softmax`` (two-action softmax = logistic): :math:`\pi = \sigma((s_{ui} - c_r)/T)`,
    :math:`c_r` solved so that :math:`E[\pi] = r` for :math:`s \sim N(0,1)`

  :math:`T_{ui} \sim \mathrm{Bern}(\pi_{ui})`; recommended impressions get a position
  uniform in 1..``n_positions`` (position does not change outcomes).
* potential outcomes (purchase probabilities):

  .. math:: p^0_{ui} = 0.9\,\sigma(\mathrm{logit}(b) + s_{ui} + a_{k_i}),\qquad
            p^1_{ui} = p^0_{ui} + \tau_{ui},\qquad
            \tau_{ui} = (1-h)\,\mathrm{ATE} + h\,c\,g_{ui}

  with ``b`` = ``base_purchase_rate``, :math:`a_k` = +2 (sure thing), -1 (lost cause),
  0 otherwise; :math:`g_{ui}` = :math:`\tfrac12(1-p^0)\sigma(s_{ui})` (persuadable),
  :math:`-\tfrac12 p^0` (sleeping dog: recommending hurts), 0 (sure thing, lost
  cause); ``h`` = ``effect_heterogeneity`` in [0, 1]; and
  :math:`c = \mathrm{ATE} / \overline{g}` over the ground-truth pairs, so that
  **mean(p_y1 - p_y0) over ground_truth equals** ``ate`` exactly. For
  ``0 <= ate <= 0.1`` no probability leaves [0, 1] (checked). Because sure things
  have the highest purchase probability and persuadables the highest effect,
  ranking by purchase probability and by effect differ.
* realised outcomes with common random numbers :math:`U^y_{ui}`:
  :math:`y_0 = 1[U^y < p^0]`, :math:`y_1 = 1[U^y < p^1]`; observed
  :math:`Y = T y_1 + (1-T) y_0`; click :math:`C = Y \lor U^c < 0.05(1+T)`.

**Events** (``events``) per observed pair at a time uniform in ``n_days`` days from
``start_date``: an ``impression`` (value = C, ``recommended`` = T, ``logged_propensity``
= probability of the logged action: :math:`\pi` if T else :math:`1-\pi`, ``policy`` =
``logging_policy``), a ``click`` 5 s later when C, a ``purchase`` (value 1.0) 60 s
later when Y. Event ids ``sim:<seed>:<u>:<i>:<type>`` are unique and deterministic.

**MCAR slice** (``mcar_events``): users with :math:`U < ` ``mcar_share`` are each shown
``mcar_items_per_user`` distinct items uniformly at random and treated by a coin flip
(:math:`\pi = 0.5`, policy ``uniform_random``); same outcome model, ids ``sim:<seed>:mcar:...``.
Their ``logged_propensity`` is the exposure probability ``mcar_items_per_user / n_items``
(as in Coat's MCAR table), not the coin.

**ground_truth**: one row per candidate pair with :math:`s, e, \pi, p^0, p^1, y_0, y_1`.
Everything is a deterministic function of (seed, u, i), so a pair's truth agrees
wherever the pair appears.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CATEGORIES = ("outdoor", "electronics", "home", "fashion", "books", "sports", "toys", "beauty")
COLOURS = ("red", "blue", "green", "black", "white", "grey", "yellow", "brown")
EFFECT_TYPES = ("sure_thing", "persuadable", "sleeping_dog", "lost_cause")
EFFECT_TYPE_SHARES = (0.25, 0.50, 0.10, 0.15)
_TWO53 = float(2 ** 53)


# --------------------------------------------------------------------------- randomness


def uniform(seed: int, tag: str, *keys):
    """U[0,1) from (seed, tag, keys): counter-based, independent of partitioning."""
    from pyspark.sql import functions as F

    h = F.xxhash64(F.lit(int(seed)), F.lit(tag), *keys)
    return F.shiftrightunsigned(h, 11).cast("double") / F.lit(_TWO53)


def normal(seed: int, tag: str, *keys):
    """N(0,1) by Box-Muller from two counter-based uniforms."""
    from pyspark.sql import functions as F

    u1 = F.lit(1.0) - uniform(seed, tag + ":a", *keys)  # (0, 1]
    u2 = uniform(seed, tag + ":b", *keys)
    return F.sqrt(F.lit(-2.0) * F.log(u1)) * F.cos(F.lit(2 * math.pi) * u2)


def _sigmoid(x):
    from pyspark.sql import functions as F

    return F.lit(1.0) / (F.lit(1.0) + F.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _norm_ppf(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


def softmax_offset(rate: float, temperature: float) -> float:
    """c such that E[sigmoid((s - c)/T)] = rate for s ~ N(0,1) (Gauss-Hermite quadrature + bisection)."""
    import numpy as np

    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()

    def mean(c):
        with np.errstate(over="ignore"):  # exp overflows to inf far from the rate: the sigmoid is then 0
            return float((w / (1 + np.exp(-(x - c) / temperature))).sum())

    # mean(c) falls from ~1 to ~0 as c grows; the offset scales with T, so widen until it is bracketed
    lo, hi = -20.0, 20.0
    while mean(hi) > rate and hi < 1e9:
        hi *= 2
    while mean(lo) < rate and lo > -1e9:
        lo *= 2
    if not mean(hi) <= rate <= mean(lo):
        raise ValueError(f"simulator: no softmax offset gives a recommend rate of {rate} at temperature "
                         f"{temperature} (reachable: {mean(hi):.3g} to {mean(lo):.3g})")
    for _ in range(100):
        mid = (lo + hi) / 2
        if mean(mid) > rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """Scalars fixed on the driver before any data is generated."""

    seed: int
    n_pairs: int
    perm_a: int
    perm_b: int
    grid: int
    pop_norm: float  # mean over items of q_i^beta
    pop_mean: float  # mean over items of q_i
    pref_norm: float  # E[exp(gamma s)]
    softmax_c: float
    greedy_threshold: float


def _check(sc) -> None:
    def bad(key, msg):
        raise ValueError(f"simulator.{key}: {msg}")

    if sc.n_users < 1 or sc.n_items < 1:
        bad("n_users/n_items", "must be >= 1")
    if sc.n_events < 1:
        bad("n_events", f"got {sc.n_events}, expected >= 1")
    if sc.n_latent < 1:
        bad("n_latent", "must be >= 1")
    if not 0 <= sc.selection_on_preference ** 2 < sc.n_latent:
        bad("selection_on_preference", f"got {sc.selection_on_preference}; need |gamma| < sqrt(n_latent)")
    if not 0 <= sc.ate <= 0.1:
        bad("ate", f"got {sc.ate}, expected 0 <= ate <= 0.1 (outcome probabilities must stay in [0, 1])")
    if not 0 <= sc.effect_heterogeneity <= 1:
        bad("effect_heterogeneity", f"got {sc.effect_heterogeneity}, expected a value in [0, 1]")
    if not 0 < sc.base_purchase_rate < 0.5:
        bad("base_purchase_rate", f"got {sc.base_purchase_rate}, expected (0, 0.5)")
    if not 0 < sc.recommend_rate < 1:
        bad("recommend_rate", f"got {sc.recommend_rate}, expected (0, 1)")
    if not 0 < sc.exposure_rate <= 1:
        bad("exposure_rate", f"got {sc.exposure_rate}, expected (0, 1]")
    if not 0 <= sc.mcar_share <= 1:
        bad("mcar_share", f"got {sc.mcar_share}, expected [0, 1]")
    if not 0 <= sc.epsilon <= 1:
        bad("epsilon", f"got {sc.epsilon}, expected [0, 1]")
    if sc.softmax_temperature <= 0:
        bad("softmax_temperature", "must be > 0")
    if sc.n_positions < 1 or sc.n_days < 1 or sc.partitions < 1:
        bad("n_positions/n_days/partitions", "must be >= 1")


def _coprime_multiplier(grid: int, n: int) -> int:
    """A multiplier a with gcd(a, grid) = 1 and a * n < 2^62 (no long overflow), far from 1."""
    limit = max(2, min(grid - 1, (2 ** 62) // max(n, 1)))
    a = max(1, int(limit * 0.6180339887)) | 1
    while a > 1 and math.gcd(a, grid) != 1:
        a -= 1
    return max(a, 1)


def make_plan(spark, sc, seed: int) -> Plan:
    import numpy as np

    _check(sc)
    q = 1.0 / np.arange(1, sc.n_items + 1, dtype=float)
    pop_norm = float(np.mean(q ** sc.popularity_bias))
    pop_mean = float(q.mean())
    d, g = sc.n_latent, sc.selection_on_preference
    pref_norm = (1 - g * g / d) ** (-d / 2)
    grid = sc.n_users * sc.n_items
    plan = Plan(seed=seed, n_pairs=1, perm_a=1, perm_b=0, grid=grid, pop_norm=pop_norm, pop_mean=pop_mean,
                pref_norm=pref_norm, softmax_c=softmax_offset(sc.recommend_rate, sc.softmax_temperature),
                greedy_threshold=_norm_ppf(1 - sc.recommend_rate))
    # Expected events per candidate pair, measured on a fixed 20k-pair sample with the same expressions.
    from pyspark.sql import functions as F

    m = min(grid, 20_000)
    probe = Plan(**{**plan.__dict__, "n_pairs": m, "perm_a": _coprime_multiplier(grid, m),
                    "perm_b": seed % grid})
    users, items = users_frame(spark, sc, seed), items_frame(spark, sc, seed)
    pr = pair_truth(spark, sc, probe, users, items, effect_scale=0.0)
    # an exposed pair logs its impression, a click with a purchase or else with chance 0.05 (1 + pi), and the
    # purchase; P(purchase) counts the recommendation's effect, ate on average (the scale is set after this)
    pi = F.col("treatment_propensity")
    py = F.col("p_y0") + pi * F.lit(sc.ate)
    est = pr.agg(F.avg(F.col("exposure_propensity") * (1 + 2 * py + (1 - py) * 0.05 * (1 + pi)))
                 .alias("epp")).collect()[0]["epp"]
    n_pairs = int(min(grid, max(1, round(sc.n_events / max(est, 1e-9)))))
    return Plan(**{**plan.__dict__, "n_pairs": n_pairs, "perm_a": _coprime_multiplier(grid, n_pairs),
                   "perm_b": (seed * 7919) % grid})


# --------------------------------------------------------------------------- dimension tables


def _latent_frame(spark, sc, seed: int, n: int, idx_col: str, prefix: str, salt: str):
    """``n`` rows of ``idx_col`` with latent columns ``{prefix}0..`` ~ N(0, 1), and the category of their argmax.

    Users and items share this so a user's ``taste`` and an item's ``category`` are read off
    their latent vectors the same way, which is what makes the attribute predictive.
    """
    from pyspark.sql import functions as F

    n_cat = min(sc.n_latent, len(CATEGORIES))
    df = spark.range(n, numPartitions=max(1, min(sc.partitions, n // 1000 + 1))).withColumnRenamed("id", idx_col)
    for k in range(sc.n_latent):
        df = df.withColumn(f"{prefix}{k}", normal(seed, f"{salt}{k}", F.col(idx_col)))
    lat = F.array(*[F.col(f"{prefix}{k}") for k in range(n_cat)])
    argmax_category = F.element_at(F.array(*[F.lit(c) for c in CATEGORIES[:n_cat]]),
                                   (F.array_position(lat, F.array_max(lat))).cast("int"))
    return df, argmax_category


def users_frame(spark, sc, seed: int):
    """One row per user: user_idx, latent t0..t{d-1}, and the USERS contract columns."""
    from pyspark.sql import functions as F

    d = sc.n_latent
    df, taste = _latent_frame(spark, sc, seed, sc.n_users, "user_idx", "t", "theta")
    a = uniform(seed, "activity", F.col("user_idx"))
    activity = F.when(a < 0.5, "low").when(a < 0.85, "mid").otherwise("high")
    return df.select(
        "user_idx", *[f"t{k}" for k in range(d)],
        F.concat(F.lit("u"), F.col("user_idx").cast("string")).alias("user_id"),
        F.array(F.concat(F.lit("taste:"), taste), F.concat(F.lit("activity:"), activity)).alias("attributes"),
        F.concat(F.lit("shopper who likes "), taste, F.lit(" items, "), activity, F.lit(" activity")).alias("text"),
        taste.alias("segment"),
    )


def items_frame(spark, sc, seed: int):
    """One row per item: item_idx, latent f0.., effect type and the ITEMS contract columns."""
    from pyspark.sql import functions as F

    d = sc.n_latent
    df, category = _latent_frame(spark, sc, seed, sc.n_items, "item_idx", "f", "phi")
    colour = F.element_at(F.array(*[F.lit(c) for c in COLOURS]),
                          (F.floor(uniform(seed, "colour", F.col("item_idx")) * len(COLOURS)) + 1).cast("int"))
    price = F.round(F.exp(F.lit(3.0) + F.lit(0.6) * normal(seed, "price", F.col("item_idx"))), 2)
    band = F.when(price < 15, "budget").when(price < 40, "mid-priced").otherwise("premium")
    ue = uniform(seed, "effect_type", F.col("item_idx"))
    cum = [sum(EFFECT_TYPE_SHARES[: j + 1]) for j in range(len(EFFECT_TYPES))]
    etype = F.when(ue < cum[0], EFFECT_TYPES[0]).when(ue < cum[1], EFFECT_TYPES[1]) \
        .when(ue < cum[2], EFFECT_TYPES[2]).otherwise(EFFECT_TYPES[3])
    df = df.withColumn("category", category).withColumn("colour", colour).withColumn("price", price) \
        .withColumn("band", band).withColumn("effect_type", etype)
    return df.select(
        "item_idx", *[f"f{k}" for k in range(d)], "effect_type",
        F.concat(F.lit("i"), F.col("item_idx").cast("string")).alias("item_id"),
        F.array(F.concat(F.lit("category:"), F.col("category")), F.concat(F.lit("colour:"), F.col("colour")),
                F.concat(F.lit("price:"), F.col("band"))).alias("attributes"),
        F.col("category"),
        F.concat(F.col("colour"), F.lit(" "), F.col("category"), F.lit(" item, "), F.col("band")).alias("text"),
        F.col("price"),
    )


# --------------------------------------------------------------------------- pairs and truth


def _outcome_columns(df, sc, seed: int, effect_scale):
    """Add true_preference-based p_y0, p_y1 (with ``effect_scale`` = c), y0, y1 and the raw effect g."""
    from pyspark.sql import functions as F

    s = F.col("true_preference")
    shift = F.when(F.col("effect_type") == "sure_thing", 2.0).when(F.col("effect_type") == "lost_cause", -1.0) \
        .otherwise(0.0)
    p0 = F.lit(0.9) * _sigmoid(F.lit(_logit(sc.base_purchase_rate)) + s + shift)
    df = df.withColumn("p_y0", p0)
    g = F.when(F.col("effect_type") == "persuadable", F.lit(0.5) * (F.lit(1.0) - F.col("p_y0")) * _sigmoid(s)) \
        .when(F.col("effect_type") == "sleeping_dog", F.lit(-0.5) * F.col("p_y0")).otherwise(F.lit(0.0))
    h = sc.effect_heterogeneity
    tau = F.lit((1 - h) * sc.ate) + F.lit(h) * F.lit(effect_scale) * F.col("g")
    uy = uniform(seed, "y", F.col("user_idx"), F.col("item_idx"))
    return (df.withColumn("g", g).withColumn("p_y1", F.col("p_y0") + tau)
            .withColumn("y0", (uy < F.col("p_y0")).cast("double"))
            .withColumn("y1", (uy < F.col("p_y1")).cast("double")))


def _treatment_propensity(sc, plan: Plan):
    from pyspark.sql import functions as F

    r = sc.recommend_rate
    s = F.col("true_preference")
    pol = sc.logging_policy
    if pol == "uniform":
        pi = F.lit(r)
    elif pol == "popularity":
        pi = F.lit(r) * F.col("q") / F.lit(plan.pop_mean)
    elif pol == "epsilon_greedy":
        pi = F.lit(sc.epsilon * r) + F.lit(1 - sc.epsilon) * (s > F.lit(plan.greedy_threshold)).cast("double")
    elif pol == "softmax":
        pi = _sigmoid((s - F.lit(plan.softmax_c)) / F.lit(sc.softmax_temperature))
    else:
        raise ValueError(f"simulator.logging_policy {pol!r}: expected uniform, popularity, epsilon_greedy or softmax")
    return F.least(F.lit(0.99), F.greatest(F.lit(0.01), pi))


def pair_truth(spark, sc, plan: Plan, users, items, effect_scale: float):
    """Candidate pairs with every ground-truth column (plus internal keys)."""
    from pyspark.sql import functions as F

    d = sc.n_latent
    parts = max(1, min(sc.partitions * 4, plan.n_pairs // 50_000 + 1))
    k = F.pmod(F.col("id") * F.lit(plan.perm_a) + F.lit(plan.perm_b), F.lit(plan.grid))
    pairs = spark.range(plan.n_pairs, numPartitions=parts).select(
        (k / F.lit(sc.n_items)).cast("long").alias("user_idx"), F.pmod(k, F.lit(sc.n_items)).alias("item_idx"))
    u = users.select("user_idx", "user_id", *[f"t{j}" for j in range(d)])
    it = items.select("item_idx", "item_id", "effect_type", *[f"f{j}" for j in range(d)])
    x = pairs.join(u, "user_idx").join(it, "item_idx")
    dot = sum((F.col(f"t{j}") * F.col(f"f{j}") for j in range(1, d)), F.col("t0") * F.col("f0"))
    x = x.withColumn("true_preference", dot / F.lit(math.sqrt(d)))
    x = x.withColumn("q", F.lit(1.0) / (F.col("item_idx") + 1).cast("double"))
    expo = (F.lit(sc.exposure_rate) * F.pow(F.col("q"), F.lit(sc.popularity_bias)) / F.lit(plan.pop_norm)
            * F.exp(F.lit(sc.selection_on_preference) * F.col("true_preference")) / F.lit(plan.pref_norm))
    x = x.withColumn("exposure_propensity", F.least(F.lit(1.0), expo))
    x = x.withColumn("treatment_propensity", _treatment_propensity(sc, plan))
    x = _outcome_columns(x, sc, plan.seed, effect_scale)
    return x.select("user_idx", "item_idx", "user_id", "item_id", "effect_type", "true_preference",
                    "exposure_propensity", "treatment_propensity", "g", "p_y0", "p_y1", "y0", "y1")


def effect_scale(truth) -> float:
    """mean(g) over the ground-truth pairs (one aggregation), the c = ATE / mean(g) denominator. Summed as
    decimals: a float sum rounds by partition layout, and the tables must not depend on parallelism."""
    from pyspark.sql import functions as F

    return float(truth.agg(F.avg(F.col("g").cast("decimal(38,18)")).alias("g")).collect()[0]["g"] or 0.0)


# --------------------------------------------------------------------------- events


def start_seconds(start_date: str) -> int:
    """``simulator.start_date`` as Unix seconds: a given UTC offset is honoured, a naive date/time is UTC
    (as ``data.earliest_time`` / ``latest_time`` are read)."""
    from causalrec.config import iso_utc

    return int(iso_utc(start_date, "simulator.start_date").timestamp())


def _events_from(x, sc, seed: int, *, slice_name: str, policy: str, exposure_propensity: float | None = None):
    """Explode treated/observed pairs into impression / click / purchase events.

    ``logged_propensity`` is the probability of the logged treatment action, or, where
    ``exposure_propensity`` is given (the MCAR slice), that known exposure probability.
    """
    from pyspark.sql import functions as F

    uk = (F.col("user_idx"), F.col("item_idx"))
    t = (uniform(seed, f"{slice_name}:t", *uk) < F.col("pi")).alias("treated")
    x = x.withColumn("treated", t)
    x = x.withColumn("Y", F.when(F.col("treated"), F.col("y1")).otherwise(F.col("y0")))
    x = x.withColumn("C", ((F.col("Y") > 0) | (uniform(seed, f"{slice_name}:c", *uk)
                                               < F.lit(0.05) * (F.lit(1.0) + F.col("treated").cast("double")))))
    start = start_seconds(sc.start_date)
    secs = F.floor(uniform(seed, f"{slice_name}:time", *uk) * F.lit(sc.n_days * 86400 - 120)).cast("long")
    x = x.withColumn("t0", F.lit(start) + secs)
    pos = (F.floor(uniform(seed, f"{slice_name}:pos", *uk) * sc.n_positions) + 1).cast("int")
    x = x.withColumn("position", F.when(F.col("treated"), pos))
    if exposure_propensity is None:
        x = x.withColumn("logged_propensity", F.when(F.col("treated"), F.col("pi")).otherwise(F.lit(1.0) - F.col("pi")))
    else:
        x = x.withColumn("logged_propensity", F.lit(float(exposure_propensity)))
    prefix = f"sim:{seed}:" + ("" if slice_name == "logged" else f"{slice_name}:")
    base = F.concat(F.lit(prefix), F.col("user_idx").cast("string"), F.lit(":"), F.col("item_idx").cast("string"))

    def ev(kind, offset, value):
        return F.struct(F.concat(base, F.lit(f":{kind}")).alias("event_id"), F.lit(kind).alias("event_type"),
                        (F.col("t0") + F.lit(offset)).alias("ts"), value.cast("double").alias("value"))

    arr = F.filter(F.array(
        ev("impression", 0, F.col("C").cast("double")),
        F.when(F.col("C"), ev("click", 5, F.lit(1.0))),
        F.when(F.col("Y") > 0, ev("purchase", 60, F.lit(1.0))),
    ), lambda e: e.isNotNull())
    x = x.withColumn("ev", F.explode(arr))
    return x.select(
        F.col("ev.event_id").alias("event_id"),
        F.col("user_id"), F.col("item_id"),
        F.timestamp_seconds(F.col("ev.ts")).alias("event_time"),
        F.col("ev.event_type").alias("event_type"),
        F.col("ev.value").alias("value"),
        F.col("position"),
        F.col("treated").alias("recommended"),
        F.col("logged_propensity"),
        F.lit(policy).alias("policy"),
        F.concat(F.lit("s"), F.col("user_idx").cast("string"), F.lit("-"),
                 F.floor(F.col("t0") / 86400).cast("string")).alias("session_id"),
        F.lit(None).cast("string").alias("context"),
    )


def mcar_exposure_propensity(sc) -> float:
    """P(an item is one of an MCAR user's random items) = min(mcar_items_per_user, n_items) / n_items."""
    return min(sc.mcar_items_per_user, sc.n_items) / sc.n_items


def _mcar_pairs(spark, sc, seed: int, users, items, c: float):
    from pyspark.sql import functions as F

    d = sc.n_latent
    m = min(sc.mcar_items_per_user, sc.n_items)
    stride = next(s for s in range(max(1, int(sc.n_items * 0.382)) | 1, 10 ** 9) if math.gcd(s, sc.n_items) == 1) \
        if sc.n_items > 1 else 1
    mu = users.where(uniform(seed, "mcar_user", F.col("user_idx")) < F.lit(sc.mcar_share))
    ks = spark.range(m).withColumnRenamed("id", "k")
    start = F.floor(uniform(seed, "mcar_start", F.col("user_idx")) * sc.n_items).cast("long")
    x = mu.crossJoin(F.broadcast(ks)).withColumn("item_idx", F.pmod(start + F.col("k") * F.lit(stride),
                                                                      F.lit(sc.n_items)))
    it = items.select("item_idx", "item_id", "effect_type", *[f"f{j}" for j in range(d)])
    x = x.join(it, "item_idx")
    dot = sum((F.col(f"t{j}") * F.col(f"f{j}") for j in range(1, d)), F.col("t0") * F.col("f0"))
    x = x.withColumn("true_preference", dot / F.lit(math.sqrt(d)))
    x = _outcome_columns(x, sc, seed, c)
    return x.withColumn("pi", F.lit(0.5))


@dataclass
class SimulatedWorld:
    plan: Plan
    effect_scale: float
    tables: dict


def simulate(spark, sim_cfg, seed: int) -> dict:
    """Generate ``events, users, items, mcar_events, ground_truth`` as Spark DataFrames.

    Runs two small driver-side aggregations (the expected events per pair on a 20k
    sample, and mean(g) over the candidate pairs for the ATE calibration); the tables
    themselves stay lazy and distributed.
    """
    return _world(spark, sim_cfg, seed).tables


def _world(spark, sc, seed: int) -> SimulatedWorld:
    from pyspark.sql import functions as F

    from causalrec.schemas import GROUND_TRUTH, ITEMS, USERS

    plan = make_plan(spark, sc, seed)
    users, items = users_frame(spark, sc, seed), items_frame(spark, sc, seed)
    mean_g = effect_scale(pair_truth(spark, sc, plan, users, items, effect_scale=0.0))
    if sc.effect_heterogeneity > 0 and sc.ate > 0:
        if mean_g <= 0:
            raise ValueError("simulator: the effect types give no positive mean effect; cannot reach simulator.ate")
        c = sc.ate / mean_g
        if c > 1:
            raise ValueError(f"simulator.ate={sc.ate} needs effect scale {c:.2f} > 1; lower ate or effect_heterogeneity")
    else:
        c = 0.0
    truth = pair_truth(spark, sc, plan, users, items, effect_scale=c)
    logged = truth.where(uniform(seed, "observed", F.col("user_idx"), F.col("item_idx"))
                         < F.col("exposure_propensity")).withColumn("pi", F.col("treatment_propensity"))
    events = _events_from(logged, sc, seed, slice_name="logged", policy=sc.logging_policy)
    # as in Coat's MCAR table: logged_propensity is the random design's exposure probability, which is
    # what the training set weighs MCAR rows by (their treatment coin is a known 0.5)
    mcar = _events_from(_mcar_pairs(spark, sc, seed, users, items, c), sc, seed, slice_name="mcar",
                        policy="uniform_random", exposure_propensity=mcar_exposure_propensity(sc))
    tables = {
        "events": events,
        "users": users.select(*USERS.names),
        "items": items.select(*ITEMS.names),
        "mcar_events": mcar,
        "ground_truth": truth.select(*GROUND_TRUTH.names),
    }
    return SimulatedWorld(plan=plan, effect_scale=c, tables=tables)


def simulated_data(spark, sim_cfg, seed: int):
    """The simulator's tables as a :class:`causalrec.loaders.LoadedData` for the ingest job."""
    from causalrec.loaders import LoadedData

    t = simulate(spark, sim_cfg, seed)
    return LoadedData(name="simulator", events=t["events"], users=t["users"], items=t["items"],
                      mcar_events=t["mcar_events"], ground_truth=t["ground_truth"],
                      sources={k: f"simulator(seed={seed})" for k in t},
                      expected={"users": sim_cfg.n_users, "items": sim_cfg.n_items})


def run(ctx) -> dict:
    """The ``simulate`` stage: generate the world and write it through the validated ingest path."""
    from causalrec.ingest.job import print_summary, write_loaded

    cfg = ctx.cfg
    with ctx.step("simulate"):
        data = simulated_data(ctx.spark, cfg.simulator, cfg.project.seed)
    summary = write_loaded(ctx, data, source="simulator")
    summary["timings_s"] = dict(ctx.timings)
    print_summary(summary)
    return summary
