"""The typed training config and the TrainingSpec validator that builds it."""
