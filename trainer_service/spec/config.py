"""The typed configuration of a training job: what the engine runs on.

`validate.validate_spec` builds a `TrainingConfig` from a protobuf `TrainingSpec` at the edge, with every default
resolved, so nothing below the servicer sees protobuf or an unset field; `convert.config_to_spec` is the way back.
Every default here is read from training_spec.proto's `field_rules` options (docs/spec.md), so `StageConfig()` and
a validated empty spec agree; the constants of the rules that relate two fields are below, each written once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from visiontune import float32, protoreflect
from visiontune.openset import OpenSetScore as OpenSetScore  # re-exported: config names every spec enum
from visiontune.v1 import training_spec_pb2 as pb


class ClassBalancing(enum.StrEnum):
    NONE = "none"
    WEIGHTED_LOSS = "weighted_loss"  # cross-entropy weighted by inverse label frequency
    WEIGHTED_SAMPLER = "weighted_sampler"  # batches drawn so each label is equally likely


class Architecture(enum.StrEnum):
    """Values are torchvision's builder names (`torchvision.models.get_model`)."""

    RESNET18 = "resnet18"
    RESNET34 = "resnet34"
    RESNET50 = "resnet50"
    RESNET101 = "resnet101"
    RESNET152 = "resnet152"
    MOBILENET_V3_SMALL = "mobilenet_v3_small"
    MOBILENET_V3_LARGE = "mobilenet_v3_large"
    MOBILENET_V2 = "mobilenet_v2"


# Blocks that fine-tuning's `last_n_blocks` counts from the end (checked against torchvision 0.29 in the unit
# tests): ResNet layer1..layer4; MobileNet `features[1:]`, since `features[0]` is the stem convolution.
BLOCK_COUNTS: dict[Architecture, int] = {
    Architecture.RESNET18: 4,
    Architecture.RESNET34: 4,
    Architecture.RESNET50: 4,
    Architecture.RESNET101: 4,
    Architecture.RESNET152: 4,
    Architecture.MOBILENET_V3_SMALL: 12,
    Architecture.MOBILENET_V3_LARGE: 16,
    Architecture.MOBILENET_V2: 18,
}


class WeightsSource(enum.StrEnum):
    IMAGENET = "imagenet"  # torchvision's weights through its cache directory
    URI = "uri"  # a state_dict in S3
    NONE = "none"  # random initialisation


class Activation(enum.StrEnum):
    RELU = "relu"
    GELU = "gelu"
    SILU = "silu"


