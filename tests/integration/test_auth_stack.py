"""The local stack's real trainer and inference processes with mutual TLS and a token file: a client without a
client certificate cannot connect, a classify-only token is refused everything else and audited, and gets past
the auth checks on Classify. No training: every call is refused or fails on a model that is not deployed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from tests.tls_certs import make_mutual_tls
from visiontune.auth import token_sha256
from visiontune.client import make_channel
from visiontune.devstack import stack
from visiontune.v1 import (
    inference_service_pb2,
    inference_service_pb2_grpc,
    study_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
)

pytestmark = pytest.mark.integration

KIOSK_TOKEN = "kiosk-" + "x" * 24
DENIED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def _audit_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in Path(log).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "visiontune.audit":
                lines.append(record)
    return lines


def _wait_for_audit(log: str, method: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in _audit_lines(log) if r["method"] == method]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            pytest.fail(f"no audit line for {method} in {log}")
        time.sleep(0.2)


def test_the_stack_with_mutual_tls_and_scoped_tokens(tmp_path: Path) -> None:
    certs = make_mutual_tls(tmp_path / "tls")
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        json.dumps({"principals": [{"name": "kiosk", "scopes": ["classify"], "sha256": token_sha256(KIOSK_TOKEN)}]})
    )
    data_dir = tmp_path / "state"
    security = stack.StackSecurity.from_dir(certs.directory, tokens)
    try:
        state = stack.up(
            data_dir,
            s3_port=0,
            trainer_port=0,
            inference_port=0,
            metrics_port=0,
            triton_ports=(0, 0, 0),
            postgres_port=0,
            security=security,
            timeout=180,
            echo=lambda _line: None,
        )
        # The stack's own health checks present its client certificate.
        assert all(row.healthy for row in stack.status(data_dir)[1])
        assert stack.load_state(data_dir) is not None
        assert KIOSK_TOKEN not in stack.state_path(data_dir).read_text()
        trainer, inference = state.component(stack.TRAINER), state.component(stack.INFERENCE)
        classify = inference_service_pb2.ClassifyRequest(
            model="models/not-deployed", images=[inference_service_pb2.Image(content=b"not an image")]
        )

        # No client certificate: the TLS handshake fails before any call.
        with make_channel(inference.address, tls_ca=certs.ca, token=KIOSK_TOKEN) as channel:
            with pytest.raises(grpc.RpcError) as err:
                inference_service_pb2_grpc.InferenceServiceStub(channel).Classify(classify, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        def client_channel(address: str) -> grpc.Channel:
            return make_channel(
                address,
                tls_ca=certs.ca,
                token=KIOSK_TOKEN,
                tls_client_cert=certs.client_cert,
                tls_client_key=certs.client_key,
            )

        with (
            client_channel(inference.address) as inference_channel,
            client_channel(trainer.address) as trainer_channel,
        ):
            serving = inference_service_pb2_grpc.InferenceServiceStub(inference_channel)
            training = training_service_pb2_grpc.TrainingServiceStub(trainer_channel)
            refused: dict[str, Callable[[], object]] = {
                "/visiontune.v1.InferenceService/DeployModel": lambda: serving.DeployModel(
                    inference_service_pb2.DeployModelRequest(model_version="models/m/versions/1"), timeout=10
                ),
                "/visiontune.v1.TrainingService/CancelJob": lambda: training.CancelJob(
                    training_service_pb2.CancelJobRequest(name="jobs/j"), timeout=10
                ),
                "/visiontune.v1.TrainingService/CreateStudy": lambda: training.CreateStudy(
                    training_service_pb2.CreateStudyRequest(study=study_pb2.Study()), timeout=10
                ),
            }
            for method, call in refused.items():
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
                assert "'kiosk'" in (err.value.details() or "")

            # Classify passes the auth checks; it fails later, on a model that is not deployed.
            with pytest.raises(grpc.RpcError) as err:
                serving.Classify(classify, timeout=30)
            assert err.value.code() not in DENIED, err.value.details()

        for method in refused:
            log = inference.log if "InferenceService" in method else trainer.log
            line = _wait_for_audit(log, method)
            assert (line["principal"], line["outcome"]) == ("kiosk", "PERMISSION_DENIED")
            assert line["peer"].startswith("ipv4:127.0.0.1:")
            assert KIOSK_TOKEN not in json.dumps(line)
    finally:
        stack.down(data_dir, echo=lambda _line: None)
