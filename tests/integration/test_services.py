"""Both services as real processes on loopback, against a real S3 server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import json_format
from trainer_service.jobs.store import JobStore
from visiontune.client import is_serving, list_services
from visiontune.devstack.launch import service_environment
from visiontune.devstack.ports import free_port
from visiontune.settings import S3Settings
from visiontune.status import field_violations
from visiontune.v1 import (
    inference_service_pb2,
    inference_service_pb2_grpc,
    job_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
    training_spec_pb2,
)

pytestmark = pytest.mark.integration

TRAINING = "visiontune.v1.TrainingService"
INFERENCE = "visiontune.v1.InferenceService"


@dataclass
class Service:
    proc: subprocess.Popen[str]
    target: str

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def _spawn(module: str, s3: S3Settings, data_dir: Path, port: int, *args: str) -> subprocess.Popen[str]:
    env = service_environment(s3, data_dir)
    if module == "inference_service":  # its metrics endpoint and its Triton's three ports: free ones too
        args = (
            "--metrics-port",
            str(free_port()),
            "--triton-grpc-port",
            str(free_port()),
            "--triton-http-port",
            str(free_port()),
            "--triton-metrics-port",
            str(free_port()),
            *args,
        )
    return subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port), "--log-format", "text", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _start(module: str, service: str, s3: S3Settings, data_dir: Path) -> Service:
    port = free_port()
    proc = _spawn(module, s3, data_dir, port)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not is_serving(target, service=service, timeout=1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"{module} did not start: {err[-2000:]}")
    return Service(proc, target)


@pytest.fixture
def s3(s3_server: object) -> S3Settings:
    return s3_server.settings("services-" + os.urandom(4).hex())  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def trainer(s3: S3Settings, tmp_path: Path) -> Iterator[Service]:
    service = _start("trainer_service", TRAINING, s3, tmp_path)
    yield service
    service.stop()


@pytest.fixture
def inference(s3: S3Settings, tmp_path: Path) -> Iterator[Service]:
    service = _start("inference_service", INFERENCE, s3, tmp_path)
    yield service
    service.stop()


def test_clients_discover_both_services_through_reflection_and_health(trainer: Service, inference: Service) -> None:
    assert TRAINING in list_services(trainer.target, timeout=5)
    assert INFERENCE in list_services(inference.target, timeout=5)
    for target, service in ((trainer.target, TRAINING), (inference.target, INFERENCE)):
        assert is_serving(target, service="", timeout=5)
        assert is_serving(target, service=service, timeout=5)


def test_trainer_serves_jobs_from_its_store_and_keeps_them_across_a_restart(
    trainer: Service, s3: S3Settings, tmp_path: Path
) -> None:
    spec = training_spec_pb2.TrainingSpec(dataset=training_spec_pb2.DatasetSpec(uri="datasets/shapes"))
    with JobStore(tmp_path / "trainer" / "jobs.sqlite3") as jobs:
        jobs.create_job("job-one", json_format.MessageToJson(spec), display_name="first")

    with grpc.insecure_channel(trainer.target) as channel:
        stub = training_service_pb2_grpc.TrainingServiceStub(channel)
        job = stub.GetJob(training_service_pb2.GetJobRequest(name="jobs/job-one"))
        assert job.display_name == "first"
        # The trainer's scheduler polls the same store, so it may already have claimed the row
        # (and, with no such dataset in the bucket, failed it): any of those states is served.
        assert job.state in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_FAILED)
        assert job.spec.dataset.uri == "datasets/shapes"

    assert trainer.stop() == 0  # SIGTERM is a clean, graceful exit
    restarted = _start("trainer_service", TRAINING, s3, tmp_path)
    try:
        with grpc.insecure_channel(restarted.target) as channel:
            stub = training_service_pb2_grpc.TrainingServiceStub(channel)
            listed = stub.ListJobs(training_service_pb2.ListJobsRequest())
            assert [j.name for j in listed.jobs] == ["jobs/job-one"]
    finally:
        restarted.stop()


def test_trainer_errors_are_status_codes_with_field_violations(trainer: Service) -> None:
    with grpc.insecure_channel(trainer.target) as channel:
        stub = training_service_pb2_grpc.TrainingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetJob(training_service_pb2.GetJobRequest(name="jobs/nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        with pytest.raises(grpc.RpcError) as bad:
            stub.ListJobs(training_service_pb2.ListJobsRequest(page_size=-1, study="not a name", page_token="garbage"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in field_violations(bad.value)} == {"page_size", "study"}

        with pytest.raises(grpc.RpcError) as no_spec:
            stub.CreateJob(training_service_pb2.CreateJobRequest(job_id="Not-An-Id"))
        assert no_spec.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in field_violations(no_spec.value)} == {"job_id", "job.spec"}

        with pytest.raises(grpc.RpcError) as no_study_spec:
            stub.CreateStudy(training_service_pb2.CreateStudyRequest())
        assert no_study_spec.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in field_violations(no_study_spec.value)} == {"study.spec"}


def test_inference_answers_with_clear_errors_before_anything_is_deployed(inference: Service) -> None:
    with grpc.insecure_channel(inference.target) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        image = inference_service_pb2.Image(content=b"\x89PNG")
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(inference_service_pb2.ClassifyRequest(model="models/m", images=[image]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "models/m has no deployed version" in (err.value.details() or "")
        assert not stub.ListDeployments(inference_service_pb2.ListDeploymentsRequest()).deployments


@pytest.mark.parametrize("module", ["trainer_service", "inference_service"])
def test_wrong_s3_credentials_refuse_start_with_one_line(module: str, s3: S3Settings, tmp_path: Path) -> None:
    proc = _spawn(module, replace(s3, secret_key="wrong-secret"), tmp_path, free_port())
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert "credentials" in lines[0]
    assert s3.endpoint in lines[0]


def test_unreachable_s3_refuses_start_naming_the_endpoint(tmp_path: Path) -> None:
    dead = S3Settings(endpoint=f"127.0.0.1:{free_port()}", access_key="a", secret_key="b")
    started = time.monotonic()
    proc = _spawn("trainer_service", dead, tmp_path, free_port(), "--s3-wait-seconds", "3")
    _, err = proc.communicate(timeout=90)

    assert proc.returncode == 2
    assert time.monotonic() - started >= 3  # it waited for S3 to come up before giving up
    final = [line for line in err.strip().splitlines() if "S3 not ready, retrying" not in line]
    assert len(final) == 1, err
    assert "cannot start" in final[0]
    assert dead.endpoint in final[0]


def test_a_job_database_url_it_cannot_use_refuses_start_with_one_line(
    s3: S3Settings, postgres_url: str, tmp_path: Path
) -> None:
    good = sa.make_url(postgres_url)
    at = f"{good.host}:{good.port}"
    nobody = free_port()

    def text(url: sa.URL) -> str:
        return url.render_as_string(hide_password=False)

    # The URL, where the line says the database is (never with the password), and the cause it gives.
    cases = {
        "wrong password": (
            text(good.set(password="not-the-password")),
            f"cannot use the job database at {at}/{good.database}: ",
            'wrong password: password authentication failed for user "visiontune"',
        ),
        "unknown database": (
            text(good.set(database="no_such_db")),
            f"cannot use the job database at {at}/no_such_db: ",
            'no such database: database "no_such_db" does not exist',
        ),
        "nobody listening": (
            text(good.set(port=nobody)),
            f"cannot use the job database at {good.host}:{nobody}/{good.database}: ",
            "Connection refused",
        ),
        "unknown host": (
            text(good.set(host="no-such-host.invalid")),
            f"cannot use the job database at no-such-host.invalid:{good.port}/{good.database}: ",
            "failed to resolve host 'no-such-host.invalid'",
        ),
        "malformed": (
            "postgresql://vt:not-the-password@db.example:54x2/jobs",
            "database URL 'postgresql://vt:***@db.example:54x2/jobs': ",
            "its port is not a number",
        ),
        "another scheme": (
            "mysql://vt:not-the-password@db.example/jobs",
            "database URL 'mysql://vt:***@db.example/jobs': ",
            "only sqlite:// and postgresql:// are supported",
        ),
    }
    procs = {}
    for name, (url, _, _) in cases.items():  # side by side: each start costs the imports (seconds on 2 cores)
        data_dir = tmp_path / name.replace(" ", "-")
        procs[name] = _spawn("trainer_service", s3, data_dir, free_port(), "--database-url", url)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        _, where, cause = cases[name]
        assert proc.returncode == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err)  # nothing before it either: the database is opened before S3
        assert "Traceback" not in err
        assert lines[0].startswith(f"trainer_service: cannot start: {where}"), (name, lines[0])
        assert cause in lines[0], (name, lines[0])
        assert lines[0].endswith(" (--database-url)"), (name, lines[0])
        assert "not-the-password" not in err
        assert str(good.password) not in err
