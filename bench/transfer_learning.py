"""Transfer learning on data unlike ImageNet: pretrained vs scratch, stage 1 vs stage 1 + fine-tuning.

    python -m bench.transfer_learning            # defaults: about 6 minutes on 2 idle CPU cores
    python -m bench.transfer_learning --help     # larger runs: --per-class, --size, --epochs, ...

Data: Fashion-MNIST from the Debian package `dataset-fashion-mnist` (28x28 grey product photos, 10 classes),
a stratified subset drawn with the seed, resized (bilinear) to S x S and replicated to 3 channels, so the
engine sees uint8 [N, 3, S, S] exactly as a job's decoded images. Train and validation come from the
`train` file, test from the separate `t10k` file.

Every variant goes through `trainer_service.engine.recipe.train` with the same data, seed, architecture
(MobileNetV2, head 256, Adam, batch 32) and epoch budget E; only the weights and the stages differ:

  pretrained, stage 1              ImageNet weights, frozen base, head trained E epochs (features cached)
  pretrained, stage 1, E + F       stage 1 alone, given the total epochs of the next one
  pretrained, stage 1 + fine-tune  stage 1 as above, then F epochs with the base unfrozen at LR / 10
  scratch, stage 1                 random weights, frozen base, head trained E epochs (the same recipe)
  scratch, end-to-end              random weights, the whole network trained E epochs
  pretrained, end-to-end           ImageNet weights, the whole network trained E epochs

"End-to-end" is stage 1 with 0 epochs and the fine-tuning stage over all layers: the engine has no
"stage 1 with nothing frozen". Each end-to-end run gets its own learning rate: a rate that suits random
weights wrecks pretrained ones (Adam 3e-3 takes pretrained MobileNetV2 below scratch here) and a rate
gentle enough for pretrained weights slows scratch down, so one shared rate would favour one side. The
defaults are each side's best on validation accuracy at the default size, seed 0: scratch 3e-3 (cosine,
E = 4: val 76 % vs 71 % at 1e-3; constant LR, E = 3: 63 % vs 59 % at 1e-3 and 39 % at 1e-2), pretrained
1e-3 (cosine, E = 4: val 86 % vs 85 % at 3e-4; constant LR, E = 3: 80 % vs 61 % at 3e-3). Give
`--scratch-lr` / `--pretrained-lr` a comma-separated list to redo that selection in the run: every rate
is trained and reported, and the one with the best validation accuracy is the one compared.

The claims of the issue are checked, and the process exits 1 when one fails, so the benchmark doubles as
a check:

  1. pretrained beats scratch at equal epochs, both trained end-to-end (same epochs, same data, same
     architecture and optimiser, each at its best LR: the fair comparison);
  2. stage 1 + fine-tuning beats stage 1 alone, both stage 1 for E epochs and stage 1 for E + F epochs.

Shown but not gated: the pretrained frozen-base head against scratch trained end-to-end (not like for
like: a head on fixed features against every weight trained, at about a third of the compute), and
scratch with the stage-1 recipe (a head on a frozen random base: random MobileNetV2 features in eval mode
shrink towards zero through its 52 BatchNorms at their initial statistics, so it sits at chance; a
strawman, listed because it is literally "the same config with weights NONE").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import math
import os
import platform
import shlex
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from trainer_service.engine.batches import Split
from trainer_service.engine.context import RunContext
from trainer_service.engine.loop import EpochRecord, NoOpCallbacks
from trainer_service.engine.models import build_classifier, normalization
from trainer_service.engine.recipe import PreparedData, TrainingResult, train
from trainer_service.spec.config import (
    Architecture,
    DatasetConfig,
    FineTuningConfig,
    ModelConfig,
    OptimizerConfig,
    OptimizerType,
    RunConfig,
    ScheduleConfig,
    ScheduleType,
    StageConfig,
    TrainingConfig,
    WeightsSource,
)
from trainer_service.weights import load_base_weights
from visiontune.weights_cache import seed_weights_cache

from bench.machine import cpu_model

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_PACKAGE = "dataset-fashion-mnist"
INSTALL_HINT = (
    f"Fashion-MNIST is not installed (expected under {DATA_DIR}): apt-get update && apt-get install -y {APT_PACKAGE}"
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "transfer_learning.md"

PRETRAINED_STAGE1 = "pretrained, stage 1"
SCRATCH_STAGE1 = "scratch, stage 1"
SCRATCH_E2E = "scratch, end-to-end"
PRETRAINED_E2E = "pretrained, end-to-end"
PRETRAINED_STAGE1_LONG = "pretrained, stage 1, E + F epochs"
PRETRAINED_FT = "pretrained, stage 1 + fine-tune"
VARIANTS = (PRETRAINED_STAGE1, PRETRAINED_STAGE1_LONG, PRETRAINED_FT, SCRATCH_STAGE1, SCRATCH_E2E, PRETRAINED_E2E)
SLUGS = {
    "pretrained-stage1": PRETRAINED_STAGE1,
    "pretrained-stage1-long": PRETRAINED_STAGE1_LONG,
    "pretrained-finetune": PRETRAINED_FT,
    "scratch-stage1": SCRATCH_STAGE1,
    "scratch-e2e": SCRATCH_E2E,
    "pretrained-e2e": PRETRAINED_E2E,
}


class DatasetMissing(Exception):
    """The Debian Fashion-MNIST files are not there; the message is the one-line install hint."""


# -- data -----------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray[Any, Any]:
    """An IDX file (gzip), as MNIST and Fashion-MNIST ship them: uint8 labels [N] or images [N, H, W]."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def load_fashion_mnist(part: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of `train` or `test` (t10k); DatasetMissing without them."""
    images_name, labels_name = FILES[part]
    paths = [data_dir / images_name, data_dir / labels_name]
    if not all(p.is_file() for p in paths):
        raise DatasetMissing(INSTALL_HINT)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{data_dir}: {part} images {images.shape} do not match labels {labels.shape}")
    return images, labels.astype(np.int64)


