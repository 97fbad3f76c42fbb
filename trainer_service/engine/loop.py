"""A training stage: stage 1 (the head on the frozen base) or stage 2 (fine-tuning), epoch by epoch.

Plain PyTorch, in the spirit of torchvision's references/classification: functions over a model, tensors
and a validated `TrainingConfig`; no gRPC, S3 or database in here. The caller passes callbacks that see
every stage start, every epoch and every checkpoint, and can ask the loop to stop (cancellation).

`run_stage` feeds `epoch.train_one_epoch` from one of two paths:

- the cached-feature path (stage 1 when nothing random happens before the base): the frozen base's bottleneck
  features are computed once (`cached_train_features`), and each epoch trains the head on those tensors
  (`feature_epoch`);
- the image path (random augmentation before the base, or fine-tuning): each epoch runs the whole model over
  images through a DataLoader (`image_epoch`).

Determinism and resume: every epoch seeds torch's RNG (dropout, augmentation) and the shuffling generator
from (seed, stage, epoch), so a run resumed from a checkpoint taken after epoch e replays epochs e+1...
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, RandomSampler, Sampler

from trainer_service.engine.augment import epoch_index_plan
from trainer_service.engine.batch_augment import build_batch_pipeline
from trainer_service.engine.batches import (
    Split,
    SplitLoader,
    balanced_sampler,
    class_weights,
    planned,
    sequential_plans,
    tensor_batches,
)
from trainer_service.engine.context import RunContext, derive_seed, seeded_generator
from trainer_service.engine.distributed import Shard, ShardedBatchSampler, reduce_totals, shard_tensor_batches
from trainer_service.engine.epoch import (
    Batches,
    EpochTotals,
    build_optimizer,
    compute_features,
    evaluate,
    train_one_epoch,
)
from trainer_service.engine.models import Classifier, freeze_base, load_trained_state, trained_state, unfreeze
from trainer_service.engine.plots import weight_histogram
from trainer_service.engine.schedules import PlateauReducer
from trainer_service.spec.config import (
    AugmentationConfig,
    ClassBalancing,
    Metric,
    ScheduleType,
    StageConfig,
    TrainingConfig,
)

CLASSIFIER = "classifier"
FINE_TUNING = "fine_tuning"


# -- inputs and outputs ---------------------------------------------------------------------------------


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
    # fp16's GradScaler (scale, growth tracker): a resume that started again at the initial scale would
    # skip steps to overflow until the scale is back where it was. None without a scaler.
    scaler: dict[str, Any] | None = None


@dataclass
class StageData:
    train: Split
    val: Split
    num_classes: int


@dataclass
class StageOutcome:
    state: StageState
    lrs: list[float]
    histograms: dict[str, list[tuple[int, list[float], list[float]]]]


# -- the two paths: what one epoch trains on -----------------------------------------------------------


@dataclass
class EpochBatches:
    """One epoch's training batches, how many optimizer steps they make, and how many images they hold."""

    batches: Batches
    steps: int
    count: int


def cached_train_features(
    model: Classifier,
    train: SplitLoader,
    count: int,
    copies_per_original: int,
    ctx: RunContext,
    copies_seed: int,
) -> tuple[Tensor, Tensor]:
    """The cached-feature path's training set: the frozen base's features of every original (`count` of them), and
    of `copies_per_original` augmented copies of each (drawn once, from `copies_seed`)."""
    rows = list(range(count))
    plan_rows = rows + [i for _ in range(copies_per_original) for i in rows]
    augmented = [False] * count + [True] * (count * copies_per_original)
    plans = sequential_plans(plan_rows, ctx.eval_batch_size, augmented)
    generator = seeded_generator(copies_seed) if copies_per_original else None
    return compute_features(model, train.batches(plans, generator), ctx, len(plan_rows))


