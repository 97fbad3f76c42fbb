"""The training engine: models, data, the training loop, evaluation and plots."""
