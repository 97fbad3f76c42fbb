"""Every leaf field of TrainingSpec reaches the engine and changes what happens.

Each test goes spec -> `validate_spec` -> engine and compares a run (or built object) with the field at its
default against one with the field changed, using the cheapest observable that proves the effect: the per-step
learning rates, the optimizer the loop built, the batches' labels, the epochs run, the trained weights.

Coverage: `@covers(...)` registers the tests of this module per field path; `EXTERNAL` maps the fields whose
effect needs S3 or a real job (or is already proven elsewhere) to those tests, which must exist by name.
`test_every_spec_field_has_a_test` enumerates the leaf fields from the proto descriptor, so a field added to
training_spec.proto without a test fails it. That check is why this is one module: the coverage registry sees
the tests of this file, one per leaf field, in the proto's order.

Speed: 12 training and 6 validation images of 32 px (three colour labels, imbalanced 4:1:1); a random
MobileNetV3-small with BatchNorm statistics measured on them, served as WEIGHTS_SOURCE_URI by a stand-in store;
mostly 1-4 epochs; one torch thread (two threads on a busy 2-core machine are many times slower for these tiny
operations). Runs are cached per spec, so a base shared by several fields trains once.
"""

from __future__ import annotations

import ast
import copy
import functools
import io
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from PIL import Image
from test_augment import SWITCHES
from torch import Tensor, nn
from trainer_service.datasets.cache import materialize
from trainer_service.datasets.listing import ImageItem
from trainer_service.datasets.splits import stratified_split
from trainer_service.engine import batches as engine_batches
from trainer_service.engine import loop
from trainer_service.engine.augment import build_eval_transform
from trainer_service.engine.batches import Split
from trainer_service.engine.context import configure_kernels, resolve_autocast, resolve_device, run_context
from trainer_service.engine.hardware import Gpu, Hardware, device_warnings
from trainer_service.engine.loop import CLASSIFIER, FINE_TUNING, EpochRecord, NoOpCallbacks, StageData
from trainer_service.engine.models import Classifier, build_classifier, normalization
from trainer_service.engine.recipe import PreparedData, RepeatResult, train
from trainer_service.engine.schedules import PlateauReducer, lr_curve
from trainer_service.jobs.executor import max_retries_of
from trainer_service.jobs.store import JobStore
from trainer_service.spec.config import (
    Architecture,
    DeviceKind,
    Metric,
    ModelConfig,
    OpenSetScore,
    ScheduleType,
    StageConfig,
    TrainingConfig,
)
from trainer_service.spec.convert import config_to_spec
from trainer_service.spec.validate import SpecInvalid, validate_spec
from trainer_service.weights import load_base_weights
from visiontune.names import ModelVersionName
from visiontune.v1 import training_spec_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
LABELS = ["red", "green", "blue"]
STAGES = {"classifier": CLASSIFIER, "fine_tuning.stage": FINE_TUNING}
STAGE_LR = {"classifier": 0.01, "fine_tuning.stage": 0.001}  # the base spec's (fine-tuning: classifier / 10)


# -- coverage: field path -> the tests that prove it --------------------------------------------------------

COVERED: dict[str, list[str]] = {}

# Fields whose effect is proven by a test in another file (they need S3 and a real job, or the other test already
# goes through the engine); `test_every_spec_field_has_a_test` checks that each named test exists.
_JOBS = "tests/integration/test_training_jobs.py"
_A_JOB = f"{_JOBS}::test_a_job_trains_streams_its_progress_and_publishes_a_model_version"
_SEPARATE_SETS = f"{_JOBS}::test_separate_validation_test_and_unknown_sets_reach_the_job_result"
_SWITCH_TEST = "tests/unit/test_augment.py::test_each_switch_adds_its_transform_and_changes_the_output"
EXTERNAL: dict[str, list[str]] = {
    "dataset.uri": [_A_JOB, "tests/integration/test_data_s3.py::test_list_image_folder"],
    "dataset.validation_uri": [_SEPARATE_SETS],
    "dataset.test_uri": [_SEPARATE_SETS],
    "dataset.unknown_uri": [_SEPARATE_SETS],
    "dataset.validation_split": [_A_JOB],  # asserts the per-label validation counts of a 0.25 split
    "dataset.cache_max_mb": [
        _SEPARATE_SETS,  # cache_max_mb 0: the job leaves no decoded set in the cache
        "tests/integration/test_data_s3.py::test_cache_disabled_or_too_small_uses_a_private_file",
    ],
    "model.weights_uri": [
        "tests/integration/test_model_weights.py::test_a_state_dict_in_the_artifact_bucket_loads_into_the_backbone",
        "tests/integration/test_model_weights.py::test_a_state_dict_in_another_bucket_of_the_same_server",
    ],
    "model.weights_sha256": [
        "tests/integration/test_model_weights.py::test_pinned_weights_load_only_when_the_object_has_the_pinned_digest",
        "tests/unit/test_input_locations.py::test_weights_sha256_is_checked_for_shape_and_only_goes_with_uri_weights",
    ],
    "output_model": [_SEPARATE_SETS],
    "run.devices": [
        "tests/unit/test_distributed.py::test_two_processes_reach_the_metrics_of_one",
        "tests/unit/test_kube_manifest.py::test_a_job_on_several_devices_asks_its_one_pod_for_that_many_gpus",
    ],  # the published model_version is models/{output_model}/versions/{job}
    **{f"augmentation.{name}": [_SWITCH_TEST] for name in SWITCHES},
}


