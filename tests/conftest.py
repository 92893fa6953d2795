"""Shared fixtures: one local SparkSession per test session, a fresh Delta root per test, local Ray.

Real data lives beside the repository in ../shared/data (read-only); set
CAUSALREC_DATA to point elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CAUSALREC_DATA", REPO.parent / "shared" / "data"))


def data_dir(name: str) -> Path:
    p = DATA / name
    if not p.exists():
        pytest.fail(f"real data folder {p} is missing: clone with shared/ beside the repo or set CAUSALREC_DATA")
    return p


@pytest.fixture(scope="session")
def spark():
    from causalrec.config import Config
    from causalrec.sessions import get_spark

    cfg = Config()
    cfg.spark.driver_memory = "4g"  # the whole suite shares this session (cached tables, MLlib fits; 3g ran dry once under load)
    cfg.spark.shuffle_partitions = 4
    cfg.spark.conf = {"spark.ui.showConsoleProgress": "false", "spark.default.parallelism": "4"}
    s = get_spark(cfg)
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


@pytest.fixture
def store(spark, tmp_path):
    from causalrec.storage import DeltaStore

    return DeltaStore(spark, str(tmp_path / "tables"))


@pytest.fixture
def cfg(tmp_path):
    """A default Config whose tables live in a fresh folder."""
    from causalrec.config import Config

    c = Config()
    c.storage.root = str(tmp_path / "tables")
    c.spark.driver_memory = "2g"
    c.spark.shuffle_partitions = 4
    c.ray.num_cpus = 2
    c.data.path = str(DATA / "coat")
    return c


@pytest.fixture
def ctx(cfg, spark):
    from causalrec.context import Context

    return Context(cfg=cfg, _spark=spark)


@pytest.fixture(scope="session")
def ray_local(spark):
    """A local Ray for the session, started after Spark's JVM (hence the ``spark`` argument).

    Starting the JVM in a process that already holds a Ray driver connection breaks that
    connection (the next GCS call hangs, seen after a Ray Train run; the pipeline shuts Ray
    down after each stage for the same reason). Depending on ``spark`` keeps every test order
    safe, not only the default one.
    """
    from causalrec.config import Config
    from causalrec.sessions import init_ray

    c = Config()
    c.ray.num_cpus = 2
    ray = init_ray(c)
    yield ray
    ray.shutdown()


@pytest.fixture
def few_partitions(spark):
    """Two shuffle partitions for the test: Coat-sized joins need no more, and each costs a task."""
    old = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "2")
    yield
    spark.conf.set("spark.sql.shuffle.partitions", old)
