"""The training recipe on tiny in-memory data: stages, repeats, early stopping, cancel, exact resume."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from tests.colour_data import LABELS, SIZE, colour_config, colour_split, cpu_context
from trainer_service.engine.augment import build_eval_transform
from trainer_service.engine.context import RunContext
from trainer_service.engine.epoch import Cancelled
from trainer_service.engine.loop import CLASSIFIER, FINE_TUNING, EpochRecord, NoOpCallbacks, predict
from trainer_service.engine.models import build_classifier, normalization
from trainer_service.engine.recipe import PreparedData, ResumeState, TrainingResult, checkpoint_bytes, train
from trainer_service.spec.config import (
    AugmentationConfig,
    EarlyStoppingConfig,
    FineTuningConfig,
    Metric,
    RunConfig,
    StageConfig,
    TrainingConfig,
)

DATA = PreparedData(labels=LABELS, train=colour_split(48, 1), val=colour_split(24, 2))
_config = colour_config
_ctx = cpu_context


class Recorder(NoOpCallbacks):
    """Callbacks that keep everything, checkpoints serialised at once as the worker does."""

    def __init__(self, stop_after_epochs: int | None = None) -> None:
        self.stages: list[tuple[int, str, int, bool]] = []
        self.ended: list[tuple[int, str, int, bool]] = []
        self.epochs: list[tuple[int, EpochRecord]] = []
        self.checkpoints: list[bytes] = []
        self.stop_after_epochs = stop_after_epochs

    def stage_started(self, repeat: int, stage: str, epochs: int, cached_features: bool) -> None:
        self.stages.append((repeat, stage, epochs, cached_features))

    def epoch_ended(self, repeat: int, record: EpochRecord) -> None:
        self.epochs.append((repeat, record))

    def stage_ended(self, repeat: int, stage: str, epochs_run: int, stopped_early: bool) -> None:
        self.ended.append((repeat, stage, epochs_run, stopped_early))

    def checkpoint(self, state: dict[str, Any]) -> None:
        self.checkpoints.append(checkpoint_bytes(state))

    def should_stop(self) -> bool:
        return self.stop_after_epochs is not None and len(self.epochs) >= self.stop_after_epochs


def _run(config: TrainingConfig, recorder: Recorder, resume: ResumeState | None = None) -> TrainingResult:
    return train(config, DATA, lambda seed: build_classifier(config.model, 3, None), _ctx(config), recorder, resume)


def _resume_state(raw: bytes) -> ResumeState:
    return ResumeState.from_bytes(raw)  # weights-only, as the worker loads it


def test_two_stages_report_every_epoch_and_learn() -> None:
    config = _config(
        fine_tuning=FineTuningConfig(enabled=True, stage=StageConfig(epochs=2, batch_size=16, learning_rate=0.001))
    )
    recorder = Recorder()
    result = _run(config, recorder)

    assert [(s, e) for _, s, e, _ in recorder.stages] == [(CLASSIFIER, 3), (FINE_TUNING, 2)]
    assert [(r.stage, r.epoch) for _, r in recorder.epochs] == [
        (CLASSIFIER, 1),
        (CLASSIFIER, 2),
        (CLASSIFIER, 3),
        (FINE_TUNING, 1),
        (FINE_TUNING, 2),
    ]
    assert len(recorder.checkpoints) == 5
    first, last = recorder.epochs[0][1], recorder.epochs[2][1]
    assert last.train_loss < first.train_loss
    assert all(r.images_per_second > 0 and r.learning_rate > 0 for _, r in recorder.epochs)
    assert len(result.best.history) == 5
    assert set(result.best.histograms) == {"early", "late", "head"}
    assert len(result.best.histograms["head"]) == 5


def test_stage_one_caches_features_only_when_nothing_random_precedes_the_base() -> None:
    cases = {
        "plain": (AugmentationConfig(), True),
        "random flips": (AugmentationConfig(horizontal_flip=True), False),
        "augmented copies": (AugmentationConfig(horizontal_flip=True, copies_per_original=1), True),
    }
    for name, (augmentation, cached) in cases.items():
        recorder = Recorder()
        _run(_config(augmentation=augmentation, classifier=StageConfig(epochs=1, batch_size=16)), recorder)
        assert recorder.stages[0][3] is cached, name


def test_augmented_copies_grow_the_epoch() -> None:
    plain, copies = Recorder(), Recorder()
    one = StageConfig(epochs=1, batch_size=16)
    _run(_config(classifier=one), plain)
    _run(_config(classifier=one, augmentation=AugmentationConfig(vertical_flip=True, copies_per_original=2)), copies)
    # Same wall-clock budget is not asserted; the number of images seen per epoch is.
    seen_plain = plain.epochs[0][1].images_per_second * plain.epochs[0][1].epoch_seconds
    seen_copies = copies.epochs[0][1].images_per_second * copies.epochs[0][1].epoch_seconds
    assert seen_copies > 2 * seen_plain


def test_early_stopping_stops_and_says_so() -> None:
    stage = StageConfig(
        epochs=6,
        batch_size=16,
        early_stopping=EarlyStoppingConfig(enabled=True, monitor=Metric.VALIDATION_LOSS, patience=1, min_delta=10.0),
    )
    recorder = Recorder()
    result = _run(_config(classifier=stage), recorder)
    # min_delta 10 means no epoch after the first counts as an improvement: stop after patience (1) more.
    assert len(recorder.epochs) == 2
    assert recorder.ended == [(0, CLASSIFIER, 2, True)]
    assert result.best.stopped_early[CLASSIFIER] is True


def test_repeats_give_mean_and_std_over_seeds() -> None:
    recorder = Recorder()
    result = _run(
        _config(
            run=RunConfig(data_loader_workers=0, repeats=3, seed=7), classifier=StageConfig(epochs=1, batch_size=16)
        ),
        recorder,
    )
    assert [r.seed for r in result.repeats] == [7, 8, 9]
    mean, std = result.summary["train_loss"]
    losses = [r.metrics()["train_loss"] for r in result.repeats]
    assert mean == pytest.approx(float(np.mean(losses)))
    assert std == pytest.approx(float(np.std(losses, ddof=1)))
    assert std > 0  # different seeds really ran


def test_cancel_stops_between_batches() -> None:
    with pytest.raises(Cancelled):
        _run(_config(), Recorder(stop_after_epochs=1))


# Random augmentation on the device, with one augmented copy per original: stage 1 caches the copies' features,
# stage 2 augments every epoch's batches.
RESUME_CONFIG = _config(
    classifier=StageConfig(epochs=2, batch_size=16, learning_rate=0.01),
    fine_tuning=FineTuningConfig(enabled=True, stage=StageConfig(epochs=1, batch_size=16, learning_rate=0.001)),
    augmentation=AugmentationConfig(horizontal_flip=True, zoom_min_scale=0.7, brightness=0.2, copies_per_original=1),
    run=RunConfig(data_loader_workers=0, repeats=2),
)


@pytest.fixture(scope="module")
def uninterrupted_run() -> tuple[TrainingResult, Recorder]:
    whole = Recorder()
    return _run(RESUME_CONFIG, whole), whole


@pytest.mark.parametrize("cut", [0, 2, 4])
def test_resuming_from_any_checkpoint_reaches_the_uninterrupted_result(
    cut: int, uninterrupted_run: tuple[TrainingResult, Recorder]
) -> None:
    """Checkpoints 0-2 are repeat 1's stage 1/2, 3+ are repeat 2: resume lands on the same numbers. The resumed run
    loads in a worker process, the uninterrupted one in-process: the batches depend on neither."""
    config = dataclasses.replace(RESUME_CONFIG, run=dataclasses.replace(RESUME_CONFIG.run, data_loader_workers=1))
    uninterrupted, whole = uninterrupted_run
    assert len(whole.checkpoints) == 6

    resumed_recorder = Recorder()
    resumed = _run(config, resumed_recorder, _resume_state(whole.checkpoints[cut]))

    assert len(resumed_recorder.epochs) == 6 - (cut + 1)  # only the epochs after the checkpoint ran again
    for key, (mean, std) in uninterrupted.summary.items():
        assert resumed.summary[key][0] == pytest.approx(mean, rel=1e-5, abs=1e-6), key
        assert resumed.summary[key][1] == pytest.approx(std, rel=1e-4, abs=1e-6), key
    for a, b in zip(uninterrupted.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


# Stage 1 stops early after its second epoch, its first one the best (min_delta 10: nothing later counts as better),
# and restores that epoch's weights before stage 2 goes on from them.
RESTORE_CONFIG = _config(
    classifier=StageConfig(
        epochs=6,
        batch_size=16,
        learning_rate=0.01,
        early_stopping=EarlyStoppingConfig(
            enabled=True, monitor=Metric.VALIDATION_LOSS, patience=1, min_delta=10.0, restore_best_weights=True
        ),
    ),
    fine_tuning=FineTuningConfig(enabled=True, stage=StageConfig(epochs=1, batch_size=16, learning_rate=0.001)),
)


def test_resuming_after_stage_one_ended_restores_its_best_weights_as_the_uninterrupted_run_did() -> None:
    whole = Recorder()
    uninterrupted = _run(RESTORE_CONFIG, whole)
    assert whole.ended[0] == (0, CLASSIFIER, 2, True)
    last_of_stage_one = _resume_state(whole.checkpoints[1])
    assert (last_of_stage_one.stage, last_of_stage_one.stage_state.completed_epochs) == (CLASSIFIER, 2)
    assert last_of_stage_one.stage_state.best_epoch == 1
    in_stage_two = _resume_state(whole.checkpoints[2])
    assert in_stage_two.classifier_state is not None
    assert in_stage_two.classifier_state.completed_epochs == 2
    assert in_stage_two.classifier_state.best_weights is None  # stage 1 is over: nothing of its weights is needed
    assert in_stage_two.classifier_state.optimizer is None

    resumed_recorder = Recorder()
    resumed = _run(RESTORE_CONFIG, resumed_recorder, last_of_stage_one)
    assert [(r.stage, r.epoch) for _, r in resumed_recorder.epochs] == [(FINE_TUNING, 1)]
    for key, (mean, _) in uninterrupted.summary.items():
        assert resumed.summary[key][0] == pytest.approx(mean, rel=1e-5, abs=1e-6), key
    for a, b in zip(uninterrupted.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_a_stage_one_checkpoint_holds_the_head_not_the_frozen_base() -> None:
    recorder = Recorder()
    result = _run(dataclasses.replace(RESTORE_CONFIG, fine_tuning=FineTuningConfig()), recorder)
    resume = _resume_state(recorder.checkpoints[0])
    head = {f"head.{k}" for k in result.model.head.state_dict()}
    assert set(resume.model) == head
    assert resume.stage_state.best_weights is not None
    assert set(resume.stage_state.best_weights) == head
    whole_model = len(checkpoint_bytes({"model": result.model.state_dict()}))
    assert len(recorder.checkpoints[0]) * 10 < whole_model, (len(recorder.checkpoints[0]), whole_model)


def test_a_checkpoint_trained_from_other_base_weights_is_refused() -> None:
    config = _config(classifier=StageConfig(epochs=2, batch_size=16, learning_rate=0.01))
    whole = Recorder()
    _run(config, whole)
    resume = _resume_state(whole.checkpoints[0])
    assert resume.base_digest is not None
    with pytest.raises(ValueError, match="other base weights"):
        _run(config, Recorder(), dataclasses.replace(resume, base_digest="0" * 64))
    # A checkpoint from before the digest was kept lacks it, and resumes unchecked.
    saved = {f.name: getattr(resume, f.name) for f in dataclasses.fields(resume) if f.name != "base_digest"}
    older = ResumeState.from_bytes(checkpoint_bytes(saved))
    assert older.base_digest is None
    resumed = Recorder()
    _run(config, resumed, older)
    last, expected = _resume_state(resumed.checkpoints[-1]).model, _resume_state(whole.checkpoints[-1]).model
    assert last.keys() == expected.keys()
    assert all(torch.equal(last[k], expected[k]) for k in expected)


@dataclasses.dataclass
class _ScaledContext(RunContext):
    """Stands in for fp16 on a GPU (none here): the loop gets a loss scaler, which torch runs on the CPU too."""

    @property
    def use_scaler(self) -> bool:
        return True


def test_the_loss_scaler_state_goes_into_the_checkpoint_and_comes_back_on_resume() -> None:
    config = _config(classifier=StageConfig(epochs=2, batch_size=16, learning_rate=0.01))
    mean, std = normalization(config.model)
    ctx = _ScaledContext(device=torch.device("cpu"), autocast_dtype=None, workers=0, mean=mean, std=std)

    def run(recorder: Recorder, resume: ResumeState | None = None) -> TrainingResult:
        return train(config, DATA, lambda seed: build_classifier(config.model, 3, None), ctx, recorder, resume)

    whole = Recorder()
    run(whole)
    saved = [ResumeState.from_bytes(raw).stage_state.scaler for raw in whole.checkpoints]  # weights-only load
    assert saved[0] is not None
    assert saved[0]["scale"] == 65536.0  # torch's initial scale: no overflow here
    assert saved[1] is not None
    assert saved[1]["_growth_tracker"] == 2 * 3  # steps since the scale last changed: 48 / 16 per epoch

    # A scale the run would never reach by itself in 3 steps: the resumed epoch must carry it on.
    resume = ResumeState.from_bytes(whole.checkpoints[0])
    assert resume.stage_state.scaler is not None
    resume.stage_state.scaler["scale"] = 1024.0
    resumed = Recorder()
    run(resumed, resume)
    after = ResumeState.from_bytes(resumed.checkpoints[-1]).stage_state.scaler
    assert after is not None
    assert after["scale"] == 1024.0
    assert after["_growth_tracker"] == 2 * 3


def test_the_final_reports_predict_in_fp32_whatever_the_training_precision() -> None:
    config = _config(classifier=StageConfig(epochs=1, batch_size=16, learning_rate=0.01))
    model = _run(config, Recorder()).model  # trained: an untrained head gives every image the same logits
    fp32 = _ctx(config)
    bf16 = dataclasses.replace(fp32, autocast_dtype=torch.bfloat16)

    logits = predict(model, DATA.val, bf16)

    tf = build_eval_transform(SIZE, fp32.mean, fp32.std)
    inputs = torch.stack([tf(torch.from_numpy(image)) for image in DATA.val.images])
    with torch.no_grad():
        plain = model(inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(inputs).float()
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, plain, rtol=0, atol=1e-6)
    assert torch.equal(logits, predict(model, DATA.val, fp32))
    assert not torch.allclose(autocast, plain, rtol=0, atol=1e-4)  # bf16 would have shown
