"""One factory for the SparkSession and one for Ray.

Spark: when the job was started by ``spark-submit`` (or the platform), the master
and every config it set win; we only fill in what is unset, and what a running session
cannot take (static configs such as ``spark.sql.extensions``) is logged with the --conf
flags to pass (:func:`fill_conf_gaps`). Locally we default to
``local[*]`` with loopback networking and the running interpreter for the Python
workers, so the Delta data source is importable by them.

Ray: local by default with fractional CPUs available (a 2-core laptop must still
fit Ray Data readers next to Train workers); ``RAY_ADDRESS`` or ``ray.address``
joins a cluster. Ray's temp files go under the system temp folder, never $HOME.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from causalrec.config import Config

log = logging.getLogger(__name__)


LOCAL_PAGE_SIZE = "4m"  # spark.buffer.pageSize of a local session (cfg.spark.conf overrides it)


def _launched_by_spark_submit() -> bool:
    # spark-submit's PythonRunner hands the driver its JVM through this variable. (SPARK_SUBMIT_OPTS is
    # an input users export for spark-submit's JVM, not a sign that spark-submit started this process.)
    return os.environ.get("PYSPARK_GATEWAY_PORT") is not None


def get_spark(cfg: Config | None = None):
    """Return the active SparkSession, or build a local one from ``cfg.spark``."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    cfg = cfg or Config()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    submitted = _launched_by_spark_submit()
    if not submitted:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder
    if not submitted:  # under spark-submit its --name (or the script's name) stands, like its --master
        builder = builder.appName(cfg.spark.app_name).master(cfg.spark.master)
        builder = builder.config("spark.driver.memory", cfg.spark.driver_memory)
        builder = builder.config("spark.driver.bindAddress", "127.0.0.1")
        builder = builder.config("spark.driver.host", "127.0.0.1")
        builder = builder.config("spark.ui.enabled", str(cfg.spark.ui_enabled).lower())
        # stage bars interleave with causalrec's own per-step progress and timings in job logs
        builder = builder.config("spark.ui.showConsoleProgress", "false")
        builder = builder.config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        builder = builder.config("spark.sql.session.timeZone", "UTC")
        builder = builder.config("spark.sql.execution.arrow.pyspark.enabled", "true")
        builder = builder.config("spark.python.worker.reuse", "true")
        builder = builder.config("spark.sql.ansi.enabled", "false")
        # Tungsten's default page is up to 64 MB, and each sort, hash aggregate and window of a task
        # holds at least one page while the task runs. training_set's plans chain dozens of them
        # in one task (sort-merge joins on user_id need no shuffle between them), so a 4 GB local
        # driver ran out of execution memory on a few hundred rows. Small pages cost nothing here.
        builder = builder.config("spark.buffer.pageSize", LOCAL_PAGE_SIZE)
        for key, value in cfg.spark.conf.items():
            builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    if submitted:
        fill_conf_gaps(spark, cfg)
        tz = spark.conf.get("spark.sql.session.timeZone")  # without a default: the effective value
        if tz != "UTC":  # the submitter chose it
            log.info("spark.sql.session.timeZone is %s (causalrec stores UTC timestamps)", tz)
    spark.sparkContext.setLogLevel("WARN")
    _quiet_item_scale_window_warning(spark)
    return spark


_EXTENSIONS = "spark.sql.extensions"
_SESSION_CATALOG = "spark.sql.catalog.spark_catalog"


def _cannot_modify(exc: Exception) -> bool:
    """Spark refused a runtime set: a static SQL config or a core config (CANNOT_MODIFY_[STATIC_]CONFIG)."""
    cond = getattr(exc, "getCondition", None) or getattr(exc, "getErrorClass", None)
    try:
        cond = cond() if cond else None
    except Exception:  # noqa: BLE001 - fall back to the message
        cond = None
    return str(cond or "").startswith("CANNOT_MODIFY") or "CANNOT_MODIFY" in str(exc)


