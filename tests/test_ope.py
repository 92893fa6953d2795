"""OPE stage on OBD-shaped and Coat-shaped events written through the store."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest

from causalrec.schemas import EVENTS, OPE_RESULTS


def _events(spark, rows):
    pdf = pd.DataFrame(rows)
    pdf["event_time"] = pd.Timestamp("2024-01-01", tz="UTC")
    pdf["event_date"] = dt.date(2024, 1, 1)
    pdf["ingest_batch"] = "t"
    from causalrec.schemas import conform

    return conform(spark.createDataFrame(pdf), EVENTS)


def obd_like(n=900, n_items=6, seed=0):
    rng = np.random.default_rng(seed)
    ctr = np.linspace(0.05, 0.4, n_items)
    item = rng.integers(0, n_items, n)
    pos = rng.integers(1, 4, n)
    click = rng.binomial(1, ctr[item] / pos)
    return [dict(event_id=f"e{i}", user_id=f"u{i}", item_id=f"i{item[i]}", event_type="impression",
                 value=float(click[i]), position=int(pos[i]), logged_propensity=1.0 / n_items, policy="random",
                 context=json.dumps({"campaign": "all"})) for i in range(n)], ctr


def test_ope_job_on_uniformly_logged_impressions(ctx, spark):
    rows, ctr = obd_like()
    ctx.store.write(_events(spark, rows), "events", spec=EVENTS)
    ctx.cfg.ope.strategies = ["random", "popular", "recommendations"]
    ctx.cfg.ope.bootstrap_replicates = 8
    from causalrec.ope.job import run

    summary = run(ctx)
    assert summary["mode"] == "logged_propensity" and summary["rows_in"] == 900
    assert summary["skipped"] == {"recommendations": "no recommendations table"}
    res = ctx.store.read("ope_results").toPandas()
    assert set(res.columns) == set(OPE_RESULTS.names)
    assert len(res) == 2 * 2 * 8  # 2 policies x 8 estimators x (analytic, bootstrap)
    a = res[res.interval_method == "analytic"].set_index(["policy", "estimator"])
    mean_click = np.mean([r["value"] for r in rows])
    # logging is uniform -> every weight of the random policy is 1: IPS = SNIPS = mean reward, ESS = n
    assert a.loc[("random", "ips"), "estimate"] == pytest.approx(mean_click)
    assert a.loc[("random", "snips"), "estimate"] == pytest.approx(mean_click)
    assert a.loc[("random", "ips"), "ess"] == pytest.approx(900)
    # the popular policy always shows the best item (per slot): its value is higher, and the paired
    # difference to the random baseline is positive with an interval
    assert a.loc[("popular", "ips"), "diff_to_baseline"] > 0
    assert a.loc[("popular", "dr"), "diff_ci_low"] < a.loc[("popular", "dr"), "diff_to_baseline"] < \
        a.loc[("popular", "dr"), "diff_ci_high"]
    assert a.loc[("popular", "ips"), "max_weight"] == pytest.approx(6.0)
    # rerun overwrites: no duplicates
    run(ctx)
    assert ctx.store.read("ope_results").count() == 32


def test_ope_job_on_ratings_uses_exposure_propensities(ctx, spark):
    rng = np.random.default_rng(1)
    rows, ep = [], []
    for u in range(30):
        for i in range(10):
            p = 0.2 + 0.06 * i
            ep.append(dict(user_id=f"u{u}", item_id=f"i{i}", exposure_propensity=p))
            if rng.uniform() < p:
                rows.append(dict(event_id=f"r{u}_{i}", user_id=f"u{u}", item_id=f"i{i}", event_type="rating",
                                 value=float(rng.integers(1, 6))))
    ctx.store.write(_events(spark, rows), "events", spec=EVENTS)
    ctx.store.write(spark.createDataFrame(pd.DataFrame(ep)), "exposure_propensity")
    recs = pd.DataFrame([dict(user_id=f"u{u}", item_id=f"i{k}", rank=k + 1) for u in range(30) for k in range(2)])
    ctx.store.write(spark.createDataFrame(recs), "recommendations")
    ctx.cfg.ope.strategies = ["random", "recommendations"]
    ctx.cfg.ope.estimators = ["ips", "snips", "dr"]
    ctx.cfg.ope.bootstrap_replicates = 0
    from causalrec.ope.job import run

    s = run(ctx)
    assert s["mode"] == "exposure" and s["policies"] == ["random", "recommendations"]
    res = ctx.store.read("ope_results").toPandas().set_index(["policy", "estimator"])
    assert len(res) == 6 and (res.interval_method == "analytic").all()
    # pscore = p_ui / sum_j p_uj; a random policy's weight is (1/10) / pscore -> known max weight
    assert res.loc[("random", "ips"), "max_weight"] == pytest.approx((1 / 10) / (0.2 / sum(0.2 + 0.06 * i for i in range(10))))
    for _, r in res.iterrows():
        assert r.ci_low <= r.estimate <= r.ci_high and 0 <= r.estimate <= 1.5
