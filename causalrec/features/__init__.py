"""Point-in-time feature transforms (user, item, user-item pair) and the features stage.

Every transform takes the events DataFrame and a ``cutoff`` and uses only events
strictly before it, so a feature row paired with a label at time t >= cutoff can
never have seen that label (no leakage). The transforms are pure
DataFrame -> DataFrame functions; :mod:`causalrec.features.job` does the I/O.
"""
from causalrec.features.common import events_before, resolve_cutoff
from causalrec.features.item import item_features
from causalrec.features.pair import item_cooccurrence, pair_features
from causalrec.features.user import user_attribute_counts, user_features

__all__ = [
    "events_before",
    "resolve_cutoff",
    "user_features",
    "user_attribute_counts",
    "item_features",
    "item_cooccurrence",
    "pair_features",
]
