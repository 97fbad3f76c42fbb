"""Pure functions over label indices: images per label, the stratified train/validation split, small-label warnings.

No I/O: the worker, the LR range test and RecommendSpec call them on a listing's labels (docs/architecture.md §4).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np


def count_labels(label_indices: Sequence[int], labels: Sequence[str]) -> dict[str, int]:
    """Images per label name (every label present, zeros included), e.g. for `label_warnings`."""
    counts = np.bincount(np.asarray(label_indices, dtype=np.int64), minlength=len(labels))
    return {label: int(counts[i]) for i, label in enumerate(labels)}


def stratified_split(label_indices: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out `fraction` of every label for validation: (train positions, validation positions), sorted.

    Per label with n images, round(fraction * n) (halves up) go to validation, but at least 1 when
    n >= 2 and at most n - 1, so both sides see the label; a label with a single image keeps it for
    training (0 in validation). `fraction == 0` holds out nothing (a separate validation set).
    Deterministic for a seed; each label draws from its own generator, so adding a label does not
    reshuffle the others.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    by_label: dict[int, list[int]] = {}
    for position, label in enumerate(label_indices):
        by_label.setdefault(int(label), []).append(position)
    val: list[int] = []
    for label, positions in sorted(by_label.items()):
        n = len(positions)
        if fraction == 0.0 or n < 2:
            continue
        k = min(n - 1, max(1, math.floor(fraction * n + 0.5)))
        # A string seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"visiontune-split:{seed}:{label}")
        val.extend(rng.sample(positions, k))
    val_set = set(val)
    train = [i for i in range(len(label_indices)) if i not in val_set]
    return train, sorted(val)


def label_warnings(
    train_counts: Mapping[str, int], val_counts: Mapping[str, int], min_train: int = 20, min_val: int = 15
) -> list[str]:
    """One line per label with fewer than `min_train` training or `min_val` validation images."""
    lines = []
    for label in sorted(set(train_counts) | set(val_counts)):
        n_train, n_val = train_counts.get(label, 0), val_counts.get(label, 0)
        problems = []
        if n_train < min_train:
            problems.append(f"{n_train} training images (fewer than {min_train})")
        if n_val < min_val:
            problems.append(f"{n_val} validation images (fewer than {min_val})")
        if problems:
            lines.append(f"label {label!r}: " + " and ".join(problems) + "; its metrics will be unreliable")
    return lines
