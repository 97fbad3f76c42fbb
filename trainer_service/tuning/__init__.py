"""Tuning studies: a search over TrainingSpec fields with Optuna, whose trials are training jobs."""
