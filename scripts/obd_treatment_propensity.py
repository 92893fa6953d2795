"""OBD: estimated treatment propensities (slot choice model) against the logged ones.

Loads the Open Bandit Dataset small sample (both policies x three campaigns, 60,000 rows),
fits the choice model of :mod:`causalrec.propensity.choice` with the logged propensities
hidden from it, and compares on the held-out rows it never saw: per log, log-correlation,
median relative error and mean against the logging policy's own propensities, and the
uniform-policy weight mean 1/(K p) (1 in expectation for correct propensities) next to the
same mean computed from the logged propensities. Writes
bench_results/obd_treatment_propensity.json.

    .venv/bin/python scripts/obd_treatment_propensity.py [--data ../shared/data/obd]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "obd"))
    ap.add_argument("--config", default=str(REPO / "conf" / "obd.yaml"))
    ap.add_argument("--out", default=str(REPO / "bench_results" / "obd_treatment_propensity.json"))
    args = ap.parse_args(argv)

    from pyspark.sql import functions as F

    from causalrec.config import load_config
    from causalrec.loaders.obd import N_ITEMS, load_obd
    from causalrec.propensity.job import _hash_fraction, treatment_propensities
    from causalrec.sessions import get_spark

    cfg = load_config(args.config)
    cfg.propensity.treatment_method = "choice"
    spark = get_spark(cfg)
    events = load_obd(spark, args.data).events.cache()
    campaign = F.get_json_object("context", "$.campaign")
    t0 = time.time()
    hidden = events.withColumn("logged_propensity", F.lit(None).cast("double"))
    t, rows = treatment_propensities(hidden, None, None, cfg)
    t = t.cache()
    n = t.count()
    seconds = time.time() - t0
    held = _hash_fraction([F.col("event_id")], "treatment-holdout") < cfg.propensity.holdout_fraction
    per = (t.join(events.select("event_id", "policy", "logged_propensity", campaign.alias("campaign")), "event_id")
           .where(held).groupBy("policy", "campaign")
           .agg(F.count(F.lit(1)).alias("n_heldout"),
                F.corr(F.log("treatment_propensity"), F.log("logged_propensity")).alias("corr_log_vs_logged"),
                F.expr("percentile_approx(abs(treatment_propensity / logged_propensity - 1), 0.5)")
                .alias("median_rel_err_vs_logged"),
                F.avg("treatment_propensity").alias("mean_estimated"), F.avg("logged_propensity").alias("mean_logged"))
           .orderBy("policy", "campaign").collect())
    logged_w = {f"{r['policy']}|{r['campaign']}": r["w"] / N_ITEMS[r["campaign"]] for r in
                events.where(held).groupBy("policy", campaign.alias("campaign"))
                .agg(F.avg(1.0 / F.col("logged_propensity")).alias("w")).collect()}
    metrics = {r["metric"]: r["value"] for r in rows if r["metric"] != "reliability"}
    logs = []
    for r in per:
        g = f"{r['policy']}|{r['campaign']}"
        logs.append({**r.asDict(), "uniform_weight_mean_estimated": metrics.get(f"uniform_weight_mean:{g}"),
                     "uniform_weight_mean_logged": logged_w.get(g), "reg_param": metrics.get(f"reg_param:{g}")})
    out = {"rows": n, "seconds": round(seconds, 1), "heldout_ece_over_candidate_pairs": metrics["ece"],
           "heldout_ece_relative": metrics["ece_relative"], "share_at_clip": metrics["share_at_clip"],
           "time_buckets": cfg.propensity.choice_time_buckets, "logs": logs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float) + "\n")
    print("| log | corr(log p) vs logged | median rel. error | mean est. / logged | 1/(Kp) est. / logged |")
    print("|---|---|---|---|---|")
    for r in logs:
        c = "-" if r["corr_log_vs_logged"] is None else f"{r['corr_log_vs_logged']:.3f}"
        print(f"| {r['policy']} {r['campaign']} | {c} | {r['median_rel_err_vs_logged']:.3f} | "
              f"{r['mean_estimated']:.4f} / {r['mean_logged']:.4f} | "
              f"{r['uniform_weight_mean_estimated']:.3f} / {r['uniform_weight_mean_logged']:.3f} |")
    print(f"held-out ECE over (row, candidate) pairs {metrics['ece']:.5f} ({metrics['ece_relative']:.1%} of the mean "
          f"choice probability); {n} rows in {seconds:.0f} s")
    return out


if __name__ == "__main__":
    main()
