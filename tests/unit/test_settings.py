"""The S3 settings codec: `S3Settings.to_env` / `from_env`, and the flags that default to it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from trainer_service.jobs.local_workers import worker_environment
from visiontune.devstack.launch import service_environment
from visiontune.settings import (
    DEFAULT_BUCKET,
    DEFAULT_S3_ENDPOINT,
    DEFAULT_S3_REGION,
    S3Settings,
    add_s3_arguments,
    s3_settings_from_args,
)

# Every field differs from its default, so a field the codec dropped would come back as the default.
CUSTOM = S3Settings(
    endpoint="s3.example.com:443", access_key="AK", secret_key="S/K+=", bucket="b-1", secure=True, region="eu-west-3"
)


def test_every_field_is_not_its_default_in_the_fixture() -> None:
    defaults = S3Settings()
    assert all(getattr(CUSTOM, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(S3Settings))


def test_to_env_names_one_variable_per_field() -> None:
    assert CUSTOM.to_env() == {
        "VISIONTUNE_S3_ENDPOINT": "s3.example.com:443",
        "VISIONTUNE_S3_ACCESS_KEY": "AK",
        "VISIONTUNE_S3_SECRET_KEY": "S/K+=",
        "VISIONTUNE_S3_BUCKET": "b-1",
        "VISIONTUNE_S3_SECURE": "true",
        "VISIONTUNE_S3_REGION": "eu-west-3",
    }
    assert S3Settings().to_env()["VISIONTUNE_S3_SECURE"] == "false"


@pytest.mark.parametrize("settings", [CUSTOM, S3Settings(), dataclasses.replace(CUSTOM, secure=False)])
def test_round_trip_keeps_every_field(settings: S3Settings) -> None:
    assert S3Settings.from_env(settings.to_env()) == settings


def test_missing_or_empty_variables_take_the_documented_defaults() -> None:
    assert S3Settings.from_env({}) == S3Settings(
        endpoint=DEFAULT_S3_ENDPOINT,
        access_key="",
        secret_key="",
        bucket=DEFAULT_BUCKET,
        secure=False,
        region=DEFAULT_S3_REGION,
    )
    assert (DEFAULT_S3_ENDPOINT, DEFAULT_BUCKET, DEFAULT_S3_REGION) == ("127.0.0.1:9000", "visiontune", "us-east-1")
    env = CUSTOM.to_env()
    for variable in env:
        field = variable.removeprefix("VISIONTUNE_S3_").lower()
        for missing in ({k: v for k, v in env.items() if k != variable}, {**env, variable: ""}):
            assert S3Settings.from_env(missing) == dataclasses.replace(CUSTOM, **{field: getattr(S3Settings(), field)})


@pytest.mark.parametrize(
    ("word", "secure"),
    [("1", True), ("TRUE", True), ("yes", True), (" on ", True), ("false", False), ("0", False), ("no", False)],
)
def test_secure_reads_the_usual_boolean_words(word: str, secure: bool) -> None:
    assert S3Settings.from_env({"VISIONTUNE_S3_SECURE": word}).secure is secure


def test_from_env_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CUSTOM.to_env().items():
        monkeypatch.setenv(name, value)
    assert S3Settings.from_env() == CUSTOM


def test_flags_default_to_the_environment_and_override_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CUSTOM.to_env().items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_s3_arguments(parser)
    assert s3_settings_from_args(parser.parse_args([])) == CUSTOM
    flagged = parser.parse_args(["--s3-bucket", "other", "--no-s3-secure", "--s3-region", "ap-south-1"])
    assert s3_settings_from_args(flagged) == dataclasses.replace(
        CUSTOM, bucket="other", secure=False, region="ap-south-1"
    )


def test_children_get_the_settings_through_the_codec() -> None:
    worker = worker_environment(CUSTOM, base={"PATH": "/bin", "VISIONTUNE_S3_REGION": "stale"})
    assert S3Settings.from_env(worker) == CUSTOM
    assert worker["PATH"] == "/bin"
    assert worker["PYTHONUNBUFFERED"] == "1"
    service = service_environment(CUSTOM, Path("/data"))
    assert S3Settings.from_env(service) == CUSTOM
    assert service["VISIONTUNE_DATA_DIR"] == "/data"
