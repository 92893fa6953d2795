"""Evaluation: unbiased, causal, fairness and ranking metrics (:mod:`.metrics`) and the
``evaluate`` stage (:mod:`.job`) that writes them to the ``metrics`` table."""
from causalrec.evaluation.metrics import (  # noqa: F401
    MetricValue,
    auc,
    calibration,
    catalog_coverage,
    causal_metrics,
    causal_metrics_by_user,
    exposure_by_group,
    gini,
    histogram,
    ips_effect_estimates,
    item_exposure,
    lorenz_curve,
    qini_curve,
    ranking_metrics,
    ranking_metrics_by_user,
    rating_metrics,
    user_group_gap,
)
