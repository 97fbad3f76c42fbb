"""`python -m trainer_service.jobs.worker --job ID`: runs one training job, started by the executor.

The worker is where S3, the job store and the engine meet: it reads the job's spec, fetches and decodes
the data (`trainer_service.datasets`), loads the base weights (`trainer_service.weights`), resumes from the
job's last checkpoint if there is one, runs the engine, and publishes the model version; what it writes to
the bucket, and under which keys, is `jobs/artifacts.py`. Progress goes to the job's event log as it
happens; the final state and result are written here too.

Jobs of a tuning study (the record has `study_id`) publish no model version: their JobResult carries the
metrics the study runner reads. A trial (`trial_number` too) reports its objective to the study's pruner
after each epoch and ends PRUNED, at once, when the pruner says so (see tuning/trial_reporter.py).

Every few seconds (and before each checkpoint) the worker reads its job's record: a cancel made on any replica
stops it like SIGTERM does, and an attempt number other than its own means the job was taken over by another
replica (this one was taken for dead), so it exits at once without writing anything more. Its final state change
is fenced by its attempt number too.

A checkpoint is serialised on the training thread and uploaded on one of its own (`jobs/checkpoints.py`) while the
next epoch trains: one upload at a time, in order; its error surfaces at the next checkpoint or when training ends,
which waits for the last upload before the job's end is written.

An outage of S3 is waited through (docs/architecture.md §6): the worker's store tells the job's event log when a
wait starts and ends (`events.OutageEvents`), and the job carries on in this process where it was. Past the
outage window the job ends FAILED with the store's one-line message; a CancelJob during a wait ends the wait.

An outage of the job database is waited through too (`visiontune.database`): every write of the job (its events,
its fence checks, its end) holds until the database answers, so training pauses and then carries on; when it is
back, one `database_unavailable` warning says for how long it was away (`events.DatabaseOutageEvents`). Past the
window nothing can be recorded, not even FAILED: the worker logs the database's one line and exits with
EXIT_DATABASE_UNAVAILABLE, and the executor, once the database answers, resumes the job from its last checkpoint
(a retry) or, past `run.max_retries`, ends it FAILED with that line.

Exit codes: 0 done (SUCCEEDED, FAILED or PRUNED recorded), 3 cancelled, 75 the trainer went away (the job
resumes when it restarts), 76 superseded by another attempt, 77 the job database stayed unreachable, 78 stopped by a
SIGTERM that was not a cancel (a node drain, an eviction: the job resumes). Dying any other way leaves the job
RUNNING for the executor to resume. Its last error also goes to VISIONTUNE_TERMINATION_MESSAGE_PATH when set (a
Kubernetes Job's termination message).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
from google.protobuf import json_format
from visiontune.database import DatabaseError
from visiontune.logs import configure_logging
from visiontune.outages import OutageTooLong
from visiontune.settings import (
    DATABASE_URL_ENV,
    TERMINATION_MESSAGE_ENV,
    add_s3_arguments,
    s3_settings_from_args,
)
from visiontune.store import ArtifactStore, StoreError
from visiontune.v1 import job_pb2

from trainer_service.datasets.cache import DecodedSet, materialize
from trainer_service.datasets.listing import (
    DatasetError,
    ImageFolderListing,
    ImageItem,
    dataset_fingerprint,
    list_image_folder,
)
from trainer_service.datasets.splits import label_warnings, stratified_split
from trainer_service.engine.batches import Split
from trainer_service.engine.context import RunContext, run_context
from trainer_service.engine.epoch import Cancelled
from trainer_service.engine.hardware import Hardware, device_warnings, out_of_memory_message, probe
from trainer_service.engine.loop import CLASSIFIER, FINE_TUNING, EpochRecord
from trainer_service.engine.models import WeightsUnavailable
from trainer_service.engine.parallel import ClassifierFactory, train_on_devices
from trainer_service.engine.recipe import PreparedData, TrainingResult
from trainer_service.jobs import artifacts, events, results
from trainer_service.jobs.checkpoints import CheckpointUploader, upload_checkpoint
from trainer_service.jobs.runtime import (
    EXIT_CANCELLED,
    EXIT_DATABASE_UNAVAILABLE,
    EXIT_INTERRUPTED,
    EXIT_PARENT_GONE,
    EXIT_SUPERSEDED,
)
from trainer_service.jobs.store import (
    ACTIVE_JOB_STATES,
    Conflict,
    JobState,
    JobStore,
    database_url_for,
    default_database_path,
)
from trainer_service.policy import DatasetLimits
from trainer_service.spec.config import TrainingConfig
from trainer_service.spec.convert import load_stored_spec
from trainer_service.weights import load_base_weights

if TYPE_CHECKING:
    from trainer_service.tuning.trial_reporter import TrialReporter

log = logging.getLogger("trainer_service.jobs.worker")

# How often the worker reads its job's record between batches (cancels from other replicas, takeovers).
FENCE_CHECK_INTERVAL_S = 2.0


class _Pruned(Exception):
    """The study's pruner stopped this trial after the epoch that ended at `step`."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"pruned after epoch {step}")
        self.step = step
        self.value = value


