"""A `TrainingSpec` checked at the edge: every rule of training_spec.proto, every default resolved.

`validate_spec` checks the whole spec in one pass and returns the `TrainingConfig` the engine runs on, or raises
`SpecInvalid` listing every bad field (docs/architecture.md §3, §4), each with its proto path
(`classifier.learning_rate`) and a description naming the allowed range and the value got. Each field's default and
range come from its `field_rules` option (docs/spec.md) through the `Checker`; what is written here are the rules
that relate two fields. `convert.config_to_spec` is the inverse.
"""

from __future__ import annotations

import re

from visiontune import float32, protoreflect
from visiontune.names import InvalidName, check_id
from visiontune.settings import DEFAULT_BUCKET
from visiontune.uris import InputLocations, parse_location
from visiontune.v1 import training_spec_pb2 as pb

from trainer_service.spec.checker import Checker, SpecInvalid
from trainer_service.spec.config import (
    ACTIVATIONS,
    ADAMW_DEFAULT_WEIGHT_DECAY,
    ARCHITECTURES,
    BLOCK_COUNTS,
    CLASS_BALANCINGS,
    DEVICES,
    FINE_TUNING_LR_DIVISOR,
    METRICS,
    OPEN_SET_SCORES,
    OPTIMIZER_TYPES,
    PEAK_LR_FACTOR,
    PRECISIONS,
    SCHEDULE_TYPES,
    WEIGHTS_SOURCES,
    Architecture,
    AugmentationConfig,
    DatasetConfig,
    EarlyStoppingConfig,
    FineTuningConfig,
    ModelConfig,
    OpenSetConfig,
    OptimizerConfig,
    OptimizerType,
    RunConfig,
    ScheduleConfig,
    ScheduleType,
    StageConfig,
    TrainingConfig,
    WeightsSource,
    fine_tuning_default_lr,
)

__all__ = [
    "DEFAULT_OUTPUT_MODEL",
    "SpecInvalid",
    "above_lr_limit",
    "model_id_from_uri",
    "validate_spec",
]

_SHA256 = re.compile(r"[0-9a-f]{64}")

# The output model when the dataset's name has nothing usable in it (e.g. `s3://b/2024/`).
DEFAULT_OUTPUT_MODEL = "model"

# Ratios of float32 values are off by a few float32 ulps (~6e-8 each); the fine-tuning LR limit is compared with
# this slack so that a client sending exactly classifier LR / 10 is not rejected for rounding.
_FLOAT32_SLACK = 1e-6
# The fine-tuning stage's epochs without its position's cap: what allow_long_fine_tuning allows.
_LONG_FINE_TUNING = protoreflect.field_rules(pb.StageSpec.DESCRIPTOR, "epochs").range


def _location(
    c: Checker, default_bucket: str, inputs: InputLocations | None, path: str, uri: str, *, folder: bool = True
) -> bool:
    """Whether `uri` is `s3://bucket/prefix` or a bare key prefix naming something below the bucket's root, and,
    when `inputs` is given, lies under one of its allowed locations."""
    try:
        where = parse_location(uri, default_bucket=default_bucket, folder=folder)
    except ValueError as exc:
        c.fail(path, str(exc))
        return False
    # The artifact bucket's root holds jobs/ and models/, never a dataset; a weights file needs a key.
    if not where.prefix and (not folder or not uri.startswith("s3://")):
        what = "an object key" if not folder else "a key prefix"
        c.fail(path, f"must name {what}: s3://BUCKET/KEY or a key in the artifact bucket, got {uri!r}")
        return False
    problem = None if inputs is None else inputs.problem(where)
    if problem is not None:
        c.fail(path, problem)
        return False
    return True


# -- validate_spec: proto in, config out ------------------------------------------------------------------------


def validate_spec(
    spec: pb.TrainingSpec, *, default_bucket: str = DEFAULT_BUCKET, inputs: InputLocations | None = None
) -> TrainingConfig:
    """The spec as a `TrainingConfig` with every default resolved; `SpecInvalid` lists every bad field.

    `default_bucket` is where bare key prefixes (`datasets/flowers`) live: the service's artifact bucket.
    `inputs` confines the dataset and weights URIs; the edge (the servicer) passes it for every spec a client
    sends. A stored spec read back by a worker was confined when it was accepted, so it is checked without.
    """
    c = Checker(pb.TrainingSpec.DESCRIPTOR)
    dataset = _dataset(c, default_bucket, inputs, spec.dataset)
    augmentation = _augmentation(c, spec.augmentation)
    model = _model(c, default_bucket, inputs, spec.model)
    classifier = _stage(c, "classifier", spec.classifier, StageConfig.learning_rate)
    architecture = None if c.failed("model.architecture") else model.architecture
    fine_tuning = _fine_tuning(c, spec.fine_tuning, classifier, architecture)
    tpr = c.number(spec.open_set, "open_set.target_true_positive_rate")
    open_set = OpenSetConfig(
        score=c.enum(spec.open_set, "open_set.score", OPEN_SET_SCORES), target_true_positive_rate=tpr
    )
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


