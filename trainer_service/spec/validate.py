"""A `TrainingSpec` checked at the edge: every rule of training_spec.proto, every default resolved.

`validate_spec` checks the whole spec in one pass and returns the `TrainingConfig` the engine runs on, or raises
`SpecInvalid` listing every bad field (docs/architecture.md §3, §4), each with its proto path (`classifier.learning_rate`) and a
description naming the allowed range and the value got. `config_to_spec` is the inverse: the resolved spec with
every field explicitly set, which is what the API returns.

Proto `float` fields are 32-bit, so 0.003 arrives as 0.0030000000260770…; every float read is turned back into the
shortest decimal that is the same float32, so configs compare equal, round-trip and print the way clients wrote them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from visiontune import float32
from visiontune.errors import FieldViolation
from visiontune.names import InvalidName, check_id
from visiontune.uris import parse_location
from visiontune.v1 import training_spec_pb2 as pb

from trainer_service.spec.config import (
    BLOCK_COUNTS,
    Activation,
    Architecture,
    AugmentationConfig,
    ClassBalancing,
    DatasetConfig,
    DeviceKind,
    EarlyStoppingConfig,
    FineTuningConfig,
    Metric,
    ModelConfig,
    OpenSetConfig,
    OpenSetScore,
    OptimizerConfig,
    OptimizerType,
    Precision,
    RunConfig,
    ScheduleConfig,
    ScheduleType,
    StageConfig,
    TrainingConfig,
    WeightsSource,
)

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

__all__ = [
    "ADAMW_DEFAULT_WEIGHT_DECAY",
    "DEFAULT_OUTPUT_MODEL",
    "SpecInvalid",
    "config_to_spec",
    "model_id_from_uri",
    "validate_spec",
]

# The proto's "Default 0 (AdamW: 0.01)": decoupled weight decay is the point of choosing AdamW.
ADAMW_DEFAULT_WEIGHT_DECAY = 0.01
# The output model when the dataset's name has nothing usable in it (e.g. `s3://b/2024/`).
DEFAULT_OUTPUT_MODEL = "model"

# Ratios of float32 values are off by a few float32 ulps (~6e-8 each); the fine-tuning LR limit is compared with
# this slack so that a client sending exactly classifier LR / 10 is not rejected for rounding.
_FLOAT32_SLACK = 1e-6
# Fine-tuning epochs above this need FineTuningSpec.allow_long_fine_tuning.
_SHORT_FINE_TUNING_EPOCHS = 5

# Defaults come from the config dataclasses, the single place they are written down in code.
_DATASET = DatasetConfig(uri="")
_AUGMENTATION = AugmentationConfig()
_MODEL = ModelConfig()
_OPTIMIZER = OptimizerConfig()
_SCHEDULE = ScheduleConfig()
_EARLY_STOPPING = EarlyStoppingConfig()
_CLASSIFIER = StageConfig()
_FINE_TUNING = FineTuningConfig()
_OPEN_SET = OpenSetConfig()
_RUN = RunConfig()


class SpecInvalid(ValueError):
    """A TrainingSpec that breaks one or more rules; `violations` lists every bad field once."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


# -- small pieces: float32 values, ranges, enum mappings, the violation collector -------------------------------


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.9g}"