@dataclass
class LoadedData:
    prepared: PreparedData
    summary: job_pb2.DatasetSummary
    keys: dict[str, list[str]]  # split -> object keys, row-aligned with the split's images
    handles: list[DecodedSet]


class JobWorker:
    """One attempt at one job. Implements the engine's Callbacks."""

    def __init__(
        self, jobs: JobStore, store: ArtifactStore, job_id: str, data_dir: Path, limits: DatasetLimits | None = None
    ) -> None:
        self.jobs = jobs
        self.limits = limits or DatasetLimits()
        # Set by CancelJob's SIGTERM: it also ends a wait for S3, which would otherwise hold the cancel for minutes.
        self._stop = threading.Event()
        self.store = store.with_outage(listener=events.OutageEvents(jobs, job_id), stop=self._stop)
        self.job_id = job_id
        self.data_dir = data_dir
        self.record = jobs.get_job(job_id)
        stored = load_stored_spec(self.record.spec_json, default_bucket=store.bucket)
        self.spec = stored.spec
        self.config: TrainingConfig = stored.config
        self._stop_requested = False
        self._parent = os.getppid()
        self._fence_checked_at = time.monotonic()
        self._stage_started_at = 0.0
        # Trials only: the reporter, and how many epochs stage 1 ran in the first repeat (the pruner's step
        # counts epochs across both stages; only the first repeat reports, so steps never repeat).
        self._reporter: TrialReporter | None = None
        self._classifier_epochs = 0
        self._dataset: job_pb2.DatasetSummary | None = None
        self._labels: list[str] = []
        # Where this attempt trains (set once the device is chosen) and the stage it is in, for the result and
        # for an out-of-memory error that says what to change.
        self._hardware = Hardware()
        self._ctx: RunContext | None = None
        self._device: job_pb2.ComputeDevice | None = None
        self._stage: str | None = None
        # Put, committed and the replaced one deleted on a thread of their own while the next epoch trains.
        self._checkpoints = CheckpointUploader(
            functools.partial(upload_checkpoint, self.store, jobs, job_id, self.record.attempt)
        )

    # -- Callbacks

    def should_stop(self) -> bool:
        if os.getppid() != self._parent:
            log.warning("the trainer that started this worker is gone; stopping", extra={"job": self.job_id})
            os._exit(EXIT_PARENT_GONE)
        if time.monotonic() - self._fence_checked_at >= FENCE_CHECK_INTERVAL_S:
            self._check_fence()
        return self._stop_requested

    def _superseded(self, now: int) -> NoReturn:
        log.warning(
            "the job was taken over by another attempt; stopping without writing",
            extra={"job": self.job_id, "attempt": self.record.attempt, "now": now},
        )
        os._exit(EXIT_SUPERSEDED)

    def _check_fence(self) -> None:
        """Read the job's record: stop if it is being cancelled, exit if another attempt has taken it over."""
        self._fence_checked_at = time.monotonic()
        current = self.jobs.get_job(self.job_id)
        if current.attempt != self.record.attempt or current.state not in ACTIVE_JOB_STATES:
            self._superseded(current.attempt)
        if current.state == JobState.CANCELLING:
            self._stop_requested = True

    def stage_started(self, repeat: int, stage: str, epochs: int, cached_features: bool) -> None:
        self._stage_started_at = time.monotonic()
        self._stage = stage
        events.record(
            self.jobs,
            self.job_id,
            "stage_started",
            job_pb2.StageStarted(stage=results.STAGES[stage], repeat=repeat + 1, total_epochs=epochs),
        )
        if cached_features:
            log.info("stage 1 trains on cached bottleneck features", extra={"job": self.job_id})

    def epoch_ended(self, repeat: int, record: EpochRecord) -> None:
        events.record(self.jobs, self.job_id, "epoch_ended", results.epoch_metrics(repeat, record))
        if self._reporter is not None and repeat == 0:
            step = record.epoch if record.stage == CLASSIFIER else self._classifier_epochs + record.epoch
            # The last epoch is reported but never pruned: the compute is spent, and a pruned trial's result
            # would not count (Hyperband otherwise stops trials at their final rung).
            last = record.epoch == record.epochs and (record.stage != CLASSIFIER or not self.config.fine_tuning.enabled)
            if self._reporter.report(step, record) and not last:
                # Raised through the engine: training stops now, before this epoch's checkpoint.
                raise _Pruned(step, record.metric(self._reporter.metric))

    def stage_ended(self, repeat: int, stage: str, epochs_run: int, stopped_early: bool) -> None:
        if stage == CLASSIFIER and repeat == 0:
            self._classifier_epochs = epochs_run
        events.record(
            self.jobs,
            self.job_id,
            "stage_ended",
            job_pb2.StageEnded(
                stage=results.STAGES[stage],
                repeat=repeat + 1,
                duration=results.duration(time.monotonic() - self._stage_started_at),
            ),
        )
        if stopped_early:
            events.record_warning(
                self.jobs,
                self.job_id,
                "early_stopping",
                f"{stage} stage stopped early after {epochs_run} epochs (repeat {repeat + 1})",
            )

    def checkpoint(self, state: dict[str, Any]) -> None:
        self._check_fence()  # a superseded attempt must not replace the checkpoint the new one resumes from
        # Serialised here, uploaded and committed in the background (the commit point: the job store names the
        # checkpoint a resume may load, by its digest). The previous upload's error surfaces here.
        try:
            self._checkpoints.submit(state)
        except Conflict:
            self._superseded(self.jobs.get_job(self.job_id).attempt)

    def _flush_checkpoints(self) -> None:
        """Wait for the last checkpoint's upload: committed, or its error raised here as the upload's would have
        been on this thread (another attempt took the job over: exit without writing)."""
        try:
            self._checkpoints.flush()
        except Conflict:
            self._superseded(self.jobs.get_job(self.job_id).attempt)

    def _settle_checkpoints(self) -> None:
        """`_flush_checkpoints` when training already ended in an error (a cancel, a prune, a failure), which is
        the one the job ends with: a failed upload is only logged (the job store then names the checkpoint before
        it, or this one if only deleting the one it replaced failed)."""
        try:
            self._flush_checkpoints()
        except (StoreError, OutageTooLong, DatabaseError) as err:
            log.warning("the last checkpoint's upload failed: %s", err, extra={"job": self.job_id})

    # -- the job

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_requested = True
        self._stop.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        try:
            if self.record.attempt <= 1:
                artifacts.save_spec(self.store, self.job_id, self.record.spec_json)
            outcome = self._run()
        except Cancelled:
            return self._stopped()
        except _Pruned as pruned:
            if self._stop_requested:  # a stop came first: a cancel, or the pod is going away
                return self._stopped()
            self._clean_up()
            metric = self._reporter.metric.value if self._reporter is not None else "objective"
            self._end(
                JobState.PRUNED,
                f"pruned by the study's pruner after {pruned.step} epoch{'s' if pruned.step != 1 else ''} "
                f"({metric} {pruned.value:.4g})",
                result=self._pruned_result(),
            )
            return 0
        except (StoreError, OutageTooLong) as err:
            if self._stop_requested:  # a stop ended a wait for S3
                return self._stopped()
            # The message is one line naming the endpoint, the operation and the cause: the job's error is that.
            log.error("job failed: %s", err, extra={"job": self.job_id})
            write_termination_message(str(err))
            self._end(JobState.FAILED, str(err), error=str(err))
            return 0
        except torch.OutOfMemoryError as err:
            log.exception("job failed: out of GPU memory", extra={"job": self.job_id})
            message = self._out_of_memory()
            write_termination_message(message)
            self._end(JobState.FAILED, message, error=f"{message} (CUDA: {str(err).splitlines()[0]})")
            return 0
        except (DatasetError, WeightsUnavailable, RuntimeError, ValueError) as err:
            log.exception("job failed", extra={"job": self.job_id})
            write_termination_message(f"{type(err).__name__}: {err}")
            self._end(JobState.FAILED, f"{type(err).__name__}: {err}", error=str(err))
            return 0
        self._end(JobState.SUCCEEDED, "succeeded", result=outcome)
        return 0

    def _out_of_memory(self) -> str:
        ctx, stage = self._ctx, self._stage
        field, batch = None, 0
        if stage == CLASSIFIER:
            field, batch = "classifier.batch_size", self.config.classifier.batch_size
        elif stage == FINE_TUNING:
            field, batch = "fine_tuning.stage.batch_size", self.config.fine_tuning.stage.batch_size
        device = ctx.device if ctx is not None else torch.device("cuda")
        return out_of_memory_message(self._hardware, device, ctx.autocast_dtype if ctx else None, field, batch)

    def _stopped(self) -> int:
        """The job was asked to stop. By CancelJob (the job is CANCELLING: seen here, or sent as SIGTERM) it ends
        CANCELLED and its checkpoints go. A SIGTERM without a cancel comes from outside (a node drain, an eviction,
        its Kubernetes Job deleted by someone): nothing is recorded and the checkpoints stay, so the executor resumes
        the job from the last one."""
        if self.jobs.get_job(self.job_id).state == JobState.CANCELLING:
            self._clean_up()
            self._end(JobState.CANCELLED, "cancelled")
            return EXIT_CANCELLED
        log.warning("stopped from outside (SIGTERM) without a cancel; the job resumes", extra={"job": self.job_id})
        write_termination_message("stopped by SIGTERM without a cancel (a node drain, an eviction, its Job deleted)")
        return EXIT_INTERRUPTED

    def _end(
        self, state: JobState, message: str, *, error: str | None = None, result: job_pb2.JobResult | None = None
    ) -> None:
        result_json = json_format.MessageToJson(result, indent=None) if result is not None else None
        if result is not None:
            events.record(self.jobs, self.job_id, "result", result)
        # The last events and the log in the bucket come before the state: a watcher that sees the job
        # ended has then already been able to read every event.
        events.record_state(self.jobs, self.job_id, state, message)
        try:
            artifacts.save_event_log(self.store, self.job_id, self.jobs.events_after(self.job_id, 0, limit=10_000))
        except StoreError as err:
            # The bucket's copy of the log is a convenience; the job store has the log, and the job must end.
            log.warning("the event log was not copied to the bucket: %s", err, extra={"job": self.job_id})
        try:
            self.jobs.update_state(
                self.job_id,
                state,
                error=error,
                result_json=result_json,
                expected=set(ACTIVE_JOB_STATES),
                attempt=self.record.attempt,
            )
        except Conflict:
            log.warning("the job was taken over by another attempt; its end is not ours", extra={"job": self.job_id})
            os._exit(EXIT_SUPERSEDED)

    def _clean_up(self) -> None:
        # The store forgets the checkpoint first: an attempt that still ran after this would start afresh rather
        # than look for a deleted object.
        try:
            self.jobs.commit_checkpoint(self.job_id, self.record.attempt, None)
        except Conflict:
            self._superseded(self.jobs.get_job(self.job_id).attempt)
        try:
            artifacts.delete_checkpoints(self.store, self.job_id)
        except StoreError as err:
            # Checkpoints left behind waste space but harm nothing: no other attempt of this job will start.
            log.warning("the job's checkpoints were not deleted: %s", err, extra={"job": self.job_id})

    def _run(self) -> job_pb2.JobResult:
        config = self.config
        ctx = self._choose_device()
        if self.record.study_id is not None and self.record.trial_number is not None:
            # Before the data: a trial whose study is gone fails at once. Imported here so that ordinary
            # jobs do not load Optuna.
            from trainer_service.tuning.trial_reporter import TrialReporter

            self._reporter = TrialReporter(
                self.jobs, self.record.study_id, self.record.trial_number, default_bucket=self.store.bucket
            )
        self.stage_started_data()
        loaded = self._load_data()
        self._dataset, self._labels = loaded.summary, loaded.prepared.labels
        try:
            base_state = load_base_weights(config.model, self.store)
            make_model = ClassifierFactory(config.model, len(loaded.prepared.labels), base_state)
            resume = artifacts.load_checkpoint(self.store, self.job_id, self.record.checkpoint_sha256)
            if resume is not None:
                events.record_warning(
                    self.jobs,
                    self.job_id,
                    "resumed",
                    f"resuming repeat {resume.repeat + 1}, {resume.stage} stage after epoch "
                    f"{resume.stage_state.completed_epochs}",
                )
                if resume.repeat == 0:
                    # Stage 1 does not run again once it has finished: its epoch count comes from the checkpoint.
                    if resume.stage == FINE_TUNING and resume.classifier_state is not None:
                        self._classifier_epochs = resume.classifier_state.completed_epochs
                    elif resume.stage == CLASSIFIER:
                        self._classifier_epochs = resume.stage_state.completed_epochs
            # run.devices > 1: this process is rank 0 of the job's processes, and the only one that records.
            try:
                result = train_on_devices(config, loaded.prepared, make_model, ctx, self, resume)
            except BaseException:
                # However training ends, the last upload is waited for: nothing of this attempt may reach the
                # bucket or the job store after its end (or its clean-up) is written. Re-raised, never swallowed.
                self._settle_checkpoints()
                raise
            self._flush_checkpoints()  # its error fails the job, as when the upload ran on this thread
            if self.should_stop():
                raise Cancelled()
            if self.record.study_id is not None:
                return self._study_job_result(result, loaded)
            return self._publish(result, loaded)
        finally:
            for handle in loaded.handles:
                handle.close()

    def _choose_device(self) -> RunContext:
        """The run's device and precision on the hardware found here, recorded as the attempt's `device_selected`
        event (with a warning where the choice would otherwise go unnoticed: a GPU torch cannot use, emulated bf16)."""
        self._hardware = probe()
        ctx = run_context(self.config, self._hardware)
        self._ctx = ctx
        self._device = results.compute_device(self._hardware, ctx.device, ctx.autocast_dtype)
        events.record(self.jobs, self.job_id, "device_selected", self._device)
        log.info(
            "device chosen",
            extra={"job": self.job_id, **json_format.MessageToDict(self._device, preserving_proto_field_name=True)},
        )
        for code, message in device_warnings(self._hardware, self.config.run.device, ctx.device, ctx.autocast_dtype):
            events.record_warning(self.jobs, self.job_id, code, message)
        return ctx

    def stage_started_data(self) -> None:
        events.record(self.jobs, self.job_id, "stage_started", job_pb2.StageStarted(stage=job_pb2.STAGE_DATA))

    # -- data

    def _load_data(self) -> LoadedData:
        cfg = self.config.dataset
        size = cfg.image_size
        cache = self.data_dir / "trainer" / "cache"
        listing = list_image_folder(self.store, cfg.uri)
        labels = list(listing.labels)
        handles: list[DecodedSet] = []

        def decode(listing: ImageFolderListing, items: Sequence[ImageItem]) -> DecodedSet:
            decoded = materialize(self.store.for_bucket(listing.bucket), items, size, cache, cfg.cache_max_mb)
            handles.append(decoded)
            if self.should_stop():
                raise Cancelled()
            return decoded

        val_listing = listing
        if cfg.validation_uri:
            train_items = list(listing.items)
            val_listing = list_image_folder(self.store, cfg.validation_uri)
            val_items = self._relabel(val_listing, labels, "validation")
        else:
            train_rows, val_rows = stratified_split(
                [item.label for item in listing.items], cfg.validation_split, self.config.run.seed
            )
            train_items = [listing.items[i] for i in train_rows]
            val_items = [listing.items[i] for i in val_rows]
        test_listing = list_image_folder(self.store, cfg.test_uri) if cfg.test_uri else None
        unknown_listing = list_image_folder(self.store, cfg.unknown_uri, min_labels=1) if cfg.unknown_uri else None
        # Every listing before any download: a job over the platform's limits fails before it costs anything.
        self._check_limits([x for x in (listing, val_listing, test_listing, unknown_listing) if x is not None])
        train_set, val_set = decode(listing, train_items), decode(val_listing, val_items)
        test_set = unknown_set = None
        if test_listing is not None:
            test_set = decode(test_listing, self._relabel(test_listing, labels, "test"))
        if unknown_listing is not None:
            unknown_set = decode(unknown_listing, [item._replace(label=0) for item in unknown_listing.items])

        corrupt = [key for d in handles for key in d.corrupt]
        for key in corrupt[:20]:
            events.record_warning(self.jobs, self.job_id, "corrupt_image", f"skipped undecodable image {key}")
        train_counts = Counter(int(t) for t in train_set.labels)
        val_counts = Counter(int(t) for t in val_set.labels)
        test_counts = Counter(int(t) for t in test_set.labels) if test_set is not None else Counter()
        for message in label_warnings(
            {labels[i]: train_counts.get(i, 0) for i in range(len(labels))},
            {labels[i]: val_counts.get(i, 0) for i in range(len(labels))},
        ):
            events.record_warning(self.jobs, self.job_id, "few_images", message)
        missing = [labels[i] for i in range(len(labels)) if train_counts.get(i, 0) == 0]
        if missing:
            raise DatasetError(f"{cfg.uri}: no decodable training images for labels {missing}")
        summary = job_pb2.DatasetSummary(
            uri=cfg.uri,
            labels=[
                job_pb2.LabelCount(
                    label=labels[i],
                    train_images=train_counts.get(i, 0),
                    validation_images=val_counts.get(i, 0),
                    test_images=test_counts.get(i, 0),
                )
                for i in range(len(labels))
            ],
            total_images=len(listing.items),
            skipped_files=len(corrupt) + len(listing.skipped),
            skipped_examples=(corrupt + list(listing.skipped))[:10],
            fingerprint=dataset_fingerprint(listing),
        )

        def split(decoded: DecodedSet) -> Split:
            return Split(images=decoded.images, targets=np.asarray(decoded.labels, dtype=np.int64))

        prepared = PreparedData(
            labels=labels,
            train=split(train_set),
            val=split(val_set),
            test=split(test_set) if test_set is not None else None,
            unknown=split(unknown_set) if unknown_set is not None else None,
        )
        keys = {"validation": list(val_set.keys)}
        if test_set is not None:
            keys["test"] = list(test_set.keys)
        return LoadedData(prepared=prepared, summary=summary, keys=keys, handles=handles)

    def _check_limits(self, listings: Sequence[ImageFolderListing]) -> None:
        # validation_split's val listing is the training listing itself: count each dataset once.
        unique = {x.uri: x for x in listings}.values()
        problems = [self.limits.bytes_problem(x.uri, sum(item.size for item in x.items)) for x in unique]
        problems.append(self.limits.images_problem(sum(len(x.items) for x in unique)))
        found = [p for p in problems if p is not None]
        if found:
            raise DatasetError("; ".join(found))

    def _relabel(self, listing: ImageFolderListing, labels: list[str], what: str) -> list[ImageItem]:
        """Items of a separate validation/test set, indexed by the training labels; others are skipped."""
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted(set(listing.labels) - set(index))
        if unknown:
            events.record_warning(
                self.jobs,
                self.job_id,
                "unknown_label",
                f"{what} set labels not in the training set are ignored: {unknown}",
            )
        return [
            item._replace(label=index[listing.labels[item.label]])
            for item in listing.items
            if listing.labels[item.label] in index
        ]

    # -- tuning studies

    def _study_job_result(self, result: TrainingResult, loaded: LoadedData) -> job_pb2.JobResult:
        """A study's job (a trial or a repeat of one) publishes no model version and no plots.

        Trials are many and most are thrown away; the configuration the user picks becomes a model
        version through the study's PromoteTrial, which trains it again as an ordinary job. What the study
        needs is here: the metrics (the objective, e.g. `val_accuracy`, as mean/std/values over repeats),
        the history, the per-class report.
        """
        job_result = results.job_result(
            result,
            labels=loaded.prepared.labels,
            score=self.config.open_set.score,
            model_version="",
            dataset=loaded.summary,
            plots=[],
            keys_by_split=loaded.keys,
            device=self._device,
        )
        self._clean_up()
        return job_result

    def _pruned_result(self) -> job_pb2.JobResult:
        """What a pruned trial ran: each epoch's metrics (from the event log; a resumed attempt replays the
        epoch after its last checkpoint, so the last record of an epoch wins) and `epochs_run`.

        No final metrics (no evaluation ran): the value Optuna keeps for a pruned trial is its last
        intermediate value.
        """
        history: dict[tuple[int, int, int], job_pb2.EpochMetrics] = {}
        for event in self.jobs.events_after(self.job_id, 0, limit=10_000):
            if event.kind == "epoch_ended":
                m = events.to_proto(event).epoch_ended
                history[(m.repeat, m.stage, m.epoch)] = m
        ordered = [history[k] for k in sorted(history)]
        epochs = float(len(ordered))
        return job_pb2.JobResult(
            history=ordered,
            metrics={"epochs_run": job_pb2.MetricSummary(mean=epochs, std=0.0, values=[epochs])},
            labels=self._labels,
            dataset=self._dataset,
        )

    # -- publishing

    def _publish(self, result: TrainingResult, loaded: LoadedData) -> job_pb2.JobResult:
        events.record(self.jobs, self.job_id, "stage_started", job_pb2.StageStarted(stage=job_pb2.STAGE_EXPORT))
        job_result = artifacts.publish_model_version(
            self.store,
            job_id=self.job_id,
            created=self.record.create_time,
            config=self.config,
            spec=self.spec,
            result=result,
            labels=loaded.prepared.labels,
            dataset=loaded.summary,
            keys_by_split=loaded.keys,
            device=self._device,
        )
        self._clean_up()
        return job_result


