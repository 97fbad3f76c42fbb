"""One pass over the data as plain functions, in the spirit of torchvision's references/classification:
`train_one_epoch` (optimizer steps under the stage's learning-rate schedule), `evaluate` (loss and accuracy
without gradients) and `compute_features` (the frozen base's bottleneck features, for the cached-feature path).

`forward` is the whole model on images, or only its head on cached features: the functions do not care which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from trainer_service.engine.context import RunContext, autocast, to_device
from trainer_service.engine.distributed import Shard
from trainer_service.engine.models import Classifier
from trainer_service.engine.schedules import lr_at
from trainer_service.spec.config import OptimizerType, StageConfig

Batches = Iterable[tuple[Tensor, Tensor]]

# Cached features stay on the GPU when they take at most this share of its free memory (the rest is the model's,
# its activations' and the optimizer's); otherwise they wait on the host and each batch is copied over.
FEATURES_ON_GPU_SHARE = 0.25


class Cancelled(Exception):
    """The caller asked the loop to stop (CancelJob); nothing after the last checkpoint is kept."""


# -- optimizer and learning rate ------------------------------------------------------------------------


def build_optimizer(params: Sequence[nn.Parameter], stage: StageConfig) -> torch.optim.Optimizer:
    opt = stage.optimizer
    lr = stage.learning_rate
    if opt.type == OptimizerType.SGD:
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=opt.momentum,
            nesterov=opt.nesterov and opt.momentum > 0,
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


class EpochTotals:
    """An epoch's summed loss, correct predictions and images. The sums stay where the batches are (a GPU's):
    reading a number back each step would make the host wait for the GPU twice a step. They are read once, at the
    epoch's end; in float64, added in the same order as Python floats would be, so the numbers are the same."""

    def __init__(self, loss: float = 0.0, correct: int = 0, seen: int = 0) -> None:
        self._loss: Tensor | float = loss
        self._correct: Tensor | int = correct
        self.seen = seen

    def add(self, loss: Tensor, logits: Tensor, targets: Tensor) -> None:
        n = int(targets.shape[0])  # a shape: known on the host without a sync
        self._loss = self._loss + loss.detach().double() * n
        self._correct = self._correct + (logits.detach().argmax(1) == targets).sum()
        self.seen += n

    @property
    def loss(self) -> float:
        return float(self._loss)

    @property
    def correct(self) -> int:
        return int(self._correct)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(1, self.seen)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.seen)


def train_one_epoch(
    forward: Callable[[Tensor], Tensor],
    trainable: Sequence[nn.Parameter],
    batches: Batches,
    steps: int,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    stage: StageConfig,
    epoch_index: int,
    lr_scale: float,
    ctx: RunContext,
    scaler: torch.amp.GradScaler | None,
    should_stop: Callable[[], bool],
    shard: Shard | None = None,
) -> tuple[EpochTotals, float, list[float]]:
    """One epoch of optimizer steps; returns the totals, the last learning rate and the rate of every step.

    The learning rate follows the stage's schedule per step (times `lr_scale`, the plateau reducer's factor).
    Raises Cancelled before the next step once `should_stop()` says so.

    `shard`: `batches` are this rank's rows of each global batch and `forward` is under DDP (which averages the
    gradients over ranks); the totals are this rank's, summed across ranks by the caller.
    """
    totals = EpochTotals()
    lrs: list[float] = []
    lr = stage.learning_rate
    for step, (inputs, targets) in enumerate(batches):
        global_rows = local_rows = int(targets.shape[0])
        stop = should_stop()
        if shard is not None:
            global_rows, stop = shard.step(local_rows, stop)
        if stop:
            raise Cancelled()
        lr = lr_at(stage, epoch_index + step / max(1, steps), steps_per_epoch=max(1, steps)) * lr_scale
        set_lr(optimizer, lr)
        lrs.append(lr)
        inputs = to_device(inputs, ctx)
        targets = targets.to(ctx.device, non_blocking=True)
        with autocast(ctx):
            logits = forward(inputs)
            loss = criterion(logits.float(), targets)
        # DDP averages the ranks' gradients: weighting each rank's mean loss by its share of the global batch
        # makes that average the gradient of the global batch's mean loss (equal shares weigh 1).
        objective = loss if shard is None else loss * (shard.world_size * local_rows / global_rows)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(objective).backward()
            if stage.gradient_clip_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trainable, stage.gradient_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            objective.backward()
            if stage.gradient_clip_norm > 0:
                nn.utils.clip_grad_norm_(trainable, stage.gradient_clip_norm)
            optimizer.step()
        totals.add(loss, logits, targets)
    return totals, lr, lrs


@torch.no_grad()
def evaluate(
    forward: Callable[[Tensor], Tensor],
    batches: Batches,
    criterion: nn.Module,
    ctx: RunContext,
) -> tuple[EpochTotals, Tensor]:
    """Loss and accuracy over every batch without gradients, and the logits (on the CPU, fp32)."""
    totals = EpochTotals()
    all_logits: list[Tensor] = []
    for inputs, targets in batches:
        inputs = to_device(inputs, ctx)
        targets = targets.to(ctx.device, non_blocking=True)
        with autocast(ctx):
            logits = forward(inputs).float()
        totals.add(criterion(logits, targets), logits, targets)
        all_logits.append(logits.cpu())
    return totals, torch.cat(all_logits) if all_logits else torch.empty(0)


def features_fit(total_bytes: int, free_bytes: int) -> bool:
    """Whether cached features of `total_bytes` may stay on a GPU with `free_bytes` free."""
    return total_bytes <= FEATURES_ON_GPU_SHARE * free_bytes


def _feature_home(ctx: RunContext, first: Tensor, rows: int) -> tuple[torch.device, torch.dtype]:
    """Where cached features live and in what dtype: on the GPU when they fit, in the autocast dtype they were
    computed in (storing them wider adds no precision); on the host in fp32 otherwise."""
    if ctx.device.type != "cuda":
        return torch.device("cpu"), torch.float32
    dtype = ctx.autocast_dtype or torch.float32
    per_row = first[0].numel() * torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(ctx.device)
    if features_fit(per_row * rows, free):
        return ctx.device, dtype
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def compute_features(model: Classifier, batches: Batches, ctx: RunContext, rows: int) -> tuple[Tensor, Tensor]:
    """The frozen base's bottleneck features of every image in `batches` (`rows` of them in all), and the labels.

    On the CPU they are fp32; on a GPU they stay on it (in the autocast dtype) when they fit, see `_feature_home`.
    """
    model.base.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    home: tuple[torch.device, torch.dtype] | None = None
    for inputs, targets in batches:
        with autocast(ctx):
            out = model.base(to_device(inputs, ctx))
        if home is None:
            home = _feature_home(ctx, out, rows)
        feats.append(out.to(device=home[0], dtype=home[1]))
        labels.append(targets.to(home[0]))
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)