@dataclass(frozen=True)
class _Range:
    """An interval as the proto comments write it: `(0, 10]`, `[0, 1)`; `hi` may be infinite."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    @classmethod
    def parse(cls, text: str) -> _Range:
        lo, hi = text[1:-1].split(",")
        return cls(float(lo), float(hi), lo_open=text[0] == "(", hi_open=text[-1] == ")")

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):  # NaN compares false to everything; inf is never a meaningful setting
            return False
        above = self.lo < value if self.lo_open else self.lo <= value
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        if math.isinf(self.hi):
            return f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{_fmt(self.lo)}, {_fmt(self.hi)}{right}"


P = TypeVar("P", bound=int)
C = TypeVar("C", bound=enum.Enum)


class _EnumMap(Generic[P, C]):
    """A proto enum and its config StrEnum, matched by name (`ARCHITECTURE_RESNET18` <-> `RESNET18`).

    The zero value `*_UNSPECIFIED` reads as `unspecified`, the documented default; a config member without a proto
    value of its own (Precision.AUTO) writes back as the zero value.
    """

    def __init__(self, proto: _EnumTypeWrapper[P], config: type[C], unspecified: C) -> None:
        zero = proto.DESCRIPTOR.values_by_number[0]
        prefix = zero.name.removesuffix("UNSPECIFIED")
        self.unspecified = unspecified
        self.allowed = ", ".join(v.name for v in proto.DESCRIPTOR.values)
        self._to_config: dict[int, C] = {0: unspecified}
        self._to_proto: dict[C, P] = {}
        for value in proto.DESCRIPTOR.values:
            if value.number != 0:
                member = config[value.name.removeprefix(prefix)]  # a KeyError at import: the enums drifted apart
                self._to_config[value.number] = member
                self._to_proto[member] = proto.Value(value.name)
        self._zero = proto.Value(zero.name)
        missing = set(config) - set(self._to_proto) - {unspecified}
        if missing:
            raise TypeError(f"{config.__name__} members without a {proto.DESCRIPTOR.name} value: {missing}")

    def to_config(self, number: int) -> C | None:
        """None for a number this server does not know (a newer client)."""
        return self._to_config.get(number)

    def to_proto(self, member: C) -> P:
        return self._to_proto.get(member, self._zero)


_CLASS_BALANCING = _EnumMap(pb.ClassBalancing, ClassBalancing, ClassBalancing.NONE)
_ARCHITECTURE = _EnumMap(pb.Architecture, Architecture, Architecture.MOBILENET_V2)
_WEIGHTS = _EnumMap(pb.WeightsSource, WeightsSource, WeightsSource.IMAGENET)
_ACTIVATION = _EnumMap(pb.Activation, Activation, Activation.RELU)
_OPTIMIZER_TYPE = _EnumMap(pb.OptimizerType, OptimizerType, OptimizerType.ADAM)
_SCHEDULE_TYPE = _EnumMap(pb.ScheduleType, ScheduleType, ScheduleType.CONSTANT)
_METRIC = _EnumMap(pb.Metric, Metric, Metric.VALIDATION_LOSS)
_OPEN_SET_SCORE = _EnumMap(pb.OpenSetScore, OpenSetScore, OpenSetScore.MAX_SOFTMAX)
_PRECISION = _EnumMap(pb.Precision, Precision, Precision.AUTO)
_DEVICE = _EnumMap(pb.Device, DeviceKind, DeviceKind.AUTO)


class _Checker:
    """Collects violations, at most one per field path (the first problem found with it)."""

    def __init__(self, default_bucket: str) -> None:
        self.default_bucket = default_bucket
        self._found: dict[str, str] = {}

    @property
    def violations(self) -> list[FieldViolation]:
        return [FieldViolation(path, description) for path, description in self._found.items()]

    def fail(self, path: str, description: str) -> None:
        self._found.setdefault(path, description)

    def failed(self, path: str) -> bool:
        return path in self._found

    def within(self, path: str, value: float, allowed: _Range | str, note: str = "") -> bool:
        """Whether `value` is in range; if not, a violation such as "must be in (0, 10], got 12"."""
        interval = _Range.parse(allowed) if isinstance(allowed, str) else allowed
        if value in interval:
            return True
        self.fail(path, f"must be {interval}{note}, got {_fmt(value)}")
        return False

    def enum(self, path: str, number: int, mapping: _EnumMap[P, C]) -> C:
        member = mapping.to_config(number)
        if member is None:
            self.fail(path, f"must be one of {mapping.allowed}, got {number}")
            return mapping.unspecified
        return member

    def location(self, path: str, uri: str, *, folder: bool = True) -> bool:
        """Whether `uri` is `s3://bucket/prefix` or a bare key prefix naming something below the bucket's root."""
        try:
            where = parse_location(uri, default_bucket=self.default_bucket, folder=folder)
        except ValueError as exc:
            self.fail(path, str(exc))
            return False
        # The artifact bucket's root holds jobs/ and models/, never a dataset; a weights file needs a key.
        if not where.prefix and (not folder or not uri.startswith("s3://")):
            what = "an object key" if not folder else "a key prefix"
            self.fail(path, f"must name {what}: s3://BUCKET/KEY or a key in the artifact bucket, got {uri!r}")
            return False
        return True