def fill_conf_gaps(spark, cfg: Config) -> list:
    """Under spark-submit: set each ``cfg.spark.conf`` key the submitter left unset, and
    ``spark.sql.shuffle.partitions`` from ``spark.shuffle_partitions``; returns the keys not set.
    Also, where unset, the two SQL settings every local run and test uses: ANSI mode off (Spark 4
    turns it on, and the stages are written and tested without it) and the UTC session time zone
    (causalrec stores UTC timestamps, and partition values are written in UTC).

    Never overrides what spark-submit or the platform set. Static and core configs (e.g.
    ``spark.sql.extensions``) are fixed when the session starts, so they are logged with the
    --conf flags to pass instead of failing the job. ``spark.sql.catalog.spark_catalog`` is left
    alone while the session lacks the extensions the config pairs it with: Delta's catalog
    needs Delta's extension, and a catalog class that is not on the classpath would fail every query.
    A configured ``spark.driver_memory`` the submitter did not pass is logged with its flag too.
    """
    conf = spark.conf
    wanted = {"spark.sql.shuffle.partitions": cfg.spark.shuffle_partitions, "spark.sql.ansi.enabled": "false",
              "spark.sql.session.timeZone": "UTC", **cfg.spark.conf}
    gaps = {k: str(v) for k, v in wanted.items() if conf.get(k, None) is None}
    wanted_ext = [e.strip() for e in str(cfg.spark.conf.get(_EXTENSIONS, "")).split(",") if e.strip()]
    have_ext = {e.strip() for e in str(conf.get(_EXTENSIONS, None) or "").split(",")}
    ext_missing = [e for e in wanted_ext if e not in have_ext]
    not_set = []
    for key, value in gaps.items():
        if key == _SESSION_CATALOG and ext_missing:
            not_set.append(key)
            continue
        try:
            conf.set(key, value)
        except Exception as exc:  # noqa: BLE001 - only Spark's "cannot modify" refusals are expected
            if not _cannot_modify(exc):
                raise
            not_set.append(key)
    memory = conf.get("spark.driver.memory", None)
    if memory is None and cfg.spark.driver_memory != type(cfg.spark)().driver_memory:
        log.warning("spark.driver_memory %s is not applied: spark-submit started the driver's JVM without "
                    "--driver-memory (Spark's default then applies); pass --driver-memory %s",
                    cfg.spark.driver_memory, cfg.spark.driver_memory)
    if not_set:
        flags = " ".join(f"--conf {k}={gaps[k]}" for k in not_set)
        msg = (f"spark.conf: {', '.join(not_set)} can only be set when the Spark session starts, and spark-submit "
               f"started it without them; pass them to spark-submit: {flags}")
        if any("delta" in gaps[k].lower() for k in not_set):
            msg += "; " + _delta_consequence(spark, cfg)
        log.warning(msg)
    return not_set


def _delta_consequence(spark, cfg: Config) -> str:
    """What the Delta layer does without Delta's SQL extension and catalog (DeltaStore's backend choice)."""
    from causalrec.storage.store import detect_backend

    if detect_backend(spark, cfg.storage.backend) == "delta-rs":
        if cfg.storage.backend == "delta-rs":
            return "storage.backend is delta-rs, which needs neither: the Delta tables are unaffected"
        return ("delta-spark is not on Spark's classpath, so causalrec reads and writes the Delta tables through "
                "delta-rs, which needs neither (to use delta-spark, also pass --packages "
                "io.delta:delta-spark_2.13:<version>)")
    return ("delta-spark is on Spark's classpath and storage.backend selects it, but delta-spark needs its "
            "extension and catalog: Delta operations can fail with 'This Delta operation requires the SparkSession "
            "to be configured with the DeltaSparkSessionExtension and the DeltaCatalog' (or set "
            "storage.backend: delta-rs)")


def _quiet_item_scale_window_warning(spark) -> None:
    """Silence WindowExec's "No Partition Defined" warning, which fires once per query.

    causalrec's unpartitioned windows rank *items* (popularity groups, dense item positions),
    a dimension table, never events; event-scale code uses range-partitioned prefix sums
    (causalrec.evaluation.metrics). A failure here only leaves the warning on.
    """
    try:
        jvm = spark.sparkContext._jvm
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(
            "org.apache.spark.sql.execution.window.WindowExec", jvm.org.apache.logging.log4j.Level.ERROR)
    except Exception as exc:  # noqa: BLE001 - logging configuration is best effort
        log.debug("could not quiet WindowExec warnings: %s", exc)


def ray_temp_dir(cfg: Config | None = None) -> str:
    if cfg is not None and cfg.ray.temp_dir:
        return cfg.ray.temp_dir
    return str(Path(tempfile.gettempdir()) / "causalrec-ray")


def init_ray(cfg: Config | None = None):
    """Connect to Ray (cluster via ``RAY_ADDRESS``/``ray.address``) or start a local instance."""
    import ray

    if ray.is_initialized():
        return ray
    cfg = cfg or Config()
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    # Keep Ray's session and token files out of $HOME.
    os.environ.setdefault("RAY_TMPDIR", ray_temp_dir(cfg))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": True}
    if not address and "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        # Ray's token auth would save its token under ~/.ray; keep it with the temp files.
        token_path = Path(ray_temp_dir(cfg)) / "auth_token"
        token_path.parent.mkdir(parents=True, exist_ok=True)
        if not token_path.exists():
            import secrets

            token_path.write_text(secrets.token_hex(32))
            token_path.chmod(0o600)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    if address:
        log.info("ray: connecting to cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        Path(ray_temp_dir(cfg)).mkdir(parents=True, exist_ok=True)
        num_cpus = cfg.ray.num_cpus or max(2, os.cpu_count() or 2)
        log.info("ray: starting local instance with %s CPUs (temp dir %s)", num_cpus, ray_temp_dir(cfg))
        init_kwargs = dict(
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=ray_temp_dir(cfg),
            # workers must import causalrec from the same interpreter/venv
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
            if os.environ.get("CAUSALREC_RAY_PYTHONPATH") else None,
        )
        if cfg.ray.object_store_memory_mb:
            init_kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
        ray.init(**{k: v for k, v in init_kwargs.items() if v is not None}, **kwargs)
    return ray
