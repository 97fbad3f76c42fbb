"""The typed configuration of a training job: what the engine runs on.

`spec_validation.validate_spec` builds a `TrainingConfig` from a protobuf `TrainingSpec` at the edge,
with every default resolved, so nothing below the servicer sees protobuf or an unset field. The config
round-trips through JSON (`to_dict` / `from_dict`): that is how a job reaches its worker process, and how
it is recorded in `jobs/{job}/spec.json` and in the model manifest.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from visiontune.openset import OpenSetScore as OpenSetScore  # re-exported: config names every spec enum


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


# -- the config tree (defaults = docs/architecture.md §4 and training_spec.proto) --------------------------------------


@dataclass(frozen=True)
class DatasetConfig:
    uri: str  # s3://bucket/prefix or a key prefix in the artifact bucket
    validation_uri: str | None = None
    test_uri: str | None = None
    unknown_uri: str | None = None
    validation_split: float = 0.2
    image_size: int = 224
    class_balancing: ClassBalancing = ClassBalancing.NONE
    cache_max_mb: int = 2048


@dataclass(frozen=True)
class AugmentationConfig:
    horizontal_flip: bool = False
    vertical_flip: bool = False
    rotation_degrees: float = 0.0
    zoom_min_scale: float = 1.0
    zoom_max_scale: float = 1.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    shear_degrees: float = 0.0
    gaussian_noise_std: float = 0.0
    copies_per_original: int = 0

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
    architecture: Architecture = Architecture.MOBILENET_V2
    weights: WeightsSource = WeightsSource.IMAGENET
    weights_uri: str | None = None
    classifier_dim: int = 256
    dropout: float = 0.5
    activation: Activation = Activation.RELU


@dataclass(frozen=True)
class OptimizerConfig:
    type: OptimizerType = OptimizerType.ADAM
    momentum: float = 0.9  # SGD, RMSprop
    nesterov: bool = False  # SGD
    weight_decay: float = 0.0
    beta1: float = 0.9  # Adam, AdamW
    beta2: float = 0.999


@dataclass(frozen=True)
class ScheduleConfig:
    type: ScheduleType = ScheduleType.CONSTANT
    warmup_epochs: float = 0.0
    step_epochs: int = 3
    gamma: float = 0.1
    min_learning_rate: float = 0.0
    max_learning_rate: float | None = None  # ONE_CYCLE, CYCLIC; resolved to 10 x the stage LR
    cycle_epochs: float = 2.0
    restart_epochs: int = 2
    restart_multiplier: int = 1
    plateau_patience: int = 2


@dataclass(frozen=True)
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: Metric = Metric.VALIDATION_LOSS
    patience: int = 3
    min_delta: float = 0.0
    restore_best_weights: bool = True


@dataclass(frozen=True)
class StageConfig:
    epochs: int = 10
    learning_rate: float = 0.003
    batch_size: int = 32
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    label_smoothing: float = 0.0
    gradient_clip_norm: float = 0.0  # 0 = off

    @property
    def peak_learning_rate(self) -> float:
        """The top of ONE_CYCLE / CYCLIC schedules."""
        peak = self.schedule.max_learning_rate
        return peak if peak is not None else 10.0 * self.learning_rate


@dataclass(frozen=True)
class FineTuningConfig:
    enabled: bool = False
    stage: StageConfig = field(default_factory=lambda: StageConfig(epochs=5, learning_rate=0.0003))
    last_n_blocks: int | None = None  # None: unfreeze the whole base


@dataclass(frozen=True)
class OpenSetConfig:
    score: OpenSetScore = OpenSetScore.MAX_SOFTMAX
    target_true_positive_rate: float = 0.95


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    repeats: int = 1
    precision: Precision = Precision.AUTO
    device: DeviceKind = DeviceKind.AUTO
    data_loader_workers: int = 2
    max_retries: int = 2


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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (enums as their string values)."""
        return _to_plain(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """The inverse of `to_dict`; missing keys take their defaults, unknown keys are an error."""
        return _from_plain(cls, data)


# -- JSON round trip ----------------------------------------------------------------------------------------

T = TypeVar("T")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _from_plain(cls: type[T], data: Any) -> T:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {name: _convert(hints[name], value) for name, value in data.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner[0], value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _from_plain(hint, value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if hint is float and isinstance(value, int):
        return float(value)
    return value
