"""Benchmark: our training loop against torchvision's reference recipe, and stage 1 with and without its cache.

Three comparisons, each against a peer run in the same process, on the same machine, synthetic data, model,
batch size, optimizer and threads:

1. Fine-tuning (stage 2, the whole base unfrozen, fp32): images/s of our `run_stage(FINE_TUNING)` against the
   inner loop of torchvision's reference classification recipe (`train_one_epoch` of
   pytorch/vision references/classification/train.py, re-implemented below because the references are not an
   installable package). Ratio ours / reference; above 1 means our loop is faster.
2. Fine-tuning with augmentation (`AUGMENTED`: flips, zoom, colour jitter): the same two loops, ours augmenting
   uint8 batches on the device (engine/batch_augment.py), the reference transforming image by image in its
   DataLoader with the per-sample torchvision.transforms.v2 pipeline (`build_train_transform`) that our loop
   itself used before. With comparison 1 showing the loops alike, this ratio is the input pipeline's.
3. Stage 1 (head on the frozen base): the epoch time of `run_stage(CLASSIFIER)` with bottleneck features
   cached (the default without augmentation) against the same stage with `cache_features=False`, plus the
   one-off feature computation the cache costs and the number of epochs after which it has paid for itself.

Both loops get one short warm-up epoch first; then `--rounds` rounds, alternating which loop goes first, and
the tables report medians.

    python -m bench.train_throughput              # defaults finish in a few minutes on a 2-core CPU
    python bench/train_throughput.py --size 128 --images 512 --device cuda

Results go to bench/results/train_throughput.md (`--out`), which the README links.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler
from trainer_service.engine import loop
from trainer_service.engine.augment import build_train_transform
from trainer_service.engine.batches import Split
from trainer_service.engine.context import RunContext, resolve_device
from trainer_service.engine.epoch import Batches
from trainer_service.engine.hardware import probe
from trainer_service.engine.loop import CLASSIFIER, FINE_TUNING, EpochRecord, NoOpCallbacks, StageData, run_stage
from trainer_service.engine.models import Classifier, WeightsUnavailable, build_classifier, normalization
from trainer_service.spec.config import (
    Architecture,
    AugmentationConfig,
    DatasetConfig,
    DeviceKind,
    FineTuningConfig,
    ModelConfig,
    OptimizerConfig,
    OptimizerType,
    Precision,
    RunConfig,
    StageConfig,
    TrainingConfig,
)
from trainer_service.weights import load_base_weights

from bench.console import progress, write_report
from bench.machine import cpu_model, format_load, load_average

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_throughput.md"
MODULE_COMMAND = ("python", "-m", "bench.train_throughput")
SCRIPT_COMMAND = ("python", "bench/train_throughput.py")
# The reference recipe's defaults for SGD (train.py --momentum / --wd); both loops get the same values.
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
OPTIMIZERS = ("sgd", "adamw")  # what both our config and the reference recipe build identically
NO_AUGMENTATION = AugmentationConfig()  # comparison 1: stage 1 caches features unless told not to
# Comparison 2's augmentation: what an image classifier commonly trains with.
AUGMENTED = AugmentationConfig(
    horizontal_flip=True, zoom_min_scale=0.6, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05
)


@dataclass(frozen=True)
class Settings:
    images: int = 256
    size: int = 96
    batch_size: int = 32
    epochs: int = 1  # timed fine-tuning epochs per loop and round
    stage1_epochs: int = 2  # timed stage-1 epochs per variant and round
    rounds: int = 5
    threads: int = field(default_factory=torch.get_num_threads)
    arch: str = Architecture.MOBILENET_V2.value
    device: str = DeviceKind.AUTO.value
    workers: int = 0
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    classes: int = 10
    val_images: int = 32
    weights: str = "imagenet"
    seed: int = 0

    def check(self) -> None:
        for name in (
            "images",
            "size",
            "batch_size",
            "epochs",
            "stage1_epochs",
            "rounds",
            "threads",
            "classes",
            "val_images",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"--workers must be at least 0, got {self.workers}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")


# -- data and model -----------------------------------------------------------------------------------------------


def make_split(count: int, size: int, classes: int, seed: int) -> Split:
    """Photo-like uint8 images [N, 3, S, S]: a class colour, smooth per-image structure and pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.arange(count) % classes)[torch.randperm(count, generator=generator)]
    palette = torch.rand(classes, 3, 1, 1, generator=generator)
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    for start in range(0, count, 256):  # in chunks: float intermediates stay small for large --images
        rows = targets[start : start + 256]
        low = torch.rand(len(rows), 3, 6, 6, generator=generator)
        smooth = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        noise = torch.rand(len(rows), 3, size, size, generator=generator)
        pixels = (0.5 * palette[rows] + 0.4 * smooth + 0.1 * noise).clamp(0.0, 1.0)
        images[start : start + len(rows)] = (pixels * 255.0).round().to(torch.uint8).numpy()
    return Split(images=images, targets=targets.numpy().astype(np.int64))


