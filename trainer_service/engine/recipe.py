"""A whole training run: repeats x (stage 1, optional stage 2), then evaluation and open-set calibration.

`train` is what a job's worker calls with decoded data and base weights in hand. It returns the best
repeat's model and every number the job reports; it never touches S3 or the job store. Resume: the
worker hands back the last checkpoint (`resume`), and training continues after its last completed epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainer_service.engine.batches import Split
from trainer_service.engine.context import RunContext, configure_kernels
from trainer_service.engine.distributed import Shard
from trainer_service.engine.evaluation import (
    ClassificationReport,
    MisclassifiedExample,
    OpenSetReport,
    aggregate,
    classification_report,
    open_set_report,
)
from trainer_service.engine.loop import (
    CLASSIFIER,
    FINE_TUNING,
    Callbacks,
    EpochRecord,
    StageData,
    StageState,
    predict,
    restore_best_weights,
    run_stage,
)
from trainer_service.engine.models import (
    Classifier,
    freeze_base,
    load_trained_state,
    trained_state,
    weights_digest,
)
from trainer_service.spec.config import OpenSetScore, TrainingConfig


@dataclass
class PreparedData:
    labels: list[str]
    train: Split
    val: Split
    test: Split | None = None
    unknown: Split | None = None


@dataclass
class RepeatResult:
    """One seed's outcome: its history and reports (the model itself is kept only for the best repeat)."""

    repeat: int
    seed: int
    history: list[EpochRecord]
    validation: ClassificationReport
    test: ClassificationReport | None
    open_set: OpenSetReport
    lrs: dict[str, list[float]]
    histograms: dict[str, list[tuple[int, list[float], list[float]]]]
    stopped_early: dict[str, bool]

    def metrics(self) -> dict[str, float]:
        """Flat numbers, aggregated across repeats as mean and std."""
        out = {
            "val_accuracy": self.validation.accuracy,
            "val_loss": self.validation.loss,
            "val_top5_accuracy": self.validation.top5_accuracy,
            "val_macro_f1": self.validation.macro_f1,
            "open_set_threshold": self.open_set.threshold,
            "open_set_validation_tpr": self.open_set.validation_tpr,
        }
        if self.history:
            out["train_loss"] = self.history[-1].train_loss
            out["train_accuracy"] = self.history[-1].train_accuracy
            out["epochs_run"] = float(len(self.history))
        if self.test is not None:
            out.update(
                test_accuracy=self.test.accuracy,
                test_loss=self.test.loss,
                test_top5_accuracy=self.test.top5_accuracy,
                test_macro_f1=self.test.macro_f1,
            )
        if self.open_set.fpr_at_threshold is not None:
            out["open_set_fpr"] = self.open_set.fpr_at_threshold
        if self.open_set.auroc is not None:
            out["open_set_auroc"] = self.open_set.auroc
        return out


@dataclass
class TrainingResult:
    repeats: list[RepeatResult]
    best: RepeatResult
    model: Classifier  # the best repeat's trained model (by validation accuracy)
    summary: dict[str, tuple[float, float]]  # metric -> (mean, std) across repeats


