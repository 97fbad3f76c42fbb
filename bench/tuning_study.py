"""The tuning benchmark's study: its two arms, its settings, and the `StudySpec` each arm runs (the base
TrainingSpec and the search space; bench/tuning.py's docstring has the method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from google.protobuf import duration_pb2
from visiontune.v1 import study_pb2
from visiontune.v1 import training_spec_pb2 as pb

BUCKET: Final = "visiontune"  # validate_spec's default bucket; the bench never touches S3
RANDOM: Final = "random search"
TPE_HB: Final = "TPE + Hyperband"

# Optimiser names as the categorical values the StudySpec lists (enum value names), shortened for tables.
OPTIMIZERS: Final = {"OPTIMIZER_TYPE_ADAM": "Adam", "OPTIMIZER_TYPE_SGD": "SGD"}


@dataclass(frozen=True)
class Arm:
    name: str
    sampler: study_pb2.Sampler.ValueType
    pruner: study_pb2.PrunerType.ValueType


ARMS: Final = (
    Arm(RANDOM, study_pb2.SAMPLER_RANDOM, study_pb2.PRUNER_TYPE_NONE),
    Arm(TPE_HB, study_pb2.SAMPLER_TPE, study_pb2.PRUNER_TYPE_HYPERBAND),
)


@dataclass(frozen=True)
class Settings:
    seeds: int
    budget_epochs: int
    max_epochs: int  # R: every trial's classifier.epochs, Hyperband's max_resource
    reduction_factor: int
    per_class: int
    val_per_class: int
    test_per_class: int
    size: int
    data_seed: int
    threads: int
    retrain: bool
    share_features: bool

    def check(self) -> None:
        problems = []
        if self.seeds < 1:
            problems.append(f"--seeds must be >= 1, got {self.seeds}")
        if self.max_epochs < 1:
            problems.append(f"--max-epochs must be >= 1, got {self.max_epochs}")
        if self.budget_epochs < self.max_epochs:
            problems.append(f"--budget-epochs must be >= --max-epochs ({self.max_epochs}), got {self.budget_epochs}")
        if min(self.per_class, self.val_per_class) < 1 or self.test_per_class < 0:
            problems.append("--per-class and --val-per-class must be >= 1, --test-per-class >= 0")
        if self.threads < 1:
            problems.append(f"--threads must be >= 1, got {self.threads}")
        if problems:
            raise ValueError("; ".join(problems))


# -- the study spec -----------------------------------------------------------------------------------------------


def base_spec(s: Settings) -> pb.TrainingSpec:
    """What every trial starts from: MobileNetV2 on ImageNet weights, stage 1 only, R epochs, cosine LR."""
    return pb.TrainingSpec(
        dataset=pb.DatasetSpec(uri="bench/fashion-mnist", image_size=s.size),
        model=pb.ModelSpec(architecture=pb.ARCHITECTURE_MOBILENET_V2, weights=pb.WEIGHTS_SOURCE_IMAGENET),
        classifier=pb.StageSpec(epochs=s.max_epochs, schedule=pb.ScheduleSpec(type=pb.SCHEDULE_TYPE_COSINE)),
        run=pb.RunSpec(
            seed=s.data_seed, repeats=1, device=pb.DEVICE_CPU, precision=pb.PRECISION_FP32, data_loader_workers=0
        ),
        output_model="bench-tuning",
    )


def search_space() -> list[study_pb2.SearchParameter]:
    def categorical(path: str, *values: str) -> study_pb2.SearchParameter:
        return study_pb2.SearchParameter(path=path, categorical=study_pb2.Categorical(values=list(values)))

    return [
        study_pb2.SearchParameter(
            path="classifier.learning_rate", float_range=study_pb2.FloatRange(min=1e-5, max=1e-1, log=True)
        ),
        categorical("model.classifier_dim", "32", "64", "128", "256"),
        study_pb2.SearchParameter(path="model.dropout", float_range=study_pb2.FloatRange(min=0.0, max=0.7)),
        categorical("classifier.optimizer.type", *OPTIMIZERS),
        categorical("classifier.batch_size", "16", "32", "64"),
    ]


def study_spec(s: Settings, arm: Arm, seed: int) -> study_pb2.StudySpec:
    # StudyBudget counts trials or wall time, not epochs: the epoch budget is the bench's own loop, and the
    # duration is only there because the spec needs a limit.
    return study_pb2.StudySpec(
        base_spec=base_spec(s),
        parameters=search_space(),
        objective=study_pb2.Objective(metric=pb.METRIC_VALIDATION_ACCURACY, direction=study_pb2.DIRECTION_MAXIMIZE),
        budget=study_pb2.StudyBudget(max_duration=duration_pb2.Duration(seconds=24 * 3600)),
        sampler=arm.sampler,
        pruner=study_pb2.PrunerSpec(type=arm.pruner, min_resource=1, reduction_factor=s.reduction_factor),
        seed=seed,
    )


def short_params(params: dict[str, str | int | float]) -> str:
    """A trial's values in a few words, for progress lines and tables."""
    lr = float(params["classifier.learning_rate"])
    return (
        f"{OPTIMIZERS.get(str(params['classifier.optimizer.type']), params['classifier.optimizer.type'])} "
        f"LR {lr:.2g}, head {params['model.classifier_dim']}, dropout {float(params['model.dropout']):.2f}, "
        f"batch {params['classifier.batch_size']}"
    )