def _head(split: Split, count: int) -> Split:
    return Split(images=split.images[:count], targets=split.targets[:count])


def build_model(settings: Settings) -> tuple[Classifier, str]:
    """Our Classifier, built as the trainer builds it; ImageNet base weights when available (offline cache)."""
    cfg = ModelConfig(architecture=Architecture(settings.arch))
    state: dict[str, Tensor] | None = None
    described = "random initialisation (--weights none)"
    if settings.weights == "imagenet":
        try:
            state = load_base_weights(cfg, None)
            described = "ImageNet IMAGENET1K_V1"
        except WeightsUnavailable as err:
            print(f"note: {err}; timing with randomly initialised weights instead", file=sys.stderr)
            described = "random initialisation (ImageNet weights unavailable)"
    torch.manual_seed(settings.seed)
    return build_classifier(cfg, settings.classes, state), described


def training_config(settings: Settings) -> TrainingConfig:
    stage = StageConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        optimizer=OptimizerConfig(type=OptimizerType(settings.optimizer), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
    )
    return TrainingConfig(
        dataset=DatasetConfig(uri="bench/synthetic", image_size=settings.size),
        output_model="bench",
        augmentation=AugmentationConfig(),  # none: stage 1 caches features unless told not to
        model=ModelConfig(architecture=Architecture(settings.arch)),
        classifier=replace(stage, epochs=settings.stage1_epochs),
        fine_tuning=FineTuningConfig(enabled=True, stage=stage, last_n_blocks=None),
        run=RunConfig(
            seed=settings.seed,
            precision=Precision.FP32,
            device=DeviceKind(settings.device),
            data_loader_workers=settings.workers,
        ),
    )


def run_context(settings: Settings) -> RunContext:
    mean, std = normalization(ModelConfig(architecture=Architecture(settings.arch)))
    return RunContext(
        device=resolve_device(DeviceKind(settings.device), probe()),
        autocast_dtype=None,
        workers=settings.workers,
        mean=mean,
        std=std,
    )


# -- our loop -----------------------------------------------------------------------------------------------------


class _Recorder(NoOpCallbacks):
    """run_stage callbacks that keep the epoch records. Checkpoints are dropped: serialising them is the
    worker's cost (after the epoch's timing), not the loop's."""

    def __init__(self) -> None:
        self.records: list[EpochRecord] = []
        self.cached_features: bool | None = None

    def stage_started(self, repeat: int, stage: str, epochs: int, cached_features: bool) -> None:
        self.cached_features = cached_features

    def epoch_ended(self, repeat: int, record: EpochRecord) -> None:
        self.records.append(record)


@dataclass(frozen=True)
class Throughput:
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def ours_fine_tuning(
    template: Classifier,
    config: TrainingConfig,
    data: StageData,
    ctx: RunContext,
    augmentation: AugmentationConfig = NO_AUGMENTATION,
) -> Throughput:
    """Our stage 2 on a fresh copy of the model, with `augmentation`. Timed by its EpochRecords: an epoch's images /
    the seconds of its training part (loader, forward, backward, step, LR schedule; validation and checkpoints
    excluded)."""
    model = copy.deepcopy(template)
    recorder = _Recorder()
    config = replace(config, augmentation=augmentation)
    run_stage(model, config, FINE_TUNING, data, ctx, recorder, repeat=0, seed=config.run.seed)
    count = len(data.train)
    return Throughput(
        images=count * len(recorder.records), seconds=sum(count / r.images_per_second for r in recorder.records)
    )


