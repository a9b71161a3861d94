"""Experiments built on the `imdm_jax` library, each a package run as `python -m experiments.NAME`
from the repository root."""
