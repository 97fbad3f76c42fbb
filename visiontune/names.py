"""Resource names of the v1 API (AIP-122): `jobs/{job}`, `studies/{study}`, `models/{model}/versions/{version}`.

One place parses and formats them, so the servicers, the CLI and the artifact layout agree. The bucket's keys
follow the names (docs/architecture.md §5): a model version's files live under its name plus '/', committed by
`MANIFEST`; the trainer's own keys (`jobs/{job}/...`, `studies/{study}/...`) are built in
`trainer_service/jobs/artifacts.py` from these names.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Final

# The file that commits a model version: readers see only versions that have one (docs/architecture.md §5).
MANIFEST: Final = "manifest.json"

# Lowercase letters, digits and '-', 1-63 characters, starting with a letter (AIP-122 / RFC-1034 style),
# so every ID is also a valid S3 key segment and Kubernetes object name.
_ID = r"[a-z][a-z0-9-]{0,62}"
_ID_RE = re.compile(rf"^{_ID}$")


class InvalidName(ValueError):
    """A resource name or ID that does not match its pattern."""


def check_id(kind: str, value: str) -> str:
    if not _ID_RE.match(value):
        raise InvalidName(
            f"invalid {kind} ID {value!r}: use lowercase letters, digits and '-', "
            "1-63 characters, starting with a letter"
        )
    return value


def new_id(prefix: str) -> str:
    """A fresh ID such as `job-3f9a1c2b7d4e`."""
    return f"{prefix}-{secrets.token_hex(6)}"


def _parse(pattern: str, name: str, kind: str) -> tuple[str, ...]:
    match = re.fullmatch(pattern, name)
    if not match:
        example = pattern.replace(f"({_ID})", "{id}").replace("\\", "")
        raise InvalidName(f"invalid {kind} name {name!r}: expected {example}")
    return match.groups()


def job_name(job_id: str) -> str:
    return f"jobs/{job_id}"


def parse_job_name(name: str) -> str:
    return _parse(rf"jobs/({_ID})", name, "job")[0]


def study_name(study_id: str) -> str:
    return f"studies/{study_id}"


def parse_study_name(name: str) -> str:
    return _parse(rf"studies/({_ID})", name, "study")[0]


def model_name(model: str) -> str:
    return f"models/{model}"


def model_versions_prefix(model: str) -> str:
    """`models/{model}/versions/`: the key prefix of every version of a model, after validating its ID."""
    return f"{model_name(check_id('model', model))}/versions/"


def parse_model_name(name: str) -> str:
    return _parse(rf"models/({_ID})", name, "model")[0]


@dataclass(frozen=True)
class ModelVersionName:
    model: str
    version: str

    def __str__(self) -> str:
        return f"{model_name(self.model)}/versions/{self.version}"

    @property
    def prefix(self) -> str:
        """The version's key prefix in the artifact bucket (docs/architecture.md §5)."""
        return f"{self}/"


def parse_model_version_name(name: str) -> ModelVersionName:
    model, version = _parse(rf"models/({_ID})/versions/({_ID})", name, "model version")
    return ModelVersionName(model, version)


def model_version_prefix(model: str, version: str) -> str:
    """`models/{model}/versions/{version}/` after validating both IDs (InvalidName, a ValueError, otherwise)."""
    return ModelVersionName(check_id("model", model), check_id("version", version)).prefix
