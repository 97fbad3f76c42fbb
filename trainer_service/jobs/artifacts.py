"""What the trainer writes to the artifact bucket, and every key it writes it under (docs/architecture.md §5).

    jobs/{job}/spec.json                        the spec as submitted (written by the job's first attempt)
    jobs/{job}/events.jsonl                     the job's whole event log, written when the job ends
    jobs/{job}/checkpoints/{sha256}.pt          the last checkpoint, named by its digest (which the job store holds)
    models/{model}/versions/{version}/          model.pt and plots/*.png, then manifest.json, which commits them
    studies/{study}/plots/{name}.png            a tuning study's plots
    lr-finder/{model}-{token}/loss_vs_lr.png    an LR range test's plot

The keys are built only here; the model-version layout comes from `visiontune.names`, which the store and the
inference service read it through. The worker, the study runner and the LR range test call these functions with
the store they were given.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from google.protobuf import json_format
from visiontune import names
from visiontune.store import ArtifactStore, ObjectNotFound
from visiontune.uris import S3Location
from visiontune.v1 import job_pb2, manifest_pb2, training_spec_pb2

from trainer_service.engine import plots
from trainer_service.engine.loop import CLASSIFIER
from trainer_service.engine.models import export_torchscript, normalization
from trainer_service.engine.recipe import ResumeState, TrainingResult, checkpoint_bytes
from trainer_service.jobs import results
from trainer_service.jobs.store import EventRecord
from trainer_service.spec.config import TrainingConfig

# A model version's files, relative to its prefix (manifest.json, which commits them, is `names.MANIFEST`).
CURVES_PLOT: Final = "plots/curves.png"
LEARNING_RATE_PLOT: Final = "plots/learning_rate.png"
CONFUSION_MATRIX_PLOT: Final = "plots/confusion_matrix.png"
WEIGHT_HISTOGRAMS_PLOT: Final = "plots/weight_histograms.png"


# -- keys -----------------------------------------------------------------------------------------------


def job_prefix(job_id: str) -> str:
    """`jobs/{job}/`: everything of one job that is not its model version."""
    return f"{names.job_name(job_id)}/"


def spec_key(job_id: str) -> str:
    return f"{job_prefix(job_id)}spec.json"


def events_key(job_id: str) -> str:
    return f"{job_prefix(job_id)}events.jsonl"


def checkpoints_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}checkpoints/"


def checkpoint_key(job_id: str, sha256: str) -> str:
    """A checkpoint is named by its digest: a new one never overwrites the one the job store still names."""
    return f"{checkpoints_prefix(job_id)}{sha256}.pt"


def study_plot_key(study_id: str, plot: str) -> str:
    return f"{names.study_name(study_id)}/plots/{plot}.png"


def lr_finder_plot_key(model: str, token: str) -> str:
    """An LR range test's plot: under the spec's output model and a fresh token (the test creates no job)."""
    return f"lr-finder/{model}-{token}/loss_vs_lr.png"


def object_uri(store: ArtifactStore, key: str) -> str:
    """`s3://{bucket}/{key}` of an object in the store's bucket, as results and plots report it."""
    return str(S3Location(store.bucket, key))


# -- a job's files --------------------------------------------------------------------------------------


def save_spec(store: ArtifactStore, job_id: str, spec_json: str) -> None:
    store.put_bytes(spec_key(job_id), spec_json.encode(), content_type="application/json")


def save_event_log(store: ArtifactStore, job_id: str, log: Iterable[EventRecord]) -> None:
    """jobs/{job}/events.jsonl: one JSON object per event (sequence, time, kind, event), beside the spec."""
    lines = [
        json.dumps(
            {"sequence": e.sequence, "time": e.time.isoformat(), "kind": e.kind, "event": json.loads(e.payload_json)}
        )
        for e in log
    ]
    store.put_bytes(events_key(job_id), ("\n".join(lines) + "\n").encode(), content_type="application/x-ndjson")


class CheckpointIntegrityError(RuntimeError):
    """The checkpoint the job store names is missing, or the object's bytes are not the ones the worker wrote:
    someone with write access to the bucket replaced it. Nothing of it was unpickled."""


def save_checkpoint(store: ArtifactStore, job_id: str, state: dict[str, Any]) -> str:
    """Upload a checkpoint; returns its sha256, which the caller commits to the job store (the commit point: until
    then a resume still loads the previous one, so a crash between the two tears nothing)."""
    return put_checkpoint(store, job_id, checkpoint_bytes(state))


def put_checkpoint(store: ArtifactStore, job_id: str, data: bytes) -> str:
    """Upload a checkpoint already serialised by `checkpoint_bytes`; returns its sha256 (see `save_checkpoint`)."""
    digest = hashlib.sha256(data).hexdigest()
    store.put_bytes(checkpoint_key(job_id, digest), data)
    return digest


