"""RecommendSpec: a starting `TrainingConfig` for a dataset, from its images per label, with a reason per choice.

Every choice follows an explicit rule of docs/architecture.md §4 (or a rule of thumb stated in its reason), driven
only by the label counts and whether a GPU is available; each rule is a small pure function below, with its thresholds
as module constants, and the spec's own defaults and limits read from training_spec.proto (docs/spec.md). The config is
valid as it stands: `validate_spec(convert.config_to_spec(config)) == config`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from visiontune import protoreflect
from visiontune.store import ArtifactStore
from visiontune.v1 import training_spec_pb2

from trainer_service.datasets import listing as datasets
from trainer_service.datasets.splits import label_warnings
from trainer_service.spec.config import (
    BLOCK_COUNTS,
    FINE_TUNING_LR_DIVISOR,
    SHORT_FINE_TUNING_EPOCHS,
    Architecture,
    AugmentationConfig,
    ClassBalancing,
    DatasetConfig,
    EarlyStoppingConfig,
    FineTuningConfig,
    ModelConfig,
    StageConfig,
    TrainingConfig,
    WeightsSource,
    fine_tuning_default_lr,
)
from trainer_service.spec.validate import model_id_from_uri

# docs/architecture.md §4: below these per label, a label's metrics are unreliable (a warning, never an error).
MIN_TRAIN_PER_LABEL = 20
MIN_VALIDATION_PER_LABEL = 15

# Batch size by total images; GPU only changes the largest tier (a batch of 128 keeps a GPU busy, on CPU it only
# costs memory). Never more than the training images (rounded down to a power of two), so an epoch is >= 1 batch.
SMALL_DATASET = 500
MEDIUM_DATASET = 5000
BATCH_SMALL, BATCH_MEDIUM, BATCH_LARGE_CPU, BATCH_LARGE_GPU = 16, 32, 64, 128

# Validation split by the smallest label's images: enough for MIN_VALIDATION_PER_LABEL where that still leaves
# MIN_TRAIN_PER_LABEL to train on, never below the default 20 % (10 % from LARGE_LABEL images on), at most 50 %.
# A smallest label too small for both gets TINY_LABEL_SPLIT.
TINY_LABEL_SPLIT = 0.3
DEFAULT_SPLIT = DatasetConfig.validation_split
LARGE_LABEL = 1000
LARGE_LABEL_SPLIT = 0.1
_SPLIT_RANGE = protoreflect.field_rules(training_spec_pb2.TrainingSpec.DESCRIPTOR, "dataset.validation_split").range
assert _SPLIT_RANGE is not None  # declared in training_spec.proto
MAX_SPLIT = _SPLIT_RANGE.hi

# Fine-tuning only with enough data to move the base without overfitting it: both thresholds must hold.
FINE_TUNE_MIN_TOTAL = 1000
FINE_TUNE_MIN_MEAN_PER_LABEL = 100
FINE_TUNE_EPOCHS = SHORT_FINE_TUNING_EPOCHS  # the most fine-tuning takes without allow_long_fine_tuning
UNFREEZE_ALL_FROM = 10000  # below this, only the last third of the base's blocks
FINE_TUNE_PATIENCE = 2
CLASSIFIER_PATIENCE = EarlyStoppingConfig.patience  # the default; early stopping itself is switched on in both stages

# Architecture: the smallest (MobileNetV2, whose ImageNet weights ship offline) unless a large dataset on a GPU.
V3_LARGE_FROM = 10000
RESNET50_FROM = 50000

# Class balancing: weighted loss once the largest label has more than this many times the smallest's images.
IMBALANCE_RATIO = 1.5
SEVERE_IMBALANCE_RATIO = 10.0  # a warning: weighting cannot make up for that

# Augmentation by images per label (mean): flips + small rotation/zoom below SMALL_PER_LABEL, more copies below
# TINY_PER_LABEL. Copies (not on-the-fly randomness) keep stage-1 bottleneck features cacheable (loop.run_stage).
TINY_PER_LABEL = 50
SMALL_PER_LABEL = 200
TINY_COPIES, SMALL_COPIES = 3, 1  # originals stay >= 25 % of an epoch (docs/architecture.md §4: >= 20 %)
ROTATION_DEGREES = 10.0
ZOOM_MIN_SCALE = 0.8

# Stage-1 epochs by total images: small sets take few steps per epoch, and cached features make epochs cheap;
# early stopping (restoring the best epoch) guards against the extra epochs overfitting.
EPOCHS_SMALL, EPOCHS_MEDIUM, EPOCHS_LARGE = 30, 20, StageConfig.epochs  # large: the classifier stage's default

# Image size: 224 (what the ImageNet weights were trained at) on GPU; on CPU smaller for speed, cost ~ pixels.
GPU_IMAGE_SIZE = 224
CPU_IMAGE_SIZE_SMALL, CPU_IMAGE_SIZE_LARGE = 160, 128


class SpecReason(NamedTuple):
    field: str  # TrainingSpec field path, e.g. `classifier.batch_size`
    value: str  # the chosen value as text
    reason: str  # one line


@dataclass(frozen=True)
class Recommendation:
    config: TrainingConfig
    reasons: list[SpecReason] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetShape:
    """The numbers the rules look at."""

    counts: dict[str, int]

    @classmethod
    def of(cls, label_counts: Mapping[str, int]) -> DatasetShape:
        if len(label_counts) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {len(label_counts)}")
        empty = sorted(label for label, n in label_counts.items() if n < 1)
        if empty:
            raise ValueError(f"labels without images: {', '.join(repr(label) for label in empty)}")
        return cls(dict(label_counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def smallest(self) -> int:
        return min(self.counts.values())

    @property
    def largest(self) -> int:
        return max(self.counts.values())

    @property
    def mean(self) -> float:
        return self.total / len(self.counts)


# -- the rules, one pure function each ------------------------------------------------------------------------------


def validation_count(n: int, fraction: float) -> int:
    """Validation images of a label with `n` images: `datasets.splits.stratified_split`'s rounding."""
    if fraction == 0.0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(fraction * n + 0.5)))


