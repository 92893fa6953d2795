"""Loaders for the real data sets: raw files -> Spark DataFrames in the table contract.

Each loader reads one data set's files (small: thousands to tens of thousands of rows,
so they are parsed on the driver with numpy/pandas), checks their shapes and counts
against what the data set's documentation promises, and returns a :class:`LoadedData`
whose event tables hold *raw* events (every ``events`` column except ``event_date``
and ``ingest_batch``). The ingest job then sends them through the same validation as
any other input, so real data, simulated data and user files share one code path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


class DataFileError(ValueError):
    """A raw data file is missing or malformed; the message names the file and what was expected."""


@dataclass
class LoadedData:
    name: str
    events: object  # Spark DataFrame, raw events
    users: object
    items: object
    mcar_events: Optional[object] = None
    ground_truth: Optional[object] = None
    sources: dict = field(default_factory=dict)  # table -> description of the files it came from
    expected: dict = field(default_factory=dict)  # table -> row count promised by the source files


def require_file(path: Path, what: str) -> Path:
    """Fail with the file name and what it should hold when it is missing."""
    p = Path(path)
    if not p.is_file():
        raise DataFileError(f"missing data file {p}: expected {what}")
    return p


def raw_event_schema():
    """The events contract minus the columns ingest derives (event_date) or assigns (ingest_batch)."""
    from pyspark.sql import types as T

    from causalrec.schemas import EVENTS

    full = EVENTS.spark_schema()
    return T.StructType([f for f in full.fields if f.name not in ("event_date", "ingest_batch")])


def events_frame(spark, pdf):
    """pandas -> Spark DataFrame with the raw event schema (missing optional columns become nulls)."""
    import pandas as pd

    schema = raw_event_schema()
    pdf = pdf.copy()
    for f in schema.fields:
        if f.name not in pdf.columns:
            pdf[f.name] = None
    pdf = pdf[[f.name for f in schema.fields]]
    if not isinstance(pdf["event_time"].dtype, pd.DatetimeTZDtype):
        pdf["event_time"] = pd.to_datetime(pdf["event_time"], utc=True)
    return spark.createDataFrame(pdf, schema=schema)


def dimension_frame(spark, pdf, spec):
    """pandas -> Spark DataFrame with a dimension table's declared schema."""
    schema = spec.spark_schema()
    pdf = pdf.copy()
    for f in schema.fields:
        if f.name not in pdf.columns:
            pdf[f.name] = None
    pdf = pdf[[f.name for f in schema.fields]]
    return spark.createDataFrame(pdf, schema=schema)


def load(name: str, spark, path: str, cfg=None) -> LoadedData:
    """Dispatch to the named loader (``coat``, ``obd``, ``amazon``)."""
    if name == "coat":
        from causalrec.loaders.coat import load_coat

        return load_coat(spark, path)
    if name == "obd":
        from causalrec.loaders.obd import load_obd

        kw = {}
        if cfg is not None:
            kw = dict(campaigns=list(cfg.data.obd_campaigns), policies=list(cfg.data.obd_policies))
        return load_obd(spark, path, **kw)
    if name == "amazon":
        from causalrec.loaders.amazon import load_amazon

        return load_amazon(spark, path)
    raise ValueError(f"unknown data set {name!r}; expected one of coat, obd, amazon")
