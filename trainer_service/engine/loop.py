"""The training recipe: stage 1 (head on the frozen base), optional stage 2 (fine-tuning), evaluation.

Plain PyTorch, in the spirit of torchvision's references/classification: functions over a model, tensors
and a validated `TrainingConfig`; no gRPC, S3 or database in here. The caller passes callbacks that see
every stage start, every epoch and every checkpoint, and can ask the loop to stop (cancellation).

Determinism and resume: every epoch seeds torch's RNG (dropout, augmentation) and the shuffling generator
from (seed, stage, epoch), so a run resumed from a checkpoint taken after epoch e replays epochs e+1...
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from trainer_service.engine.augment import build_eval_transform, build_train_transform, epoch_index_plan
from trainer_service.engine.models import Classifier, freeze_base, normalization, unfreeze
from trainer_service.engine.plots import weight_histogram
from trainer_service.engine.schedules import PlateauReducer, lr_at
from trainer_service.spec.config import (
    ClassBalancing,
    DeviceKind,
    Metric,
    OptimizerType,
    Precision,
    ScheduleType,
    StageConfig,
    TrainingConfig,
)

CLASSIFIER = "classifier"
FINE_TUNING = "fine_tuning"

Transform = Callable[[Tensor], Tensor]


class Cancelled(Exception):
    """The caller asked the loop to stop (CancelJob); nothing after the last checkpoint is kept."""


# -- inputs and outputs ---------------------------------------------------------------------------------


@dataclass
class Split:
    """Decoded images of one split: uint8 [N, 3, S, S] (a numpy memmap is fine) and their label indices."""

    images: np.ndarray[Any, Any]
    targets: np.ndarray[Any, Any]

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@dataclass(frozen=True)
class EpochRecord:
    stage: str
    epoch: int  # 1-based within the stage
    epochs: int  # planned epochs of the stage
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float  # at the end of the epoch
    images_per_second: float
    epoch_seconds: float

    def metric(self, which: Metric) -> float:
        return {
            Metric.VALIDATION_LOSS: self.val_loss,
            Metric.VALIDATION_ACCURACY: self.val_accuracy,
            Metric.TRAIN_LOSS: self.train_loss,
            Metric.TRAIN_ACCURACY: self.train_accuracy,
        }[which]


class Callbacks(Protocol):
    def stage_started(self, repeat: int, stage: str, epochs: int, cached_features: bool) -> None: ...

    def epoch_ended(self, repeat: int, record: EpochRecord) -> None: ...

    def stage_ended(self, repeat: int, stage: str, epochs_run: int, stopped_early: bool) -> None: ...

    def checkpoint(self, state: dict[str, Any]) -> None: ...

    def should_stop(self) -> bool: ...


class NoOpCallbacks:
    """Callbacks that do nothing and never stop: subclass it and override only what you need."""

    def stage_started(self, repeat: int, stage: str, epochs: int, cached_features: bool) -> None:
        pass

    def epoch_ended(self, repeat: int, record: EpochRecord) -> None:
        pass

    def stage_ended(self, repeat: int, stage: str, epochs_run: int, stopped_early: bool) -> None:
        pass

    def checkpoint(self, state: dict[str, Any]) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class RunContext:
    """What the loop needs besides the config: device, precision and the data-loading setup."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    workers: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eval_batch_size: int = 64

    @property
    def use_scaler(self) -> bool:
        return self.autocast_dtype == torch.float16 and self.device.type == "cuda"


@dataclass
class StageState:
    """Everything needed to resume a stage after its last completed epoch."""

    stage: str
    completed_epochs: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    best_weights: dict[str, Tensor] | None = None
    epochs_without_improvement: int = 0
    plateau: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    stopped_early: bool = False


# -- device and precision -----------------------------------------------------------------------------