def validation_split_for(smallest: int) -> float:
    if smallest < MIN_TRAIN_PER_LABEL + MIN_VALIDATION_PER_LABEL:
        return TINY_LABEL_SPLIT
    floor = LARGE_LABEL_SPLIT if smallest >= LARGE_LABEL else DEFAULT_SPLIT
    # Rounded up to whole percent: a value that survives float32 and still gives the smallest label >= 15 images.
    needed = math.ceil(100 * MIN_VALIDATION_PER_LABEL / smallest) / 100
    return min(MAX_SPLIT, max(floor, needed))


def batch_size_for(total: int, train_images: int, *, gpu: bool) -> int:
    if total < SMALL_DATASET:
        size = BATCH_SMALL
    elif total < MEDIUM_DATASET:
        size = BATCH_MEDIUM
    else:
        size = BATCH_LARGE_GPU if gpu else BATCH_LARGE_CPU
    power_of_two_floor = 1 << (max(1, train_images).bit_length() - 1)
    return min(size, power_of_two_floor)


def classifier_epochs_for(total: int) -> int:
    if total < SMALL_DATASET:
        return EPOCHS_SMALL
    return EPOCHS_MEDIUM if total < MEDIUM_DATASET else EPOCHS_LARGE


def image_size_for(total: int, *, gpu: bool) -> int:
    if gpu:
        return GPU_IMAGE_SIZE
    return CPU_IMAGE_SIZE_SMALL if total < MEDIUM_DATASET else CPU_IMAGE_SIZE_LARGE


def architecture_for(total: int, *, gpu: bool) -> Architecture:
    if gpu and total >= RESNET50_FROM:
        return Architecture.RESNET50
    if gpu and total >= V3_LARGE_FROM:
        return Architecture.MOBILENET_V3_LARGE
    return Architecture.MOBILENET_V2


def fine_tuning_wanted(total: int, mean_per_label: float) -> bool:
    return total >= FINE_TUNE_MIN_TOTAL and mean_per_label >= FINE_TUNE_MIN_MEAN_PER_LABEL


def unfreeze_blocks_for(total: int, architecture: Architecture) -> int | None:
    """None: the whole base."""
    if total >= UNFREEZE_ALL_FROM:
        return None
    return math.ceil(BLOCK_COUNTS[architecture] / 3)


def class_balancing_for(smallest: int, largest: int) -> ClassBalancing:
    return ClassBalancing.WEIGHTED_LOSS if largest / smallest > IMBALANCE_RATIO else ClassBalancing.NONE