# -- validate_spec: proto in, config out ------------------------------------------------------------------------


def validate_spec(spec: pb.TrainingSpec, *, default_bucket: str = "visiontune") -> TrainingConfig:
    """The spec as a `TrainingConfig` with every default resolved; `SpecInvalid` lists every bad field.

    `default_bucket` is where bare key prefixes (`datasets/flowers`) live: the service's artifact bucket.
    """
    c = _Checker(default_bucket)
    dataset = _dataset(c, spec.dataset)
    augmentation = _augmentation(c, spec.augmentation)
    model = _model(c, spec.model)
    classifier = _stage(c, "classifier", spec.classifier, _CLASSIFIER, _Range(1, 1000))
    architecture = None if c.failed("model.architecture") else model.architecture
    fine_tuning = _fine_tuning(c, spec.fine_tuning, classifier, architecture)
    open_set = _open_set(c, spec.open_set)
    run = _run(c, spec.run)
    output_model = _output_model(c, spec.output_model, dataset.uri)
    if c.violations:
        raise SpecInvalid(c.violations)
    return TrainingConfig(
        dataset=dataset,
        output_model=output_model,
        augmentation=augmentation,
        model=model,
        classifier=classifier,
        fine_tuning=fine_tuning,
        open_set=open_set,
        run=run,
    )


def _dataset(c: _Checker, msg: pb.DatasetSpec) -> DatasetConfig:
    if msg.uri.strip("/"):
        c.location("dataset.uri", msg.uri)
    else:
        c.fail("dataset.uri", f"is required: s3://BUCKET/PREFIX or a key prefix (datasets/NAME), got {msg.uri!r}")
    for name, uri in (("validation_uri", msg.validation_uri), ("test_uri", msg.test_uri),
                      ("unknown_uri", msg.unknown_uri)):
        if uri:
            c.location(f"dataset.{name}", uri)
    split = float32.shortest(msg.validation_split) if msg.HasField("validation_split") else _DATASET.validation_split
    c.within("dataset.validation_split", split, "(0, 0.5]")
    image_size = msg.image_size if msg.HasField("image_size") else _DATASET.image_size
    c.within("dataset.image_size", image_size, "[32, 1024]")
    cache_max_mb = msg.cache_max_mb if msg.HasField("cache_max_mb") else _DATASET.cache_max_mb
    c.within("dataset.cache_max_mb", cache_max_mb, _Range(0))
    return DatasetConfig(
        uri=msg.uri,
        validation_uri=msg.validation_uri or None,
        test_uri=msg.test_uri or None,
        unknown_uri=msg.unknown_uri or None,
        validation_split=split,
        image_size=image_size,
        class_balancing=c.enum("dataset.class_balancing", msg.class_balancing, _CLASS_BALANCING),
        cache_max_mb=cache_max_mb,
    )