def feature_epoch(
    train_x: Tensor,
    train_y: Tensor,
    balancing: ClassBalancing,
    num_classes: int,
    batch_size: int,
    shuffle_seed: int,
    shard: Shard | None = None,
) -> EpochBatches:
    """The cached-feature path's epoch: the cached features in an order drawn from `shuffle_seed` (this rank's
    rows of each batch under `shard`)."""
    count = int(train_x.shape[0])
    if balancing == ClassBalancing.WEIGHTED_SAMPLER:
        order = torch.tensor(list(balanced_sampler(train_y.cpu().numpy(), num_classes, count, shuffle_seed)))
    else:
        order = torch.randperm(count, generator=seeded_generator(shuffle_seed))
    batches = tensor_batches(train_x, train_y, batch_size, order)
    if shard is not None:
        batches = shard_tensor_batches(batches, shard)
    return EpochBatches(batches, math.ceil(count / batch_size), count)


def image_epoch(
    train: Split,
    loader: SplitLoader,
    aug: AugmentationConfig,
    balancing: ClassBalancing,
    num_classes: int,
    batch_size: int,
    shuffle_seed: int,
    augment_seed: int,
    shard: Shard | None = None,
) -> EpochBatches:
    """The image path's epoch: the images (and this epoch's augmented copies) in batches, shuffled or
    class-balanced from `shuffle_seed`, augmented on the device from `augment_seed`."""
    if aug.copies_per_original > 0:
        epoch_plan = epoch_index_plan(len(train), aug.copies_per_original, seeded_generator(shuffle_seed))
        rows = [r for r, _ in epoch_plan]
        augmented = [a for _, a in epoch_plan]
    else:
        rows = list(range(len(train)))
        augmented = [True] * len(rows)
    order: Sampler[int]
    if balancing == ClassBalancing.WEIGHTED_SAMPLER:
        order = balanced_sampler(train.targets[rows], num_classes, len(rows), shuffle_seed)
    else:
        order = RandomSampler(range(len(rows)), generator=seeded_generator(shuffle_seed))
    batches = BatchSampler(order, batch_size, drop_last=False)
    # Under a shard: this rank's rows of each global batch.
    plans = planned(batches if shard is None else ShardedBatchSampler(batches, shard), rows, augmented)
    # Steps of the global batches: the schedule advances as one process's would.
    return EpochBatches(
        loader.batches(plans, seeded_generator(augment_seed)), math.ceil(len(rows) / batch_size), len(rows)
    )


# -- a stage --------------------------------------------------------------------------------------------


