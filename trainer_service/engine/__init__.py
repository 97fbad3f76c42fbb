"""The training engine, plain PyTorch over a typed config: models, batches, the stage loop, evaluation and plots.

It never touches S3, gRPC or the job store (docs/architecture.md §1, checked by tests/unit/test_architecture.py):
the worker hands it decoded arrays and base weights, and it hands back plain results and checkpoint states.
"""