# -- torchvision's reference recipe -----------------------------------------------------------------------------


def _reference_accuracy(output: Tensor, target: Tensor, topk: tuple[int, ...]) -> list[Tensor]:
    """references/classification/utils.py `accuracy`: top-k precision in percent."""
    with torch.inference_mode():
        maxk = max(topk)
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target[None])
        return [correct[:k].flatten().sum(dtype=torch.float32) * (100.0 / batch_size) for k in topk]


def reference_train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    topk: tuple[int, ...],
) -> int:
    """`train_one_epoch` of pytorch/vision references/classification/train.py, its default fp32 path (no
    --amp, --clip-grad-norm or --model-ema). Upstream's MetricLogger (printing every --print-freq batches)
    is reduced to the values it is fed each batch: loss.item(), acc1/acc5 .item() and the learning rate.
    Returns the number of images trained on."""
    model.train()
    seen = 0
    meters = {"loss": 0.0, "acc1": 0.0, "acc5": 0.0, "lr": 0.0}  # sums over images, as MetricLogger keeps
    for image, target in data_loader:
        image, target = image.to(device), target.to(device)
        output = model(image)
        loss = criterion(output, target)

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        acc1, acc5 = _reference_accuracy(output, target, topk)
        batch_size = image.shape[0]
        meters["lr"] = optimizer.param_groups[0]["lr"]
        meters["loss"] += loss.item() * batch_size
        meters["acc1"] += acc1.item() * batch_size
        meters["acc5"] += acc5.item() * batch_size
        seen += batch_size
    return seen


def reference_optimizer(params: Iterable[nn.Parameter], settings: Settings) -> torch.optim.Optimizer:
    """As train.py builds it (`--opt sgd` / `--opt adamw`, no --norm-weight-decay)."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.learning_rate, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=False
        )
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=WEIGHT_DECAY)


class ReferenceImages(Dataset[tuple[Tensor, int]]):
    """The reference's dataset: our in-memory uint8 rows, one image at a time through a per-sample transform
    (what ImageFolder + ClassificationPresetTrain amount to once the images are decoded)."""

    def __init__(self, split: Split, transform: Any) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = torch.from_numpy(np.ascontiguousarray(self.split.images[i]))
        return self.transform(image), int(self.split.targets[i])


def reference_fine_tuning(
    template: Classifier,
    settings: Settings,
    train: Split,
    ctx: RunContext,
    epochs: int,
    augmentation: AugmentationConfig = NO_AUGMENTATION,
) -> Throughput:
    """The reference recipe's set-up and epoch loop (train.py `main`) on the same model, data and transform.

    Same as upstream: a RandomSampler DataLoader built once, CrossEntropyLoss, the optimizer over
    model.parameters(), StepLR stepped after each epoch. Different from upstream, to time the same work as our
    loop: the images are our in-memory uint8 arrays through our per-sample v2 train transform (`augmentation`)
    instead of an ImageFolder through ClassificationPresetTrain, and pin_memory only on CUDA (as ours does; on a CPU it
    only warns). Timed per epoch around train_one_epoch, as our loop times its training part.
    """
    model = copy.deepcopy(template)
    model.requires_grad_(True)  # the whole model trains, as in our stage 2 with last_n_blocks=None
    model.to(ctx.device)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.0)
    optimizer = reference_optimizer(model.parameters(), settings)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    transform = build_train_transform(augmentation, settings.size, ctx.mean, ctx.std)
    dataset = ReferenceImages(train, transform)
    data_loader: DataLoader[tuple[Tensor, int]] = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=RandomSampler(dataset),
        num_workers=ctx.workers,
        pin_memory=ctx.device.type == "cuda",
    )
    topk = (1, min(5, settings.classes))
    images, seconds = 0, 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        images += reference_train_one_epoch(model, criterion, optimizer, data_loader, ctx.device, topk)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        seconds += time.perf_counter() - started
        lr_scheduler.step()
    return Throughput(images=images, seconds=seconds)


# -- stage 1 with and without the feature cache ----------------------------------------------------------------


@dataclass(frozen=True)
class Stage1Run:
    epoch_seconds: list[float]  # whole epochs (training and validation), as EpochRecord reports them
    feature_seconds: float  # the one-off pass of the base over the training images (0 without the cache)


@contextlib.contextmanager
def _timed_feature_passes() -> Iterator[list[tuple[int, float]]]:
    """(rows, seconds) of each `compute_features` call run_stage makes; it looks the function up in its module
    at call time, so wrapping the module attribute times exactly the loop's own passes."""
    calls: list[tuple[int, float]] = []
    original = loop.compute_features

    def timed(model: Classifier, batches: Batches, ctx: RunContext, rows: int) -> tuple[Tensor, Tensor]:
        started = time.perf_counter()
        features, labels = original(model, batches, ctx, rows)
        calls.append((int(labels.shape[0]), time.perf_counter() - started))
        return features, labels

    loop.compute_features = timed
    try:
        yield calls
    finally:
        loop.compute_features = original