@dataclass
class ResumeState:
    """What a checkpoint carries: where the run was, and what it had finished.

    `model` and `best_model` are `trained_state`s, not whole state_dicts: a resume builds the repeat's model
    again (same base weights, same seed) and loads them on top. `base_digest` is that fresh model's
    `weights_digest`, so a resume onto other base weights (an unpinned `model.weights_uri` whose object changed)
    fails instead of training on silently.
    """

    repeat: int
    stage: str
    stage_state: StageState
    model: dict[str, Tensor]
    finished: list[RepeatResult] = field(default_factory=list)
    best_model: dict[str, Tensor] | None = None
    base_digest: str | None = None  # None: a checkpoint written before the digest was kept
    classifier_state: StageState | None = None  # stage 1's history while stage 2 runs
    lrs: dict[str, list[float]] = field(default_factory=dict)
    histograms: dict[str, list[tuple[int, list[float], list[float]]]] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> ResumeState:
        """The resume state in a checkpoint: the dict `Callbacks.checkpoint` was given, read back. A field with a
        default may be missing (a checkpoint from before it existed)."""
        required = {f.name for f in dataclasses.fields(cls) if _required(f)}
        missing = required - set(state)
        if missing:
            raise ValueError(f"the checkpoint lacks {sorted(missing)}")
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})

    @classmethod
    def from_bytes(cls, raw: bytes) -> ResumeState:
        """A checkpoint as `checkpoint_bytes` wrote it, loaded weights-only: tensors, primitives and the
        `CHECKPOINT_TYPES` rebuild, any other global in the pickle is refused (no code runs)."""
        with torch.serialization.safe_globals(list(CHECKPOINT_TYPES)):
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        return cls.from_checkpoint(state)


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def checkpoint_bytes(state: Mapping[str, Any]) -> bytes:
    """The dict `Callbacks.checkpoint` is given, serialised as `ResumeState.from_bytes` reads it."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


# Every type a checkpoint holds besides tensors and primitives: what the weights-only unpickler may rebuild.
CHECKPOINT_TYPES: tuple[type, ...] = (
    StageState,
    EpochRecord,
    RepeatResult,
    ClassificationReport,
    MisclassifiedExample,
    OpenSetReport,
    OpenSetScore,
)


@dataclass
class _Progress:
    """What the run has finished so far; checkpoints carry it."""

    finished: list[RepeatResult]
    best_model: dict[str, Tensor] | None


def _checkpoint_extra(
    progress: _Progress,
    state: StageState,
    *,
    repeat: int,
    stage: str,
    base_digest: str,
    classifier_state: StageState | None,
    lrs: dict[str, list[float]],
    histograms: dict[str, list[tuple[int, list[float], list[float]]]],
) -> dict[str, Any]:
    return {
        "repeat": repeat,
        "stage": stage,
        "finished": progress.finished,
        "best_model": progress.best_model,
        "base_digest": base_digest,
        "classifier_state": classifier_state,
        "lrs": lrs,
        "histograms": histograms,
    }


ModelFactory = Callable[[int], Classifier]  # seed -> a fresh model (base weights loaded, head initialised)


def _fresh_model(make_model: ModelFactory, seed: int) -> Classifier:
    """The repeat's model as built before it trained, the same every time it is built: the head's initialisation
    (and a base without pretrained weights) is drawn from `seed`. A `trained_state` loads onto it."""
    torch.manual_seed(seed)
    return make_model(seed)


def _ended(state: StageState) -> StageState:
    """A stage that has ended, as later checkpoints carry it: a resume reads its history and how it ended, never
    again its best weights or its optimizer's state (which stage 2 checkpoints would otherwise repeat)."""
    return dataclasses.replace(state, best_weights=None, optimizer=None, scaler=None, plateau=None)


def _merge_histograms(
    into: dict[str, list[tuple[int, list[float], list[float]]]],
    more: dict[str, list[tuple[int, list[float], list[float]]]],
    epoch_offset: int,
) -> None:
    for group, rows in more.items():
        into.setdefault(group, []).extend((epoch + epoch_offset, edges, counts) for epoch, edges, counts in rows)