def augmentation_for(mean_per_label: float) -> AugmentationConfig:
    if mean_per_label >= SMALL_PER_LABEL:
        return AugmentationConfig()
    copies = TINY_COPIES if mean_per_label < TINY_PER_LABEL else SMALL_COPIES
    return AugmentationConfig(
        horizontal_flip=True,
        rotation_degrees=ROTATION_DEGREES,
        zoom_min_scale=ZOOM_MIN_SCALE,
        copies_per_original=copies,
    )


def expected_split(counts: Mapping[str, int], fraction: float) -> tuple[dict[str, int], dict[str, int]]:
    """(training, validation) images per label that a stratified split at `fraction` gives."""
    val = {label: validation_count(n, fraction) for label, n in counts.items()}
    return {label: n - val[label] for label, n in counts.items()}, val


# -- assembling the config and the reasons --------------------------------------------------------------------------


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, enum.Enum):
        return value.name
    return str(value)


class _Reasons:
    def __init__(self) -> None:
        self.items: list[SpecReason] = []

    def add(self, path: str, value: object, reason: str) -> None:
        self.items.append(SpecReason(path, _text(value), reason))


def _dataset(shape: DatasetShape, uri: str, gpu: bool, why: _Reasons) -> DatasetConfig:
    split = validation_split_for(shape.smallest)
    if shape.smallest < MIN_TRAIN_PER_LABEL + MIN_VALIDATION_PER_LABEL:
        why.add(
            "dataset.validation_split",
            split,
            f"the smallest label has {shape.smallest} images, too few for "
            f"{MIN_TRAIN_PER_LABEL} training + {MIN_VALIDATION_PER_LABEL} validation; "
            f"{TINY_LABEL_SPLIT:.0%} keeps most for training",
        )
    elif split == LARGE_LABEL_SPLIT:
        why.add(
            "dataset.validation_split",
            split,
            f"every label has >= {LARGE_LABEL} images: 10 % is already >= "
            f"{round(LARGE_LABEL_SPLIT * LARGE_LABEL)} validation images per label, the rest trains",
        )
    elif split == DEFAULT_SPLIT:
        why.add(
            "dataset.validation_split",
            split,
            f"the default 20 % already gives the smallest label "
            f"({shape.smallest} images) >= {MIN_VALIDATION_PER_LABEL} validation images",
        )
    else:
        why.add(
            "dataset.validation_split",
            split,
            f"the smallest fraction that gives the smallest label "
            f"({shape.smallest} images) {MIN_VALIDATION_PER_LABEL} validation images, leaving >= "
            f"{MIN_TRAIN_PER_LABEL} for training",
        )
    size = image_size_for(shape.total, gpu=gpu)
    if gpu:
        why.add("dataset.image_size", size, "the resolution the ImageNet weights were trained at; a GPU affords it")
    else:
        why.add(
            "dataset.image_size",
            size,
            f"CPU only: compute grows with pixels ({size} px costs "
            f"{size * size / GPU_IMAGE_SIZE**2:.0%} of 224 px) for a few points of accuracy",
        )
    balancing = class_balancing_for(shape.smallest, shape.largest)
    ratio = shape.largest / shape.smallest
    if balancing is ClassBalancing.WEIGHTED_LOSS:
        why.add(
            "dataset.class_balancing",
            balancing,
            f"the largest label has {ratio:.1f}x the images of the "
            f"smallest (> {IMBALANCE_RATIO}): weight the loss by inverse label frequency",
        )
    else:
        why.add(
            "dataset.class_balancing",
            balancing,
            f"labels are balanced (largest / smallest = {ratio:.2f} <= {IMBALANCE_RATIO})",
        )
    return DatasetConfig(uri=uri, validation_split=split, image_size=size, class_balancing=balancing)