def resolve_device(kind: DeviceKind) -> torch.device:
    if kind == DeviceKind.CUDA:
        if not torch.cuda.is_available():
            raise RuntimeError("the spec asks for device CUDA, but no GPU is available to this trainer")
        return torch.device("cuda")
    if kind == DeviceKind.AUTO and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_autocast(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. AUTO: bf16 on GPUs that support it, fp16 on older ones."""
    if precision == Precision.FP32:
        return None
    if precision == Precision.AMP_BF16:
        return torch.bfloat16
    if precision == Precision.AMP_FP16:
        return torch.float16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def run_context(config: TrainingConfig) -> RunContext:
    """The RunContext a job's spec asks for: its device, precision and data-loader workers (run.*)."""
    device = resolve_device(config.run.device)
    mean, std = normalization(config.model)
    return RunContext(device=device, autocast_dtype=resolve_autocast(config.run.precision, device),
                      workers=config.run.data_loader_workers, mean=mean, std=std)


def _autocast(ctx: RunContext) -> contextlib.AbstractContextManager[Any]:
    if ctx.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.autocast_dtype)


# -- seeding ------------------------------------------------------------------------------------------


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the run seed and where we are (stage, epoch, purpose)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# -- datasets -------------------------------------------------------------------------------------------


class ImageArrayDataset(Dataset[tuple[Tensor, int]]):
    """Rows of a uint8 image array through a transform. Picklable for DataLoader worker processes."""

    def __init__(self, split: Split, indices: Sequence[int], transform: Transform) -> None:
        self.split = split
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        row = self.indices[i]
        image = torch.from_numpy(np.ascontiguousarray(self.split.images[row]))
        return self.transform(image), int(self.split.targets[row])


class _PlanDataset(Dataset[tuple[Tensor, int]]):
    """One epoch's plan of (original index, augmented?) pairs: originals plain, copies augmented."""

    def __init__(self, split: Split, plan: Sequence[tuple[int, bool]], plain: Transform, augmented: Transform):
        self.split = split
        self.plan = list(plan)
        self.plain = plain
        self.augmented = augmented

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        row, is_augmented = self.plan[i]
        image = torch.from_numpy(np.ascontiguousarray(self.split.images[row]))
        transform = self.augmented if is_augmented else self.plain
        return transform(image), int(self.split.targets[row])


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch per worker from its base seed; numpy is not used for randomness here.
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset[Any],
    ctx: RunContext,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler: WeightedRandomSampler | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader[Any]:
    workers = ctx.workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
        worker_init_fn=_seed_worker if workers else None,
        prefetch_factor=4 if workers else None,
    )


def class_weights(targets: np.ndarray[Any, Any], num_classes: int) -> Tensor:
    """Inverse label frequency, normalised to mean 1 over the labels present."""
    counts = torch.bincount(torch.as_tensor(targets, dtype=torch.long), minlength=num_classes).double()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def _balanced_sampler(targets: np.ndarray[Any, Any], num_classes: int, count: int, seed: int) -> WeightedRandomSampler:
    per_class = class_weights(targets, num_classes)
    sample_weights = per_class[torch.as_tensor(targets, dtype=torch.long)].double()
    return WeightedRandomSampler(sample_weights.tolist(), num_samples=count, replacement=True,
                                 generator=seeded_generator(seed))


# -- optimizer and learning rate ------------------------------------------------------------------------


def build_optimizer(params: Sequence[nn.Parameter], stage: StageConfig) -> torch.optim.Optimizer:
    opt = stage.optimizer
    lr = stage.learning_rate
    if opt.type == OptimizerType.SGD:
        return torch.optim.SGD(
            params, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0,
            weight_decay=opt.weight_decay,
        )
    if opt.type == OptimizerType.ADAM:
        return torch.optim.Adam(params, lr=lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay)
    if opt.type == OptimizerType.ADAMW:
        return torch.optim.AdamW(params, lr=lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay)
    return torch.optim.RMSprop(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# -- one epoch ------------------------------------------------------------------------------------------


@dataclass
class _EpochTotals:
    loss: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, loss: Tensor, logits: Tensor, targets: Tensor) -> None:
        n = int(targets.shape[0])
        self.loss += float(loss.detach()) * n
        self.correct += int((logits.detach().argmax(1) == targets).sum())
        self.seen += n

    @property
    def mean_loss(self) -> float:
        return self.loss / max(1, self.seen)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.seen)