def train(
    config: TrainingConfig,
    data: PreparedData,
    make_model: ModelFactory,
    ctx: RunContext,
    callbacks: Callbacks,
    resume: ResumeState | None = None,
    shard: Shard | None = None,
) -> TrainingResult:
    """`shard`: this process is one rank of several training together (`engine/parallel.py` starts them); every
    rank runs this whole function, and only rank 0's callbacks record anything."""
    configure_kernels(config.run.deterministic)
    progress = _Progress(
        finished=list(resume.finished) if resume else [], best_model=resume.best_model if resume else None
    )
    finished = progress.finished
    stage_data = StageData(train=data.train, val=data.val, num_classes=len(data.labels))
    first_repeat = resume.repeat if resume else 0

    for repeat in range(first_repeat, config.run.repeats):
        seed = config.run.seed + repeat
        model = _fresh_model(make_model, seed)
        base_digest = weights_digest(model)
        resuming = resume is not None and repeat == resume.repeat
        lrs: dict[str, list[float]] = dict(resume.lrs) if resuming and resume else {}
        histograms: dict[str, list[tuple[int, list[float], list[float]]]] = (
            {k: list(v) for k, v in resume.histograms.items()} if resuming and resume else {}
        )
        stage1_resume: StageState | None = None
        stage2_resume: StageState | None = None
        if resuming and resume is not None:
            if resume.base_digest is not None and resume.base_digest != base_digest:
                raise ValueError(
                    f"the checkpoint of repeat {repeat + 1} was trained from other base weights than the ones "
                    "loaded now (has the object at model.weights_uri changed? model.weights_sha256 pins it), so "
                    "the job cannot resume from it"
                )
            load_trained_state(model, resume.model)
            if resume.stage == CLASSIFIER:
                stage1_resume = resume.stage_state
            else:
                stage1_resume = resume.classifier_state
                stage2_resume = resume.stage_state

        stage1_done = stage1_resume is not None and (
            stage1_resume.completed_epochs >= config.classifier.epochs
            or stage1_resume.stopped_early
            or stage2_resume is not None
        )
        if stage1_done and stage1_resume is not None:
            stage1 = stage1_resume
            if stage2_resume is None:
                # The checkpoint is stage 1's last epoch: the model is left as run_stage leaves it after that
                # epoch (base frozen, the best epoch's weights back), as an uninterrupted run goes on from.
                freeze_base(model)
                restore_best_weights(model, config.classifier, stage1)
        else:
            outcome = run_stage(
                model,
                config,
                CLASSIFIER,
                stage_data,
                ctx,
                callbacks,
                repeat=repeat,
                seed=seed,
                resume=stage1_resume,
                shard=shard,
                checkpoint_extra=functools.partial(
                    _checkpoint_extra,
                    progress,
                    repeat=repeat,
                    stage=CLASSIFIER,
                    base_digest=base_digest,
                    classifier_state=None,
                    lrs=lrs,
                    histograms=histograms,
                ),
            )
            stage1 = outcome.state
            lrs[CLASSIFIER] = lrs.get(CLASSIFIER, []) + outcome.lrs
            _merge_histograms(histograms, outcome.histograms, 0)
        history = list(stage1.history)
        stopped_early = {CLASSIFIER: stage1.stopped_early}

        if config.fine_tuning.enabled:
            outcome = run_stage(
                model,
                config,
                FINE_TUNING,
                stage_data,
                ctx,
                callbacks,
                repeat=repeat,
                seed=seed,
                resume=stage2_resume,
                shard=shard,
                checkpoint_extra=functools.partial(
                    _checkpoint_extra,
                    progress,
                    repeat=repeat,
                    stage=FINE_TUNING,
                    base_digest=base_digest,
                    classifier_state=_ended(stage1),
                    lrs=lrs,
                    histograms=histograms,
                ),
            )
            history += outcome.state.history
            stopped_early[FINE_TUNING] = outcome.state.stopped_early
            lrs[FINE_TUNING] = lrs.get(FINE_TUNING, []) + outcome.lrs
            _merge_histograms(histograms, outcome.histograms, len(stage1.history))

        result = evaluate(config, data, model, ctx, repeat=repeat, seed=seed)
        result.history, result.lrs, result.histograms, result.stopped_early = history, lrs, histograms, stopped_early
        if progress.best_model is None or result.validation.accuracy > max(r.validation.accuracy for r in finished):
            # What the repeat's last stage trains is everything any of its stages changed: every stage trains
            # the head, and stage 2 freezes no more of the base than stage 1 (all of it) did. So this holds the
            # union, and the rest is the base as `_fresh_model` builds it.
            progress.best_model = trained_state(model)
        finished.append(result)

    best = max(finished, key=lambda r: (r.validation.accuracy, -r.repeat))
    model = _fresh_model(make_model, best.seed)
    assert progress.best_model is not None
    load_trained_state(model, progress.best_model)
    model.eval()
    return TrainingResult(repeats=finished, best=best, model=model, summary=aggregate([r.metrics() for r in finished]))


def evaluate(
    config: TrainingConfig,
    data: PreparedData,
    model: Classifier,
    ctx: RunContext,
    *,
    repeat: int,
    seed: int,
) -> RepeatResult:
    """Validation report, open-set calibration on validation, and the test/unknown sets when given."""
    val_logits = predict(model, data.val, ctx)
    val_targets = torch.as_tensor(data.val.targets, dtype=torch.long)
    validation = classification_report(val_logits, val_targets, data.labels)
    test = None
    if data.test is not None and len(data.test):
        test = classification_report(
            predict(model, data.test, ctx), torch.as_tensor(data.test.targets, dtype=torch.long), data.labels
        )
    unknown_logits = predict(model, data.unknown, ctx) if data.unknown is not None and len(data.unknown) else None
    open_set = open_set_report(
        val_logits, config.open_set.score, config.open_set.target_true_positive_rate, unknown_logits
    )
    return RepeatResult(
        repeat=repeat,
        seed=seed,
        history=[],
        validation=validation,
        test=test,
        open_set=open_set,
        lrs={},
        histograms={},
        stopped_early={},
    )
