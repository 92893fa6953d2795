"""Delta Lake storage: one API (:class:`DeltaStore`) over delta-spark or delta-rs."""
from causalrec.storage.delta_rs_commit import ConcurrentWriteError, DeltaWriteError, WriteCommittedError
from causalrec.storage.store import DeltaStore, detect_backend

__all__ = ["DeltaStore", "DeltaWriteError", "ConcurrentWriteError", "WriteCommittedError", "detect_backend"]