def _criterion(
    config: TrainingConfig,
    stage: StageConfig,
    train: Split,
    num_classes: int,
    device: torch.device,
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


def _end_epoch(
    state: StageState,
    record: EpochRecord,
    stage: StageConfig,
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    plateau: PlateauReducer,
    histograms: dict[str, list[tuple[int, list[float], list[float]]]],
) -> bool:
    """Record an epoch: history, weight histograms, the plateau reducer, the best weights, early stopping, and
    the optimizer's state for the checkpoint. True when the stage stops after this epoch."""
    state.history.append(record)
    state.completed_epochs = record.epoch
    for group, params in _weight_groups(model).items():
        edges, counts = weight_histogram(params)
        histograms[group].append((record.epoch, list(edges), list(counts)))

    monitor = stage.early_stopping.monitor
    value = record.metric(monitor)
    if stage.schedule.type == ScheduleType.REDUCE_ON_PLATEAU:
        plateau.update(value)
    if _improved(value, state.best_value, monitor, stage.early_stopping.min_delta):
        state.best_value, state.best_epoch = value, record.epoch
        state.epochs_without_improvement = 0
        if stage.early_stopping.enabled and stage.early_stopping.restore_best_weights:
            state.best_weights = trained_state(model)  # the frozen base is no part of what an epoch changed
    else:
        state.epochs_without_improvement += 1
    stop_now = stage.early_stopping.enabled and state.epochs_without_improvement >= stage.early_stopping.patience
    state.stopped_early = stop_now and record.epoch < stage.epochs
    state.optimizer = optimizer.state_dict()
    state.scaler = scaler.state_dict() if scaler is not None else None
    state.plateau = plateau.state_dict()
    return stop_now


def grad_scaler(ctx: RunContext, saved: dict[str, Any] | None) -> torch.amp.GradScaler | None:
    """fp16's loss scaler when the context needs one, carrying on from a checkpoint's state when given."""
    if not ctx.use_scaler:
        return None
    scaler = torch.amp.GradScaler(ctx.device.type)
    if saved:
        scaler.load_state_dict(saved)
    return scaler


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
    shard: Shard | None = None,
) -> StageOutcome:
    """Train one stage; returns its history. Resumes after `resume.completed_epochs` when given.

    `cache_features`: None (the default) caches stage 1's bottleneck features whenever that is exact (see
    below); False never caches (the base runs over every image every epoch, e.g. to measure what the cache
    saves); True insists on caching and raises ValueError where it would not be exact.

    `shard`: this process is one rank of several training the stage together (engine/distributed.py); None is
    one process alone.
    """
    stage = config.classifier if stage_name == CLASSIFIER else config.fine_tuning.stage
    aug = config.augmentation
    balancing = config.dataset.class_balancing
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
    pipeline = build_batch_pipeline(aug, int(data.train.images.shape[-1]), ctx.mean, ctx.std)
    plateau = PlateauReducer(stage, higher_is_better=stage.early_stopping.monitor.higher_is_better)
    state = resume if resume is not None else StageState(stage=stage_name)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    scaler = grad_scaler(ctx, state.scaler)
    if state.plateau is not None:
        plateau.load_state_dict(state.plateau)

    # Stage 1 trains the head on the frozen base: when nothing random happens before the base, the
    # base's features are computed once (and once per augmented copy) instead of every epoch.
    can_cache = stage_name == CLASSIFIER and (not aug.is_random or aug.copies_per_original > 0)
    if cache_features and not can_cache:
        raise ValueError(f"cannot cache features in stage {stage_name!r} with random augmentation before the base")
    cache_features = can_cache if cache_features is None else cache_features
    if shard is not None and len(data.val) < shard.world_size:
        raise ValueError(f"{shard.world_size} devices need at least as many validation images, got {len(data.val)}")
    callbacks.stage_started(repeat, stage_name, stage.epochs, cache_features)
    # Under a shard each rank validates its rows of the validation set; the totals are summed across ranks.
    val_rows = range(len(data.val)) if shard is None else range(shard.rank, len(data.val), shard.world_size)
    val_loader = SplitLoader(data.val, ctx, pipeline)
    val_plans = sequential_plans(val_rows, ctx.eval_batch_size)
    # Stage 1 validates the head on the validation set's features, computed once: the base is frozen.
    val_features = (
        compute_features(model, val_loader.batches(val_plans, None), ctx, len(val_rows))
        if stage_name == CLASSIFIER
        else None
    )
    # One loader for the stage: its workers (run.data_loader_workers) stay up from epoch to epoch.
    train_loader = SplitLoader(data.train, ctx, pipeline)

    epoch_batches: Callable[[int, int], EpochBatches]
    forward: Callable[[Tensor], Tensor]
    if cache_features:
        train_x, train_y = cached_train_features(
            model,
            train_loader,
            len(data.train),
            aug.copies_per_original,
            ctx,
            derive_seed(seed, stage_name, "copies"),
        )

        def epoch_batches(shuffle_seed: int, augment_seed: int) -> EpochBatches:
            return feature_epoch(train_x, train_y, balancing, data.num_classes, stage.batch_size, shuffle_seed, shard)

        forward = model.head if shard is None else shard.wrap(model.head)
    else:

        def epoch_batches(shuffle_seed: int, augment_seed: int) -> EpochBatches:
            return image_epoch(
                data.train,
                train_loader,
                aug,
                balancing,
                data.num_classes,
                stage.batch_size,
                shuffle_seed,
                augment_seed,
                shard,
            )

        forward = model if shard is None else shard.wrap(model)

    lrs: list[float] = []
    histograms: dict[str, list[tuple[int, list[float], list[float]]]] = {"early": [], "late": [], "head": []}
    for epoch_index in range(state.completed_epochs, stage.epochs):
        started = time.perf_counter()
        rank_parts = shard.seed_parts if shard else ()
        torch.manual_seed(derive_seed(seed, stage_name, epoch_index, "torch", *rank_parts))
        shuffle_seed = derive_seed(seed, stage_name, epoch_index, "order")
        model.train()  # a frozen base keeps its BatchNorm in eval mode (Classifier.train)
        epoch = epoch_batches(shuffle_seed, derive_seed(seed, stage_name, epoch_index, "augment", *rank_parts))
        totals, lr, epoch_lrs = train_one_epoch(
            forward,
            trainable,
            epoch.batches,
            epoch.steps,
            optimizer,
            criterion,
            stage,
            epoch_index,
            plateau.scale,
            ctx,
            scaler,
            callbacks.should_stop,
            shard,
        )
        lrs.extend(epoch_lrs)
        train_seconds = time.perf_counter() - started
        model.eval()
        if val_features is not None:
            val_x, val_y = val_features
            val_totals, _ = evaluate(
                model.head, tensor_batches(val_x, val_y, ctx.eval_batch_size, None), criterion, ctx
            )
        else:
            val_totals, _ = evaluate(model, val_loader.batches(val_plans, None), criterion, ctx)
        if shard is not None:
            totals, val_totals = _summed(totals, shard), _summed(val_totals, shard)
        record = EpochRecord(
            stage=stage_name,
            epoch=epoch_index + 1,
            epochs=stage.epochs,
            train_loss=totals.mean_loss,
            train_accuracy=totals.accuracy,
            val_loss=val_totals.mean_loss,
            val_accuracy=val_totals.accuracy,
            learning_rate=lr,
            images_per_second=epoch.count / max(train_seconds, 1e-9),
            epoch_seconds=time.perf_counter() - started,
        )
        stop_now = _end_epoch(state, record, stage, model, optimizer, scaler, plateau, histograms)
        callbacks.epoch_ended(repeat, record)
        extra = checkpoint_extra(state) if checkpoint_extra is not None else {}
        # What trains, not the frozen base: a resume builds the model again and loads this on top (recipe.train).
        callbacks.checkpoint({**extra, "stage_state": state, "model": trained_state(model)})
        if stop_now:
            break

    restore_best_weights(model, stage, state)
    callbacks.stage_ended(repeat, stage_name, state.completed_epochs, state.stopped_early)
    return StageOutcome(state=state, lrs=lrs, histograms=histograms)