def load_checkpoint(store: ArtifactStore, job_id: str, sha256: str | None) -> ResumeState | None:
    """The checkpoint the job store names (`sha256`, None: there is none) as the engine resumes from it.

    The bytes are checked against the digest before anything is unpickled, and then loaded weights-only with just
    the checkpoint's own dataclasses allowed: a replaced object fails here (CheckpointIntegrityError) and never
    runs code in the worker, which holds the bucket's and the database's credentials.
    """
    if sha256 is None:
        return None
    key = checkpoint_key(job_id, sha256)
    try:
        raw = store.get_bytes(key)
    except ObjectNotFound:
        raise CheckpointIntegrityError(
            f"the job's checkpoint {object_uri(store, key)} is missing from the bucket; it was deleted behind the "
            "job's back, so the job cannot resume"
        ) from None
    actual = hashlib.sha256(raw).hexdigest()
    if not hmac.compare_digest(actual, sha256):
        raise CheckpointIntegrityError(
            f"the job's checkpoint {object_uri(store, key)} has sha256 {actual}, but the worker wrote {sha256}: the "
            "object was replaced in the bucket; refusing to load it"
        )
    return ResumeState.from_bytes(raw)


def delete_checkpoint(store: ArtifactStore, job_id: str, sha256: str) -> None:
    """Drop a checkpoint a newer one replaced."""
    store.delete(checkpoint_key(job_id, sha256))


def delete_checkpoints(store: ArtifactStore, job_id: str) -> None:
    store.delete_prefix(checkpoints_prefix(job_id))


# -- the model version ----------------------------------------------------------------------------------


def training_plots(result: TrainingResult, config: TrainingConfig, labels: Sequence[str]) -> dict[str, bytes]:
    """The best repeat's plots as PNGs, by their path in the model version."""
    best = result.best
    history_rows: list[dict[str, float | str]] = [
        {
            "epoch": i + 1,
            "stage": r.stage,
            "train_loss": r.train_loss,
            "val_loss": r.val_loss,
            "train_accuracy": r.train_accuracy,
            "val_accuracy": r.val_accuracy,
            "learning_rate": r.learning_rate,
        }
        for i, r in enumerate(best.history)
    ]
    report = best.test if best.test is not None else best.validation
    steps = max(1, len(best.lrs.get(CLASSIFIER, [])) // max(1, config.classifier.epochs))
    return {
        CURVES_PLOT: plots.training_curves_png(history_rows),
        LEARNING_RATE_PLOT: plots.learning_rate_png([lr for stage in best.lrs.values() for lr in stage], steps),
        CONFUSION_MATRIX_PLOT: plots.confusion_matrix_png(report.confusion_matrix, labels),
        WEIGHT_HISTOGRAMS_PLOT: plots.weight_histograms_png(best.histograms),
    }


def publish_model_version(
    store: ArtifactStore,
    *,
    job_id: str,
    created: datetime,
    config: TrainingConfig,
    spec: training_spec_pb2.TrainingSpec,
    result: TrainingResult,
    labels: Sequence[str],
    dataset: job_pb2.DatasetSummary,
    keys_by_split: Mapping[str, Sequence[str]],
    device: job_pb2.ComputeDevice | None = None,
) -> job_pb2.JobResult:
    """Write `models/{output_model}/versions/{job}/`: the TorchScript weights, the plots, and the manifest last.

    Returns the job's JobResult (which the manifest's metrics and open-set threshold come from).
    """
    version = job_id
    model_version = names.ModelVersionName(config.output_model, version)
    pngs = training_plots(result, config, labels)
    with tempfile.TemporaryDirectory(prefix=f"vt-{job_id}-") as tmp:
        weights_path = Path(tmp) / results.MODEL_FILE
        mean, std = normalization(config.model)
        export_torchscript(result.model.cpu(), config.dataset.image_size, weights_path, mean=mean, std=std)
        with store.begin_model_version(config.output_model, version) as writer:
            writer.put_file(results.MODEL_FILE, weights_path)
            plot_uris = []
            for relpath, png in pngs.items():
                writer.put_bytes(relpath, png, content_type="image/png")
                plot_uris.append(object_uri(store, model_version.prefix + relpath))
            job_result = results.job_result(
                result,
                labels=labels,
                score=config.open_set.score,
                model_version=str(model_version),
                dataset=dataset,
                plots=plot_uris,
                keys_by_split=keys_by_split,
                device=device,
            )
            size = config.dataset.image_size
            weights = results.torchscript_weights(weights_path, size=size, num_labels=len(labels))
            weights.input_format = manifest_pb2.INPUT_FORMAT_UINT8_RGB  # export_torchscript normalises inside
            manifest = results.manifest(
                name=str(model_version),
                job=names.job_name(job_id),
                created=created,
                labels=labels,
                architecture=spec.model.architecture,
                preprocessing=results.preprocessing(size, mean, std),
                weights=weights,
                open_set=job_result.open_set,
                metrics=job_result.metrics,
                spec=spec,
                dataset=dataset,
                files=[results.MODEL_FILE, *pngs],
                device=device,
            )
            writer.commit(json_format.MessageToJson(manifest).encode())
    return job_result
