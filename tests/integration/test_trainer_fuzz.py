"""Generated TrainingSpecs and StudySpecs never crash or wedge a live trainer.

Hypothesis builds specs from the descriptors (tests/fuzz_specs.py): fully hostile messages, and a valid base with a
few fields changed, so most reach the cross-field checks and some pass them. They go to a real trainer process
(real S3, SQLite job store) as CreateJob / CreateStudy with validate_only, and every tenth also for real: the job or
study is created, read back and cancelled at once (its bucket holds no dataset, so a worker that starts before the
cancel ends in seconds). Every call must end within its deadline with OK, or INVALID_ARGUMENT carrying field
violations on the request's fields; nothing else. Afterwards the trainer still serves, still validates a good spec,
is still alive, and its log holds no traceback.

The default run sends FUZZ_EXAMPLES of each; the slow suite (`make test-slow`) SLOW_EXAMPLES.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.fuzz_specs import HOSTILE_STRINGS, study_specs, training_specs, valid_study_spec, valid_training_spec
from tests.integration.trainer_helpers import Trainer, start_trainer
from visiontune.client import is_serving
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.status import field_violations
from visiontune.store import ArtifactStore
from visiontune.v1 import job_pb2, study_pb2, training_service_pb2, training_spec_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

FUZZ_EXAMPLES = 500
SLOW_EXAMPLES = 10_000
CREATE_EVERY = 10  # every tenth example is also sent with validate_only=False
# The slow suite creates fewer for real: each may start a worker (a torch import) before its cancel lands, and
# 1 000 of them would cost more CPU than the 10 000 validations together.
SLOW_CREATE_EVERY = 50
CALL_TIMEOUT_S = 30.0
SERVICE = "visiontune.v1.TrainingService"


@dataclass
class Tally:
    """What one fuzz run sent and what came back, by status code."""

    kind: str
    examples: int = 0
    created: int = 0
    codes: Counter[str] = field(default_factory=Counter)

    def line(self, seconds: float) -> str:
        by_code = ", ".join(f"{code}={n}" for code, n in sorted(self.codes.items()))
        internal = self.codes.get("INTERNAL", 0)
        return (
            f"fuzz: {self.examples} {self.kind} ({self.created} created for real), {internal} INTERNAL, "
            f"{by_code}, in {seconds:.1f} s"
        )


@pytest.fixture(scope="module")
def fuzz_trainer(s3_server: S3ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainer]:
    """A trainer on an empty bucket of its own: created jobs find no dataset, so none trains."""
    store = ArtifactStore.connect(s3_server.settings("spec-fuzz-" + secrets.token_hex(4)))
    store.ensure_bucket()
    root = tmp_path_factory.mktemp("spec-fuzz")
    (root / "state").mkdir()
    running = start_trainer(store, s3_server, root / "state")
    try:
        yield running
    finally:
        running.stop()


def _report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """The summary on the terminal whether output is captured or not (-s)."""
    with capsys.disabled():
        print(f"\n{line}")


def _call(tally: Tally, prefixes: tuple[str, ...], rpc: Callable[[], object]) -> object | None:
    """Make one call; count its code; fail on anything but OK or INVALID_ARGUMENT with violations on `prefixes`."""
    error: grpc.RpcError | None = None
    try:
        answer = rpc()
    except grpc.RpcError as err:
        error = err
    if error is None:
        tally.codes["OK"] += 1
        return answer
    code = error.code()
    tally.codes[code.name] += 1
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, error.details())
    fields = [v.field for v in field_violations(error)]
    assert fields, f"INVALID_ARGUMENT without field violations: {error.details()}"
    assert all(f.startswith(prefixes) for f in fields), fields
    return None


# Envelope fields around the spec: mostly what a client sends, sometimes hostile.
_display_names = st.one_of(st.just(""), st.just("fuzz"), st.sampled_from(HOSTILE_STRINGS), st.text(max_size=20))
_labels = st.dictionaries(st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=10), st.text(max_size=10), max_size=3)
_ids = st.one_of(st.just(""), st.just(""), st.sampled_from(HOSTILE_STRINGS), st.text(max_size=70))


def _fuzz_jobs(trainer: Trainer, tally: Tally, examples: int, create_every: int) -> None:
    stub = trainer.stub

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(spec=training_specs(), display_name=_display_names, labels=_labels, job_id=_ids)
    def send(spec: training_spec_pb2.TrainingSpec, display_name: str, labels: dict[str, str], job_id: str) -> None:
        tally.examples += 1
        job = job_pb2.Job(spec=spec, display_name=display_name, labels=labels)
        request = training_service_pb2.CreateJobRequest(job=job, job_id=job_id, validate_only=True)
        _call(tally, ("job.", "job_id"), lambda: stub.CreateJob(request, timeout=CALL_TIMEOUT_S))
        if tally.examples % create_every:
            return
        # For real, under an ID of the test's own (a reused one would answer ALREADY_EXISTS, rightly).
        real = training_service_pb2.CreateJobRequest(job=job, job_id="fuzz-" + secrets.token_hex(6))
        created = _call(tally, ("job.",), lambda: stub.CreateJob(real, timeout=CALL_TIMEOUT_S))
        if not isinstance(created, job_pb2.Job):
            return
        tally.created += 1
        stub.CancelJob(training_service_pb2.CancelJobRequest(name=created.name), timeout=CALL_TIMEOUT_S)
        again = stub.GetJob(training_service_pb2.GetJobRequest(name=created.name), timeout=CALL_TIMEOUT_S)
        assert again.spec == created.spec

    send()


def _fuzz_studies(trainer: Trainer, tally: Tally, examples: int, create_every: int) -> None:
    stub = trainer.stub

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(spec=study_specs(), display_name=_display_names, study_id=_ids)
    def send(spec: study_pb2.StudySpec, display_name: str, study_id: str) -> None:
        tally.examples += 1
        study = study_pb2.Study(spec=spec, display_name=display_name)
        request = training_service_pb2.CreateStudyRequest(study=study, study_id=study_id, validate_only=True)
        _call(tally, ("study.", "study_id"), lambda: stub.CreateStudy(request, timeout=CALL_TIMEOUT_S))
        if tally.examples % create_every:
            return
        real = training_service_pb2.CreateStudyRequest(study=study, study_id="fuzz-" + secrets.token_hex(6))
        created = _call(tally, ("study.",), lambda: stub.CreateStudy(real, timeout=CALL_TIMEOUT_S))
        if not isinstance(created, study_pb2.Study):
            return
        tally.created += 1
        cancel = training_service_pb2.CancelStudyRequest(name=created.name)
        refused: grpc.RpcError | None = None
        try:
            stub.CancelStudy(cancel, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            refused = err
        # It may have ended already: its trials find no dataset.
        assert refused is None or refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused
        again = stub.GetStudy(training_service_pb2.GetStudyRequest(name=created.name), timeout=CALL_TIMEOUT_S)
        assert again.spec == created.spec

    send()


def _still_serves(trainer: Trainer) -> None:
    assert trainer.proc.poll() is None, "the trainer died"
    assert is_serving(trainer.target, SERVICE, 5.0)
    job = job_pb2.Job(spec=valid_training_spec())
    request = training_service_pb2.CreateJobRequest(job=job, validate_only=True)
    assert trainer.stub.CreateJob(request, timeout=CALL_TIMEOUT_S).state == job_pb2.JOB_STATE_QUEUED
    study = training_service_pb2.CreateStudyRequest(study=study_pb2.Study(spec=valid_study_spec()), validate_only=True)
    assert trainer.stub.CreateStudy(study, timeout=CALL_TIMEOUT_S).state == study_pb2.STUDY_STATE_RUNNING
    log = next(Path(trainer.data_dir.parent).glob(f"trainer-{trainer.target.rsplit(':', 1)[1]}.log"))
    assert "Traceback" not in log.read_text(errors="replace"), f"the trainer logged a traceback: see {log}"


def _run(capsys: pytest.CaptureFixture[str], trainer: Trainer, kind: str, examples: int) -> None:
    create_every = CREATE_EVERY if examples <= FUZZ_EXAMPLES else SLOW_CREATE_EVERY
    tally = Tally(kind)
    fuzz = _fuzz_jobs if kind == "TrainingSpec" else _fuzz_studies
    started = time.monotonic()
    fuzz(trainer, tally, examples, create_every)
    _report(capsys, tally.line(time.monotonic() - started))
    assert tally.examples >= examples
    assert tally.codes.get("OK", 0) > 0, tally.codes
    assert tally.codes.get("INVALID_ARGUMENT", 0) > 0, tally.codes
    _still_serves(trainer)


def test_generated_training_specs_get_ok_or_invalid_argument(
    capsys: pytest.CaptureFixture[str], fuzz_trainer: Trainer
) -> None:
    _run(capsys, fuzz_trainer, "TrainingSpec", FUZZ_EXAMPLES)


def test_generated_study_specs_get_ok_or_invalid_argument(
    capsys: pytest.CaptureFixture[str], fuzz_trainer: Trainer
) -> None:
    _run(capsys, fuzz_trainer, "StudySpec", FUZZ_EXAMPLES)


@pytest.mark.slow
def test_ten_thousand_training_specs(capsys: pytest.CaptureFixture[str], fuzz_trainer: Trainer) -> None:
    _run(capsys, fuzz_trainer, "TrainingSpec", SLOW_EXAMPLES)


@pytest.mark.slow
def test_ten_thousand_study_specs(capsys: pytest.CaptureFixture[str], fuzz_trainer: Trainer) -> None:
    _run(capsys, fuzz_trainer, "StudySpec", SLOW_EXAMPLES)
