"""A job's checkpoints, uploaded and committed off the training thread.

The worker writes a checkpoint after every epoch. Putting it in the bucket and committing its digest to the job
store takes as long as the object is large (and as long as an outage of either lasts), and the training thread
would wait through all of it. With `CheckpointUploader` the training thread only serialises the checkpoint; one
background thread puts it, commits it and deletes the one it replaced (`upload_checkpoint`) while the next epoch
trains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from visiontune.store import ArtifactStore

from trainer_service.engine.recipe import checkpoint_bytes
from trainer_service.jobs import artifacts
from trainer_service.jobs.store import JobStore


def upload_checkpoint(store: ArtifactStore, jobs: JobStore, job_id: str, attempt: int, data: bytes) -> str:
    """Put a checkpoint serialised by `checkpoint_bytes`, make it the job's checkpoint if `attempt` is still the
    job's current one, then delete the object it replaced. Returns its digest.

    The commit is the commit point: until then a resume loads the previous checkpoint, so dying anywhere in here
    tears nothing. Raises StoreError or OutageTooLong from the bucket, DatabaseError from the job store, and
    Conflict when another attempt has taken the job over (then nothing is committed or deleted: the checkpoint the
    job store names is the other attempt's to resume from).
    """
    digest = artifacts.put_checkpoint(store, job_id, data)
    previous = jobs.commit_checkpoint(job_id, attempt, digest)
    if previous is not None and previous != digest:
        artifacts.delete_checkpoint(store, job_id, previous)
    return digest


class CheckpointUploader:
    """Checkpoints handed to `upload` (e.g. `upload_checkpoint` bound to a job) on one background thread: in the
    order they were submitted, at most one in flight. `submit` and `flush` are called from one thread, the
    training thread.

    `submit` serialises the checkpoint where it is called: the dict holds the optimizer's state as its live
    tensors (on the GPU too), which the next step changes, so the bytes are the snapshot. Only bytes cross to the
    upload thread. `submit` then waits for the previous upload before it starts this one: uploads cannot overtake
    each other, and at most two checkpoints are held at once (the one uploading and the next).

    An upload's error is raised on the caller's thread, once, by the next `submit` or `flush`: the caller handles
    it as if the upload had run there. A `submit` that raises it drops its own checkpoint (training ends on that
    error). `flush` waits for the upload in flight, so that the last checkpoint is committed (or its error raised)
    before the job's end is written.
    """

    def __init__(self, upload: Callable[[bytes], object]) -> None:
        self._upload = upload
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future[object] | None = None

    def submit(self, state: Mapping[str, Any]) -> None:
        """Serialise `state` now and upload it once the previous upload is done; raises that upload's error."""
        data = checkpoint_bytes(state)
        self.flush()
        self._pending = self._thread.submit(self._upload, data)

    def flush(self) -> None:
        """Wait until no upload is in flight; raises the error of the last one, if it failed (once)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Stop the upload thread once the upload in flight is done (its error, if any, is not raised: `flush`
        first where it matters)."""
        self._thread.shutdown(wait=True)
