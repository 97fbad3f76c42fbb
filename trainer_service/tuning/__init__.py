"""Tuning studies (issue #5): a search over TrainingSpec fields with Optuna, whose trials are training jobs."""
