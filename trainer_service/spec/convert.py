"""From a `TrainingConfig` back to protobuf, and from a job's stored spec to its config.

`config_to_spec` is the inverse of `validate.validate_spec`: the resolved spec with every field explicitly set,
which is what the API returns and what the job store keeps (`jobs.spec_json`, docs/architecture.md §2).
`load_stored_spec` reads that stored JSON back for the processes that run the job: the worker and the executor.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import json_format
from visiontune.settings import DEFAULT_BUCKET
from visiontune.v1 import training_spec_pb2 as pb

from trainer_service.spec.config import (
    ACTIVATIONS,
    ARCHITECTURES,
    CLASS_BALANCINGS,
    DEVICES,
    METRICS,
    OPEN_SET_SCORES,
    OPTIMIZER_TYPES,
    PRECISIONS,
    SCHEDULE_TYPES,
    SHORT_FINE_TUNING_EPOCHS,
    WEIGHTS_SOURCES,
    StageConfig,
    TrainingConfig,
)
from trainer_service.spec.validate import above_lr_limit, validate_spec

__all__ = ["StoredSpec", "config_to_spec", "load_stored_spec"]


@dataclass(frozen=True)
class StoredSpec:
    """A job's spec as stored, and the config it resolves to."""

    spec: pb.TrainingSpec
    config: TrainingConfig


def load_stored_spec(spec_json: str, *, default_bucket: str = DEFAULT_BUCKET) -> StoredSpec:
    """The spec CreateJob stored (JSON of the resolved spec), validated again into its config.

    Validating again costs a millisecond and means a spec stored by another version of the trainer is read by this
    version's rules; json_format.ParseError or SpecInvalid when it cannot be.
    """
    spec = json_format.Parse(spec_json, pb.TrainingSpec())
    return StoredSpec(spec=spec, config=validate_spec(spec, default_bucket=default_bucket))


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
            class_balancing=CLASS_BALANCINGS.to_proto(d.class_balancing),
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
            architecture=ARCHITECTURES.to_proto(m.architecture),
            weights=WEIGHTS_SOURCES.to_proto(m.weights),
            weights_uri=m.weights_uri or "",
            weights_sha256=m.weights_sha256 or "",
            classifier_dim=m.classifier_dim,
            dropout=m.dropout,
            activation=ACTIVATIONS.to_proto(m.activation),
        ),
        classifier=_stage_to_spec(config.classifier),
        fine_tuning=pb.FineTuningSpec(
            enabled=f.enabled,
            stage=_stage_to_spec(f.stage),
            unfreeze=pb.UnfreezeSpec(all=True)
            if f.last_n_blocks is None
            else pb.UnfreezeSpec(last_n_blocks=f.last_n_blocks),
            # The config does not record whether a limit was lifted; the resolved spec lifts exactly the limits its
            # values need, so it is valid on its own.
            override_learning_rate_limit=above_lr_limit(f.stage.learning_rate, config.classifier.learning_rate),
            allow_long_fine_tuning=f.stage.epochs > SHORT_FINE_TUNING_EPOCHS,
        ),
        open_set=pb.OpenSetSpec(
            score=OPEN_SET_SCORES.to_proto(o.score), target_true_positive_rate=o.target_true_positive_rate
        ),
        run=pb.RunSpec(
            seed=r.seed,
            repeats=r.repeats,
            precision=PRECISIONS.to_proto(r.precision),
            device=DEVICES.to_proto(r.device),
            data_loader_workers=r.data_loader_workers,
            max_retries=r.max_retries,
            devices=r.devices,
            deterministic=r.deterministic,
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
            type=OPTIMIZER_TYPES.to_proto(opt.type),
            momentum=opt.momentum,
            nesterov=opt.nesterov,
            weight_decay=opt.weight_decay,
            beta1=opt.beta1,
            beta2=opt.beta2,
        ),
        schedule=pb.ScheduleSpec(
            type=SCHEDULE_TYPES.to_proto(sched.type),
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
            monitor=METRICS.to_proto(early.monitor),
            patience=early.patience,
            min_delta=early.min_delta,
            restore_best_weights=early.restore_best_weights,
        ),
        label_smoothing=stage.label_smoothing,
        gradient_clip_norm=stage.gradient_clip_norm,
    )