def ours_stage1(
    template: Classifier, config: TrainingConfig, data: StageData, ctx: RunContext, *, cache: bool
) -> Stage1Run:
    model = copy.deepcopy(template)
    recorder = _Recorder()
    with _timed_feature_passes() as calls:
        run_stage(
            model,
            config,
            CLASSIFIER,
            data,
            ctx,
            recorder,
            repeat=0,
            seed=config.run.seed,
            cache_features=None if cache else False,
        )
    if recorder.cached_features is not cache:
        raise RuntimeError(f"stage 1 cached features: {recorder.cached_features}, expected {cache}")
    # Stage 1 always computes the validation features first (both variants); what the cache adds is the
    # pass over the training images after it.
    return Stage1Run(
        epoch_seconds=[r.epoch_seconds for r in recorder.records],
        feature_seconds=sum(seconds for _, seconds in calls[1:]),
    )


# -- the benchmark ------------------------------------------------------------------------------------------------


def _epochs_once(config: TrainingConfig) -> TrainingConfig:
    return replace(
        config,
        classifier=replace(config.classifier, epochs=1),
        fine_tuning=replace(config.fine_tuning, stage=replace(config.fine_tuning.stage, epochs=1)),
    )


def _paired_rounds(
    settings: Settings, label: str, ours: Callable[[], Throughput], reference: Callable[[], Throughput]
) -> dict[str, Any]:
    """`settings.rounds` rounds of both sides back to back, alternating which goes first; medians and ratios."""
    runs: dict[str, list[Throughput]] = {"ours": [], "reference": []}
    paired: list[float] = []  # ours / reference within each round: both ran back to back, under similar load
    for round_index in range(settings.rounds):
        for which in ("ours", "reference") if round_index % 2 == 0 else ("reference", "ours"):
            result = ours() if which == "ours" else reference()
            runs[which].append(result)
            progress(
                f"{label} round {round_index + 1}/{settings.rounds}: {which:9} {result.images_per_second:8.2f} images/s"
            )
        paired.append(runs["ours"][-1].images_per_second / runs["reference"][-1].images_per_second)
    ours_ips = statistics.median(t.images_per_second for t in runs["ours"])
    reference_ips = statistics.median(t.images_per_second for t in runs["reference"])
    return {
        "ours_images_per_second": ours_ips,
        "reference_images_per_second": reference_ips,
        "ratio_ours_over_reference": statistics.median(paired),  # the headline: median of per-round ratios
        "ratio_of_medians": ours_ips / reference_ips,
        "ours_rounds": [t.images_per_second for t in runs["ours"]],
        "reference_rounds": [t.images_per_second for t in runs["reference"]],
        "paired_ratios": paired,
    }


