"""Feedback behind a load balancer: two real inference replicas (each with its own Triton) on one bucket and one
real PostgreSQL database, as two pods behind one Kubernetes Service.

A report is scored once, by whichever replica receives it, and counted in that replica's metrics only; the same
report on the other replica, or after both restart, is a duplicate. A database the service cannot use stops it at
start with one line naming the host.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from tests.integration.inference_helpers import (
    BLUE,
    GREY,
    RED,
    Inference,
    publish_color_model,
    restart,
    solid_image,
    start_inference,
)
from visiontune.devstack.launch import service_environment
from visiontune.devstack.ports import free_port
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore
from visiontune.v1 import inference_service_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

T = TypeVar("T")


def both(fn: Callable[..., T], *args: tuple[object, ...]) -> tuple[T, T]:
    """`fn(*args[0])` and `fn(*args[1])` at once: two replicas start (and stop) in the time of one."""
    with ThreadPoolExecutor(2) as pool:
        first, second = (pool.submit(fn, *a) for a in args)
        return first.result(), second.result()


def report(service: Inference, request_id: str, index: int, true_label: str | None) -> pb.ReportFeedbackResponse:
    """ReportFeedback: the image's true label, or (None) that it was of an unknown class."""
    request = pb.ReportFeedbackRequest(request_id=request_id, index=index)
    if true_label is None:
        request.unknown = True
    else:
        request.true_label = true_label
    response: pb.ReportFeedbackResponse = service.stub.ReportFeedback(request, timeout=30)
    return response


def scored(service: Inference, model: str) -> dict[str, float]:
    """{outcome: count} of `visiontune_inference_feedback_total` for `model`, scraped from the replica."""
    with urllib.request.urlopen(service.process.metrics_url, timeout=10) as scrape:
        text = scrape.read().decode()
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "visiontune_inference_feedback_total" and sample.labels.get("model") == model
    }


def test_feedback_is_scored_once_on_any_replica_and_after_restarts(
    store: ArtifactStore, s3_server: S3ServerProcess, postgres_url: str, tmp_path: Path
) -> None:
    name = publish_color_model(store, "fleet")
    shared = ("--feedback-database-url", postgres_url)
    a, b = both(
        start_inference, (store, s3_server, tmp_path / "a", *shared), (store, s3_server, tmp_path / "b", *shared)
    )
    try:
        a.deploy(name)
        b.deploy(name)
        rid = a.classify("models/fleet", solid_image(RED), solid_image(GREY), solid_image(BLUE)).request_id

        # Classified on A, reported on B: B scores it and counts it; A counts nothing.
        first = report(b, rid, 0, "red")
        assert (first.outcome, first.duplicate, first.model_version) == (pb.FEEDBACK_OUTCOME_CORRECT, False, name)
        assert scored(b, "fleet") == {"correct": 1.0}
        assert scored(a, "fleet") == {}

        # The same image on A: a duplicate with the first outcome (another truth does not change it), not counted.
        again = report(a, rid, 0, None)
        assert (again.outcome, again.duplicate) == (pb.FEEDBACK_OUTCOME_CORRECT, True)
        assert scored(a, "fleet") == {}
        assert scored(b, "fleet") == {"correct": 1.0}

        # A request id is one request's across the fleet.
        with pytest.raises(grpc.RpcError) as reused:
            b.classify("models/fleet", solid_image(RED), request_id=rid)
        assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS

        a, b = both(restart, (a, store, s3_server), (b, store, s3_server))

        # Fresh processes, fresh counters: the report is still the same one; another image of the request still
        # scores, once.
        after = report(a, rid, 0, "red")
        assert (after.outcome, after.duplicate) == (pb.FEEDBACK_OUTCOME_CORRECT, True)
        grey = report(b, rid, 1, None)
        assert (grey.outcome, grey.duplicate) == (pb.FEEDBACK_OUTCOME_TRUE_REJECTION, False)
        assert report(a, rid, 1, None).duplicate
        assert scored(a, "fleet") == {}
        assert scored(b, "fleet") == {"true_rejection": 1.0}

        with pytest.raises(grpc.RpcError) as unknown:
            report(a, "req-never-classified", 0, None)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown to every replica" in (unknown.value.details() or "")
    finally:
        both(Inference.stop, (a,), (b,))


@pytest.mark.parametrize("problem", ["wrong password", "nobody listening"])
def test_a_feedback_database_it_cannot_use_stops_the_service_with_one_line(
    problem: str, store: ArtifactStore, s3_server: S3ServerProcess, postgres_url: str, tmp_path: Path
) -> None:
    good = sa.make_url(postgres_url)
    if problem == "wrong password":
        url, cause = good.set(password="not-the-password"), "password authentication failed"
    else:
        url, cause = good.set(port=free_port()), "Connection refused"
    command = [
        sys.executable,
        "-m",
        "inference_service",
        "--port",
        str(free_port()),
        "--log-format",
        "text",
        "--feedback-database-url",
        url.render_as_string(hide_password=False),
    ]
    proc = subprocess.run(
        command,
        env=service_environment(s3_server.settings(store.bucket), tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"inference_service: cannot start: cannot use the prediction database at 127.0.0.1:{url.port}/{url.database}: "
    ), lines[0]
    assert cause in lines[0]
    assert lines[0].endswith("(--feedback-database-url)")
    assert "not-the-password" not in proc.stderr
    assert str(good.password) not in proc.stderr
    assert not (tmp_path / "inference" / "triton" / "tritonserver.log").exists()  # Triton was never started