def _augmentation(c: _Checker, msg: pb.AugmentationSpec) -> AugmentationConfig:
    path = "augmentation"
    zoom_min = float32.shortest(msg.zoom_min_scale) if msg.HasField("zoom_min_scale") else _AUGMENTATION.zoom_min_scale
    zoom_max = float32.shortest(msg.zoom_max_scale) if msg.HasField("zoom_max_scale") else _AUGMENTATION.zoom_max_scale
    min_ok = c.within(f"{path}.zoom_min_scale", zoom_min, "[0.05, 1]")
    max_ok = c.within(f"{path}.zoom_max_scale", zoom_max, "[0.05, 1]")
    if min_ok and max_ok and zoom_min > zoom_max:
        c.fail(f"{path}.zoom_min_scale", f"must be <= zoom_max_scale ({_fmt(zoom_max)}), got {_fmt(zoom_min)}")
    floats = {
        "rotation_degrees": (msg.rotation_degrees, "[0, 180]"),
        "brightness": (msg.brightness, "[0, 1]"),
        "contrast": (msg.contrast, "[0, 1]"),
        "saturation": (msg.saturation, "[0, 1]"),
        "hue": (msg.hue, "[0, 0.5]"),
        "shear_degrees": (msg.shear_degrees, "[0, 45]"),
        "gaussian_noise_std": (msg.gaussian_noise_std, "[0, 1]"),
    }
    values = {name: float32.shortest(value) for name, (value, _) in floats.items()}
    for name, (_, allowed) in floats.items():
        c.within(f"{path}.{name}", values[name], allowed)
    c.within(f"{path}.copies_per_original", msg.copies_per_original, "[0, 4]")
    return AugmentationConfig(
        horizontal_flip=msg.horizontal_flip,
        vertical_flip=msg.vertical_flip,
        rotation_degrees=values["rotation_degrees"],
        zoom_min_scale=zoom_min,
        zoom_max_scale=zoom_max,
        brightness=values["brightness"],
        contrast=values["contrast"],
        saturation=values["saturation"],
        hue=values["hue"],
        shear_degrees=values["shear_degrees"],
        gaussian_noise_std=values["gaussian_noise_std"],
        copies_per_original=msg.copies_per_original,
    )


def _model(c: _Checker, msg: pb.ModelSpec) -> ModelConfig:
    weights = c.enum("model.weights", msg.weights, _WEIGHTS)
    # weights_uri is required iff weights is URI; skipped when weights itself is bad (already reported).
    uri_path, uri = "model.weights_uri", msg.weights_uri
    if not c.failed("model.weights"):
        if weights is WeightsSource.URI and not uri:
            c.fail(uri_path, "is required when model.weights is WEIGHTS_SOURCE_URI: s3://BUCKET/KEY or a key")
        elif weights is WeightsSource.URI:
            c.location(uri_path, uri, folder=False)
        elif uri:
            c.fail(uri_path, f"must be empty unless model.weights is WEIGHTS_SOURCE_URI, got {uri!r}")
    classifier_dim = msg.classifier_dim if msg.HasField("classifier_dim") else _MODEL.classifier_dim
    c.within("model.classifier_dim", classifier_dim, "[8, 8192]")
    dropout = float32.shortest(msg.dropout) if msg.HasField("dropout") else _MODEL.dropout
    c.within("model.dropout", dropout, "[0, 0.95]")
    return ModelConfig(
        architecture=c.enum("model.architecture", msg.architecture, _ARCHITECTURE),
        weights=weights,
        weights_uri=msg.weights_uri or None,
        classifier_dim=classifier_dim,
        dropout=dropout,
        activation=c.enum("model.activation", msg.activation, _ACTIVATION),
    )


def _stage(c: _Checker, path: str, msg: pb.StageSpec, defaults: StageConfig, epochs_range: _Range,
           epochs_note: str = "") -> StageConfig:
    epochs = msg.epochs if msg.HasField("epochs") else defaults.epochs
    epochs_ok = c.within(f"{path}.epochs", epochs, epochs_range, epochs_note)
    lr = float32.shortest(msg.learning_rate) if msg.HasField("learning_rate") else defaults.learning_rate
    lr_ok = c.within(f"{path}.learning_rate", lr, "(0, 10]")
    batch_size = msg.batch_size if msg.HasField("batch_size") else defaults.batch_size
    c.within(f"{path}.batch_size", batch_size, "[1, 4096]")
    label_smoothing = float32.shortest(msg.label_smoothing)
    c.within(f"{path}.label_smoothing", label_smoothing, "[0, 0.5)")
    clip = float32.shortest(msg.gradient_clip_norm)
    c.within(f"{path}.gradient_clip_norm", clip, "[0, 1000]")
    return StageConfig(
        epochs=epochs,
        learning_rate=lr,
        batch_size=batch_size,
        optimizer=_optimizer(c, f"{path}.optimizer", msg.optimizer),
        # The schedule's ranges depend on the stage's epochs and LR: skipped where those are bad themselves.
        schedule=_schedule(c, path, msg.schedule, epochs if epochs_ok else None, lr if lr_ok else None),
        early_stopping=_early_stopping(c, f"{path}.early_stopping", msg.early_stopping),
        label_smoothing=label_smoothing,
        gradient_clip_norm=clip,
    )