class OptimizerType(enum.StrEnum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"
    RMSPROP = "rmsprop"


class ScheduleType(enum.StrEnum):
    CONSTANT = "constant"
    STEP = "step"
    COSINE = "cosine"
    ONE_CYCLE = "one_cycle"
    CYCLIC = "cyclic"
    SGDR = "sgdr"
    REDUCE_ON_PLATEAU = "reduce_on_plateau"


class Metric(enum.StrEnum):
    VALIDATION_LOSS = "val_loss"
    VALIDATION_ACCURACY = "val_accuracy"
    TRAIN_LOSS = "train_loss"
    TRAIN_ACCURACY = "train_accuracy"

    @property
    def higher_is_better(self) -> bool:
        return self in (Metric.VALIDATION_ACCURACY, Metric.TRAIN_ACCURACY)


class Precision(enum.StrEnum):
    AUTO = "auto"  # FP32 on CPU; AMP bf16 on CUDA where supported, else fp16
    FP32 = "fp32"
    AMP_BF16 = "amp_bf16"
    AMP_FP16 = "amp_fp16"


class DeviceKind(enum.StrEnum):
    AUTO = "auto"  # CUDA when present, else CPU
    CPU = "cpu"
    CUDA = "cuda"  # the job fails when no GPU is present


# Each proto enum and its config enum, matched by short name (docs/architecture.md §4).
CLASS_BALANCINGS: Final = protoreflect.EnumMap(pb.ClassBalancing, ClassBalancing)
ARCHITECTURES: Final = protoreflect.EnumMap(pb.Architecture, Architecture)
WEIGHTS_SOURCES: Final = protoreflect.EnumMap(pb.WeightsSource, WeightsSource)
ACTIVATIONS: Final = protoreflect.EnumMap(pb.Activation, Activation)
OPTIMIZER_TYPES: Final = protoreflect.EnumMap(pb.OptimizerType, OptimizerType)
SCHEDULE_TYPES: Final = protoreflect.EnumMap(pb.ScheduleType, ScheduleType)
METRICS: Final = protoreflect.EnumMap(pb.Metric, Metric)
OPEN_SET_SCORES: Final = protoreflect.EnumMap(pb.OpenSetScore, OpenSetScore)
PRECISIONS: Final = protoreflect.EnumMap(pb.Precision, Precision)
DEVICES: Final = protoreflect.EnumMap(pb.Device, DeviceKind)

E = TypeVar("E", bound=enum.Enum)
_SPEC = pb.TrainingSpec.DESCRIPTOR


def _default(path: str) -> Any:
    """The default of the TrainingSpec field at `path`, from its field_rules option."""
    return protoreflect.field_default(_SPEC, path)


def enum_default(path: str, mapping: protoreflect.EnumMap[Any, E]) -> E:
    """The config member an unset enum field at `path` resolves to (computed once, at import)."""
    member = mapping.to_python(_default(path))
    assert member is not None, f"{path}: its default has no {mapping.proto.name} member"  # a test guards this
    return member


# The rules that relate two fields (their wording is in training_spec.proto's comments):
# the fine-tuning LR is at most the classifier LR / FINE_TUNING_LR_DIVISOR, which is also its default;
FINE_TUNING_LR_DIVISOR: Final = 10
# ONE_CYCLE and CYCLIC peak at PEAK_LR_FACTOR x the stage LR unless max_learning_rate is set;
PEAK_LR_FACTOR: Final = 10
# AdamW's weight decay defaults to this instead of the field's own default: decoupled decay is why one picks AdamW;
ADAMW_DEFAULT_WEIGHT_DECAY: Final = 0.01
# fine-tuning epochs above the fine-tuning stage's cap need FineTuningSpec.allow_long_fine_tuning.
_FINE_TUNING_EPOCHS = protoreflect.field_rules(_SPEC, "fine_tuning.stage.epochs").range
assert _FINE_TUNING_EPOCHS is not None  # declared in training_spec.proto; a test guards it
SHORT_FINE_TUNING_EPOCHS: Final = int(_FINE_TUNING_EPOCHS.hi)


# -- the config tree (defaults: training_spec.proto's field_rules, docs/spec.md) ------------------------------------


@dataclass(frozen=True)
class DatasetConfig:
    uri: str  # s3://bucket/prefix or a key prefix in the artifact bucket
    validation_uri: str | None = None
    test_uri: str | None = None
    unknown_uri: str | None = None
    validation_split: float = _default("dataset.validation_split")
    image_size: int = _default("dataset.image_size")
    class_balancing: ClassBalancing = field(default=enum_default("dataset.class_balancing", CLASS_BALANCINGS))
    cache_max_mb: int = _default("dataset.cache_max_mb")


@dataclass(frozen=True)
class AugmentationConfig:
    horizontal_flip: bool = _default("augmentation.horizontal_flip")
    vertical_flip: bool = _default("augmentation.vertical_flip")
    rotation_degrees: float = _default("augmentation.rotation_degrees")
    zoom_min_scale: float = _default("augmentation.zoom_min_scale")
    zoom_max_scale: float = _default("augmentation.zoom_max_scale")
    brightness: float = _default("augmentation.brightness")
    contrast: float = _default("augmentation.contrast")
    saturation: float = _default("augmentation.saturation")
    hue: float = _default("augmentation.hue")
    shear_degrees: float = _default("augmentation.shear_degrees")
    gaussian_noise_std: float = _default("augmentation.gaussian_noise_std")
    copies_per_original: int = _default("augmentation.copies_per_original")

    @property
    def is_random(self) -> bool:
        """Whether any random transformation is on (then stage-1 features cannot be computed once)."""
        return (
            self.horizontal_flip
            or self.vertical_flip
            or self.rotation_degrees > 0
            or self.zoom_min_scale < 1.0
            or self.zoom_max_scale < 1.0
            or any(v > 0 for v in (self.brightness, self.contrast, self.saturation, self.hue))
            or self.shear_degrees > 0
            or self.gaussian_noise_std > 0
        )


@dataclass(frozen=True)
class ModelConfig:
    architecture: Architecture = field(default=enum_default("model.architecture", ARCHITECTURES))
    weights: WeightsSource = field(default=enum_default("model.weights", WEIGHTS_SOURCES))
    weights_uri: str | None = None
    weights_sha256: str | None = None  # lower-case hex; the weights file must match it when set
    classifier_dim: int = _default("model.classifier_dim")
    dropout: float = _default("model.dropout")
    activation: Activation = field(default=enum_default("model.activation", ACTIVATIONS))


# The messages both stages share default alike; the classifier stage's paths stand for them.
@dataclass(frozen=True)
class OptimizerConfig:
    type: OptimizerType = field(default=enum_default("classifier.optimizer.type", OPTIMIZER_TYPES))
    momentum: float = _default("classifier.optimizer.momentum")  # SGD, RMSprop
    nesterov: bool = _default("classifier.optimizer.nesterov")  # SGD
    weight_decay: float = _default("classifier.optimizer.weight_decay")  # AdamW: ADAMW_DEFAULT_WEIGHT_DECAY
    beta1: float = _default("classifier.optimizer.beta1")  # Adam, AdamW
    beta2: float = _default("classifier.optimizer.beta2")


@dataclass(frozen=True)
class ScheduleConfig:
    type: ScheduleType = field(default=enum_default("classifier.schedule.type", SCHEDULE_TYPES))
    warmup_epochs: float = _default("classifier.schedule.warmup_epochs")
    step_epochs: int = _default("classifier.schedule.step_epochs")
    gamma: float = _default("classifier.schedule.gamma")
    min_learning_rate: float = _default("classifier.schedule.min_learning_rate")
    max_learning_rate: float | None = None  # ONE_CYCLE, CYCLIC; resolved to PEAK_LR_FACTOR x the stage LR
    cycle_epochs: float = _default("classifier.schedule.cycle_epochs")
    restart_epochs: int = _default("classifier.schedule.restart_epochs")
    restart_multiplier: int = _default("classifier.schedule.restart_multiplier")
    plateau_patience: int = _default("classifier.schedule.plateau_patience")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    enabled: bool = _default("classifier.early_stopping.enabled")
    monitor: Metric = field(default=enum_default("classifier.early_stopping.monitor", METRICS))
    patience: int = _default("classifier.early_stopping.patience")
    min_delta: float = _default("classifier.early_stopping.min_delta")
    restore_best_weights: bool = _default("classifier.early_stopping.restore_best_weights")


@dataclass(frozen=True)
class StageConfig:
    """A stage; its defaults are the classifier stage's (FineTuningConfig's stage has its own)."""

    epochs: int = _default("classifier.epochs")
    learning_rate: float = _default("classifier.learning_rate")
    batch_size: int = _default("classifier.batch_size")
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    label_smoothing: float = _default("classifier.label_smoothing")
    gradient_clip_norm: float = _default("classifier.gradient_clip_norm")  # 0 = off

    @property
    def peak_learning_rate(self) -> float:
        """The top of ONE_CYCLE / CYCLIC schedules."""
        peak = self.schedule.max_learning_rate
        return peak if peak is not None else PEAK_LR_FACTOR * self.learning_rate


def fine_tuning_default_lr(classifier_lr: float) -> float:
    """The fine-tuning stage's default LR, which is also its limit: the classifier's / FINE_TUNING_LR_DIVISOR."""
    return float32.shortest(classifier_lr / FINE_TUNING_LR_DIVISOR)


def _fine_tuning_stage() -> StageConfig:
    return StageConfig(
        epochs=_default("fine_tuning.stage.epochs"), learning_rate=fine_tuning_default_lr(StageConfig.learning_rate)
    )


@dataclass(frozen=True)
class FineTuningConfig:
    enabled: bool = _default("fine_tuning.enabled")
    stage: StageConfig = field(default_factory=_fine_tuning_stage)
    last_n_blocks: int | None = None  # None: unfreeze the whole base


@dataclass(frozen=True)
class OpenSetConfig:
    score: OpenSetScore = field(default=enum_default("open_set.score", OPEN_SET_SCORES))
    target_true_positive_rate: float = _default("open_set.target_true_positive_rate")


@dataclass(frozen=True)
class RunConfig:
    seed: int = _default("run.seed")
    repeats: int = _default("run.repeats")
    precision: Precision = field(default=enum_default("run.precision", PRECISIONS))
    device: DeviceKind = field(default=enum_default("run.device", DEVICES))
    data_loader_workers: int = _default("run.data_loader_workers")
    max_retries: int = _default("run.max_retries")
    devices: int = _default("run.devices")
    deterministic: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    dataset: DatasetConfig
    output_model: str
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    classifier: StageConfig = field(default_factory=StageConfig)
    fine_tuning: FineTuningConfig = field(default_factory=FineTuningConfig)
    open_set: OpenSetConfig = field(default_factory=OpenSetConfig)
    run: RunConfig = field(default_factory=RunConfig)