def stratified_indices(
    labels: np.ndarray[Any, Any],
    counts: Sequence[int],
    rng: np.random.Generator,
) -> list[np.ndarray[Any, Any]]:
    """Disjoint index sets, set k holding counts[k] rows of every class, drawn at random with `rng`."""
    need = sum(counts)
    chosen: list[list[np.ndarray[Any, Any]]] = [[] for _ in counts]
    for label in range(len(LABELS)):
        rows = np.flatnonzero(labels == label)
        if rows.size < need:
            raise ValueError(f"class {LABELS[label]!r} has {rows.size} images, {need} requested")
        rows = rng.permutation(rows)[:need]
        start = 0
        for k, count in enumerate(counts):
            chosen[k].append(rows[start : start + count])
            start += count
    return [np.concatenate(parts) for parts in chosen]


def to_rgb(images: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    """Grey uint8 [N, H, W] -> uint8 [N, 3, size, size]: bilinear resize, grey replicated to 3 channels."""
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous().numpy()


def prepare_data(
    per_class: int, val_per_class: int, test_per_class: int, size: int, seed: int, data_dir: Path = DATA_DIR
) -> PreparedData:
    """A stratified subset of Fashion-MNIST as the engine's PreparedData; the same for the same arguments."""
    rng = np.random.default_rng(seed)
    train_images, train_labels = load_fashion_mnist("train", data_dir)
    test_images, test_labels = load_fashion_mnist("test", data_dir)
    train_rows, val_rows = stratified_indices(train_labels, [per_class, val_per_class], rng)
    (test_rows,) = stratified_indices(test_labels, [test_per_class], rng)
    train_rows = rng.permutation(train_rows)  # classes interleaved (the loaders shuffle anyway)

    def split(images: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], rows: np.ndarray[Any, Any]) -> Split:
        return Split(images=to_rgb(images[rows], size), targets=labels[rows].copy())

    return PreparedData(
        labels=list(LABELS),
        train=split(train_images, train_labels, train_rows),
        val=split(train_images, train_labels, val_rows),
        test=split(test_images, test_labels, test_rows),
    )