def _optimizer(c: _Checker, path: str, msg: pb.OptimizerSpec) -> OptimizerConfig:
    kind = c.enum(f"{path}.type", msg.type, _OPTIMIZER_TYPE)
    momentum = float32.shortest(msg.momentum) if msg.HasField("momentum") else _OPTIMIZER.momentum
    momentum_ok = c.within(f"{path}.momentum", momentum, "[0, 1)")
    if kind is OptimizerType.SGD and msg.nesterov and momentum_ok and momentum == 0:
        # torch.optim.SGD refuses this at construction; report it before any work starts instead.
        c.fail(f"{path}.nesterov", f"needs {path}.momentum > 0 with SGD, got momentum 0")
    default_decay = ADAMW_DEFAULT_WEIGHT_DECAY if kind is OptimizerType.ADAMW else _OPTIMIZER.weight_decay
    weight_decay = float32.shortest(msg.weight_decay) if msg.HasField("weight_decay") else default_decay
    c.within(f"{path}.weight_decay", weight_decay, "[0, 1]")
    beta1 = float32.shortest(msg.beta1) if msg.HasField("beta1") else _OPTIMIZER.beta1
    c.within(f"{path}.beta1", beta1, "[0, 1)")
    beta2 = float32.shortest(msg.beta2) if msg.HasField("beta2") else _OPTIMIZER.beta2
    c.within(f"{path}.beta2", beta2, "[0, 1)")
    return OptimizerConfig(
        type=kind, momentum=momentum, nesterov=msg.nesterov, weight_decay=weight_decay, beta1=beta1, beta2=beta2
    )


def _schedule(c: _Checker, stage: str, msg: pb.ScheduleSpec, epochs: int | None, lr: float | None) -> ScheduleConfig:
    """`epochs` and `lr` are the stage's, or None where they are invalid (then the checks against them are off)."""
    path = f"{stage}.schedule"
    kind = c.enum(f"{path}.type", msg.type, _SCHEDULE_TYPE)
    warmup = float32.shortest(msg.warmup_epochs)
    if epochs is None:
        c.within(f"{path}.warmup_epochs", warmup, _Range(0))
    else:
        c.within(f"{path}.warmup_epochs", warmup, _Range(0, epochs, hi_open=True), f" (less than {stage}.epochs)")
    step_epochs = msg.step_epochs if msg.HasField("step_epochs") else _SCHEDULE.step_epochs
    c.within(f"{path}.step_epochs", step_epochs, "[1, 1000]")
    gamma = float32.shortest(msg.gamma) if msg.HasField("gamma") else _SCHEDULE.gamma
    c.within(f"{path}.gamma", gamma, "(0, 1)")
    min_lr = float32.shortest(msg.min_learning_rate)
    if lr is None:
        c.within(f"{path}.min_learning_rate", min_lr, _Range(0))
    else:
        below = f" (below {stage}.learning_rate)"
        c.within(f"{path}.min_learning_rate", min_lr, _Range(0, lr, hi_open=True), below)
    max_lr: float | None = None
    if msg.HasField("max_learning_rate"):
        max_lr = float32.shortest(msg.max_learning_rate)
        peak_floor = _Range(0, lo_open=True) if lr is None else _Range(lr, lo_open=True)
        c.within(f"{path}.max_learning_rate", max_lr, peak_floor, f" ({stage}.learning_rate)" if lr is not None else "")
    elif kind in (ScheduleType.ONE_CYCLE, ScheduleType.CYCLIC) and lr is not None:
        max_lr = float32.shortest(10 * lr)  # the documented default peak; other schedules have no peak
    cycle_epochs = float32.shortest(msg.cycle_epochs) if msg.HasField("cycle_epochs") else _SCHEDULE.cycle_epochs
    c.within(f"{path}.cycle_epochs", cycle_epochs, "[1, 1000]")
    restart_epochs = msg.restart_epochs if msg.HasField("restart_epochs") else _SCHEDULE.restart_epochs
    c.within(f"{path}.restart_epochs", restart_epochs, "[1, 1000]")
    multiplier = msg.restart_multiplier if msg.HasField("restart_multiplier") else _SCHEDULE.restart_multiplier
    c.within(f"{path}.restart_multiplier", multiplier, "[1, 10]")
    patience = msg.plateau_patience if msg.HasField("plateau_patience") else _SCHEDULE.plateau_patience
    c.within(f"{path}.plateau_patience", patience, "[0, 100]")
    return ScheduleConfig(
        type=kind,
        warmup_epochs=warmup,
        step_epochs=step_epochs,
        gamma=gamma,
        min_learning_rate=min_lr,
        max_learning_rate=max_lr,
        cycle_epochs=cycle_epochs,
        restart_epochs=restart_epochs,
        restart_multiplier=multiplier,
        plateau_patience=patience,
    )