def _train_epoch(
    forward: Callable[[Tensor], Tensor],
    trainable: Sequence[nn.Parameter],
    batches: Iterator[tuple[Tensor, Tensor]] | DataLoader[Any],
    steps: int,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    stage: StageConfig,
    epoch_index: int,
    lr_scale: float,
    ctx: RunContext,
    scaler: torch.amp.GradScaler | None,
    should_stop: Callable[[], bool],
) -> tuple[_EpochTotals, float, list[float]]:
    totals = _EpochTotals()
    lrs: list[float] = []
    lr = stage.learning_rate
    for step, (inputs, targets) in enumerate(batches):
        if should_stop():
            raise Cancelled()
        lr = lr_at(stage, epoch_index + step / max(1, steps), steps_per_epoch=max(1, steps)) * lr_scale
        set_lr(optimizer, lr)
        lrs.append(lr)
        inputs = inputs.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        if ctx.device.type == "cuda" and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with _autocast(ctx):
            logits = forward(inputs)
            loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if stage.gradient_clip_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trainable, stage.gradient_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if stage.gradient_clip_norm > 0:
                nn.utils.clip_grad_norm_(trainable, stage.gradient_clip_norm)
            optimizer.step()
        totals.add(loss, logits, targets)
    return totals, lr, lrs


@torch.no_grad()
def _evaluate(
    forward: Callable[[Tensor], Tensor], batches: Iterator[tuple[Tensor, Tensor]] | DataLoader[Any],
    criterion: nn.Module, ctx: RunContext,
) -> tuple[_EpochTotals, Tensor]:
    totals = _EpochTotals()
    all_logits: list[Tensor] = []
    for inputs, targets in batches:
        inputs = inputs.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        with _autocast(ctx):
            logits = forward(inputs).float()
        totals.add(criterion(logits, targets), logits, targets)
        all_logits.append(logits.cpu())
    return totals, torch.cat(all_logits) if all_logits else torch.empty(0)


