"""Image pipelines (torchvision.transforms.v2) and the per-epoch sample plan of augmented copies.

Images reach the pipelines as uint8 tensors [3, S, S] (or batches [N, 3, S, S]), already decoded and resized
to the job's image_size S by `trainer_service.datasets`; the pipelines return float32 tensors normalised with the
base's mean and std.

Randomness: the transforms draw from torch's global RNG, so callers make a run reproducible by seeding it
(`torch.manual_seed` per epoch, and per DataLoader worker, which PyTorch derives from the loader's base seed).
Nothing here seeds or keeps RNG state.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2  # type: ignore[import-untyped, unused-ignore]

from trainer_service.spec.config import AugmentationConfig

# Augmented copies per original are capped so that originals stay >= 1 / (1 + 4) = 20 % of an epoch.
MAX_COPIES_PER_ORIGINAL = 4

Stats = tuple[float, float, float]


def _to_normalised(mean: Stats, std: Stats) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def build_eval_transform(image_size: int, mean: Stats, std: Stats) -> v2.Compose:
    """uint8 [3, S, S] or [N, 3, S, S] -> float32, normalised. No randomness.

    The Resize is a no-op (torchvision returns the input untouched) when the input is already S x S.
    """
    return v2.Compose([v2.Resize((image_size, image_size), antialias=True), *_to_normalised(mean, std)])


def build_train_transform(aug: AugmentationConfig, image_size: int, mean: Stats, std: Stats) -> v2.Compose:
    """The training pipeline: exactly the enabled augmentations, then the eval pipeline's normalisation.

    Order: geometry on uint8 (zoom crop, flips, rotation/shear), colour jitter on uint8, to float and
    normalise, then Gaussian noise on the normalised tensor (as AugmentationSpec defines it). With every
    switch off the output equals `build_eval_transform`'s.
    """
    if not 0.0 < aug.zoom_min_scale <= aug.zoom_max_scale <= 1.0:
        raise ValueError(f"zoom scales need 0 < min <= max <= 1, got {aug.zoom_min_scale}, {aug.zoom_max_scale}")
    steps: list[v2.Transform] = []
    if aug.zoom_min_scale < 1.0 or aug.zoom_max_scale < 1.0:
        # Zoom = a random square crop of that area fraction, resized back to S: ratio (1, 1) keeps the
        # aspect of the (square) image, so zoom never stretches.
        steps.append(
            v2.RandomResizedCrop(
                image_size, scale=(aug.zoom_min_scale, aug.zoom_max_scale), ratio=(1.0, 1.0), antialias=True
            )
        )
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    if aug.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.vertical_flip:
        steps.append(v2.RandomVerticalFlip())
    if aug.rotation_degrees > 0 or aug.shear_degrees > 0:
        d = aug.shear_degrees
        steps.append(
            v2.RandomAffine(
                degrees=aug.rotation_degrees,
                # (x_min, x_max, y_min, y_max): shear along both axes; None keeps a rotation-only affine exact.
                shear=(-d, d, -d, d) if d > 0 else None,
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    if any(v > 0 for v in (aug.brightness, aug.contrast, aug.saturation, aug.hue)):
        # ColorJitter treats a 0 strength as "leave this property alone".
        steps.append(
            v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast, saturation=aug.saturation, hue=aug.hue)
        )
    steps.extend(_to_normalised(mean, std))
    if aug.gaussian_noise_std > 0:
        # clip=False: a normalised tensor is not in [0, 1], clipping would destroy it.
        steps.append(v2.GaussianNoise(mean=0.0, sigma=aug.gaussian_noise_std, clip=False))
    return v2.Compose(steps)


def epoch_index_plan(
    num_originals: int, copies_per_original: int, generator: torch.Generator
) -> list[tuple[int, bool]]:
    """The samples one training epoch sees, shuffled: (original index, augmented?) pairs.

    - copies_per_original == 0: classic random augmentation: every original once, through the train
      transform (all flagged augmented).
    - copies_per_original == k > 0: every original once un-augmented (eval transform) plus k augmented copies
      of it, so originals are 1 / (1 + k) >= 20 % of the epoch (k <= MAX_COPIES_PER_ORIGINAL).

    The order depends only on `generator`, so a resumed epoch replays the same plan.
    """
    if num_originals < 0:
        raise ValueError(f"num_originals must be >= 0, got {num_originals}")
    if not 0 <= copies_per_original <= MAX_COPIES_PER_ORIGINAL:
        raise ValueError(f"copies_per_original must be in [0, {MAX_COPIES_PER_ORIGINAL}], got {copies_per_original}")
    originals = range(num_originals)
    if copies_per_original == 0:
        plan = [(i, True) for i in originals]
    else:
        plan = [(i, False) for i in originals] + [(i, True) for _ in range(copies_per_original) for i in originals]
    order: list[int] = torch.randperm(len(plan), generator=generator).tolist()
    return [plan[j] for j in order]
