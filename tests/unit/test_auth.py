"""Scoped credentials without a server: the method -> scope table against the services' descriptors, the token
file's parsing and its clear errors, the registry's reload, and which request fields the audit log names. The
interceptors over real gRPC are in test_server_runtime.py."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from visiontune import auth
from visiontune.auth import (
    METHOD_SCOPES,
    MUTATING_METHODS,
    Principal,
    Scope,
    TokenFileError,
    TokenRegistry,
    parse_token_file,
    token_digest,
    token_sha256,
)
from visiontune.v1 import inference_service_pb2, training_service_pb2


def _rpcs() -> set[str]:
    services = [
        training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"],
        inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    ]
    return {f"/{service.full_name}/{method.name}" for service in services for method in service.methods}


def test_every_rpc_of_both_services_has_exactly_one_scope() -> None:
    # A new RPC must be given a scope here: unlisted it is closed to all but admins, which nobody would notice.
    assert set(METHOD_SCOPES) == _rpcs()
    assert set(METHOD_SCOPES) >= MUTATING_METHODS
    for method, scope in METHOD_SCOPES.items():
        verb = method.rsplit("/", 1)[1]
        if verb.startswith(("Get", "List", "Watch")):
            assert scope == Scope.READ, method
        else:
            assert scope != Scope.READ, method
        assert scope != Scope.ADMIN, method


def test_mutating_methods_are_the_creates_cancels_deploys_promote_and_feedback() -> None:
    verbs = {m.rsplit("/", 1)[1] for m in MUTATING_METHODS}
    assert verbs == {
        "CreateJob",
        "CancelJob",
        "CreateStudy",
        "CancelStudy",
        "PromoteTrial",
        "DeployModel",
        "UndeployModel",
        "ReportFeedback",
    }


def test_admin_implies_every_scope() -> None:
    admin = Principal("root", frozenset({Scope.ADMIN}))
    assert all(admin.allows(scope) for scope in Scope)
    reader = Principal("ro", frozenset({Scope.READ}))
    assert reader.allows(Scope.READ)
    assert not reader.allows(Scope.TRAIN)


# ------------------------------------------------------------------------------------------------ token file


def _file(*principals: object) -> str:
    return json.dumps({"principals": list(principals)})


def test_a_token_file_gives_principals_with_sha256_or_plain_tokens() -> None:
    entries = parse_token_file(
        _file(
            {"name": "ci", "scopes": ["train", "read"], "sha256": token_sha256("ci-token")},
            {"name": "kiosk", "scopes": ["classify"], "token": "kiosk-token"},
        )
    )
    assert entries == [
        (Principal("ci", frozenset({Scope.TRAIN, Scope.READ})), token_digest("ci-token")),
        (Principal("kiosk", frozenset({Scope.CLASSIFY})), token_digest("kiosk-token")),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"tokens.json: not valid JSON: .* at line 1 column 2"),
        ("[]", r"tokens.json: must be a JSON object with a 'principals' list"),
        (_file("ci"), r"principals\[0\]: must be an object"),
        (_file({"scopes": ["read"], "token": "t"}), r"principals\[0\]: 'name' must be a non-empty string"),
        (_file({"name": "ci", "scopes": [], "token": "t"}), r"principals\[0\] \(ci\): 'scopes' must be a non-empty"),
        (_file({"name": "ci", "scopes": ["write"], "token": "t"}), r"\(ci\): unknown scope\(s\) write; known: train"),
        (_file({"name": "ci", "scopes": ["read"]}), r"\(ci\): give exactly one of 'sha256' \(preferred\) or 'token'"),
        (
            _file({"name": "ci", "scopes": ["read"], "token": "t", "sha256": token_sha256("t")}),
            r"give exactly one of",
        ),
        (_file({"name": "ci", "scopes": ["read"], "sha256": "abc"}), r"\(ci\): 'sha256' must be 64 hex digits"),
        (_file({"name": "ci", "scopes": ["read"], "token": "t", "role": "x"}), r"\(ci\): unknown key\(s\) role"),
        (
            _file({"name": "ci", "scopes": ["read"], "token": "a"}, {"name": "ci", "scopes": ["read"], "token": "b"}),
            r"principal 'ci' is listed twice",
        ),
        (
            _file({"name": "a", "scopes": ["read"], "token": "t"}, {"name": "b", "scopes": ["train"], "token": "t"}),
            r"principal 'b' has the same token as another one",
        ),
    ],
)
def test_token_file_errors_name_the_file_the_entry_and_the_fault(text: str, message: str) -> None:
    with pytest.raises(TokenFileError, match=message):
        parse_token_file(text, "tokens.json")


def test_a_broken_token_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    with pytest.raises(TokenFileError, match="cannot read the token file"):
        TokenRegistry(token_file=path)
    path.write_text("{")
    with pytest.raises(TokenFileError, match="not valid JSON"):
        TokenRegistry(token_file=path)
    path.write_bytes(b'{"principals": ["\xff"]}')
    with pytest.raises(TokenFileError, match="not UTF-8 text"):
        TokenRegistry(token_file=path)
    with pytest.raises(ValueError, match="needs a token file or a token"):
        TokenRegistry()
    assert TokenRegistry.from_settings(None, None) is None


# -------------------------------------------------------------------------------------------------- registry


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, text: str) -> None:
    # As Kubernetes updates a mounted Secret: a new file swapped in, never a half-written one.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_the_registry_reloads_a_changed_file_and_keeps_the_old_one_when_the_new_is_broken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.json"
    _write(path, _file({"name": "ci", "scopes": ["train"], "token": "old"}))
    clock = FakeClock()
    registry = TokenRegistry(token_file=path, default_token="legacy", clock=clock)
    assert registry.authenticate("old") == Principal("ci", frozenset({Scope.TRAIN}))
    legacy = registry.authenticate("legacy")
    assert legacy == Principal(auth.DEFAULT_PRINCIPAL, frozenset({Scope.ADMIN}))
    assert registry.authenticate("nope") is None

    _write(path, _file({"name": "ci", "scopes": ["train", "read"], "token": "new"}))
    assert registry.authenticate("old") is not None, "not looked at again within the check interval"
    clock.now += auth.RELOAD_CHECK_S
    assert registry.authenticate("old") is None
    assert registry.authenticate("new") == Principal("ci", frozenset({Scope.TRAIN, Scope.READ}))
    assert registry.authenticate("legacy") == legacy, "the --auth-token principal survives every reload"

    with caplog.at_level(logging.ERROR, logger="visiontune.auth"):
        _write(path, "{broken")
        clock.now += auth.RELOAD_CHECK_S
        assert registry.authenticate("new") is not None, "a broken file keeps what was loaded"
        clock.now += auth.RELOAD_CHECK_S
        assert registry.authenticate("new") is not None
        path.unlink()
        for _ in range(2):
            clock.now += auth.RELOAD_CHECK_S
            assert registry.authenticate("new") is not None, "a file gone keeps what was loaded"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, "a broken version is reported once, the missing file once"
    assert "not valid JSON" in errors[0].__dict__["error"]

    _write(path, _file({"name": "ops", "scopes": ["deploy"], "sha256": token_sha256("fixed")}))
    os.utime(path)
    clock.now += auth.RELOAD_CHECK_S
    assert registry.authenticate("fixed") == Principal("ops", frozenset({Scope.DEPLOY}))
    assert [p.name for p in registry.principals] == [auth.DEFAULT_PRINCIPAL, "ops"]


def test_principal_and_caller_name_read_the_bearer_token_of_the_metadata() -> None:
    registry = TokenRegistry(default_token="s3cret")
    assert registry.principal((("authorization", "Bearer s3cret"),)) is not None
    assert registry.principal((("authorization", "bearer  s3cret "),)) is not None
    assert registry.principal((("authorization", "Basic s3cret"),)) is None
    assert registry.principal(None) is None

    class Context:
        def __init__(self, token: str) -> None:
            self._metadata = (("authorization", f"Bearer {token}"),)

        def invocation_metadata(self) -> Any:
            return self._metadata

    context: Any = Context("s3cret")
    assert auth.caller_name(context, registry) == auth.DEFAULT_PRINCIPAL
    assert auth.caller_name(Context("wrong"), registry) == ""  # type: ignore[arg-type]
    assert auth.caller_name(context, None) == "", "authentication off: every caller is anonymous"


def test_the_audit_log_names_resources_from_the_request_but_never_images_or_secrets() -> None:
    classify = inference_service_pb2.ClassifyRequest(model="models/cats", request_id="r1")
    classify.images.add(content=b"\x89PNG...", client_id="img-1")
    assert auth._resources(classify) == {"model": "models/cats", "request_id": "r1"}
    cancel = training_service_pb2.CancelJobRequest(name="jobs/42")
    assert auth._resources(cancel) == {"name": "jobs/42"}
    promote = training_service_pb2.PromoteTrialRequest(study="studies/s", job_id="j")
    assert auth._resources(promote) == {"study": "studies/s", "job_id": "j"}
    assert auth._resources(b"raw bytes of a rejected call") == {}