def write_termination_message(text: str) -> None:
    """The worker's last error, where Kubernetes reads a container's last words (`terminationMessagePath`, named
    in TERMINATION_MESSAGE_ENV by the Kubernetes executor; unset for local workers, whose log file says it)."""
    path = os.environ.get(TERMINATION_MESSAGE_ENV)
    if not path:
        return
    try:
        Path(path).write_text(text[:4096] + "\n")  # Kubernetes keeps at most 4 KiB of it
    except OSError as err:
        log.warning("the termination message was not written: %s", err, extra={"path": path})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer_service.jobs.worker", description=__doc__)
    parser.add_argument("--job", required=True, help="the job ID")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV, ""),
        help=f"the job database (default: the SQLite file under --data-dir) [{DATABASE_URL_ENV}]",
    )
    add_s3_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("VISIONTUNE_LOG_LEVEL", "INFO"), "json", service="trainer_worker")
    # Denormal floats make CPU kernels crawl once weights or gradients get tiny; flushing them is harmless.
    torch.set_flush_denormal(True)
    store = ArtifactStore.connect(s3_settings_from_args(args))
    url = args.database_url or database_url_for(default_database_path(args.data_dir))
    outages = events.DatabaseOutageEvents(None, args.job)
    try:
        with JobStore(url, outage_listener=outages) as jobs:
            outages.bind(jobs)
            return JobWorker(jobs, store, args.job, args.data_dir, DatasetLimits.from_env()).run()
    except DatabaseError as err:
        write_termination_message(str(err))
        # Past the outage window (or the database refused us): nothing can be recorded, not even FAILED. One line, no
        # traceback: the executor reads it as the job's news when the database answers again.
        log.error("%s", err, extra={"job": args.job, "then": "the trainer resumes the job when the database is back"})
        return EXIT_DATABASE_UNAVAILABLE


def _main_with_last_words() -> int:
    try:
        return main()
    except Exception as err:
        # Anything unexpected still reaches the job's error in one line (the traceback goes to the log), then the
        # process dies as before: the executor resumes the job or fails it with these words.
        write_termination_message(f"{type(err).__name__}: {err}")
        raise


if __name__ == "__main__":
    sys.exit(_main_with_last_words())
