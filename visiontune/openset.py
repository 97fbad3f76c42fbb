"""The open-set score: how "known" an image looks to a classifier, shared by the trainer and inference.

The trainer calibrates a threshold on validation images with these scores; the inference service
compares each request image's score with that threshold (the manifest's `open_set`). Scores are
"higher = more known": an image is accepted as one of the model's classes when `score >= threshold`.
"""

from __future__ import annotations

import enum

import torch


class OpenSetScore(enum.StrEnum):
    MAX_SOFTMAX = "max_softmax"  # Hendrycks & Gimpel 2017
    ENERGY = "energy"  # logsumexp of the logits, Liu et al. 2020


def open_set_scores(logits: torch.Tensor, score: OpenSetScore) -> torch.Tensor:
    """One "known-ness" score per row of `[N, C]` logits; higher means more likely a known class.

    MAX_SOFTMAX: the largest softmax probability, in (1/C, 1]. ENERGY: logsumexp of the logits, i.e. the
    negative free energy at temperature 1 — unbounded, and unlike softmax it keeps the logits' magnitude.
    """
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [N, C] with C >= 1, got {list(logits.shape)}")
    logits = logits.detach().float()
    if score == OpenSetScore.MAX_SOFTMAX:
        return logits.softmax(dim=1).amax(dim=1)
    if score == OpenSetScore.ENERGY:
        return torch.logsumexp(logits, dim=1)
    raise ValueError(f"unknown open-set score {score!r}")


def is_known(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The accept decision for each score: known when `score >= threshold`."""
    return scores >= threshold
