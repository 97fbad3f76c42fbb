"""Triton Inference Server: the process and its supervisor, the model repository and the backend model."""
