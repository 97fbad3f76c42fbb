"""The two RPCs that help a user choose: the LR range test on real data, and a recommended starting spec.

Both read the dataset from S3 like a job does; neither creates a job. The LR range test runs on the stage-1
setting (cached bottleneck features of a sample), which takes seconds, in a process of its own in one of the
trainer's job slots (`lr_worker`); RecommendSpec only lists the dataset, in the trainer.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from visiontune.store import ArtifactStore

from trainer_service.datasets.cache import materialize
from trainer_service.datasets.listing import list_image_folder
from trainer_service.datasets.splits import stratified_split
from trainer_service.engine.batches import Split, class_weights
from trainer_service.engine.context import run_context
from trainer_service.engine.lr_finder import LrFinderResult, find_learning_rate
from trainer_service.engine.models import build_classifier
from trainer_service.engine.plots import lr_finder_png
from trainer_service.jobs import artifacts
from trainer_service.spec.config import ClassBalancing, TrainingConfig
from trainer_service.spec.lr_sweep import LrSweep
from trainer_service.weights import load_base_weights


@dataclass(frozen=True)
class LrFinderOutcome:
    result: LrFinderResult
    plot_uri: str


def run_lr_finder(config: TrainingConfig, sweep: LrSweep, store: ArtifactStore, cache_dir: Path) -> LrFinderOutcome:
    """The LR range test on the spec's model and the training part of its data; the plot goes to the bucket."""
    # The device first: a spec asking for a GPU that is not here fails before anything is downloaded. No
    # DataLoader worker processes for a sweep over a small sample.
    ctx = dataclasses.replace(run_context(config), workers=0)
    listing = list_image_folder(store, config.dataset.uri)
    train_rows, _ = stratified_split(
        [item.label for item in listing.items], config.dataset.validation_split, config.run.seed
    )
    # The sweep sees at most steps x batch images; decode only a seeded sample of that size.
    needed = sweep.steps * config.classifier.batch_size
    rng = np.random.default_rng(config.run.seed)
    if len(train_rows) > needed:
        train_rows = sorted(rng.choice(train_rows, size=needed, replace=False).tolist())
    items = [listing.items[i] for i in train_rows]
    with materialize(
        store.for_bucket(listing.bucket), items, config.dataset.image_size, cache_dir, config.dataset.cache_max_mb
    ) as decoded:
        train = Split(images=decoded.images, targets=np.asarray(decoded.labels, dtype=np.int64))
        model = build_classifier(config.model, len(listing.labels), load_base_weights(config.model, store))
        weight = None
        if config.dataset.class_balancing == ClassBalancing.WEIGHTED_LOSS:
            weight = class_weights(train.targets, len(listing.labels))
        result = find_learning_rate(
            model,
            train,
            config.classifier,
            ctx,
            min_lr=sweep.min_lr,
            max_lr=sweep.max_lr,
            steps=sweep.steps,
            smoothing=sweep.smoothing,
            divergence_factor=sweep.divergence_factor,
            seed=config.run.seed,
            class_weight=weight,
        )
    png = lr_finder_png([p.lr for p in result.points], [p.smoothed_loss for p in result.points], result.suggested_lr)
    key = artifacts.lr_finder_plot_key(config.output_model, secrets.token_hex(4))
    store.put_bytes(key, png, content_type="image/png")
    return LrFinderOutcome(result=result, plot_uri=artifacts.object_uri(store, key))
