"""A job's checkpoints uploaded off the training thread, against a real S3 server and a real job store: each is put,
committed as the job's checkpoint and the one it replaced deleted, in order; an upload's failure (another attempt
took the job over, the bucket is gone) reaches the caller and commits nothing."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_service.engine.loop import CLASSIFIER, StageState
from trainer_service.jobs import artifacts
from trainer_service.jobs.checkpoints import CheckpointUploader, upload_checkpoint
from trainer_service.jobs.store import Conflict, JobStore
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore, StoreError

pytestmark = pytest.mark.integration

JOB = "uploads"


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[JobStore]:
    with JobStore(tmp_path / "jobs.sqlite3") as store:
        store.create_job(JOB, "{}")
        yield store


def _state(epoch: int) -> dict[str, Any]:
    return {
        "repeat": 0,
        "stage": CLASSIFIER,
        "stage_state": StageState(stage=CLASSIFIER, completed_epochs=epoch),
        "model": {"head.0.weight": torch.full((4, 2), float(epoch))},
    }


def _uploader(store: ArtifactStore, jobs: JobStore, attempt: int) -> CheckpointUploader:
    return CheckpointUploader(lambda data: upload_checkpoint(store, jobs, JOB, attempt, data))


def _keys(store: ArtifactStore) -> list[str]:
    return [o.key for o in store.list(artifacts.checkpoints_prefix(JOB))]


def test_the_last_checkpoint_is_committed_and_the_ones_it_replaced_are_gone(
    store: ArtifactStore, jobs: JobStore
) -> None:
    attempt = jobs.increment_attempt(JOB).attempt
    uploader = _uploader(store, jobs, attempt)
    try:
        for epoch in (1, 2, 3):
            uploader.submit(_state(epoch))
        uploader.flush()
    finally:
        uploader.close()
    digest = jobs.get_job(JOB).checkpoint_sha256
    assert digest is not None
    assert _keys(store) == [artifacts.checkpoint_key(JOB, digest)]
    resume = artifacts.load_checkpoint(store, JOB, digest)
    assert resume is not None
    assert resume.stage_state.completed_epochs == 3
    assert torch.equal(resume.model["head.0.weight"], torch.full((4, 2), 3.0))


def test_a_superseded_attempt_commits_and_deletes_nothing(store: ArtifactStore, jobs: JobStore) -> None:
    attempt = jobs.increment_attempt(JOB).attempt
    uploader = _uploader(store, jobs, attempt)
    try:
        uploader.submit(_state(1))
        uploader.flush()
        kept = jobs.get_job(JOB).checkpoint_sha256
        assert kept is not None
        newer = jobs.increment_attempt(JOB).attempt  # another replica took the job over
        uploader.submit(_state(2))
        with pytest.raises(Conflict, match=f"on attempt {newer}, not {attempt}"):
            uploader.flush()
    finally:
        uploader.close()
    assert jobs.get_job(JOB).checkpoint_sha256 == kept  # the checkpoint the new attempt resumes from
    assert artifacts.checkpoint_key(JOB, kept) in _keys(store)


def test_an_upload_to_a_missing_bucket_fails_and_commits_nothing(s3_server: S3ServerProcess, jobs: JobStore) -> None:
    gone = ArtifactStore.connect(s3_server.settings("never-created-" + secrets.token_hex(4)))
    uploader = _uploader(gone, jobs, jobs.increment_attempt(JOB).attempt)
    try:
        uploader.submit(_state(1))
        with pytest.raises(StoreError, match="does not exist"):
            uploader.submit(_state(2))
    finally:
        uploader.close()
    assert jobs.get_job(JOB).checkpoint_sha256 is None