def _dataset(c: Checker, default_bucket: str, inputs: InputLocations | None, msg: pb.DatasetSpec) -> DatasetConfig:
    if msg.uri.strip("/"):
        _location(c, default_bucket, inputs, "dataset.uri", msg.uri)
    else:  # the field is REQUIRED (field_behavior)
        c.fail("dataset.uri", f"is required: s3://BUCKET/PREFIX or a key prefix (datasets/NAME), got {msg.uri!r}")
    for name, uri in (
        ("validation_uri", msg.validation_uri),
        ("test_uri", msg.test_uri),
        ("unknown_uri", msg.unknown_uri),
    ):
        if uri:
            _location(c, default_bucket, inputs, f"dataset.{name}", uri)
    split = c.number(msg, "dataset.validation_split")
    image_size = c.number(msg, "dataset.image_size")
    cache_max_mb = c.number(msg, "dataset.cache_max_mb")
    return DatasetConfig(
        uri=msg.uri,
        validation_uri=msg.validation_uri or None,
        test_uri=msg.test_uri or None,
        unknown_uri=msg.unknown_uri or None,
        validation_split=split,
        image_size=image_size,
        class_balancing=c.enum(msg, "dataset.class_balancing", CLASS_BALANCINGS),
        cache_max_mb=cache_max_mb,
    )


def _augmentation(c: Checker, msg: pb.AugmentationSpec) -> AugmentationConfig:
    path = "augmentation"
    zoom_min = c.number(msg, f"{path}.zoom_min_scale")
    zoom_max = c.number(msg, f"{path}.zoom_max_scale")
    if not c.failed(f"{path}.zoom_min_scale") and not c.failed(f"{path}.zoom_max_scale") and zoom_min > zoom_max:
        c.fail(
            f"{path}.zoom_min_scale",
            f"must be <= zoom_max_scale ({protoreflect.format_number(zoom_max)}), "
            f"got {protoreflect.format_number(zoom_min)}",
        )
    return AugmentationConfig(
        horizontal_flip=msg.horizontal_flip,
        vertical_flip=msg.vertical_flip,
        rotation_degrees=c.number(msg, f"{path}.rotation_degrees"),
        zoom_min_scale=zoom_min,
        zoom_max_scale=zoom_max,
        brightness=c.number(msg, f"{path}.brightness"),
        contrast=c.number(msg, f"{path}.contrast"),
        saturation=c.number(msg, f"{path}.saturation"),
        hue=c.number(msg, f"{path}.hue"),
        shear_degrees=c.number(msg, f"{path}.shear_degrees"),
        gaussian_noise_std=c.number(msg, f"{path}.gaussian_noise_std"),
        copies_per_original=c.number(msg, f"{path}.copies_per_original"),
    )


def _model(c: Checker, default_bucket: str, inputs: InputLocations | None, msg: pb.ModelSpec) -> ModelConfig:
    weights = c.enum(msg, "model.weights", WEIGHTS_SOURCES)
    # weights_uri is required iff weights is URI; skipped when weights itself is bad (already reported).
    uri_path, uri = "model.weights_uri", msg.weights_uri
    if not c.failed("model.weights"):
        if weights is WeightsSource.URI and not uri:
            c.fail(uri_path, "is required when model.weights is WEIGHTS_SOURCE_URI: s3://BUCKET/KEY or a key")
        elif weights is WeightsSource.URI:
            _location(c, default_bucket, inputs, uri_path, uri, folder=False)
        elif uri:
            c.fail(uri_path, f"must be empty unless model.weights is WEIGHTS_SOURCE_URI, got {uri!r}")
        if msg.weights_sha256 and weights is not WeightsSource.URI:
            c.fail("model.weights_sha256", "must be empty unless model.weights is WEIGHTS_SOURCE_URI")
        elif msg.weights_sha256 and not _SHA256.fullmatch(msg.weights_sha256.lower()):
            c.fail("model.weights_sha256", f"must be 64 hex digits (a sha256), got {msg.weights_sha256!r}")
    classifier_dim = c.number(msg, "model.classifier_dim")
    dropout = c.number(msg, "model.dropout")
    return ModelConfig(
        architecture=c.enum(msg, "model.architecture", ARCHITECTURES),
        weights=weights,
        weights_uri=msg.weights_uri or None,
        weights_sha256=msg.weights_sha256.lower() or None,
        classifier_dim=classifier_dim,
        dropout=dropout,
        activation=c.enum(msg, "model.activation", ACTIVATIONS),
    )