def imagenet_base_state() -> dict[str, torch.Tensor] | None:
    """MobileNetV2's ImageNet weights, the task's pretrained base, from the offline checkpoint cache."""
    seed_weights_cache()
    return load_base_weights(ModelConfig(architecture=Architecture.MOBILENET_V2, weights=WeightsSource.IMAGENET), None)


# -- the variants ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    per_class: int
    val_per_class: int
    test_per_class: int
    size: int
    epochs: int
    fine_tune_epochs: int
    fine_tune_blocks: int | None  # None: the whole base
    learning_rate: float  # stage 1 (the head); fine-tuning runs at a tenth of it
    scratch_lrs: tuple[float, ...]  # end-to-end from scratch: each is run, the best on validation compared
    pretrained_lrs: tuple[float, ...]  # end-to-end from ImageNet weights: likewise
    batch_size: int
    schedule: ScheduleType  # every stage of every variant
    seed: int
    threads: int
    workers: int


@dataclass(frozen=True)
class Outcome:
    variant: str
    epochs: str  # what ran, e.g. "5 + 3"
    trained: str  # which weights trained
    learning_rate: str
    val_accuracy: float
    test_accuracy: float
    test_count: int
    seconds: float
    selected: bool = True  # among several LRs of one variant: the one with the best validation accuracy


def _adam_stage(epochs: int, learning_rate: float, s: Settings) -> StageConfig:
    return StageConfig(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=s.batch_size,
        optimizer=OptimizerConfig(type=OptimizerType.ADAM),
        schedule=ScheduleConfig(type=s.schedule),
    )


def variant_config(variant: str, s: Settings, e2e_lr: float | None = None) -> tuple[TrainingConfig, str, str, str]:
    """(config, epochs, what trains, learning rates) of one variant; `e2e_lr` for the end-to-end ones."""
    pretrained = variant not in (SCRATCH_STAGE1, SCRATCH_E2E)
    model = ModelConfig(
        architecture=Architecture.MOBILENET_V2,
        weights=WeightsSource.IMAGENET if pretrained else WeightsSource.NONE,
        classifier_dim=256,
    )
    no_fine_tuning = FineTuningConfig(enabled=False)
    blocks = "all blocks" if s.fine_tune_blocks is None else f"last {s.fine_tune_blocks} blocks"
    ft_lr = s.learning_rate / 10
    if variant in (PRETRAINED_STAGE1, SCRATCH_STAGE1):
        classifier, fine_tuning = _adam_stage(s.epochs, s.learning_rate, s), no_fine_tuning
        epochs, trained, lr = f"{s.epochs}", "head", f"{s.learning_rate:g}"
    elif variant == PRETRAINED_STAGE1_LONG:
        total = s.epochs + s.fine_tune_epochs
        classifier, fine_tuning = _adam_stage(total, s.learning_rate, s), no_fine_tuning
        epochs, trained, lr = f"{total}", "head", f"{s.learning_rate:g}"
    elif variant == PRETRAINED_FT:
        classifier = _adam_stage(s.epochs, s.learning_rate, s)
        fine_tuning = FineTuningConfig(
            enabled=True, last_n_blocks=s.fine_tune_blocks, stage=_adam_stage(s.fine_tune_epochs, ft_lr, s)
        )
        epochs = f"{s.epochs} + {s.fine_tune_epochs}"
        trained, lr = f"head, then head + {blocks}", f"{s.learning_rate:g}, then {ft_lr:g}"
    elif variant in (SCRATCH_E2E, PRETRAINED_E2E):
        if e2e_lr is None:
            raise ValueError(f"{variant} needs its learning rate")
        # No stage 1 (0 epochs), then every layer trains from the first step.
        classifier = _adam_stage(0, s.learning_rate, s)
        fine_tuning = FineTuningConfig(enabled=True, last_n_blocks=None, stage=_adam_stage(s.epochs, e2e_lr, s))
        epochs, trained, lr = f"{s.epochs}", "everything", f"{e2e_lr:g}"
    else:
        raise ValueError(f"unknown variant {variant!r}")
    config = TrainingConfig(
        dataset=DatasetConfig(uri="bench/fashion-mnist", image_size=s.size),
        output_model="bench-transfer-learning",
        model=model,
        classifier=classifier,
        fine_tuning=fine_tuning,
        run=RunConfig(seed=s.seed, repeats=1, data_loader_workers=s.workers),
    )
    return config, epochs, trained, lr


