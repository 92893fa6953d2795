"""Validated, idempotent ingest of events into Delta (see :mod:`causalrec.ingest.job`)."""
