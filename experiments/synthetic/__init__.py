"""The synthetic experiment of method.md §5: MDM vs IMDM at few sampling steps.

Run as `python -m experiments.synthetic` from the repository root (`__main__.py`).
"""
