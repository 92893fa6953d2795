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
    """[(title, cosine similarity)] of the history items closest to the item, best first."""
    if item_vec is None or history_vecs is None or len(history_titles) == 0:
        return []
    sims = history_vecs @ item_vec / (np.linalg.norm(history_vecs, axis=1) * np.linalg.norm(item_vec) + 1e-12)
    order = np.argsort(-sims)[:top]
    return [(history_titles[i], float(sims[i])) for i in order if sims[i] >= min_similarity]


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating)) and math.isfinite(float(x))


def _short(title: str, n: int = 60) -> str:
    t = " ".join(str(title).split())
    return t if len(t) <= n else t[: n - 1].rstrip() + "…"


def _amount(x: float, probability: bool) -> str:
    return f"{abs(x) * 100:.1f} percentage points" if probability else f"{abs(x):.2f} rating points"


def _signed(x: float, probability: bool) -> str:
    return f"{x * 100:+.1f}" if probability else f"{x:+.2f}"


def _interval_text(interval: tuple[float, float], probability: bool, alpha: float) -> str:
    lo, hi = interval
    s = f" ({ci_level(alpha)} interval {_signed(lo, probability)} to {_signed(hi, probability)}"
    return s + (", so the lift may be zero)" if lo <= 0 <= hi else ")")


def explain(*, policy: str, rank: int, relevance: Optional[float], uplift: Optional[float],
            interval: Optional[tuple[float, float]], similar: Sequence[tuple[str, float]],
            boosted: bool, group: Optional[str] = None, attribute: str = "popularity_group",
            probability: bool = True, item_effect: Optional[tuple[float, float, float]] = None,
            alpha: float = 0.05, uplift_probability: Optional[bool] = None) -> str:
    """One recommendation's explanation; every clause carries the number it rests on.

    ``interval`` belongs to ``uplift``; ``item_effect`` = (effect, ci_low, ci_high) is the item's
    average effect over logged users, stated as its own clause. Both intervals are ``1 - alpha``
    intervals (uplift_effects: ``ope.alpha``; ``interval``: :func:`lift_interval` at that alpha).
    Units: ``probability`` is the relevance's (the model task's: a click probability or a rating);
    ``uplift_probability`` the lift's (default: the relevance's; the uplift_effects prior is a change
    in outcome probability whatever the model), and ``item_effect``, from uplift_effects, is always
    a change in outcome probability.
    """
    parts = []
    up_prob = probability if uplift_probability is None else uplift_probability
    if _finite(uplift):
        verb = "raise" if uplift > 0 else ("lower" if uplift < 0 else "not change")
        what = "the chance you respond" if up_prob else "your rating"
        s = f"Recommending this is estimated to {verb} {what}"
        if uplift != 0:
            s += f" by {_amount(uplift, up_prob)}"
        if interval is not None:
            s += _interval_text(interval, up_prob, alpha)
        parts.append(s + ".")
    elif item_effect is None:
        parts.append("No estimate of the effect of recommending this is available.")
    if item_effect is not None:
        eff, lo, hi = item_effect
        parts.append(f"Averaged over the users it was logged for, the item's effect of being recommended is "
                     f"estimated at {_signed(eff, True)} percentage points{_interval_text((lo, hi), True, alpha)}.")
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