def covers(*paths: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def register(test: Callable[..., None]) -> Callable[..., None]:
        for path in paths:
            COVERED.setdefault(path, []).append(test.__name__)
        return test

    return register


def covers_stage(*fields: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A test parametrized over `prefix` in STAGES covers the field in both stages."""
    return covers(*(f"{prefix}.{field}" for prefix in STAGES for field in fields))


def stage_cases(names: str, values: Mapping[str, Any]) -> pytest.MarkDecorator:
    """Parametrize ("prefix", *names) over STAGES x values (id -> value or tuple of values); the fine-tuning stage
    with the first value only: one value proves the stage's wiring, and the classifier stage (cheap, on cached
    features) takes them all."""
    cases = [
        pytest.param(prefix, *(value if isinstance(value, tuple) else (value,)), id=f"{prefix}-{name}")
        for prefix in STAGES
        for name, value in (list(values.items()) if prefix == "classifier" else list(values.items())[:1])
    ]
    return pytest.mark.parametrize(("prefix", *names.split(",")), cases)


def _leaf_paths(descriptor: Descriptor, prefix: str = "") -> Iterator[str]:
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            yield from _leaf_paths(field.message_type, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}"


def _test_exists(reference: str) -> bool:
    file, _, name = reference.partition("::")
    tree = ast.parse((REPO / file).read_text())
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in tree.body)


# -- data, specs and runs ---------------------------------------------------------------------------------------


def _split(targets: list[int], seed: int, *, bright: bool = True) -> Split:
    """Each label a bright colour channel over noise (learnable in a few steps); `bright=False`: noise only."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(targets, dtype=np.int64)
    images = rng.integers(0, 120, size=(len(labels), 3, SIZE, SIZE), dtype=np.uint8)
    if bright:
        for i, t in enumerate(labels):
            images[i, t] = 240
    return Split(images=images, targets=labels)


TRAIN = _split([0, 1, 0, 0, 2, 0, 0, 1, 0, 0, 2, 0], 1)  # 8 / 2 / 2: imbalanced for class_balancing
VAL = _split([0, 1, 2, 0, 1, 2], 2)
DATA = PreparedData(labels=LABELS, train=TRAIN, val=VAL, unknown=_split([0] * 6, 3, bright=False))


class _FakeStore:
    """Stands in for the ArtifactStore `load_base_weights` reads a WEIGHTS_SOURCE_URI state_dict from; the real
    S3 path is tests/integration/test_model_weights.py."""

    bucket = "visiontune"

    def __init__(self, objects: Mapping[tuple[str, str], dict[str, Tensor]]) -> None:
        self.objects = {where: _saved(state) for where, state in objects.items()}
        self.read: list[tuple[str, str]] = []
        self._bucket = self.bucket

    def for_bucket(self, bucket: str) -> _FakeStore:
        other = _FakeStore({})
        other.objects, other._bucket, other.read = self.objects, bucket, self.read
        return other

    def download_file(self, key: str, path: Path) -> None:
        self.read.append((self._bucket, key))
        path.write_bytes(self.objects[(self._bucket, key)])


def _saved(state: Mapping[str, Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def _calibrated_backbone(seed: int) -> dict[str, Tensor]:
    """A random MobileNetV3-small whose BatchNorm statistics are measured on the training images.

    A freshly initialised backbone is useless frozen: its eval-mode BatchNorms (mean 0, variance 1) shrink the
    activations to ~1e-10, so every image has the same features and stage 1 learns only the head's bias. With
    statistics measured on the data the frozen base passes the images on, as a pretrained one does.
    """
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v3_small(weights=None)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over what it sees
    mean, std = normalization(ModelConfig(architecture=Architecture.MOBILENET_V3_SMALL))
    images = build_eval_transform(SIZE, mean, std)(torch.from_numpy(np.concatenate([TRAIN.images, VAL.images])))
    with torch.no_grad():
        model.train()(images)
    return model.state_dict()


BASE_WEIGHTS = "weights/mobilenet_v3_small.pth"


@functools.cache
def _store() -> _FakeStore:
    """Where the base spec's backbone (WEIGHTS_SOURCE_URI, BASE_WEIGHTS) comes from."""
    return _FakeStore({("visiontune", BASE_WEIGHTS): _calibrated_backbone(0)})


def _base_spec() -> pb.TrainingSpec:
    """Small and fast; everything not set here is at its default. CPU explicitly, even where a GPU exists."""
    return pb.TrainingSpec(
        dataset=pb.DatasetSpec(uri="datasets/colours", image_size=SIZE),
        model=pb.ModelSpec(
            architecture=pb.ARCHITECTURE_MOBILENET_V3_SMALL,
            weights=pb.WEIGHTS_SOURCE_URI,
            weights_uri=BASE_WEIGHTS,
            classifier_dim=16,
        ),
        classifier=pb.StageSpec(epochs=1, batch_size=4, learning_rate=STAGE_LR["classifier"]),
        fine_tuning=pb.FineTuningSpec(stage=pb.StageSpec(epochs=1, batch_size=4)),
        run=pb.RunSpec(data_loader_workers=0, device=pb.DEVICE_CPU),
    )


def _parent(spec: Message, path: str) -> tuple[Message, str]:
    *parents, leaf = path.split(".")
    for name in parents:
        spec = getattr(spec, name)
    return spec, leaf


def _spec(values: Mapping[str, Any] | None = None, clear: Iterable[str] = ()) -> pb.TrainingSpec:
    """The base spec with the fields in `clear` unset (so at their defaults) and `values` set, by path."""
    spec = _base_spec()
    for path in clear:
        parent, leaf = _parent(spec, path)
        parent.ClearField(leaf)
    for path, value in (values or {}).items():
        parent, leaf = _parent(spec, path)
        setattr(parent, leaf, value)
    return spec


def _head(model: Classifier) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}


def _same(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _SpyLoss(nn.Module):
    """The loop's criterion, recording the targets of every training batch (evaluation runs without grad)."""

    def __init__(self, inner: nn.CrossEntropyLoss, batches: list[Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self.batches = batches

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            self.batches.append(targets.detach().clone())
        loss: Tensor = self.inner(logits, targets)
        return loss


_BUILD_OPTIMIZER = loop.build_optimizer
_CRITERION = loop._criterion
_DATA_LOADER = engine_batches.DataLoader


@dataclass
class StageRun:
    """What one `run_stage` did, kept small (no model or optimizer state, so cached runs cost little memory)."""

    config: TrainingConfig
    stage: StageConfig
    history: list[EpochRecord]
    lrs: list[float]
    best_value: float | None
    best_epoch: int
    stopped_early: bool
    optimizer: type[torch.optim.Optimizer]
    param_group: dict[str, Any]  # the optimizer's hyperparameters (without the parameters)
    loss_weight: Tensor | None
    label_smoothing: float
    batches: list[Tensor]  # the labels of every training batch, in order
    cached_features: bool
    trainable: frozenset[str]  # parameter names that required a gradient during the stage
    changed: frozenset[str]  # parameter names whose values the stage changed
    update_norm: float  # L2 norm of (parameters after - before) over the trainable ones
    head: dict[str, Tensor]  # after the stage (after any restore of the best weights)
    epoch_heads: list[dict[str, Tensor]]  # after each epoch (what each checkpoint held)
    loader_workers: list[int]  # num_workers of every DataLoader the stage made

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lrs) // len(self.history)


class _Spy(NoOpCallbacks):
    """Callbacks plus the stand-ins for the loop's optimizer, criterion and DataLoader factories."""

    def __init__(self, model: Classifier) -> None:
        self.model = model
        self.optimizers: list[torch.optim.Optimizer] = []
        self.criteria: list[nn.CrossEntropyLoss] = []
        self.batches: list[Tensor] = []
        self.loader_workers: list[int] = []
        self.cached: list[bool] = []
        self.start: dict[str, Tensor] = {}
        self.trainable: frozenset[str] = frozenset()
        self.epoch_heads: list[dict[str, Tensor]] = []

    def build_optimizer(self, params: Any, stage: StageConfig) -> torch.optim.Optimizer:
        optimizer = _BUILD_OPTIMIZER(params, stage)
        self.optimizers.append(optimizer)
        return optimizer

    def criterion(self, *args: Any) -> nn.Module:
        inner = _CRITERION(*args)
        assert isinstance(inner, nn.CrossEntropyLoss)
        self.criteria.append(inner)
        return _SpyLoss(inner, self.batches)

    def data_loader(self, *args: Any, **kwargs: Any) -> Any:
        self.loader_workers.append(kwargs["num_workers"])
        return _DATA_LOADER(*args, **kwargs)

    # -- Callbacks

    def stage_started(self, repeat: int, stage: str, epochs: int, cached_features: bool) -> None:
        self.cached.append(cached_features)
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.trainable = frozenset(n for n, p in self.model.named_parameters() if p.requires_grad)

    def checkpoint(self, state: dict[str, Any]) -> None:
        self.epoch_heads.append(_head(self.model))


_STAGE_RUNS: dict[tuple[str, bytes], StageRun] = {}


def stage_run(stage_name: str, spec: pb.TrainingSpec) -> StageRun:
    """`loop.run_stage` of one stage on a fresh model, as the spec asks (cached per spec)."""
    key = (stage_name, spec.SerializeToString(deterministic=True))
    if key not in _STAGE_RUNS:
        _STAGE_RUNS[key] = _run_stage(stage_name, spec)
    return _STAGE_RUNS[key]


_MODELS: dict[tuple[ModelConfig, int], Classifier] = {}


def _fresh_model(model: ModelConfig, seed: int) -> Classifier:
    """`build_classifier(model, labels, load_base_weights(model, store))` after `torch.manual_seed(seed)`, as the
    worker's factory is called by `recipe.train`. Built once per (model, seed) and copied: building is
    deterministic, and loading and initialising take longer than a stage here."""
    if (model, seed) not in _MODELS:
        torch.manual_seed(seed)
        _MODELS[(model, seed)] = build_classifier(model, len(LABELS), load_base_weights(model, _store()))
    return copy.deepcopy(_MODELS[(model, seed)])


def _run_stage(stage_name: str, spec: pb.TrainingSpec) -> StageRun:
    config = validate_spec(spec)
    model = _fresh_model(config.model, config.run.seed)
    spy = _Spy(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "build_optimizer", spy.build_optimizer)
        patch.setattr(loop, "_criterion", spy.criterion)
        patch.setattr(engine_batches, "DataLoader", spy.data_loader)
        outcome = loop.run_stage(
            model,
            config,
            stage_name,
            StageData(TRAIN, VAL, len(LABELS)),
            run_context(config),
            spy,
            repeat=0,
            seed=config.run.seed,
        )
    params = dict(model.named_parameters())
    (optimizer,), (criterion,) = spy.optimizers, spy.criteria
    state = outcome.state
    return StageRun(
        config=config,
        stage=config.classifier if stage_name == CLASSIFIER else config.fine_tuning.stage,
        history=list(state.history),
        lrs=list(outcome.lrs),
        best_value=state.best_value,
        best_epoch=state.best_epoch,
        stopped_early=state.stopped_early,
        optimizer=type(optimizer),
        param_group={k: v for k, v in optimizer.param_groups[0].items() if k != "params"},
        loss_weight=None if criterion.weight is None else criterion.weight.detach().cpu().clone(),
        label_smoothing=criterion.label_smoothing,
        batches=spy.batches,
        cached_features=spy.cached[0],
        trainable=spy.trainable,
        changed=frozenset(n for n, p in params.items() if not torch.equal(p.detach(), spy.start[n])),
        update_norm=math.sqrt(sum(float((params[n].detach() - spy.start[n]).pow(2).sum()) for n in spy.trainable)),
        head=_head(model),
        epoch_heads=spy.epoch_heads,
        loader_workers=spy.loader_workers,
    )


def pair(
    stage_name: str,
    path: str,
    value: Any,
    context: Mapping[str, Any] | None = None,
) -> tuple[StageRun, StageRun]:
    """(run with the field at `path` at its default, run with it set to `value`), both with `context` set."""
    default = stage_run(stage_name, _spec(context, clear=[path]))
    changed = stage_run(stage_name, _spec({**(context or {}), path: value}))
    assert default.config != changed.config, f"{path}: {value!r} is its default"
    return default, changed


def stage_pair(
    prefix: str,
    field: str,
    value: Any,
    context: Mapping[str, Any] | None = None,
) -> tuple[StageRun, StageRun]:
    """`pair` for a field of the stage `prefix` names, run in that stage; `context` paths are relative to the stage
    except those starting with "/" (`/model.dropout`)."""
    absolute = {(k[1:] if k.startswith("/") else f"{prefix}.{k}"): v for k, v in (context or {}).items()}
    return pair(STAGES[prefix], f"{prefix}.{field}", value, absolute)


@dataclass
class RecipeRun:
    config: TrainingConfig
    repeats: list[RepeatResult]
    stages: list[tuple[int, str, int]]  # (repeat, stage, planned epochs) as the stages started
    head: dict[str, Tensor]  # the returned (best repeat's) model's head


class _Recorder(NoOpCallbacks):
    def __init__(self) -> None:
        self.stages: list[tuple[int, str, int]] = []

    def stage_started(self, repeat: int, stage: str, epochs: int, cached_features: bool) -> None:
        self.stages.append((repeat, stage, epochs))


_RECIPE_RUNS: dict[bytes, RecipeRun] = {}


def recipe_run(spec: pb.TrainingSpec) -> RecipeRun:
    """`recipe.train` (repeats, stages, evaluation) as the worker calls it, on the in-memory data (cached)."""
    key = spec.SerializeToString(deterministic=True)
    if key not in _RECIPE_RUNS:
        config = validate_spec(spec)
        recorder = _Recorder()
        result = train(config, DATA, lambda seed: _fresh_model(config.model, seed), run_context(config), recorder)
        _RECIPE_RUNS[key] = RecipeRun(config, result.repeats, recorder.stages, _head(result.model))
    return _RECIPE_RUNS[key]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the coverage check -------------------------------------------------------------------------------------


def test_every_spec_field_has_a_test() -> None:
    leaves = set(_leaf_paths(pb.TrainingSpec.DESCRIPTOR))
    assert len(leaves) > 80  # the enumeration really walks the tree
    untested = leaves - set(COVERED) - set(EXTERNAL)
    assert not untested, f"spec fields without a test proving they reach the engine: {sorted(untested)}"
    unknown = (set(COVERED) | set(EXTERNAL)) - leaves
    assert not unknown, f"covered paths that are not spec fields: {sorted(unknown)}"
    missing = sorted({ref for refs in EXTERNAL.values() for ref in refs if not _test_exists(ref)})
    assert not missing, f"coverage table names tests that do not exist: {missing}"
    here = Path(__file__).relative_to(REPO).as_posix()
    assert all(_test_exists(f"{here}::{name}") for names in COVERED.values() for name in names)


# -- stage fields (classifier.* and fine_tuning.stage.*) --------------------------------------------------------


@covers_stage("epochs")
@pytest.mark.parametrize("prefix", STAGES)
def test_epochs_is_the_number_of_epochs_run(prefix: str) -> None:
    default, changed = stage_pair(prefix, "epochs", 2)
    assert len(default.history) == (10 if prefix == "classifier" else 5)
    assert len(changed.history) == 2
    assert [r.epochs for r in changed.history] == [2, 2]
    assert len(changed.lrs) == 2 * changed.steps_per_epoch


@covers_stage("learning_rate")
@pytest.mark.parametrize("prefix", STAGES)
def test_learning_rate_is_every_step_s_rate_and_changes_the_weights(prefix: str) -> None:
    value = STAGE_LR[prefix] / 2
    default, changed = stage_pair(prefix, "learning_rate", value)
    # Defaults: 0.003 for the classifier; the classifier's / 10 for fine-tuning.
    expected_default = 0.003 if prefix == "classifier" else STAGE_LR["classifier"] / 10
    assert default.lrs == pytest.approx([expected_default] * len(default.lrs))
    assert changed.lrs == pytest.approx([value] * len(changed.lrs))
    assert not _same(default.head, changed.head)


@covers_stage("batch_size")
@pytest.mark.parametrize("prefix", STAGES)
def test_batch_size_sets_the_batches(prefix: str) -> None:
    default, changed = stage_pair(prefix, "batch_size", 5)
    # 12 training images: the default 32 is one batch per epoch; 5 is batches of 5, 5, 2.
    assert [len(b) for b in default.batches] == [12] * len(default.history)
    assert [len(b) for b in changed.batches] == [5, 5, 2] * len(changed.history)
    assert changed.steps_per_epoch == 3


OPTIMIZER_CLASSES = {
    pb.OPTIMIZER_TYPE_SGD: torch.optim.SGD,
    pb.OPTIMIZER_TYPE_ADAMW: torch.optim.AdamW,
    pb.OPTIMIZER_TYPE_RMSPROP: torch.optim.RMSprop,
}


@covers_stage("optimizer.type")
@stage_cases("kind", {pb.OptimizerType.Name(k): k for k in OPTIMIZER_CLASSES})
def test_optimizer_type_picks_the_optimizer_and_changes_the_weights(prefix: str, kind: int) -> None:
    default, changed = stage_pair(prefix, "optimizer.type", kind)
    assert default.optimizer is torch.optim.Adam
    assert changed.optimizer is OPTIMIZER_CLASSES[kind]
    assert not _same(default.head, changed.head)


@covers_stage("optimizer.momentum")
@stage_cases("kind", {"SGD": pb.OPTIMIZER_TYPE_SGD, "RMSPROP": pb.OPTIMIZER_TYPE_RMSPROP})
def test_optimizer_momentum(prefix: str, kind: int) -> None:
    default, changed = stage_pair(prefix, "optimizer.momentum", 0.5, {"optimizer.type": kind})
    assert default.param_group["momentum"] == pytest.approx(0.9)
    assert changed.param_group["momentum"] == pytest.approx(0.5)
    assert not _same(default.head, changed.head)


@covers_stage("optimizer.nesterov")
@pytest.mark.parametrize("prefix", STAGES)
def test_optimizer_nesterov(prefix: str) -> None:
    default, changed = stage_pair(prefix, "optimizer.nesterov", True, {"optimizer.type": pb.OPTIMIZER_TYPE_SGD})
    assert default.param_group["nesterov"] is False
    assert changed.param_group["nesterov"] is True
    assert not _same(default.head, changed.head)


@covers_stage("optimizer.weight_decay")
@stage_cases("kind,default_decay", {"ADAM": (pb.OPTIMIZER_TYPE_ADAM, 0.0), "ADAMW": (pb.OPTIMIZER_TYPE_ADAMW, 0.01)})
def test_optimizer_weight_decay(prefix: str, kind: int, default_decay: float) -> None:
    default, changed = stage_pair(prefix, "optimizer.weight_decay", 0.2, {"optimizer.type": kind})
    assert default.param_group["weight_decay"] == pytest.approx(default_decay)
    assert changed.param_group["weight_decay"] == pytest.approx(0.2)
    assert not _same(default.head, changed.head)


@covers_stage("optimizer.beta1", "optimizer.beta2")
@pytest.mark.parametrize(
    ("field", "index", "value", "default_value"), [("beta1", 0, 0.5, 0.9), ("beta2", 1, 0.9, 0.999)]
)
@pytest.mark.parametrize("prefix", STAGES)
def test_optimizer_betas(prefix: str, field: str, index: int, value: float, default_value: float) -> None:
    default, changed = stage_pair(prefix, f"optimizer.{field}", value)
    assert default.param_group["betas"][index] == pytest.approx(default_value)
    assert changed.param_group["betas"][index] == pytest.approx(value)
    assert not _same(default.head, changed.head)


def _expected_lrs(run: StageRun) -> list[float]:
    """What the schedule says the run's per-step LRs are; REDUCE_ON_PLATEAU replayed on the run's own metrics."""
    stage, steps = run.stage, run.steps_per_epoch
    curve = lr_curve(stage, steps)[: len(run.lrs)]
    if stage.schedule.type is ScheduleType.REDUCE_ON_PLATEAU:
        monitor = stage.early_stopping.monitor
        reducer = PlateauReducer(stage, higher_is_better=monitor.higher_is_better)
        scales = []
        for record in run.history:
            scales.append(reducer.scale)
            reducer.update(record.metric(monitor))
        curve = [lr * scales[i // steps] for i, lr in enumerate(curve)]
    return curve


def _check_schedule(default: StageRun, changed: StageRun) -> None:
    assert default.lrs == pytest.approx(_expected_lrs(default), rel=1e-9)
    assert changed.lrs == pytest.approx(_expected_lrs(changed), rel=1e-9)
    assert changed.lrs != pytest.approx(default.lrs, rel=1e-6)


# Deterministic epochs: every epoch one batch of all 12 images (the same BatchNorm batch statistics), no dropout.
_STEADY = {"batch_size": 16, "/model.dropout": 0.0}
_PLATEAU = {
    "schedule.type": pb.SCHEDULE_TYPE_REDUCE_ON_PLATEAU,
    "epochs": 3,
    "schedule.plateau_patience": 0,
    # Plain SGD at a tiny LR changes no prediction: the training accuracy never improves, so reductions.
    "optimizer.type": pb.OPTIMIZER_TYPE_SGD,
    "learning_rate": 1e-6,
    "early_stopping.monitor": pb.METRIC_TRAIN_ACCURACY,
    **_STEADY,
}
SCHEDULE_TYPES: dict[int, dict[str, Any]] = {  # each type, with what makes it visible within the stage
    pb.SCHEDULE_TYPE_STEP: {"schedule.step_epochs": 1, "epochs": 2},
    pb.SCHEDULE_TYPE_COSINE: {},
    pb.SCHEDULE_TYPE_ONE_CYCLE: {},
    pb.SCHEDULE_TYPE_CYCLIC: {},
    pb.SCHEDULE_TYPE_SGDR: {},
    pb.SCHEDULE_TYPE_REDUCE_ON_PLATEAU: {k: v for k, v in _PLATEAU.items() if k != "schedule.type"},
}


@covers_stage("schedule.type")
@stage_cases("kind", {pb.ScheduleType.Name(k): k for k in SCHEDULE_TYPES})
def test_schedule_type_shapes_the_per_step_learning_rates(prefix: str, kind: int) -> None:
    default, changed = stage_pair(prefix, "schedule.type", kind, SCHEDULE_TYPES[kind])
    assert len(set(default.lrs)) == 1  # CONSTANT
    _check_schedule(default, changed)


# field -> (context, value as a function of the stage's LR)
SCHEDULE_FIELDS: dict[str, tuple[dict[str, Any], Callable[[float], float]]] = {
    "warmup_epochs": ({}, lambda lr: 0.5),
    "step_epochs": ({"schedule.type": pb.SCHEDULE_TYPE_STEP, "epochs": 2}, lambda lr: 1),
    "gamma": ({"schedule.type": pb.SCHEDULE_TYPE_STEP, "schedule.step_epochs": 1, "epochs": 2}, lambda lr: 0.5),
    "min_learning_rate": ({"schedule.type": pb.SCHEDULE_TYPE_COSINE}, lambda lr: lr / 2),
    "max_learning_rate": ({"schedule.type": pb.SCHEDULE_TYPE_ONE_CYCLE}, lambda lr: 3 * lr),
    "cycle_epochs": ({"schedule.type": pb.SCHEDULE_TYPE_CYCLIC}, lambda lr: 1),
    "restart_epochs": ({"schedule.type": pb.SCHEDULE_TYPE_SGDR}, lambda lr: 1),
    "restart_multiplier": (
        {"schedule.type": pb.SCHEDULE_TYPE_SGDR, "schedule.restart_epochs": 1, "epochs": 2},
        lambda lr: 2,
    ),
    "plateau_patience": ({k: v for k, v in _PLATEAU.items() if k != "schedule.plateau_patience"}, lambda lr: 0),
}
# gamma also scales REDUCE_ON_PLATEAU's reductions.
PLATEAU_GAMMA: tuple[dict[str, Any], Callable[[float], float]] = (_PLATEAU, lambda lr: 0.5)


@covers_stage(*(f"schedule.{name}" for name in SCHEDULE_FIELDS))
@pytest.mark.parametrize("case", [*SCHEDULE_FIELDS, "gamma (plateau)"])
@pytest.mark.parametrize("prefix", STAGES)
def test_schedule_fields_change_the_per_step_learning_rates(prefix: str, case: str) -> None:
    field = case.split()[0]
    context, value = PLATEAU_GAMMA if case == "gamma (plateau)" else SCHEDULE_FIELDS[case]
    lr = context.get("learning_rate", STAGE_LR[prefix])
    default, changed = stage_pair(prefix, f"schedule.{field}", value(lr), context)
    _check_schedule(default, changed)
    if context.get("schedule.type") == pb.SCHEDULE_TYPE_REDUCE_ON_PLATEAU:
        assert min(changed.lrs) < max(changed.lrs)  # the premise: a reduction happened


# Nothing counts as better: an accuracy never rises by more than 1.
_STOPPER = {
    "epochs": 3,
    "early_stopping.monitor": pb.METRIC_VALIDATION_ACCURACY,
    "early_stopping.patience": 1,
    "early_stopping.min_delta": 1.0,
}


@covers_stage("early_stopping.enabled")
@pytest.mark.parametrize("prefix", STAGES)
def test_early_stopping_enabled_stops_the_stage(prefix: str) -> None:
    default, changed = stage_pair(prefix, "early_stopping.enabled", True, _STOPPER)
    assert (len(default.history), default.stopped_early) == (3, False)
    assert (len(changed.history), changed.stopped_early) == (2, True)


@covers_stage("early_stopping.patience")
@pytest.mark.parametrize("prefix", STAGES)
def test_early_stopping_patience(prefix: str) -> None:
    context = {**_STOPPER, "early_stopping.enabled": True}
    del context["early_stopping.patience"]
    default, changed = stage_pair(prefix, "early_stopping.patience", 1, context)
    assert (len(default.history), default.stopped_early) == (3, False)  # patience 3 outlasts 3 epochs
    assert (len(changed.history), changed.stopped_early) == (2, True)


@covers_stage("early_stopping.min_delta")
@pytest.mark.parametrize("prefix", STAGES)
def test_early_stopping_min_delta(prefix: str) -> None:
    context = {**_STOPPER, "early_stopping.enabled": True, "early_stopping.monitor": pb.METRIC_TRAIN_LOSS, **_STEADY}
    del context["early_stopping.min_delta"]
    default, changed = stage_pair(prefix, "early_stopping.min_delta", 1.0, context)
    assert default.history[1].train_loss < default.history[0].train_loss  # the premise: epoch 2 improved
    assert len(default.history) == 3
    assert (len(changed.history), changed.stopped_early) == (2, True)


MONITORS = {
    pb.METRIC_VALIDATION_ACCURACY: Metric.VALIDATION_ACCURACY,
    pb.METRIC_TRAIN_LOSS: Metric.TRAIN_LOSS,
    pb.METRIC_TRAIN_ACCURACY: Metric.TRAIN_ACCURACY,
}


def _best(run: StageRun, metric: Metric) -> tuple[int, float]:
    """(epoch, value) of the first epoch with the best value of `metric`."""
    values = [r.metric(metric) for r in run.history]
    best = max(values) if metric.higher_is_better else min(values)
    return values.index(best) + 1, best


@covers_stage("early_stopping.monitor")
@stage_cases("monitor", {pb.Metric.Name(k): k for k in MONITORS})
def test_early_stopping_monitor_is_the_metric_judged(prefix: str, monitor: int) -> None:
    default, changed = stage_pair(
        prefix, "early_stopping.monitor", monitor, {"early_stopping.enabled": True, "epochs": 2}
    )
    assert (default.best_epoch, default.best_value) == _best(default, Metric.VALIDATION_LOSS)
    assert (changed.best_epoch, changed.best_value) == _best(changed, MONITORS[monitor])
    assert changed.best_value != default.best_value


@covers_stage("early_stopping.restore_best_weights")
@pytest.mark.parametrize("prefix", STAGES)
def test_early_stopping_restore_best_weights(prefix: str) -> None:
    default, changed = stage_pair(
        prefix, "early_stopping.restore_best_weights", False, {**_STOPPER, "early_stopping.enabled": True}
    )
    for run in (default, changed):
        assert (len(run.history), run.best_epoch) == (2, 1)
        assert not _same(run.epoch_heads[0], run.epoch_heads[1])
    assert _same(default.head, default.epoch_heads[0])  # restored to the best (first) epoch
    assert _same(changed.head, changed.epoch_heads[1])  # kept the last


@covers_stage("label_smoothing")
@pytest.mark.parametrize("prefix", STAGES)
def test_label_smoothing_changes_the_loss(prefix: str) -> None:
    default, changed = stage_pair(prefix, "label_smoothing", 0.2)
    assert (default.label_smoothing, changed.label_smoothing) == (0.0, pytest.approx(0.2))
    assert _losses(changed) != pytest.approx(_losses(default), rel=1e-3)


@covers_stage("gradient_clip_norm")
@pytest.mark.parametrize("prefix", STAGES)
def test_gradient_clip_norm_bounds_the_gradient(prefix: str) -> None:
    # One step of plain SGD: the update is exactly -lr x the (clipped) gradient.
    context = {"optimizer.type": pb.OPTIMIZER_TYPE_SGD, "optimizer.momentum": 0.0, "batch_size": 16}
    clip = 0.01
    default, changed = stage_pair(prefix, "gradient_clip_norm", clip, context)
    lr = STAGE_LR[prefix]
    assert len(default.lrs) == len(changed.lrs) == 1
    assert default.update_norm / lr > 10 * clip  # the premise: unclipped, the gradient is far larger
    assert changed.update_norm / lr == pytest.approx(clip, rel=1e-3)


# -- dataset ------------------------------------------------------------------------------------------------------


def _label_counts(run: StageRun) -> list[int]:
    return torch.bincount(torch.cat(run.batches), minlength=len(LABELS)).tolist()


@covers("dataset.class_balancing")
@pytest.mark.parametrize("prefix", STAGES)  # stage 1 balances cached features, stage 2 the DataLoader's sampler
def test_class_balancing(prefix: str) -> None:
    context = {f"{prefix}.epochs": 4}
    default = stage_run(STAGES[prefix], _spec(context))
    weighted_loss = stage_run(
        STAGES[prefix], _spec({**context, "dataset.class_balancing": pb.CLASS_BALANCING_WEIGHTED_LOSS})
    )
    sampler = stage_run(
        STAGES[prefix], _spec({**context, "dataset.class_balancing": pb.CLASS_BALANCING_WEIGHTED_SAMPLER})
    )
    # NONE: every epoch is the training set as it is, 8 / 2 / 2, with an unweighted loss.
    assert _label_counts(default) == [32, 8, 8]
    assert default.loss_weight is None
    # WEIGHTED_LOSS: the same batches, the loss weighted by inverse frequency (mean 1).
    assert _label_counts(weighted_loss) == [32, 8, 8]
    assert weighted_loss.loss_weight is not None
    torch.testing.assert_close(weighted_loss.loss_weight, torch.tensor([0.5, 2.0, 2.0]))
    assert _losses(weighted_loss) != pytest.approx(_losses(default), rel=1e-4)
    assert not _same(weighted_loss.head, default.head)
    # WEIGHTED_SAMPLER: as many samples, drawn so each label is equally likely: 16 +- 3.3 of the majority.
    counts = _label_counts(sampler)
    assert sum(counts) == 48
    assert counts[0] < 24
    assert sampler.loss_weight is None


@covers("dataset.image_size", "dataset.cache_max_mb")
def test_image_size_and_cache_bound_reach_materialize(tmp_path: Path) -> None:
    """What the worker does with them: `materialize(reader, items, image_size, cache, cache_max_mb)`."""
    objects, items = _png_objects()

    def decode(spec: pb.TrainingSpec, cache: Path) -> tuple[tuple[int, ...], bool, int]:
        """(shape of the decoded images, whether a second read came from the cache, sets in the cache)."""
        cfg = validate_spec(spec).dataset
        with materialize(_DictReader(objects), items, cfg.image_size, cache, cfg.cache_max_mb) as decoded:
            again = materialize(_DictReader(objects), items, cfg.image_size, cache, cfg.cache_max_mb)
            with again:
                return tuple(decoded.images.shape), again.from_cache, len(list((cache / "decoded").iterdir()))

    # Default 224 px and a 2048 MiB cache: the second read of the set comes from the cache.
    assert decode(_spec(clear=["dataset.image_size"]), tmp_path / "a") == ((4, 3, 224, 224), True, 1)
    assert decode(_spec({"dataset.image_size": 40}), tmp_path / "b") == ((4, 3, 40, 40), True, 1)
    # cache_max_mb 0: no cross-job cache; every read decodes again into a job-private file.
    assert decode(_spec({"dataset.cache_max_mb": 0}), tmp_path / "c") == ((4, 3, 32, 32), False, 0)


class _DictReader:
    def __init__(self, objects: Mapping[str, bytes]) -> None:
        self.objects = objects

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]


def _png_objects() -> tuple[dict[str, bytes], list[ImageItem]]:
    objects: dict[str, bytes] = {}
    items = []
    for i in range(4):
        buffer = io.BytesIO()
        Image.new("RGB", (50, 40), (60 * i, 100, 200)).save(buffer, "PNG")
        key = f"datasets/colours/{LABELS[i % 2]}/{i}.png"
        objects[key] = buffer.getvalue()
        items.append(ImageItem(key, i % 2, len(objects[key]), f"etag{i}"))
    return objects, items


@covers("dataset.validation_split")
def test_validation_split_is_the_held_out_fraction() -> None:
    """What the worker does with it: `stratified_split(labels, validation_split, run.seed)`."""
    labels = [0] * 10 + [1] * 10

    def held_out(spec: pb.TrainingSpec) -> int:
        config = validate_spec(spec)
        return len(stratified_split(labels, config.dataset.validation_split, config.run.seed)[1])

    assert held_out(_spec()) == 4  # 0.2 of each label
    assert held_out(_spec({"dataset.validation_split": 0.5})) == 10


@covers("dataset.uri", "output_model")
def test_output_model_names_the_model_version_and_defaults_to_the_dataset_name() -> None:
    """The worker publishes `ModelVersionName(config.output_model, job)`."""
    assert str(ModelVersionName(validate_spec(_spec()).output_model, "j1")) == "models/colours/versions/j1"
    renamed = validate_spec(_spec({"dataset.uri": "s3://data/sets/Flowers_2024/"})).output_model
    assert str(ModelVersionName(renamed, "j1")) == "models/flowers-2024/versions/j1"
    chosen = validate_spec(_spec({"output_model": "my-model"})).output_model
    assert str(ModelVersionName(chosen, "j1")) == "models/my-model/versions/j1"


# -- augmentation ---------------------------------------------------------------------------------------------------


@covers(*(f"augmentation.{name}" for name in SWITCHES))
@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_augmentation_switch_changes_what_training_sees(name: str) -> None:
    """The transform each switch adds is tested in test_augment.py; here the spec's switch reaches run_stage."""
    kwargs = SWITCHES[name][0]
    context = {f"augmentation.{k}": v for k, v in kwargs.items() if k != name}  # zoom_max_scale needs a min
    default, changed = pair(CLASSIFIER, f"augmentation.{name}", kwargs[name], context)
    assert changed.config.augmentation.is_random
    assert changed.cached_features is False  # random images every epoch: no cached bottleneck features
    assert changed.history[0].train_loss != pytest.approx(default.history[0].train_loss, rel=1e-4)


@covers("augmentation.copies_per_original")
@pytest.mark.parametrize("prefix", STAGES)
def test_copies_per_original_grow_the_epoch(prefix: str) -> None:
    default, changed = pair(STAGES[prefix], "augmentation.copies_per_original", 2)
    assert sum(len(b) for b in default.batches) == 12
    assert sum(len(b) for b in changed.batches) == 36  # each original plus two augmented copies
    assert changed.steps_per_epoch == 9


# -- model ----------------------------------------------------------------------------------------------------------


def _model(spec: pb.TrainingSpec, store: Any = None) -> Classifier:
    """The model the worker's factory builds: `build_classifier(model, labels, load_base_weights(model, store))`."""
    config = validate_spec(spec)
    return build_classifier(config.model, len(LABELS), load_base_weights(config.model, store or _store()))


@covers("model.architecture")
def test_architecture_picks_the_backbone() -> None:
    # The default, MobileNetV2 (with no weights: the base spec's are MobileNetV3-small's).
    default = _model(
        _spec({"model.weights": pb.WEIGHTS_SOURCE_NONE}, clear=["model.architecture", "model.weights_uri"])
    )
    changed = _model(_spec())  # the base spec's MobileNetV3-small
    assert (default.architecture, default.feature_dim, len(default.blocks())) == (Architecture.MOBILENET_V2, 1280, 18)
    assert (changed.architecture, changed.feature_dim, len(changed.blocks())) == (
        Architecture.MOBILENET_V3_SMALL,
        576,
        12,
    )


@covers("model.weights", "model.weights_uri")
def test_weights_source_and_uri_load_the_backbone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty torchvision cache
    first, second = _calibrated_backbone(1), _calibrated_backbone(2)
    store = _FakeStore({("visiontune", "weights/a.pth"): first, ("other", "b.pth"): second})
    key = "features.0.1.running_mean"

    def running_mean(spec: pb.TrainingSpec) -> Tensor:
        return _model(spec, store).base.state_dict()[key]

    # The default, IMAGENET: torchvision's checkpoint, which ships offline (seeded into the empty cache) for the
    # default architecture, MobileNetV2; its statistics are ImageNet's. NONE: a fresh initialisation (mean 0).
    v2 = ["model.architecture", "model.weights_uri"]
    imagenet = running_mean(_spec(clear=[*v2, "model.weights"]))
    none = running_mean(_spec({"model.weights": pb.WEIGHTS_SOURCE_NONE}, clear=v2))
    assert imagenet.abs().max() > 0.1
    assert none.abs().max() == 0
    # URI: the state_dict at weights_uri, a key in the artifact bucket or s3://BUCKET/KEY.
    assert torch.equal(running_mean(_spec({"model.weights_uri": "weights/a.pth"})), first[key])
    assert torch.equal(running_mean(_spec({"model.weights_uri": "s3://other/b.pth"})), second[key])
    assert store.read == [("visiontune", "weights/a.pth"), ("other", "b.pth")]
    assert not torch.equal(first[key], second[key])


HEAD_FIELDS: dict[str, tuple[Any, Callable[[nn.Sequential], Any], Any, Any]] = {
    # field: (value, what to look at in the head, at the default, changed)
    "classifier_dim": (24, lambda head: head[0].out_features, 256, 24),
    "dropout": (0.0, lambda head: head[2].p, 0.5, 0.0),
    "activation": (pb.ACTIVATION_GELU, lambda head: type(head[1]), nn.ReLU, nn.GELU),
}


@covers(*(f"model.{field}" for field in HEAD_FIELDS))
@pytest.mark.parametrize("field", HEAD_FIELDS)
def test_head_fields_shape_the_head_and_change_training(field: str) -> None:
    value, look, at_default, changed_to = HEAD_FIELDS[field]
    path = f"model.{field}"
    assert look(_model(_spec(clear=[path])).head) == at_default
    assert look(_model(_spec({path: value})).head) == changed_to
    default, changed = pair(CLASSIFIER, path, value)
    assert changed.history[-1].train_loss != pytest.approx(default.history[-1].train_loss, rel=1e-4)


# -- fine-tuning ------------------------------------------------------------------------------------------------------


@covers("fine_tuning.enabled")
def test_fine_tuning_enabled_runs_stage_two() -> None:
    default = recipe_run(_spec())
    changed = recipe_run(_spec({"fine_tuning.enabled": True}))
    assert default.stages == [(0, CLASSIFIER, 1)]
    assert changed.stages == [(0, CLASSIFIER, 1), (0, FINE_TUNING, 1)]
    assert [r.stage for r in changed.repeats[0].history] == [CLASSIFIER, FINE_TUNING]
    assert set(changed.repeats[0].lrs) == {CLASSIFIER, FINE_TUNING}


def _parameter_names(last_n_blocks: int | None = None) -> frozenset[str]:
    """Every parameter of the base spec's model, or those of its head and last N base blocks."""
    model = _model(_spec())
    if last_n_blocks is None:
        return frozenset(name for name, _ in model.named_parameters())
    chosen = {id(p) for block in model.blocks()[-last_n_blocks:] for p in block.parameters()}
    chosen |= {id(p) for p in model.head.parameters()}
    return frozenset(name for name, p in model.named_parameters() if id(p) in chosen)


@covers("fine_tuning.unfreeze.all", "fine_tuning.unfreeze.last_n_blocks")
def test_unfreeze_chooses_what_fine_tuning_trains() -> None:
    stem = "base.features.0.0.weight"
    head_only = stage_run(CLASSIFIER, _spec())
    default = stage_run(FINE_TUNING, _spec())  # unfreeze unset: the whole base
    every = stage_run(FINE_TUNING, _spec({"fine_tuning.unfreeze.all": True}))
    last_two = stage_run(FINE_TUNING, _spec({"fine_tuning.unfreeze.last_n_blocks": 2}))
    assert head_only.trainable == frozenset(f"head.{name}" for name in head_only.head)
    assert default.trainable == every.trainable == _parameter_names()
    assert last_two.trainable == _parameter_names(2) != every.trainable
    # What was frozen did not move; the stem trains only when the whole base is unfrozen.
    assert last_two.changed <= last_two.trainable
    assert stem in every.changed
    assert stem not in last_two.changed
    with pytest.raises(SpecInvalid, match=r"fine_tuning\.unfreeze\.all"):
        validate_spec(_spec({"fine_tuning.unfreeze.all": False}))


@covers("fine_tuning.override_learning_rate_limit")
def test_override_learning_rate_limit_lets_fine_tuning_run_above_a_tenth() -> None:
    fast = {"fine_tuning.stage.learning_rate": 0.005}  # above the classifier's 0.01 / 10
    with pytest.raises(SpecInvalid) as refused:
        validate_spec(_spec(fast))
    assert [v.field for v in refused.value.violations] == ["fine_tuning.stage.learning_rate"]
    run = stage_run(FINE_TUNING, _spec({**fast, "fine_tuning.override_learning_rate_limit": True}))
    assert run.lrs == pytest.approx([0.005] * len(run.lrs))


@covers("fine_tuning.allow_long_fine_tuning")
def test_allow_long_fine_tuning_lets_stage_two_run_more_than_five_epochs() -> None:
    long = {"fine_tuning.stage.epochs": 6, "fine_tuning.stage.batch_size": 16}
    with pytest.raises(SpecInvalid) as refused:
        validate_spec(_spec(long))
    assert [v.field for v in refused.value.violations] == ["fine_tuning.stage.epochs"]
    run = stage_run(FINE_TUNING, _spec({**long, "fine_tuning.allow_long_fine_tuning": True}))
    assert len(run.history) == 6


# -- open set -----------------------------------------------------------------------------------------------------


@covers("open_set.score")
def test_open_set_score_is_what_the_threshold_is_calibrated_on() -> None:
    default = recipe_run(_spec())
    changed = recipe_run(_spec({"open_set.score": pb.OPEN_SET_SCORE_ENERGY}))
    assert _same(default.head, changed.head)  # the same model: only the open-set calibration differs
    d, c = default.repeats[0].open_set, changed.repeats[0].open_set
    assert (d.score, c.score) == (OpenSetScore.MAX_SOFTMAX, OpenSetScore.ENERGY)
    assert 1 / len(LABELS) <= d.threshold <= 1  # a softmax probability
    assert c.threshold != pytest.approx(d.threshold, rel=1e-3)  # a logsumexp of logits
    assert d.auroc is not None
    assert c.auroc is not None


@covers("open_set.target_true_positive_rate")
def test_target_true_positive_rate_sets_the_threshold() -> None:
    default = recipe_run(_spec())
    changed = recipe_run(_spec({"open_set.target_true_positive_rate": 0.6}))
    d, c = default.repeats[0].open_set, changed.repeats[0].open_set
    # 6 validation images: 0.95 must accept all 6, 0.6 only 4 (ceil(3.6)), so the threshold rises.
    assert (d.target_tpr, c.target_tpr) == (pytest.approx(0.95), pytest.approx(0.6))
    assert (d.validation_tpr, c.validation_tpr) == (1.0, pytest.approx(4 / 6))
    assert c.threshold > d.threshold


# -- run --------------------------------------------------------------------------------------------------------------


@covers("run.seed")
def test_seed_changes_the_run() -> None:
    default = recipe_run(_spec())
    changed = recipe_run(_spec({"run.seed": 3}))
    assert ([r.seed for r in default.repeats], [r.seed for r in changed.repeats]) == ([0], [3])
    assert not _same(default.head, changed.head)
    assert changed.repeats[0].history[0].train_loss != pytest.approx(default.repeats[0].history[0].train_loss)
    # The worker's validation split draws from it too.
    labels = [0] * 10 + [1] * 10
    splits = [stratified_split(labels, 0.2, validate_spec(spec).run.seed) for spec in (_spec(), _spec({"run.seed": 3}))]
    assert splits[0] != splits[1]


@covers("run.repeats")
def test_repeats_run_that_many_seeds() -> None:
    default = recipe_run(_spec())
    changed = recipe_run(_spec({"run.repeats": 3}))
    assert [r.seed for r in default.repeats] == [0]
    assert [r.seed for r in changed.repeats] == [0, 1, 2]
    assert [repeat for repeat, _, _ in changed.stages] == [0, 1, 2]


def _losses(run: StageRun) -> list[float]:
    return [r.train_loss for r in run.history] + [r.val_loss for r in run.history]


@covers("run.precision")
def test_precision_picks_the_autocast_dtype() -> None:
    def dtype(precision: int) -> torch.dtype | None:
        return run_context(validate_spec(_spec({"run.precision": precision}))).autocast_dtype

    # On the CPU (the base spec's device) AUTO is full FP32; resolve_autocast's CUDA choice is below.
    assert [
        dtype(p) for p in (pb.PRECISION_UNSPECIFIED, pb.PRECISION_FP32, pb.PRECISION_AMP_BF16, pb.PRECISION_AMP_FP16)
    ] == [None, None, torch.bfloat16, torch.float16]
    default, bf16 = pair(CLASSIFIER, "run.precision", pb.PRECISION_AMP_BF16)
    fp32 = stage_run(CLASSIFIER, _spec({"run.precision": pb.PRECISION_FP32}))
    assert _losses(fp32) == _losses(default)
    # bfloat16 (and float16) autocast on the CPU trains, with slightly different numbers.
    fp16 = stage_run(CLASSIFIER, _spec({"run.precision": pb.PRECISION_AMP_FP16}))
    for run in (bf16, fp16):
        assert _losses(run) == pytest.approx(_losses(default), rel=0.05)
        assert _losses(run) != pytest.approx(_losses(default), rel=1e-6)
    # AUTO on a GPU: bf16 only where it is native (Ampere, 8.0+), fp16 with a GradScaler on older ones. The GPUs
    # here are described, not present (this machine has none): the choice is a pure function of what was probed.
    auto = validate_spec(_spec()).run.precision
    cuda = torch.device("cuda")
    v100 = Hardware(gpus=(Gpu("Tesla V100-SXM2-32GB", (7, 0), 32 << 30),))
    a100 = Hardware(gpus=(Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 80 << 30),))
    assert resolve_autocast(auto, cuda, v100) == torch.float16
    assert resolve_autocast(auto, cuda, a100) == torch.bfloat16
    assert resolve_autocast(auto, torch.device("cpu"), a100) is None
    bf16 = validate_spec(_spec({"run.precision": pb.PRECISION_AMP_BF16})).run.precision
    assert resolve_autocast(bf16, cuda, v100) == torch.bfloat16  # asked for explicitly: kept, with a warning
    (warning,) = device_warnings(v100, DeviceKind.CUDA, cuda, torch.bfloat16)
    assert warning[0] == "emulated_bf16"
    assert "compute capability 7.0" in warning[1]
    assert device_warnings(a100, DeviceKind.CUDA, cuda, torch.bfloat16) == []


@covers("run.deterministic")
def test_deterministic_chooses_the_kernels_and_the_cpu_is_exact_either_way() -> None:
    fast = recipe_run(_spec())
    assert torch.backends.cudnn.benchmark  # the default: autotuned cuDNN, TF32 matmuls
    assert torch.backends.cuda.matmul.allow_tf32
    assert not torch.are_deterministic_algorithms_enabled()
    exact = recipe_run(_spec({"run.deterministic": True}))
    try:
        assert not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.deterministic
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        configure_kernels(False)  # process-global: later tests get the default back

    # Those flags only choose GPU kernels: on the CPU both runs give the same numbers to the bit.
    def numbers(run: RecipeRun) -> list[tuple[float, ...]]:
        return [(e.train_loss, e.train_accuracy, e.val_loss, e.val_accuracy) for r in run.repeats for e in r.history]

    assert numbers(exact) == numbers(fast)
    assert _same(exact.head, fast.head)


@covers("run.device")
def test_device() -> None:
    def device(value: int) -> str:
        return run_context(validate_spec(_spec({"run.device": value}))).device.type

    assert device(pb.DEVICE_CPU) == "cpu"
    # A driver torch cannot use (older than the CUDA it was built for): AUTO trains on the CPU, and says why.
    stale = Hardware(driver_version="470.82.01", driver_cuda_version="11.4", cuda_build="13.0")
    assert resolve_device(DeviceKind.AUTO, stale).type == "cpu"
    ((code, message),) = device_warnings(stale, DeviceKind.AUTO, torch.device("cpu"), None)
    assert code == "gpu_unusable"
    for said in ("470.82.01", "supports CUDA 11.4", "needs CUDA 13.0"):
        assert said in message
    assert device_warnings(Hardware(), DeviceKind.AUTO, torch.device("cpu"), None) == []  # no driver: nothing to say
    assert resolve_device(DeviceKind.AUTO, Hardware(gpus=(Gpu("NVIDIA L4", (8, 9), 24 << 30),))).type == "cuda"
    if torch.cuda.is_available():
        assert device(pb.DEVICE_UNSPECIFIED) == device(pb.DEVICE_AUTO) == device(pb.DEVICE_CUDA) == "cuda"
    else:
        # No GPU on this machine: AUTO (the default) falls back to the CPU, and CUDA fails the job, saying why.
        assert device(pb.DEVICE_UNSPECIFIED) == device(pb.DEVICE_AUTO) == "cpu"
        with pytest.raises(RuntimeError, match="no GPU is available"):
            device(pb.DEVICE_CUDA)


@covers("run.data_loader_workers")
def test_data_loader_workers_load_in_worker_processes_with_the_same_result() -> None:
    in_process = stage_run(FINE_TUNING, _spec())  # the base spec's 0
    one = stage_run(FINE_TUNING, _spec({"run.data_loader_workers": 1}))
    default = stage_run(FINE_TUNING, _spec(clear=["run.data_loader_workers"]))
    assert set(in_process.loader_workers) == {0}
    assert set(one.loader_workers) == {1}
    assert set(default.loader_workers) == {2}
    # Workers only copy uint8 rows: the order is drawn in the main process from the epoch's seeded generator, and
    # augmentation happens on the device from the epoch's augmentation generator, so the worker count changes
    # nothing, with random augmentation too.
    for run in (one, default):
        assert _losses(run) == _losses(in_process)
        assert _same(run.head, in_process.head)
    flips = {"augmentation.horizontal_flip": True, "augmentation.brightness": 0.3}
    augmented_in_process = stage_run(FINE_TUNING, _spec(flips))
    augmented_two = stage_run(FINE_TUNING, _spec({**flips, "run.data_loader_workers": 2}))
    assert set(augmented_two.loader_workers) == {2}
    assert _losses(augmented_two) == _losses(augmented_in_process) != _losses(in_process)
    assert _same(augmented_two.head, augmented_in_process.head)


@covers("run.max_retries")
def test_max_retries_is_what_the_executor_allows(tmp_path: Path) -> None:
    def retries(spec: pb.TrainingSpec, job_id: str) -> int:
        # As CreateJob stores a job (the resolved spec as JSON) and the executor reads it back.
        resolved = json_format.MessageToJson(config_to_spec(validate_spec(spec)), indent=None)
        with JobStore(tmp_path / "jobs.sqlite3") as jobs:
            record, _ = jobs.create_job(job_id, resolved)
            return max_retries_of(jobs.get_job(record.job_id))

    assert retries(_spec(), "default") == 2
    assert retries(_spec({"run.max_retries": 5}), "five") == 5
    assert retries(_spec({"run.max_retries": 0}), "none") == 0
