"""causalrec: causal recommendation at data-platform scale (Spark + Delta + Ray)."""
__version__ = "0.1.0"
