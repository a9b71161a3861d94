"""The text study: the paper's claim on real text, one resumable command (`python -m
experiments.text`; docs/results_text.md)."""
