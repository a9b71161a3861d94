"""Benchmarks of the library, run from the repository root (e.g. `python -m bench.couplings`)."""