def _stage(
    c: Checker,
    path: str,
    msg: pb.StageSpec,
    default_lr: float,
    epochs_range: protoreflect.Interval | None = None,
    epochs_note: str = "",
) -> StageConfig:
    """`epochs_range` replaces the declared range of `{path}.epochs` (None: keep it)."""
    epochs = c.number(msg, f"{path}.epochs", allowed=epochs_range, note=epochs_note)
    lr = c.number(msg, f"{path}.learning_rate", default=default_lr)
    batch_size = c.number(msg, f"{path}.batch_size")
    label_smoothing = c.number(msg, f"{path}.label_smoothing")
    clip = c.number(msg, f"{path}.gradient_clip_norm")
    # The schedule's ranges depend on the stage's epochs and LR: skipped where those are bad themselves.
    epochs_ok = not c.failed(f"{path}.epochs")
    lr_ok = not c.failed(f"{path}.learning_rate")
    return StageConfig(
        epochs=epochs,
        learning_rate=lr,
        batch_size=batch_size,
        optimizer=_optimizer(c, f"{path}.optimizer", msg.optimizer),
        schedule=_schedule(c, path, msg.schedule, epochs if epochs_ok else None, lr if lr_ok else None),
        early_stopping=_early_stopping(c, f"{path}.early_stopping", msg.early_stopping),
        label_smoothing=label_smoothing,
        gradient_clip_norm=clip,
    )


def _optimizer(c: Checker, path: str, msg: pb.OptimizerSpec) -> OptimizerConfig:
    kind = c.enum(msg, f"{path}.type", OPTIMIZER_TYPES)
    momentum = c.number(msg, f"{path}.momentum")
    if kind is OptimizerType.SGD and msg.nesterov and not c.failed(f"{path}.momentum") and momentum == 0:
        # torch.optim.SGD refuses this at construction; report it before any work starts instead.
        c.fail(f"{path}.nesterov", f"needs {path}.momentum > 0 with SGD, got momentum 0")
    decay_default = ADAMW_DEFAULT_WEIGHT_DECAY if kind is OptimizerType.ADAMW else None
    return OptimizerConfig(
        type=kind,
        momentum=momentum,
        nesterov=msg.nesterov,
        weight_decay=c.number(msg, f"{path}.weight_decay", default=decay_default),
        beta1=c.number(msg, f"{path}.beta1"),
        beta2=c.number(msg, f"{path}.beta2"),
    )


def _schedule(c: Checker, stage: str, msg: pb.ScheduleSpec, epochs: int | None, lr: float | None) -> ScheduleConfig:
    """`epochs` and `lr` are the stage's, or None where they are invalid (then the checks against them are off)."""
    path = f"{stage}.schedule"
    kind = c.enum(msg, f"{path}.type", SCHEDULE_TYPES)
    # warmup_epochs, min_learning_rate and max_learning_rate are also bounded by the stage's epochs and LR.
    warmup_path, floor_path = f"{path}.warmup_epochs", f"{path}.min_learning_rate"
    peak_path = f"{path}.max_learning_rate"
    if epochs is None:
        warmup = c.number(msg, warmup_path)
    else:
        warmup = c.number(
            msg,
            warmup_path,
            allowed=c.range_of(warmup_path).below(epochs, inclusive=False),
            note=f" (less than {stage}.epochs)",
        )
    step_epochs = c.number(msg, f"{path}.step_epochs")
    gamma = c.number(msg, f"{path}.gamma")
    if lr is None:
        min_lr = c.number(msg, floor_path)
    else:
        min_lr = c.number(
            msg,
            floor_path,
            allowed=c.range_of(floor_path).below(lr, inclusive=False),
            note=f" (below {stage}.learning_rate)",
        )
    max_lr: float | None = None
    if msg.HasField("max_learning_rate"):
        if lr is None:
            max_lr = c.number(msg, peak_path)
        else:
            max_lr = c.number(
                msg,
                peak_path,
                allowed=c.range_of(peak_path).above(lr, inclusive=False),
                note=f" ({stage}.learning_rate)",
            )
    elif kind in (ScheduleType.ONE_CYCLE, ScheduleType.CYCLIC) and lr is not None:
        max_lr = float32.shortest(PEAK_LR_FACTOR * lr)  # the documented default peak; other schedules have none
    cycle_epochs = c.number(msg, f"{path}.cycle_epochs")
    restart_epochs = c.number(msg, f"{path}.restart_epochs")
    multiplier = c.number(msg, f"{path}.restart_multiplier")
    patience = c.number(msg, f"{path}.plateau_patience")
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