def restore_best_weights(model: Classifier, stage: StageConfig, state: StageState) -> None:
    """What a stage ends with under `early_stopping.restore_best_weights`: its best epoch's weights put back (from
    `state`, after its last completed epoch; a resume whose stage had already ended does it too)."""
    if stage.early_stopping.enabled and stage.early_stopping.restore_best_weights and state.best_weights is not None:
        load_trained_state(model, state.best_weights)


def _summed(totals: EpochTotals, shard: Shard) -> EpochTotals:
    return EpochTotals(*reduce_totals(totals.loss, totals.correct, totals.seen, shard))


@torch.no_grad()
def predict(model: Classifier, split: Split, ctx: RunContext) -> Tensor:
    """Logits of every image of a split (eval transform, eval mode), on the CPU in fp32.

    Never under autocast, whatever precision the run trained in: the final reports and the open-set threshold
    are computed here, and they must hold for the exported model, which is served in fp32.
    """
    model.eval()
    model.to(ctx.device)
    pipeline = build_batch_pipeline(AugmentationConfig(), int(split.images.shape[-1]), ctx.mean, ctx.std)
    loader = SplitLoader(split, ctx, pipeline)
    outputs = [
        model(inputs).float().cpu()
        for inputs, _ in loader.batches(sequential_plans(range(len(split)), ctx.eval_batch_size), None)
    ]
    return torch.cat(outputs) if outputs else torch.empty(0, 0)
