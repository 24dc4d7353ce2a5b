"""Parity checks: the small-scale TRL run and the large-scale NeMo-Aligner run are the same experiment."""