def _early_stopping(c: Checker, path: str, msg: pb.EarlyStoppingSpec) -> EarlyStoppingConfig:
    patience = c.number(msg, f"{path}.patience")
    min_delta = c.number(msg, f"{path}.min_delta")
    return EarlyStoppingConfig(
        enabled=msg.enabled,
        monitor=c.enum(msg, f"{path}.monitor", METRICS),
        patience=patience,
        min_delta=min_delta,
        restore_best_weights=c.read(msg, f"{path}.restore_best_weights"),
    )


def _fine_tuning(
    c: Checker, msg: pb.FineTuningSpec, classifier: StageConfig, architecture: Architecture | None
) -> FineTuningConfig:
    """Checked even when disabled: a config never holds out-of-range values, used or not."""
    path = "fine_tuning"
    classifier_lr_ok = not c.failed("classifier.learning_rate")
    # Default LR: the classifier's / 10; a bad classifier LR is reported once, not again through this default.
    default_lr = fine_tuning_default_lr(classifier.learning_rate if classifier_lr_ok else StageConfig.learning_rate)
    if msg.allow_long_fine_tuning:
        stage = _stage(c, f"{path}.stage", msg.stage, default_lr, _LONG_FINE_TUNING)
    else:
        stage = _stage(c, f"{path}.stage", msg.stage, default_lr, epochs_note=f" unless {path}.allow_long_fine_tuning")
    lr_path = f"{path}.stage.learning_rate"
    too_high = above_lr_limit(stage.learning_rate, classifier.learning_rate)
    if too_high and classifier_lr_ok and not c.failed(lr_path) and not msg.override_learning_rate_limit:
        limit = protoreflect.format_number(fine_tuning_default_lr(classifier.learning_rate))
        c.fail(
            lr_path,
            f"must be <= classifier.learning_rate / {FINE_TUNING_LR_DIVISOR} = {limit} unless "
            f"{path}.override_learning_rate_limit, got {protoreflect.format_number(stage.learning_rate)}",
        )
    return FineTuningConfig(
        enabled=msg.enabled, stage=stage, last_n_blocks=_unfreeze(c, f"{path}.unfreeze", msg.unfreeze, architecture)
    )


def above_lr_limit(fine_tuning_lr: float, classifier_lr: float) -> bool:
    """Whether a fine-tuning LR breaks the limit the classifier's LR sets (FineTuningSpec.override_learning_rate_limit
    lifts it)."""
    return fine_tuning_lr > classifier_lr / FINE_TUNING_LR_DIVISOR * (1 + _FLOAT32_SLACK)


def _unfreeze(c: Checker, path: str, msg: pb.UnfreezeSpec, architecture: Architecture | None) -> int | None:
    """The number of blocks to unfreeze, or None for the whole base."""
    which = msg.WhichOneof("which")
    if which is None:
        return None
    if which == "all":
        if not msg.all:  # `all: false` could be read as "freeze everything": ambiguous, so refused
            c.fail(f"{path}.all", "must be true when set (or set last_n_blocks instead), got false")
        return None
    blocks_path = f"{path}.last_n_blocks"
    if architecture is None:  # a bad architecture is reported already: only the declared range applies
        return int(c.number(msg, blocks_path))
    blocks = c.range_of(blocks_path).below(BLOCK_COUNTS[architecture], inclusive=True)
    return int(c.number(msg, blocks_path, allowed=blocks, note=f" for {architecture.value}"))


def _run(c: Checker, msg: pb.RunSpec) -> RunConfig:
    repeats = c.number(msg, "run.repeats")
    workers = c.number(msg, "run.data_loader_workers")
    retries = c.number(msg, "run.max_retries")
    devices = c.number(msg, "run.devices")
    return RunConfig(
        seed=msg.seed,
        repeats=repeats,
        precision=c.enum(msg, "run.precision", PRECISIONS),
        device=c.enum(msg, "run.device", DEVICES),
        data_loader_workers=workers,
        max_retries=retries,
        devices=devices,
        deterministic=msg.deterministic,
    )


def _output_model(c: Checker, output_model: str, dataset_uri: str) -> str:
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
