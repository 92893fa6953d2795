"""Training: debiased objectives, one train step, the Ray Train loop and job, tuning, checkpoints.

Import submodules directly; only ``loop``, ``job`` and ``tune`` need Ray.
"""
