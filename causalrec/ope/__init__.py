"""Off-policy evaluation: evaluation policies as per-row action probabilities, and the OPE stage."""