def _early_stopping(c: _Checker, path: str, msg: pb.EarlyStoppingSpec) -> EarlyStoppingConfig:
    patience = msg.patience if msg.HasField("patience") else _EARLY_STOPPING.patience
    c.within(f"{path}.patience", patience, "[1, 1000]")
    min_delta = float32.shortest(msg.min_delta)
    c.within(f"{path}.min_delta", min_delta, "[0, 1]")
    restore = msg.restore_best_weights if msg.HasField("restore_best_weights") else _EARLY_STOPPING.restore_best_weights
    return EarlyStoppingConfig(
        enabled=msg.enabled,
        monitor=c.enum(f"{path}.monitor", msg.monitor, _METRIC),
        patience=patience,
        min_delta=min_delta,
        restore_best_weights=restore,
    )


def _fine_tuning(c: _Checker, msg: pb.FineTuningSpec, classifier: StageConfig,
                 architecture: Architecture | None) -> FineTuningConfig:
    """Checked even when disabled: a config never holds out-of-range values, used or not."""
    path = "fine_tuning"
    classifier_lr_ok = not c.failed("classifier.learning_rate")
    limit = classifier.learning_rate / 10
    # Default LR: the classifier's / 10; a bad classifier LR is reported once, not again through this default.
    default_lr = float32.shortest(limit) if classifier_lr_ok else _FINE_TUNING.stage.learning_rate
    defaults = dataclasses.replace(_FINE_TUNING.stage, learning_rate=default_lr)
    if msg.allow_long_fine_tuning:
        stage = _stage(c, f"{path}.stage", msg.stage, defaults, _Range(1, 1000))
    else:
        short = _Range(1, _SHORT_FINE_TUNING_EPOCHS)
        stage = _stage(c, f"{path}.stage", msg.stage, defaults, short, f" unless {path}.allow_long_fine_tuning")
    lr_path = f"{path}.stage.learning_rate"
    too_high = _above_lr_limit(stage.learning_rate, classifier.learning_rate)
    if too_high and classifier_lr_ok and not c.failed(lr_path) and not msg.override_learning_rate_limit:
        c.fail(lr_path, f"must be <= classifier.learning_rate / 10 = {_fmt(float32.shortest(limit))} unless "
                        f"{path}.override_learning_rate_limit, got {_fmt(stage.learning_rate)}")
    return FineTuningConfig(
        enabled=msg.enabled, stage=stage, last_n_blocks=_unfreeze(c, f"{path}.unfreeze", msg.unfreeze, architecture)
    )


