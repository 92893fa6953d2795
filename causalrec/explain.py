"""Plain-language explanations built from the numbers behind each recommendation.

Three facts, each from a real quantity and stated with it:

* the estimated lift from recommending (``uplift``), with its ``1 - alpha`` interval when it has a
  standard error (``uplift_se``); without one, the item's average effect from ``uplift_effects``
  may be quoted beside it, as that, with its own point estimate and interval (an interval is
  never attached to a number it was not computed for, nor labelled with a level it was not
  computed at: ``alpha`` is the caller's ``ope.alpha``, the level uplift_effects are computed at);
* the history items most responsible: cosine similarity of the item's text embedding
  to each of the user's recent items, naming the top one or two by title;
* whether fairness re-ranking boosted it, and for which group.

Nothing is said that the numbers do not support: no interval without one, no
"because you liked" without a history item above ``min_similarity``.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional, Sequence

import numpy as np


def ci_level(alpha: float) -> str:
    """The level of a ``1 - alpha`` interval as printed in every label: 0.05 -> "95%", 0.1 -> "90%"."""
    return f"{100 * (1 - alpha):g}%"


def lift_interval(uplift: Optional[float], se: Optional[float] = None,
                  alpha: float = 0.05) -> Optional[tuple[float, float]]:
    """``1 - alpha`` normal interval of ``uplift`` from its own standard error; None without one (a
    per-item interval belongs to the item's average effect, not to a model's per-pair uplift)."""
    if uplift is None or not _finite(uplift):
        return None
    if _finite(se) and se > 0:
        z = NormalDist().inv_cdf(1 - alpha / 2)
        return (uplift - z * se, uplift + z * se)
    return None


def most_similar_history(item_vec: Optional[np.ndarray], history_vecs: Optional[np.ndarray],
                         history_titles: Sequence[str], top: int = 2, min_similarity: float = 0.3):
    """[(title, cosine similarity)] of the history items closest to the item, best first, one per title:
    two history items with the same title (Coat's "women's jacket, other colour") would read as one
    item named twice, so the next closest title is named instead."""
    if item_vec is None or history_vecs is None or len(history_titles) == 0:
        return []
    sims = history_vecs @ item_vec / (np.linalg.norm(history_vecs, axis=1) * np.linalg.norm(item_vec) + 1e-12)
    out: list = []
    for i in np.argsort(-sims, kind="stable"):
        if len(out) == top or sims[i] < min_similarity:
            break
        if all(_short(t) != _short(history_titles[i]) for t, _ in out):
            out.append((history_titles[i], float(sims[i])))
    return out


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating)) and math.isfinite(float(x))


def _short(title: str, n: int = 60) -> str:
    t = " ".join(str(title).split())
    return t if len(t) <= n else t[: n - 1].rstrip() + "…"


# What a number is a change in: a probability (a click model, or an effect on a 0/1 outcome, stated in
# percentage points), a rating (rating points) or an outcome's value (uplift_effects of an outcome that
# sums event values, e.g. revenue: stated as a number in that value's own unit).
PROBABILITY, RATING, VALUE = "probability", "rating", "value"
_SCALE = {PROBABILITY: (100.0, 1, " percentage points"), RATING: (1.0, 2, " rating points"), VALUE: (1.0, 2, "")}


def _amount(x: float, unit: str) -> str:
    """``|x|`` in ``unit``; a nonzero amount that rounds to zero is "less than" the last digit shown,
    never "0.0" beside a verb that says it moves."""
    factor, digits, name = _SCALE[unit]
    text = f"{abs(x) * factor:.{digits}f}"
    if x != 0 and float(text) == 0:
        return f"less than {10.0 ** -digits:.{digits}f}{name}"
    return text + name


def _signed(x: float, unit: str) -> str:
    factor, digits, _ = _SCALE[unit]
    return f"{x * factor:+.{digits}f}"


def _interval_text(interval: tuple[float, float], unit: str, alpha: float) -> str:
    lo, hi = interval
    s = f" ({ci_level(alpha)} interval {_signed(lo, unit)} to {_signed(hi, unit)}"
    return s + (", so the lift may be zero)" if lo <= 0 <= hi else ")")


def _what_moves(unit: str, outcome: Optional[str]) -> str:
    if unit == PROBABILITY:
        return "the chance you respond"
    return "your rating" if unit == RATING else f"the expected value of your {outcome or 'outcome'} events"


def explain(*, policy: str, rank: int, relevance: Optional[float], uplift: Optional[float],
            interval: Optional[tuple[float, float]], similar: Sequence[tuple[str, float]],
            boosted: bool, group: Optional[str] = None, attribute: str = "popularity_group",
            probability: bool = True, item_effect: Optional[tuple[float, float, float]] = None,
            alpha: float = 0.05, uplift_unit: Optional[str] = None, effect_unit: str = PROBABILITY,
            outcome: Optional[str] = None) -> str:
    """One recommendation's explanation; every clause carries the number it rests on.

    ``interval`` belongs to ``uplift``; ``item_effect`` = (effect, ci_low, ci_high) is the item's
    average effect over logged users, stated as its own clause. Both intervals are ``1 - alpha``
    intervals (uplift_effects: ``ope.alpha``; ``interval``: :func:`lift_interval` at that alpha).
    Units: ``probability`` is the relevance's (the model task's: a click probability or a rating);
    ``uplift_unit`` the lift's (:data:`PROBABILITY`, :data:`RATING` or :data:`VALUE`; default: the
    relevance's), ``effect_unit`` that of ``item_effect``, from uplift_effects: a probability change
    when its outcome is 0/1, else a change in the summed value of ``outcome`` events.
    """
    parts = []
    up_unit = uplift_unit or (PROBABILITY if probability else RATING)
    if _finite(uplift):
        verb = "raise" if uplift > 0 else ("lower" if uplift < 0 else "not change")
        s = f"Recommending this is estimated to {verb} {_what_moves(up_unit, outcome)}"
        if uplift != 0:
            s += f" by {_amount(uplift, up_unit)}"
        if interval is not None:
            s += _interval_text(interval, up_unit, alpha)
        parts.append(s + ".")
    elif item_effect is None:
        parts.append("No estimate of the effect of recommending this is available.")
    if item_effect is not None:
        eff, lo, hi = item_effect
        on = "" if effect_unit == PROBABILITY else f" on the value of {outcome or 'outcome'} events"
        parts.append(f"Averaged over the users it was logged for, the item's effect of being recommended{on} is "
                     f"estimated at {_signed(eff, effect_unit)}{_SCALE[effect_unit][2]}"
                     f"{_interval_text((lo, hi), effect_unit, alpha)}.")
    if similar:
        names = " and ".join(f"'{_short(t)}' (similarity {s:.2f})" for t, s in similar)
        parts.append(f"It is most similar to {names} from your recent history.")
    if _finite(relevance):
        rel = f"{relevance * 100:.1f}%" if probability else f"{relevance:.2f}"
        parts.append(f"Predicted {'response probability' if probability else 'rating'} {rel}; "
                     f"rank {rank} under the {policy} policy.")
    if boosted:
        g = f" ({attribute} = {group})" if group is not None else ""
        parts.append(f"It was moved into your top list by exposure-fairness re-ranking{g}.")
    return " ".join(parts)
