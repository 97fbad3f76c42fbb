"""What a Kubernetes Job and its pods say about a worker: a pure function from their objects (the API's JSON, as
dicts) to a `WorkerExit`, or None while the worker runs or may still start.

A pod that ended says how in its container's terminated state: the exit code (128 + N for signal N), the kernel's
OOMKilled, the kubelet's Evicted, and the worker's termination message. A pod that never starts is a failure too, once
it has waited long enough: no node can take it (the scheduler's Unschedulable condition, e.g. a GPU request no node
meets), or its image cannot be pulled, or its container cannot be made (a Secret it names is missing). Those fail the
job at once, since a new attempt would wait the same way.
"""

from __future__ import annotations

import signal
from datetime import datetime
from typing import Any, Final

from trainer_service.jobs.runtime import EXIT_INTERRUPTED, WorkerExit, last_words

Obj = dict[str, Any]

_PULL_FAILURES: Final = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
# Failures a wait cannot mend: reported at once.
_HOPELESS: Final = frozenset({"InvalidImageName", "ErrImageNeverPull"})
_CONFIG_FAILURES: Final = frozenset({"CreateContainerConfigError", "CreateContainerError"})


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time as Kubernetes writes it (`2026-12-01T21:35:10Z`)."""
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def signal_cause(exit_code: int) -> str:
    if exit_code > 128:
        try:
            return f"signal {signal.Signals(exit_code - 128).name} (exit code {exit_code})"
        except ValueError:
            pass
    return f"exit code {exit_code}"


def _condition(obj: Obj, kind: str) -> Obj | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def _terminated(pod: Obj) -> Obj | None:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "terminated" in state:
            return dict(state["terminated"])
    return None


def _waiting(pod: Obj) -> Obj | None:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "waiting" in state:
            return dict(state["waiting"]) | {"image": status.get("image", "")}
    return None


def pod_exit(pod: Obj) -> WorkerExit | None:
    """How an ended pod (phase Succeeded or Failed) ended; None while it has not."""
    status = pod.get("status", {})
    phase = status.get("phase")
    if phase not in ("Succeeded", "Failed"):
        return None
    if status.get("reason") == "Evicted":
        # The kubelet stopped it under node pressure (memory, disk): the job resumes on another node.
        message = " ".join(str(status.get("message", "")).split())
        return WorkerExit(None, f"evicted by its node: {message}" if message else "evicted by its node", message)
    terminated = _terminated(pod)
    if terminated is None:
        reason = status.get("reason") or phase
        return WorkerExit(None, f"its pod {phase.lower()} ({reason})", str(status.get("message", "")))
    code = int(terminated.get("exitCode", 1 if phase == "Failed" else 0))
    words = last_words(str(terminated.get("message") or ""))
    if terminated.get("reason") == "OOMKilled":
        return WorkerExit(None, f"OOMKilled (over its memory limit, exit code {code})", words or "killed for memory")
    if code > 128:
        return WorkerExit(None, signal_cause(code), words)
    if code == EXIT_INTERRUPTED:
        return WorkerExit(None, "stopped from outside (SIGTERM without a cancel: a drain or an eviction)", words)
    return WorkerExit(code, f"exit code {code}", words)


def pending_exit(
    pod: Obj, now: datetime, *, schedule_timeout_s: float, image_pull_timeout_s: float
) -> WorkerExit | None:
    """A pod that has not started and will not: unschedulable, or its image or container cannot be had, for longer
    than the timeouts allow."""
    status = pod.get("status", {})
    if status.get("phase") not in (None, "Pending"):
        return None
    created = parse_time(pod.get("metadata", {}).get("creationTimestamp")) or now
    scheduled = _condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        since = parse_time(scheduled.get("lastTransitionTime")) or created
        waited = (now - min(since, created)).total_seconds()
        if waited >= schedule_timeout_s:
            message = " ".join(str(scheduled.get("message", "")).split())
            return WorkerExit(None, f"no node could run it for {waited:.0f} s: {message}", message, retryable=False)
        return None
    waiting = _waiting(pod)
    if waiting is None:
        return None
    reason = str(waiting.get("reason", ""))
    started = parse_time(status.get("startTime")) or created
    waited = (now - started).total_seconds()
    message = " ".join(str(waiting.get("message", "")).split())
    detail = f"{reason}: {message}" if message else reason
    if reason in _PULL_FAILURES and (reason in _HOPELESS or waited >= image_pull_timeout_s):
        image = waiting.get("image") or _container_image(pod)
        return WorkerExit(
            None, f"its image {image} could not be pulled for {waited:.0f} s ({detail})", detail, retryable=False
        )
    if reason in _CONFIG_FAILURES and waited >= image_pull_timeout_s:
        return WorkerExit(None, f"its container could not be created ({detail})", detail, retryable=False)
    return None


def _container_image(pod: Obj) -> str:
    containers = pod.get("spec", {}).get("containers") or [{}]
    return str(containers[0].get("image", "?"))


def job_failed_exit(job: Obj) -> WorkerExit | None:
    """A Job the Job controller failed while no pod says why (its deadline passed, or its pod is gone)."""
    failed = _condition(job, "Failed")
    if failed is None or failed.get("status") != "True":
        return None
    reason = str(failed.get("reason", ""))
    message = " ".join(str(failed.get("message", "")).split())
    if reason == "DeadlineExceeded":
        deadline = job.get("spec", {}).get("activeDeadlineSeconds")
        return WorkerExit(
            None, f"it ran past its deadline (activeDeadlineSeconds {deadline}): {message}", message, retryable=False
        )
    return WorkerExit(None, f"its Kubernetes Job failed ({reason}: {message})", message)


def job_complete(job: Obj) -> bool:
    complete = _condition(job, "Complete")
    return complete is not None and complete.get("status") == "True"


def worker_exit(
    job: Obj | None,
    pods: list[Obj],
    now: datetime,
    *,
    name: str,
    schedule_timeout_s: float,
    image_pull_timeout_s: float,
) -> WorkerExit | None:
    """How the worker of Job `name` ended (`job` None: the Job is gone); None while it runs or may still start."""
    if job is not None:
        failed = job_failed_exit(job)
        if failed is not None and not failed.retryable:
            return failed  # past its deadline: the Job controller stopped its pod, whatever the pod says of it
    pods = sorted(pods, key=lambda p: str(p.get("metadata", {}).get("creationTimestamp", "")))
    for pod in pods:
        ended = pod_exit(pod)
        if ended is not None:
            return ended
    if job is None:
        return WorkerExit(None, f"its Kubernetes Job {name} was deleted", "")
    if job_complete(job):
        return WorkerExit(0, "exit code 0", "")
    for pod in pods:
        stuck = pending_exit(pod, now, schedule_timeout_s=schedule_timeout_s, image_pull_timeout_s=image_pull_timeout_s)
        if stuck is not None:
            return stuck
    if not pods and not job.get("status", {}).get("active"):
        created = parse_time(job.get("metadata", {}).get("creationTimestamp"))
        waited = (now - created).total_seconds() if created is not None else 0.0
        if waited >= schedule_timeout_s:
            # The Job controller could not make its pod: a missing ServiceAccount, a quota, an admission policy. Why
            # is in the Job's events, which the trainer's Role does not read.
            why = (
                f"its Kubernetes Job {name} made no pod for {waited:.0f} s "
                f"(see `kubectl describe job {name}`: a missing ServiceAccount, a quota or an admission policy)"
            )
            return WorkerExit(None, why, why, retryable=False)
    return job_failed_exit(job)