def benchmark(settings: Settings) -> dict[str, Any]:
    """Run both comparisons; returns every number the report shows, as plain data."""
    settings.check()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _benchmark(settings)
    finally:
        torch.set_num_threads(previous_threads)


def _benchmark(settings: Settings) -> dict[str, Any]:
    load_before = load_average()
    ctx = run_context(settings)
    config = training_config(settings)
    template, weights = build_model(settings)
    data = StageData(
        train=make_split(settings.images, settings.size, settings.classes, settings.seed),
        val=make_split(settings.val_images, settings.size, settings.classes, settings.seed + 1),
        num_classes=settings.classes,
    )

    # Warm-up: one short epoch (two batches) of every variant, so that no timed run pays for first-call costs
    # (allocator growth, kernel selection, lazy initialisation).
    progress("warm-up ...")
    small = StageData(
        train=_head(data.train, 2 * settings.batch_size),
        val=_head(data.val, min(settings.val_images, settings.batch_size)),
        num_classes=settings.classes,
    )
    once = _epochs_once(config)
    ours_fine_tuning(template, once, small, ctx)
    reference_fine_tuning(template, settings, small.train, ctx, epochs=1)
    ours_fine_tuning(template, once, small, ctx, AUGMENTED)
    reference_fine_tuning(template, settings, small.train, ctx, 1, AUGMENTED)
    ours_stage1(template, once, small, ctx, cache=True)
    ours_stage1(template, once, small, ctx, cache=False)

    plain = _paired_rounds(
        settings,
        "fine-tuning",
        lambda: ours_fine_tuning(template, config, data, ctx),
        lambda: reference_fine_tuning(template, settings, data.train, ctx, settings.epochs),
    )
    augmented = _paired_rounds(
        settings,
        "augmented fine-tuning",
        lambda: ours_fine_tuning(template, config, data, ctx, AUGMENTED),
        lambda: reference_fine_tuning(template, settings, data.train, ctx, settings.epochs, AUGMENTED),
    )

    cached: list[Stage1Run] = []
    uncached: list[Stage1Run] = []
    for round_index in range(settings.rounds):
        for cache in [True, False] if round_index % 2 == 0 else [False, True]:
            run = ours_stage1(template, config, data, ctx, cache=cache)
            (cached if cache else uncached).append(run)
            progress(
                f"stage 1 round {round_index + 1}/{settings.rounds}: {'cache' if cache else 'no cache':8} "
                f"epochs {', '.join(f'{s:.3f}' for s in run.epoch_seconds)} s"
                + (f", features {run.feature_seconds:.3f} s" if cache else "")
            )

    cached_epoch = statistics.median(s for run in cached for s in run.epoch_seconds)
    uncached_epoch = statistics.median(s for run in uncached for s in run.epoch_seconds)
    feature_seconds = statistics.median(run.feature_seconds for run in cached)
    saved_per_epoch = uncached_epoch - cached_epoch
    break_even = feature_seconds / saved_per_epoch if saved_per_epoch > 0 else math.inf

    device = ctx.device
    return {
        "settings": asdict(settings),
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": device.type if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            # Other processes on the machine slow whichever side runs at the time: the 1-minute load average
            # before and after the run says how quiet the machine was.
            "load_average": [load_before, load_average()],
        },
        "weights": weights,
        "fine_tuning": plain,
        "augmented_fine_tuning": augmented,
        "stage1": {
            "cached_epoch_seconds": cached_epoch,
            "uncached_epoch_seconds": uncached_epoch,
            "ratio_cached_over_uncached": cached_epoch / uncached_epoch,
            "speed_up": uncached_epoch / cached_epoch,
            "feature_seconds": feature_seconds,
            "break_even_epochs": break_even,
            # With E epochs the cache costs F + E*c against E*u: it is ahead once E > F / (u - c).
            "cache_ahead_from_epoch": math.floor(break_even) + 1 if math.isfinite(break_even) else None,
            "cached_epochs": [s for run in cached for s in run.epoch_seconds],
            "uncached_epochs": [s for run in uncached for s in run.epoch_seconds],
            "feature_rounds": [run.feature_seconds for run in cached],
        },
    }