class _Progress(NoOpCallbacks):
    """Engine callbacks that print one line per stage and epoch."""

    def __init__(self, variant: str) -> None:
        self.variant = variant

    def stage_started(self, repeat: int, stage: str, epochs: int, cached_features: bool) -> None:
        if epochs:
            cached = ", features cached" if cached_features else ""
            print(f"  [{self.variant}] {stage}: {epochs} epochs{cached}", flush=True)

    def epoch_ended(self, repeat: int, record: EpochRecord) -> None:
        print(
            f"  [{self.variant}] {record.stage} {record.epoch}/{record.epochs}: "
            f"train loss {record.train_loss:.3f} acc {record.train_accuracy:.3f}, "
            f"val acc {record.val_accuracy:.3f} ({record.epoch_seconds:.1f} s)",
            flush=True,
        )


def run_variant(
    variant: str,
    s: Settings,
    data: PreparedData,
    imagenet_state: dict[str, torch.Tensor] | None,
    e2e_lr: float | None = None,
) -> Outcome:
    config, epochs, trained, lr = variant_config(variant, s, e2e_lr)
    base_state = imagenet_state if config.model.weights is WeightsSource.IMAGENET else None
    mean, std = normalization(config.model)  # ImageNet statistics for both: the same input pipeline
    ctx = RunContext(device=torch.device("cpu"), autocast_dtype=None, workers=s.workers, mean=mean, std=std)
    print(f"{variant}: epochs {epochs}, trains {trained}, LR {lr}", flush=True)
    started = time.perf_counter()
    result: TrainingResult = train(
        config,
        data,
        lambda seed: build_classifier(config.model, len(data.labels), base_state),
        ctx,
        _Progress(variant),
    )
    seconds = time.perf_counter() - started
    test = result.best.test
    assert test is not None
    outcome = Outcome(
        variant=variant,
        epochs=epochs,
        trained=trained,
        learning_rate=lr,
        val_accuracy=result.best.validation.accuracy,
        test_accuracy=test.accuracy,
        test_count=test.count,
        seconds=seconds,
    )
    print(f"{variant}: val {outcome.val_accuracy:.3f}, test {outcome.test_accuracy:.3f} in {seconds:.0f} s", flush=True)
    return outcome


def run_all(
    variants: Sequence[str], s: Settings, data: PreparedData, imagenet_state: dict[str, torch.Tensor] | None
) -> list[Outcome]:
    """Every run, in VARIANTS order; an end-to-end variant once per LR, the best on validation selected."""
    outcomes: list[Outcome] = []
    for variant in VARIANTS:
        if variant not in variants:
            continue
        if variant not in (SCRATCH_E2E, PRETRAINED_E2E):
            outcomes.append(run_variant(variant, s, data, imagenet_state))
            continue
        lrs = s.scratch_lrs if variant == SCRATCH_E2E else s.pretrained_lrs
        runs = [run_variant(variant, s, data, imagenet_state, lr) for lr in lrs]
        best = max(range(len(runs)), key=lambda i: (runs[i].val_accuracy, -i))
        outcomes += [dataclasses.replace(r, selected=i == best) for i, r in enumerate(runs)]
    return outcomes


