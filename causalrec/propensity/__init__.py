"""Exposure and treatment propensities, with calibration and overlap diagnostics.

* exposure: P(pair observed | user, item) for missing-not-at-random feedback
  (:mod:`causalrec.propensity.exposure`), several estimators behind one interface;
* treatment: P(recommended | user, item, context) (:mod:`causalrec.propensity.treatment`),
  logged when the data has it, else estimated;
* :mod:`causalrec.propensity.diagnostics`: reliability/ECE, clip share, ESS, overlap, truth.
"""
from causalrec.propensity.exposure import (
    ESTIMATORS,
    ExposureEstimator,
    LogisticExposure,
    NaiveBayesExposure,
    PopularityExposure,
    make_exposure_estimator,
)

__all__ = ["ESTIMATORS", "ExposureEstimator", "LogisticExposure", "NaiveBayesExposure", "PopularityExposure",
           "make_exposure_estimator"]