# -- the report ---------------------------------------------------------------------------------------------------


def _list(values: Sequence[float], digits: int) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _paired_table(runs: dict[str, Any], ours: str, reference: str) -> list[str]:
    return [
        "| loop | images/s (median) | rounds |",
        "|---|---:|---|",
        f"| {ours} | {runs['ours_images_per_second']:.2f} | {_list(runs['ours_rounds'], 2)} |",
        f"| {reference} | {runs['reference_images_per_second']:.2f} | {_list(runs['reference_rounds'], 2)} |",
        f"| **ratio ours / reference** (median of the rounds' ratios) | **{runs['ratio_ours_over_reference']:.3f}** "
        f"| {_list(runs['paired_ratios'], 3)} |",
        f"| ratio of the two medians above | {runs['ratio_of_medians']:.3f} | |",
    ]


def _augmentation_words(aug: AugmentationConfig) -> str:
    on = {k: v for k, v in asdict(aug).items() if v != getattr(NO_AUGMENTATION, k)}
    return ", ".join(f"{k} {v}" for k, v in on.items())


def render_markdown(result: dict[str, Any], command: str, when: dt.datetime) -> str:
    s = result["settings"]
    m = result["machine"]
    ft = result["fine_tuning"]
    st = result["stage1"]
    load_start, load_end = m["load_average"]
    ahead = st["cache_ahead_from_epoch"]
    break_even = (
        f"{st['break_even_epochs']:.2f} epochs: the cache is ahead from epoch {ahead} on"
        if ahead is not None
        else "never (no epoch time saved)"
    )
    lines = [
        "# Training throughput (`bench/train_throughput`)",
        "",
        f"Run {when.strftime('%Y-%m-%d %H:%M UTC')} with `{command}`.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {m['cpu']} ({m['logical_cpus']} logical CPUs) |",
        f"| torch threads | {m['torch_threads']} |",
        f"| device | {m['device']} |",
        f"| torch / torchvision | {m['torch']} / {m['torchvision']} |",
        f"| Python | {m['python']} |",
        f"| 1-min load average, start / end | {format_load(load_start)} / {format_load(load_end)} |",
        "",
        f"Data: {s['images']} synthetic uint8 images 3x{s['size']}x{s['size']} in memory, {s['classes']} classes "
        f"({s['val_images']} more for validation); model {s['arch']} + our head, base weights "
        f"{result['weights']}; batch size {s['batch_size']}, {s['optimizer'].upper()} lr {s['learning_rate']} "
        f"(momentum {MOMENTUM} for SGD, weight decay {WEIGHT_DECAY}), fp32, {s['workers']} DataLoader workers. "
        f"One warm-up epoch each, then {s['rounds']} round(s) alternating which side goes first; medians.",
        "",
        f"## Fine-tuning: our loop vs torchvision's reference recipe ({s['epochs']} epoch(s) per round)",
        "",
        *_paired_table(
            ft,
            "ours: `run_stage(FINE_TUNING)`, whole base unfrozen",
            "torchvision references/classification `train_one_epoch`",
        ),
        "",
        f"## Fine-tuning with augmentation: batched on the device vs per sample in the DataLoader "
        f"({s['epochs']} epoch(s) per round)",
        "",
        f"Augmentation: {_augmentation_words(AUGMENTED)}. The same two loops as above; what differs is where the "
        "images are augmented.",
        "",
        *_paired_table(
            result["augmented_fine_tuning"],
            "ours: uint8 batches augmented on the device (`BatchPipeline`)",
            "reference loop, per-sample v2 pipeline in its DataLoader (`build_train_transform`)",
        ),
        "",
        f"## Stage 1: epoch time with the feature cache vs without ({s['stage1_epochs']} epoch(s) per round)",
        "",
        "| stage 1 (head on the frozen base) | seconds (median) | all |",
        "|---|---:|---|",
        f"| epoch with the cache (default, no augmentation) | {st['cached_epoch_seconds']:.4f} "
        f"| {_list(st['cached_epochs'], 4)} |",
        f"| epoch without the cache (`cache_features=False`) | {st['uncached_epoch_seconds']:.4f} "
        f"| {_list(st['uncached_epochs'], 4)} |",
        f"| **ratio cached / uncached epoch** | **{st['ratio_cached_over_uncached']:.4f}** "
        f"(speed-up x{st['speed_up']:.1f}) | |",
        f"| one-off feature computation (training images) | {st['feature_seconds']:.4f} "
        f"| {_list(st['feature_rounds'], 4)} |",
        f"| break-even | {break_even} | |",
        "",
        "## What is measured",
        "",
        "- Images/s: training images of an epoch / seconds of its training part. Ours from the `EpochRecord`s "
        "(DataLoader, forward, loss, backward, step, per-step LR, running loss/accuracy); the reference timed "
        "around `train_one_epoch` (DataLoader, forward, loss, backward, step, `loss.item()`, top-1/top-5 "
        "accuracy). Validation, checkpoints and set-up are outside both.",
        "- The reference runs the same `Classifier` (deep copy of the same initial weights, every parameter "
        "trainable), the same augmentation and the same images. Without augmentation it differs only in the "
        "loop; with it, also in the input pipeline: ours loads uint8 batches and augments them on the training "
        "device with per-sample parameters, the reference transforms each image in its DataLoader (in the "
        "training process with 0 workers), as our loop did before.",
        "- Headline ratio: each round runs both loops back to back (alternating which goes first) and gives "
        "one ratio; the table reports the median of those, which cancels slow drifts in machine load better "
        "than the ratio of the two medians (also shown).",
        "- Other processes on the machine slow whichever side is running at the time: a load average near "
        "or above the CPU count means the rounds are noisy, and the spread across rounds shows how much.",
        "- Stage-1 epoch seconds are whole epochs as `EpochRecord.epoch_seconds` reports them (training and "
        "validation on cached validation features, computed by both variants). The one-off cost is the loop's "
        "own `compute_features` pass over the training images; break-even = one-off / (uncached - cached "
        "epoch).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> tuple[Settings, Path]:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=d.images, help="training images (default %(default)s)")
    p.add_argument("--size", type=int, default=d.size, help="image side S (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default %(default)s)")
    p.add_argument(
        "--epochs", type=int, default=d.epochs, help="timed fine-tuning epochs per round (default %(default)s)"
    )
    p.add_argument(
        "--stage1-epochs",
        type=int,
        default=d.stage1_epochs,
        help="timed stage-1 epochs per round (default %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=d.rounds, help="(default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads (default %(default)s)")
    p.add_argument("--arch", choices=[a.value for a in Architecture], default=d.arch, help="(default %(default)s)")
    p.add_argument("--device", choices=[k.value for k in DeviceKind], default=d.device, help="(default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers (default %(default)s)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="(default %(default)s)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="(default %(default)s)")
    p.add_argument("--classes", type=int, default=d.classes, help="(default %(default)s)")
    p.add_argument("--val-images", type=int, default=d.val_images, help="(default %(default)s)")
    p.add_argument("--weights", choices=("imagenet", "none"), default=d.weights, help="(default %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report (default bench/results/...)")
    a = p.parse_args(list(argv))
    settings = Settings(
        images=a.images,
        size=a.size,
        batch_size=a.batch_size,
        epochs=a.epochs,
        stage1_epochs=a.stage1_epochs,
        rounds=a.rounds,
        threads=a.threads,
        arch=a.arch,
        device=a.device,
        workers=a.workers,
        optimizer=a.optimizer,
        learning_rate=a.lr,
        classes=a.classes,
        val_images=a.val_images,
        weights=a.weights,
    )
    return settings, a.out


def main(argv: Sequence[str] | None = None, program: Sequence[str] = MODULE_COMMAND) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    settings, out = parse_args(args)
    try:
        settings.check()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = benchmark(settings)
    report = render_markdown(result, shlex.join([*program, *args]), dt.datetime.now(dt.UTC))
    write_report(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(program=MODULE_COMMAND if __spec__ is not None else SCRIPT_COMMAND))