# -- claims and report ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    text: str
    better: str
    worse: str
    gated: bool  # whether a failure fails the run

    def holds(self, results: dict[str, Outcome]) -> bool | None:
        if self.better not in results or self.worse not in results:
            return None
        return results[self.better].test_accuracy > results[self.worse].test_accuracy


CLAIMS = (
    Claim(
        "pretrained beats scratch at equal epochs, both trained end-to-end, each at its best LR (the fair comparison)",
        PRETRAINED_E2E,
        SCRATCH_E2E,
        gated=True,
    ),
    Claim("stage 1 + fine-tuning beats stage 1 alone (E epochs)", PRETRAINED_FT, PRETRAINED_STAGE1, gated=True),
    Claim(
        "stage 1 + fine-tuning beats stage 1 alone given the same total epochs (E + F)",
        PRETRAINED_FT,
        PRETRAINED_STAGE1_LONG,
        gated=True,
    ),
    Claim(
        "pretrained frozen-base head beats scratch trained end-to-end at equal epochs (not like for like: "
        "head only vs every weight)",
        PRETRAINED_STAGE1,
        SCRATCH_E2E,
        gated=False,
    ),
    Claim(
        "pretrained beats scratch with the stage-1 recipe (strawman: a frozen random base)",
        PRETRAINED_STAGE1,
        SCRATCH_STAGE1,
        gated=False,
    ),
)


def _standard_error(accuracy: float, count: int) -> float:
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(count, 1))