def tensor_batches(x: Tensor, y: Tensor, batch_size: int, order: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
    index = order if order is not None else torch.arange(x.shape[0])
    for start in range(0, int(index.shape[0]), batch_size):
        rows = index[start:start + batch_size]
        yield x[rows], y[rows]


# -- features -------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_features(model: Classifier, loader: DataLoader[Any], ctx: RunContext) -> tuple[Tensor, Tensor]:
    """The frozen base's bottleneck features of every image the loader yields, on the CPU in fp32."""
    model.base.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    for inputs, targets in loader:
        inputs = inputs.to(ctx.device, non_blocking=True)
        if ctx.device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with _autocast(ctx):
            feats.append(model.base(inputs).float().cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


# -- a stage --------------------------------------------------------------------------------------------


@dataclass
class StageData:
    train: Split
    val: Split
    num_classes: int


def _criterion(config: TrainingConfig, stage: StageConfig, train: Split, num_classes: int, device: torch.device,
               ) -> nn.Module:
    weight = None
    if config.dataset.class_balancing == ClassBalancing.WEIGHTED_LOSS:
        weight = class_weights(train.targets, num_classes).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=stage.label_smoothing)


def _improved(value: float, best: float | None, metric: Metric, min_delta: float) -> bool:
    if best is None:
        return True
    if metric.higher_is_better:
        return value > best + min_delta
    return value < best - min_delta


def _weight_groups(model: Classifier) -> dict[str, list[Tensor]]:
    blocks = model.blocks()
    return {
        "early": [p.detach() for p in blocks[0].parameters()],
        "late": [p.detach() for p in blocks[-1].parameters()],
        "head": [p.detach() for p in model.head.parameters()],
    }


@dataclass
class StageOutcome:
    state: StageState
    lrs: list[float]
    histograms: dict[str, list[tuple[int, list[float], list[float]]]]


def run_stage(
    model: Classifier,
    config: TrainingConfig,
    stage_name: str,
    data: StageData,
    ctx: RunContext,
    callbacks: Callbacks,
    *,
    repeat: int,
    seed: int,
    resume: StageState | None = None,
    checkpoint_extra: Callable[[StageState], dict[str, Any]] | None = None,
    cache_features: bool | None = None,
) -> StageOutcome:
    """Train one stage; returns its history. Resumes after `resume.completed_epochs` when given.

    `cache_features`: None (the default) caches stage 1's bottleneck features whenever that is exact (see
    below); False never caches (the base runs over every image every epoch, e.g. to measure what the cache
    saves); True insists on caching and raises ValueError where it would not be exact.
    """
    stage = config.classifier if stage_name == CLASSIFIER else config.fine_tuning.stage
    aug = config.augmentation
    if stage_name == CLASSIFIER:
        freeze_base(model)
    else:
        unfreeze(model, config.fine_tuning.last_n_blocks)
    model.to(ctx.device)
    if ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, stage)
    criterion = _criterion(config, stage, data.train, data.num_classes, ctx.device)
    scaler = torch.amp.GradScaler("cuda") if ctx.use_scaler else None
    image_size = int(data.train.images.shape[-1])
    eval_tf = build_eval_transform(image_size, ctx.mean, ctx.std)
    train_tf = build_train_transform(aug, image_size, ctx.mean, ctx.std)
    plateau = PlateauReducer(stage, higher_is_better=stage.early_stopping.monitor.higher_is_better)
    monitor = stage.early_stopping.monitor
    state = resume if resume is not None else StageState(stage=stage_name)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    if state.plateau is not None:
        plateau.load_state_dict(state.plateau)

    # Stage 1 trains the head on the frozen base: when nothing random happens before the base, the
    # base's features are computed once (and once per augmented copy) instead of every epoch.
    can_cache = stage_name == CLASSIFIER and (not aug.is_random or aug.copies_per_original > 0)
    if cache_features and not can_cache:
        raise ValueError(f"cannot cache features in stage {stage_name!r} with random augmentation before the base")
    cache_features = can_cache if cache_features is None else cache_features
    callbacks.stage_started(repeat, stage_name, stage.epochs, cache_features)
    n_train = len(data.train)
    all_rows = list(range(n_train))
    val_loader = make_loader(ImageArrayDataset(data.val, range(len(data.val)), eval_tf), ctx, ctx.eval_batch_size)

    train_x = train_y = val_x = val_y = None
    if stage_name == CLASSIFIER:
        val_x, val_y = compute_features(model, val_loader, ctx)
    if cache_features:
        plan = [(i, False) for i in all_rows]
        if aug.copies_per_original > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, stage_name, "copies"))
                plan += [(i, True) for _ in range(aug.copies_per_original) for i in all_rows]
                copies_ds = _PlanDataset(data.train, plan, eval_tf, train_tf)
                # Workers would draw their own seeds; the copies must be the same on a resumed run.
                train_x, train_y = compute_features(
                    model, make_loader(copies_ds, replace(ctx, workers=0), ctx.eval_batch_size), ctx
                )
        else:
            train_x, train_y = compute_features(
                model, make_loader(ImageArrayDataset(data.train, all_rows, eval_tf), ctx, ctx.eval_batch_size), ctx
            )

    lrs: list[float] = []
    histograms: dict[str, list[tuple[int, list[float], list[float]]]] = {"early": [], "late": [], "head": []}
    for epoch_index in range(state.completed_epochs, stage.epochs):
        started = time.perf_counter()
        torch.manual_seed(derive_seed(seed, stage_name, epoch_index, "torch"))
        shuffle_seed = derive_seed(seed, stage_name, epoch_index, "order")
        model.train()  # a frozen base keeps its BatchNorm in eval mode (Classifier.train)
        if cache_features:
            assert train_x is not None
            assert train_y is not None
            count = int(train_x.shape[0])
            if config.dataset.class_balancing == ClassBalancing.WEIGHTED_SAMPLER:
                order = torch.tensor(list(_balanced_sampler(train_y.numpy(), data.num_classes, count, shuffle_seed)))
            else:
                order = torch.randperm(count, generator=seeded_generator(shuffle_seed))
            steps = math.ceil(count / stage.batch_size)
            batches: Iterator[tuple[Tensor, Tensor]] | DataLoader[Any] = tensor_batches(
                train_x, train_y, stage.batch_size, order
            )
            forward: Callable[[Tensor], Tensor] = model.head
        else:
            if aug.copies_per_original > 0:
                epoch_plan = epoch_index_plan(n_train, aug.copies_per_original, seeded_generator(shuffle_seed))
                dataset: ImageArrayDataset | _PlanDataset = _PlanDataset(data.train, epoch_plan, eval_tf, train_tf)
            else:
                dataset = ImageArrayDataset(data.train, all_rows, train_tf)
            sampler = None
            if config.dataset.class_balancing == ClassBalancing.WEIGHTED_SAMPLER:
                rows = [r for r, _ in epoch_plan] if aug.copies_per_original > 0 else all_rows
                sampler = _balanced_sampler(data.train.targets[rows], data.num_classes, len(dataset), shuffle_seed)
            batches = make_loader(dataset, ctx, stage.batch_size, shuffle=True, sampler=sampler,
                              generator=seeded_generator(shuffle_seed))
            count = len(dataset)
            steps = len(batches)
            forward = model
        totals, lr, epoch_lrs = _train_epoch(
            forward, trainable, batches, steps, optimizer, criterion, stage, epoch_index,
            plateau.scale, ctx, scaler, callbacks.should_stop,
        )
        lrs.extend(epoch_lrs)
        train_seconds = time.perf_counter() - started
        model.eval()
        if stage_name == CLASSIFIER:
            assert val_x is not None
            assert val_y is not None
            val_totals, _ = _evaluate(model.head, tensor_batches(val_x, val_y, ctx.eval_batch_size, None),
                                      criterion, ctx)
        else:
            val_totals, _ = _evaluate(model, val_loader, criterion, ctx)
        record = EpochRecord(
            stage=stage_name, epoch=epoch_index + 1, epochs=stage.epochs,
            train_loss=totals.mean_loss, train_accuracy=totals.accuracy,
            val_loss=val_totals.mean_loss, val_accuracy=val_totals.accuracy,
            learning_rate=lr, images_per_second=count / max(train_seconds, 1e-9),
            epoch_seconds=time.perf_counter() - started,
        )
        state.history.append(record)
        state.completed_epochs = epoch_index + 1
        for group, params in _weight_groups(model).items():
            edges, counts = weight_histogram(params)
            histograms[group].append((epoch_index + 1, list(edges), list(counts)))

        value = record.metric(monitor)
        if stage.schedule.type == ScheduleType.REDUCE_ON_PLATEAU:
            plateau.update(value)
        if _improved(value, state.best_value, monitor, stage.early_stopping.min_delta):
            state.best_value, state.best_epoch = value, record.epoch
            state.epochs_without_improvement = 0
            if stage.early_stopping.enabled and stage.early_stopping.restore_best_weights:
                state.best_weights = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            state.epochs_without_improvement += 1
        stop_now = stage.early_stopping.enabled and state.epochs_without_improvement >= stage.early_stopping.patience
        state.stopped_early = stop_now and record.epoch < stage.epochs
        state.optimizer = optimizer.state_dict()
        state.plateau = plateau.state_dict()
        callbacks.epoch_ended(repeat, record)
        extra = checkpoint_extra(state) if checkpoint_extra is not None else {}
        callbacks.checkpoint({**extra, "stage_state": state, "model": model.state_dict()})
        if stop_now:
            break

    if stage.early_stopping.enabled and stage.early_stopping.restore_best_weights and state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    callbacks.stage_ended(repeat, stage_name, state.completed_epochs, state.stopped_early)
    return StageOutcome(state=state, lrs=lrs, histograms=histograms)


@torch.no_grad()
def predict(model: Classifier, split: Split, ctx: RunContext) -> Tensor:
    """Logits of every image of a split (eval transform, eval mode), on the CPU in fp32."""
    model.eval()
    model.to(ctx.device)
    tf = build_eval_transform(int(split.images.shape[-1]), ctx.mean, ctx.std)
    loader = make_loader(ImageArrayDataset(split, range(len(split)), tf), ctx, ctx.eval_batch_size)
    outputs: list[Tensor] = []
    for inputs, _ in loader:
        inputs = inputs.to(ctx.device, non_blocking=True)
        with _autocast(ctx):
            outputs.append(model(inputs).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, 0)
