"""The run context a stage receives: config, and lazily created Spark, Delta store and Ray.

Why lazy: a Ray-only stage should not start a JVM, and a Spark stage should not
start Ray; the CLI, the pipeline and ``jobs/*.py`` all build the same context.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

from causalrec.config import Config

log = logging.getLogger("causalrec")


@dataclass
class Context:
    cfg: Config
    force: bool = False
    _spark: object = None
    _store: object = None
    timings: dict = field(default_factory=dict)

    @property
    def spark(self):
        if self._spark is None:
            from causalrec.sessions import get_spark

            self._spark = get_spark(self.cfg)
        return self._spark

    @property
    def store(self):
        """The :class:`causalrec.storage.DeltaStore` rooted at ``storage.root``."""
        if self._store is None:
            from causalrec.storage import DeltaStore

            self._store = DeltaStore(self.spark, self.cfg.storage.root, self.cfg.storage.backend)
        return self._store

    def ray(self):
        from causalrec.sessions import init_ray

        return init_ray(self.cfg)

    @contextmanager
    def step(self, name: str):
        """Log and time a named step of a stage."""
        t0 = time.perf_counter()
        log.info("%s ...", name)
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.timings[name] = round(dt, 3)
            log.info("%s done in %.1fs", name, dt)

    def log_rows(self, table: str, rows: int, direction: str = "out") -> None:
        log.info("rows %s %-24s %12d", direction, table, rows)


def make_context(config_path: Optional[str] = None, overrides: Optional[list] = None, force: bool = False) -> Context:
    from causalrec.config import load_config

    return Context(cfg=load_config(config_path, overrides), force=force)