def _lrs(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def render_report(
    s: Settings, outcomes: Sequence[Outcome], command: str, data: PreparedData, total_seconds: float
) -> tuple[str, bool]:
    """(Markdown, whether every gated claim that could be checked holds)."""
    results = {o.variant: o for o in outcomes if o.selected}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    blocks = "all blocks" if s.fine_tune_blocks is None else f"the last {s.fine_tune_blocks} blocks"
    lines = [
        "# Transfer learning: pretrained vs scratch, stage 1 vs fine-tuning",
        "",
        f"Fashion-MNIST (28x28 grey product photos, unlike ImageNet), stratified subset: {len(data.train)} train "
        f"({s.per_class}/class) and {len(data.val)} validation ({s.val_per_class}/class) from the train file, "
        f"{len(data.test or [])} test ({s.test_per_class}/class) from t10k; resized to {s.size}x{s.size}, grey "
        f"replicated to RGB, seed {s.seed}. MobileNetV2 with a 256-unit head (dropout 0.5), Adam, batch "
        f"{s.batch_size}, {s.schedule.value} LR schedule in every stage, no augmentation, through "
        f"`recipe.train`. E = {s.epochs}, F = {s.fine_tune_epochs}; "
        f"fine-tuning unfreezes {blocks} at the stage-1 LR / 10. End-to-end runs train every layer from the "
        f"first step (stage 1 with 0 epochs, then the fine-tuning stage over all layers), scratch at LR "
        f"{_lrs(s.scratch_lrs)} and pretrained at LR {_lrs(s.pretrained_lrs)}: each side at its own best rate "
        f"(see the module docstring; a shared rate favours one side), picked on validation accuracy where "
        f"several are listed. Test accuracy is measured once, after the last epoch; ± is its binomial "
        f"standard error.",
        "",
        "| variant | epochs | trains | LR | val acc | test acc (± s.e.) | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    several = {o.variant for o in outcomes if not o.selected}
    for r in outcomes:
        se = _standard_error(r.test_accuracy, r.test_count)
        mark = (" (selected on val)" if r.selected else " (not selected)") if r.variant in several else ""
        lines.append(
            f"| {r.variant}{mark} | {r.epochs} | {r.trained} | {r.learning_rate} | {r.val_accuracy:.1%} | "
            f"{r.test_accuracy:.1%} (± {se:.1%}) | {r.seconds:.0f} s |"
        )
    lines += ["", "| claim | test acc | verdict |", "|---|---|---|"]
    ok = True
    for claim in CLAIMS:
        verdict = claim.holds(results)
        if verdict is None:
            continue
        diff = results[claim.better].test_accuracy - results[claim.worse].test_accuracy
        accuracies = (
            f"{results[claim.better].test_accuracy:.1%} vs {results[claim.worse].test_accuracy:.1%} ({diff:+.1%})"
        )
        word = "holds" if verdict else ("**fails**" if claim.gated else "does not hold (informational)")
        lines.append(f"| {claim.text} | {accuracies} | {word} |")
        ok = ok and (verdict or not claim.gated)
    lines += [
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores, {s.threads} torch thread(s), {s.workers} loader "
        f"workers, no GPU used; Python {platform.python_version()}, torch {torch.__version__}; "
        f"{platform.platform()}. Total wall time {total_seconds / 60:.1f} min. Date: {now}.",
        "",
    ]
    return "\n".join(lines), ok


# -- command line ---------------------------------------------------------------------------------------------


def _lr_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from err
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive: {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transfer_learning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--per-class", type=int, default=200, help="training images per class (default 200)")
    parser.add_argument("--val-per-class", type=int, default=50, help="validation images per class (default 50)")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class, from t10k (100)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--epochs", type=int, default=4, help="E: stage-1 and end-to-end epochs (default 4)")
    parser.add_argument("--fine-tune-epochs", type=int, default=4, help="F: fine-tuning epochs (default 4)")
    parser.add_argument(
        "--fine-tune-blocks",
        type=int,
        default=None,
        help="unfreeze only the last N of MobileNetV2's 18 blocks (default: the whole base)",
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="stage-1 LR; fine-tuning uses a tenth (3e-3)")
    parser.add_argument(
        "--scratch-lr",
        type=_lr_list,
        default=(3e-3,),
        help="end-to-end LR from scratch; a comma-separated list picks on validation (3e-3)",
    )
    parser.add_argument(
        "--pretrained-lr",
        type=_lr_list,
        default=(1e-3,),
        help="end-to-end LR from ImageNet weights; a list picks on validation (1e-3)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--schedule",
        choices=[ScheduleType.COSINE.value, ScheduleType.CONSTANT.value],
        default=ScheduleType.COSINE.value,
        help="LR schedule of every stage (default cosine: decays to 0 over each stage)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine 2 threads oversubscribe)",
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SLUGS)}")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"report file (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    unknown = [v for v in args.only.split(",") if v and v not in SLUGS]
    if unknown:
        parser.error(f"--only: unknown variants {unknown}; choose from {', '.join(SLUGS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every gated claim holds, 1 when one fails, 2 when the data is missing."""
    args = parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m bench.transfer_learning", *map(shlex.quote, raw)])
    s = Settings(
        per_class=args.per_class,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        size=args.size,
        epochs=args.epochs,
        fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_blocks=args.fine_tune_blocks,
        learning_rate=args.lr,
        scratch_lrs=args.scratch_lr,
        pretrained_lrs=args.pretrained_lr,
        batch_size=args.batch_size,
        schedule=ScheduleType(args.schedule),
        seed=args.seed,
        threads=args.threads,
        workers=args.workers,
    )
    torch.set_num_threads(s.threads)
    try:
        data = prepare_data(s.per_class, s.val_per_class, s.test_per_class, s.size, s.seed, args.data_dir)
    except DatasetMissing as err:
        print(err, file=sys.stderr)
        return 2
    imagenet_state = imagenet_base_state()
    chosen = [SLUGS[v] for v in args.only.split(",") if v] or list(VARIANTS)
    started = time.perf_counter()
    outcomes = run_all(chosen, s, data, imagenet_state)
    report, ok = render_report(s, outcomes, command, data, time.perf_counter() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print()
    print(report)
    print(f"written to {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
