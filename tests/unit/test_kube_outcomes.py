"""How Job and pod objects (the API's JSON, as the watch delivers it) map to a worker's end and the job's error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from trainer_service.jobs.kubernetes.outcomes import worker_exit

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _ts(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _job(*conditions: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": "vt-j-1"},
        "spec": {"activeDeadlineSeconds": 600},
        "status": {"conditions": list(conditions)},
    }


def _pod(phase: str, *, state: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": "vt-j-1-abcde", "creationTimestamp": _ts(status.pop("age", 10))},
        "spec": {"containers": [{"name": "worker", "image": "visiontune/trainer:1"}]},
        "status": {"phase": phase, **status},
    }
    if state is not None:
        pod["status"]["containerStatuses"] = [{"name": "worker", "image": "visiontune/trainer:1", "state": state}]
    return pod


def _exit(job: dict[str, Any] | None, *pods: dict[str, Any]) -> Any:
    return worker_exit(job, list(pods), NOW, name="vt-j-1", schedule_timeout_s=60, image_pull_timeout_s=30)


def test_a_running_pod_has_not_ended() -> None:
    assert _exit(_job(), _pod("Running", state={"running": {"startedAt": _ts(5)}})) is None


def test_a_completed_job_exits_zero() -> None:
    pod = _pod("Succeeded", state={"terminated": {"exitCode": 0, "reason": "Completed"}})
    ended = _exit(_job({"type": "Complete", "status": "True"}), pod)
    assert (ended.exit_code, ended.cause) == (0, "exit code 0")


def test_an_exit_code_and_the_termination_message_are_the_last_words() -> None:
    message = '{"msg": "job failed", "exc": "Traceback (most recent call last):\\n  File x\\nValueError: bad"}'
    pod = _pod("Failed", state={"terminated": {"exitCode": 1, "reason": "Error", "message": message}})
    ended = _exit(_job(), pod)
    assert (ended.exit_code, ended.cause, ended.last_words, ended.retryable) == (
        1,
        "exit code 1",
        "job failed: ValueError: bad",
        True,
    )


def test_a_signal_is_named() -> None:
    ended = _exit(_job(), _pod("Failed", state={"terminated": {"exitCode": 137, "reason": "Error"}}))
    assert ended.exit_code is None
    assert ended.cause == "signal SIGKILL (exit code 137)"
    assert ended.retryable


def test_oom_killed_and_evicted_are_retryable_with_their_cause() -> None:
    oom = _exit(_job(), _pod("Failed", state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}}))
    assert oom.cause.startswith("OOMKilled")
    assert oom.retryable
    evicted = _exit(_job(), _pod("Failed", reason="Evicted", message="The node was low on resource: memory."))
    assert evicted.cause == "evicted by its node: The node was low on resource: memory."
    assert evicted.retryable


def test_unschedulable_fails_only_past_the_timeout() -> None:
    cond = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
    }
    assert _exit(_job(), _pod("Pending", conditions=[{**cond, "lastTransitionTime": _ts(20)}], age=20)) is None
    ended = _exit(_job(), _pod("Pending", conditions=[{**cond, "lastTransitionTime": _ts(90)}], age=90))
    assert not ended.retryable
    assert ended.cause == "no node could run it for 90 s: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."


@pytest.mark.parametrize(
    ("reason", "started_ago", "fails"),
    [("ErrImagePull", 5, False), ("ImagePullBackOff", 45, True), ("InvalidImageName", 1, True)],
)
def test_an_image_that_cannot_be_pulled(reason: str, started_ago: float, fails: bool) -> None:
    waiting = {"waiting": {"reason": reason, "message": 'pull "visiontune/trainer:1": not found'}}
    ended = _exit(_job(), _pod("Pending", state=waiting, startTime=_ts(started_ago)))
    if not fails:
        assert ended is None
        return
    assert not ended.retryable
    assert ended.cause.startswith(
        f"its image visiontune/trainer:1 could not be pulled for {started_ago:.0f} s ({reason}"
    )


def test_a_deadline_fails_the_job_whatever_the_pod_says() -> None:
    failed = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer"}
    ended = _exit(_job(failed), _pod("Failed", state={"terminated": {"exitCode": 78}}))
    assert not ended.retryable
    assert ended.cause.startswith("it ran past its deadline (activeDeadlineSeconds 600)")


def test_a_job_gone_without_pods() -> None:
    ended = _exit(None)
    assert (ended.exit_code, ended.cause, ended.retryable) == (None, "its Kubernetes Job vt-j-1 was deleted", True)


def test_a_job_that_makes_no_pod_fails_past_the_schedule_timeout() -> None:
    job = _job()
    job["metadata"]["creationTimestamp"] = _ts(30)
    assert _exit(job) is None
    job["metadata"]["creationTimestamp"] = _ts(61)
    ended = _exit(job)
    assert not ended.retryable
    assert ended.cause.startswith("its Kubernetes Job vt-j-1 made no pod for 61 s")


def test_a_worker_stopped_from_outside_is_retried_with_that_cause() -> None:
    message = "stopped by SIGTERM without a cancel (a node drain, an eviction, its Job deleted)"
    ended = _exit(_job(), _pod("Failed", state={"terminated": {"exitCode": 78, "reason": "Error", "message": message}}))
    assert (ended.exit_code, ended.retryable) == (None, True)
    assert ended.cause == "stopped from outside (SIGTERM without a cancel: a drain or an eviction)"
    assert ended.last_words == message
