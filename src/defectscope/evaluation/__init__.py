"""Evaluation: metrics on a run's test split or another dataset."""
