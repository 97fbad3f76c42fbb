"""A tiny dataset and training config the engine's tests share: three labels, each a bright colour channel over
noise (learnable in a few steps), 32 x 32 images, MobileNetV3-small from random weights, on the CPU."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from trainer_service.engine.batches import Split
from trainer_service.engine.context import RunContext
from trainer_service.engine.models import normalization
from trainer_service.spec.config import (
    Architecture,
    DatasetConfig,
    ModelConfig,
    RunConfig,
    StageConfig,
    TrainingConfig,
    WeightsSource,
)

SIZE = 32
LABELS = ["red", "green", "blue"]


def colour_split(n: int, seed: int) -> Split:
    """`n` images, labels 0, 1, 2 in turn: label t's channel t is 240 over noise below 120."""
    rng = np.random.default_rng(seed)
    targets = np.arange(n, dtype=np.int64) % 3
    images = rng.integers(0, 120, size=(n, 3, SIZE, SIZE), dtype=np.uint8)
    for i, t in enumerate(targets):
        images[i, t] = 240
    return Split(images=images, targets=targets)


def colour_config(*, dropout: float | None = None, **changes: Any) -> TrainingConfig:
    """Stage 1 only, 3 epochs of batch 16, no loader workers; `changes` replace whole fields of the config."""
    model = ModelConfig(architecture=Architecture.MOBILENET_V3_SMALL, weights=WeightsSource.NONE, classifier_dim=32)
    if dropout is not None:
        model = dataclasses.replace(model, dropout=dropout)
    base = TrainingConfig(
        dataset=DatasetConfig(uri="datasets/colours", image_size=SIZE),
        output_model="colours",
        model=model,
        classifier=StageConfig(epochs=3, batch_size=16, learning_rate=0.01),
        run=RunConfig(data_loader_workers=0),
    )
    return dataclasses.replace(base, **changes)


def cpu_context(config: TrainingConfig) -> RunContext:
    """fp32 on the CPU with the config's loader workers."""
    mean, std = normalization(config.model)
    return RunContext(
        device=torch.device("cpu"), autocast_dtype=None, workers=config.run.data_loader_workers, mean=mean, std=std
    )