def _above_lr_limit(fine_tuning_lr: float, classifier_lr: float) -> bool:
    return fine_tuning_lr > classifier_lr / 10 * (1 + _FLOAT32_SLACK)


def _unfreeze(c: _Checker, path: str, msg: pb.UnfreezeSpec, architecture: Architecture | None) -> int | None:
    """The number of blocks to unfreeze, or None for the whole base."""
    which = msg.WhichOneof("which")
    if which is None:
        return None
    if which == "all":
        if not msg.all:  # `all: false` could be read as "freeze everything": ambiguous, so refused
            c.fail(f"{path}.all", "must be true when set (or set last_n_blocks instead), got false")
        return None
    n = msg.last_n_blocks
    if architecture is None:  # a bad architecture is reported already: only the lower bound is known
        c.within(f"{path}.last_n_blocks", n, _Range(1))
    else:
        blocks = _Range(1, BLOCK_COUNTS[architecture])
        c.within(f"{path}.last_n_blocks", n, blocks, f" for {architecture.value}")
    return n


def _open_set(c: _Checker, msg: pb.OpenSetSpec) -> OpenSetConfig:
    tpr = float32.shortest(msg.target_true_positive_rate) if msg.HasField("target_true_positive_rate") else (
        _OPEN_SET.target_true_positive_rate
    )
    c.within("open_set.target_true_positive_rate", tpr, "[0.5, 1)")
    return OpenSetConfig(score=c.enum("open_set.score", msg.score, _OPEN_SET_SCORE), target_true_positive_rate=tpr)


def _run(c: _Checker, msg: pb.RunSpec) -> RunConfig:
    repeats = msg.repeats if msg.HasField("repeats") else _RUN.repeats
    c.within("run.repeats", repeats, "[1, 20]")
    workers = msg.data_loader_workers if msg.HasField("data_loader_workers") else _RUN.data_loader_workers
    c.within("run.data_loader_workers", workers, "[0, 64]")
    retries = msg.max_retries if msg.HasField("max_retries") else _RUN.max_retries
    c.within("run.max_retries", retries, "[0, 10]")
    return RunConfig(
        seed=msg.seed,
        repeats=repeats,
        precision=c.enum("run.precision", msg.precision, _PRECISION),
        device=c.enum("run.device", msg.device, _DEVICE),
        data_loader_workers=workers,
        max_retries=retries,
    )


def _output_model(c: _Checker, output_model: str, dataset_uri: str) -> str:
    if output_model:
        try:
            return check_id("model", output_model)
        except InvalidName as exc:
            c.fail("output_model", str(exc))
            return output_model
    if c.failed("dataset.uri"):
        return DEFAULT_OUTPUT_MODEL  # nothing to derive it from; the spec is rejected anyway
    return model_id_from_uri(dataset_uri)


def model_id_from_uri(uri: str) -> str:
    """A model ID from a dataset URI's last path segment: `s3://b/datasets/Flowers_2024/` -> `flowers-2024`."""
    segment = uri.removeprefix("s3://").rstrip("/").rpartition("/")[2]
    candidate = re.sub(r"[^a-z0-9]+", "-", segment.lower())
    candidate = re.sub(r"^[^a-z]+", "", candidate)[:63].rstrip("-")  # IDs start with a letter, end tidily
    return check_id("model", candidate) if candidate else DEFAULT_OUTPUT_MODEL


# -- config_to_spec: config in, proto out -----------------------------------------------------------------------