def _augmentation(shape: DatasetShape, why: _Reasons) -> AugmentationConfig:
    aug = augmentation_for(shape.mean)
    per_label = f"{shape.mean:.0f} images per label on average"
    if aug.copies_per_original == 0:
        why.add(
            "augmentation.copies_per_original",
            0,
            f"{per_label} (>= {SMALL_PER_LABEL}): enough variety "
            "without augmentation, and stage 1 trains on features computed once",
        )
        return aug
    why.add(
        "augmentation.horizontal_flip",
        aug.horizontal_flip,
        f"{per_label}: mirrored images are new, plausible "
        "examples (turn off when left/right carries meaning, e.g. text)",
    )
    why.add(
        "augmentation.rotation_degrees",
        aug.rotation_degrees,
        "small rotations: robustness to camera tilt without changing what the image shows",
    )
    why.add(
        "augmentation.zoom_min_scale",
        aug.zoom_min_scale,
        "crops of 80-100 % of the image: robustness to framing and object size",
    )
    tier = "very few" if shape.mean < TINY_PER_LABEL else "few"
    why.add(
        "augmentation.copies_per_original",
        aug.copies_per_original,
        f"{tier} images per label "
        f"({shape.mean:.0f} < {TINY_PER_LABEL if tier == 'very few' else SMALL_PER_LABEL}): fixed augmented "
        "copies add variety and keep stage-1 features cacheable",
    )
    return aug


def _model(shape: DatasetShape, gpu: bool, why: _Reasons) -> ModelConfig:
    arch = architecture_for(shape.total, gpu=gpu)
    if arch is Architecture.MOBILENET_V2:
        where = "on CPU" if not gpu else f"below {V3_LARGE_FROM} images"
        why.add(
            "model.architecture", arch, f"smallest architecture first ({where}); its ImageNet weights install offline"
        )
    else:
        why.add(
            "model.architecture",
            arch,
            f"{shape.total} images on a GPU can use a larger base; its ImageNet "
            "weights must be in torchvision's cache (they do not ship offline), else use MOBILENET_V2",
        )
    why.add(
        "model.weights",
        WeightsSource.IMAGENET,
        "transfer learning: pretrained features beat training from scratch on datasets of this size",
    )
    return ModelConfig(architecture=arch, weights=WeightsSource.IMAGENET)


def _early_stopping(patience: int) -> EarlyStoppingConfig:
    return EarlyStoppingConfig(enabled=True, patience=patience, restore_best_weights=True)


def _classifier(shape: DatasetShape, train_images: int, gpu: bool, why: _Reasons) -> StageConfig:
    batch = batch_size_for(shape.total, train_images, gpu=gpu)
    capped = " (capped at the training images)" if batch < batch_size_for(shape.total, 10**9, gpu=gpu) else ""
    why.add(
        "classifier.batch_size",
        batch,
        f"{shape.total} images{' on GPU' if gpu else ''}: batches of {batch} "
        f"(< {SMALL_DATASET}: {BATCH_SMALL}, < {MEDIUM_DATASET}: {BATCH_MEDIUM}, else "
        f"{BATCH_LARGE_GPU if gpu else BATCH_LARGE_CPU}){capped}",
    )
    epochs = classifier_epochs_for(shape.total)
    if epochs > EPOCHS_LARGE:
        epochs_why = "few steps per epoch, and cached features make epochs cheap; early stopping ends it sooner"
    else:
        epochs_why = "plenty of steps per epoch; the default suffices"
    why.add("classifier.epochs", epochs, f"{shape.total} images: {epochs_why}")
    stage = StageConfig(epochs=epochs, batch_size=batch, early_stopping=_early_stopping(CLASSIFIER_PATIENCE))
    why.add(
        "classifier.learning_rate",
        stage.learning_rate,
        "Adam's safe default for a fresh head; FindLearningRate can refine it",
    )
    why.add(
        "classifier.early_stopping.enabled",
        True,
        f"stop once validation loss has not improved for "
        f"{CLASSIFIER_PATIENCE} epochs and keep the best epoch's weights",
    )
    return stage