def config_to_spec(config: TrainingConfig) -> pb.TrainingSpec:
    """The resolved spec of `config` with every field explicitly set (None-valued config fields stay unset)."""
    d, a, m, f = config.dataset, config.augmentation, config.model, config.fine_tuning
    o, r = config.open_set, config.run
    return pb.TrainingSpec(
        dataset=pb.DatasetSpec(
            uri=d.uri,
            validation_uri=d.validation_uri or "",
            test_uri=d.test_uri or "",
            unknown_uri=d.unknown_uri or "",
            validation_split=d.validation_split,
            image_size=d.image_size,
            class_balancing=_CLASS_BALANCING.to_proto(d.class_balancing),
            cache_max_mb=d.cache_max_mb,
        ),
        augmentation=pb.AugmentationSpec(
            horizontal_flip=a.horizontal_flip,
            vertical_flip=a.vertical_flip,
            rotation_degrees=a.rotation_degrees,
            zoom_min_scale=a.zoom_min_scale,
            zoom_max_scale=a.zoom_max_scale,
            brightness=a.brightness,
            contrast=a.contrast,
            saturation=a.saturation,
            hue=a.hue,
            shear_degrees=a.shear_degrees,
            gaussian_noise_std=a.gaussian_noise_std,
            copies_per_original=a.copies_per_original,
        ),
        model=pb.ModelSpec(
            architecture=_ARCHITECTURE.to_proto(m.architecture),
            weights=_WEIGHTS.to_proto(m.weights),
            weights_uri=m.weights_uri or "",
            classifier_dim=m.classifier_dim,
            dropout=m.dropout,
            activation=_ACTIVATION.to_proto(m.activation),
        ),
        classifier=_stage_to_spec(config.classifier),
        fine_tuning=pb.FineTuningSpec(
            enabled=f.enabled,
            stage=_stage_to_spec(f.stage),
            unfreeze=pb.UnfreezeSpec(all=True) if f.last_n_blocks is None else pb.UnfreezeSpec(
                last_n_blocks=f.last_n_blocks
            ),
            # The config does not record whether a limit was lifted; the resolved spec lifts exactly the limits its
            # values need, so it is valid on its own.
            override_learning_rate_limit=_above_lr_limit(f.stage.learning_rate, config.classifier.learning_rate),
            allow_long_fine_tuning=f.stage.epochs > _SHORT_FINE_TUNING_EPOCHS,
        ),
        open_set=pb.OpenSetSpec(
            score=_OPEN_SET_SCORE.to_proto(o.score), target_true_positive_rate=o.target_true_positive_rate
        ),
        run=pb.RunSpec(
            seed=r.seed,
            repeats=r.repeats,
            precision=_PRECISION.to_proto(r.precision),
            device=_DEVICE.to_proto(r.device),
            data_loader_workers=r.data_loader_workers,
            max_retries=r.max_retries,
        ),
        output_model=config.output_model,
    )


def _stage_to_spec(stage: StageConfig) -> pb.StageSpec:
    opt, sched, early = stage.optimizer, stage.schedule, stage.early_stopping
    return pb.StageSpec(
        epochs=stage.epochs,
        learning_rate=stage.learning_rate,
        batch_size=stage.batch_size,
        optimizer=pb.OptimizerSpec(
            type=_OPTIMIZER_TYPE.to_proto(opt.type),
            momentum=opt.momentum,
            nesterov=opt.nesterov,
            weight_decay=opt.weight_decay,
            beta1=opt.beta1,
            beta2=opt.beta2,
        ),
        schedule=pb.ScheduleSpec(
            type=_SCHEDULE_TYPE.to_proto(sched.type),
            warmup_epochs=sched.warmup_epochs,
            step_epochs=sched.step_epochs,
            gamma=sched.gamma,
            min_learning_rate=sched.min_learning_rate,
            max_learning_rate=sched.max_learning_rate,  # None leaves it unset: "no peak" / "10 x the LR"
            cycle_epochs=sched.cycle_epochs,
            restart_epochs=sched.restart_epochs,
            restart_multiplier=sched.restart_multiplier,
            plateau_patience=sched.plateau_patience,
        ),
        early_stopping=pb.EarlyStoppingSpec(
            enabled=early.enabled,
            monitor=_METRIC.to_proto(early.monitor),
            patience=early.patience,
            min_delta=early.min_delta,
            restore_best_weights=early.restore_best_weights,
        ),
        label_smoothing=stage.label_smoothing,
        gradient_clip_norm=stage.gradient_clip_norm,
    )