def _fine_tuning(shape: DatasetShape, classifier: StageConfig, arch: Architecture, why: _Reasons) -> FineTuningConfig:
    lr = fine_tuning_default_lr(classifier.learning_rate)  # also the most the limit allows
    default = FineTuningConfig()
    if not fine_tuning_wanted(shape.total, shape.mean):
        why.add(
            "fine_tuning.enabled",
            False,
            f"{shape.total} images, {shape.mean:.0f} per label: too few to "
            f"update the base without overfitting (needs >= {FINE_TUNE_MIN_TOTAL} and >= "
            f"{FINE_TUNE_MIN_MEAN_PER_LABEL} per label)",
        )
        return replace(default, stage=replace(default.stage, learning_rate=lr))
    why.add(
        "fine_tuning.enabled",
        True,
        f"{shape.total} images, {shape.mean:.0f} per label: enough to adapt the "
        "base's features after the head has trained",
    )
    why.add(
        "fine_tuning.stage.learning_rate",
        lr,
        f"classifier learning rate / {FINE_TUNING_LR_DIVISOR}, "
        "the spec's fine-tuning limit: small steps keep the pretrained features",
    )
    why.add(
        "fine_tuning.stage.epochs",
        FINE_TUNE_EPOCHS,
        f"at most {FINE_TUNE_EPOCHS} without fine_tuning.allow_long_fine_tuning, with early stopping",
    )
    why.add("fine_tuning.stage.batch_size", classifier.batch_size, "same batch size as the classifier stage")
    why.add("fine_tuning.stage.early_stopping.enabled", True, "fine-tuning overfits quickly: keep its best epoch")
    why.add(
        "fine_tuning.stage.early_stopping.patience",
        FINE_TUNE_PATIENCE,
        f"only {FINE_TUNE_EPOCHS} epochs: stop after {FINE_TUNE_PATIENCE} without improvement",
    )
    blocks = unfreeze_blocks_for(shape.total, arch)
    if blocks is None:
        why.add("fine_tuning.unfreeze.all", True, f">= {UNFREEZE_ALL_FROM} images: enough to train the whole base")
    else:
        why.add(
            "fine_tuning.unfreeze.last_n_blocks",
            blocks,
            f"< {UNFREEZE_ALL_FROM} images: only the last third "
            f"of {arch.name}'s {BLOCK_COUNTS[arch]} blocks; early layers' generic features stay fixed",
        )
    stage = StageConfig(
        epochs=FINE_TUNE_EPOCHS,
        learning_rate=lr,
        batch_size=classifier.batch_size,
        early_stopping=_early_stopping(FINE_TUNE_PATIENCE),
    )
    return FineTuningConfig(enabled=True, stage=stage, last_n_blocks=blocks)


def _warnings(shape: DatasetShape, split: float) -> list[str]:
    train_counts, val_counts = expected_split(shape.counts, split)
    lines = label_warnings(train_counts, val_counts, MIN_TRAIN_PER_LABEL, MIN_VALIDATION_PER_LABEL)
    ratio = shape.largest / shape.smallest
    if ratio > SEVERE_IMBALANCE_RATIO:
        small = min(shape.counts, key=lambda label: (shape.counts[label], label))
        big = max(shape.counts, key=lambda label: (shape.counts[label], label))
        lines.append(
            f"label {big!r} has {ratio:.0f}x the images of label {small!r} ({shape.largest} vs "
            f"{shape.smallest}): loss weighting helps, more images of the small labels help more"
        )
    return lines


def recommend_spec(label_counts: Mapping[str, int], *, dataset_uri: str, gpu_available: bool) -> Recommendation:
    """A valid starting config for a dataset with these images per label, why each value, and the dataset's problems.

    ValueError with fewer than 2 labels or a label without images.
    """
    shape = DatasetShape.of(label_counts)
    why = _Reasons()
    dataset = _dataset(shape, dataset_uri, gpu_available, why)
    train_images = sum(expected_split(shape.counts, dataset.validation_split)[0].values())
    augmentation = _augmentation(shape, why)
    model = _model(shape, gpu_available, why)
    classifier = _classifier(shape, train_images, gpu_available, why)
    fine_tuning = _fine_tuning(shape, classifier, model.architecture, why)
    output_model = model_id_from_uri(dataset_uri)
    why.add("output_model", output_model, "named after the dataset's last path segment")
    config = TrainingConfig(
        dataset=dataset,
        output_model=output_model,
        augmentation=augmentation,
        model=model,
        classifier=classifier,
        fine_tuning=fine_tuning,
    )
    return Recommendation(config=config, reasons=why.items, warnings=_warnings(shape, dataset.validation_split))


def recommend_for_dataset(
    store: ArtifactStore,
    dataset_uri: str,
    *,
    gpu_available: bool,
) -> tuple[Recommendation, datasets.ImageFolderListing]:
    listing = datasets.list_image_folder(store, dataset_uri)
    recommendation = recommend_spec(listing.label_counts(), dataset_uri=dataset_uri, gpu_available=gpu_available)
    return recommendation, listing
