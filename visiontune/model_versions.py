"""Writing one model version: its files under `models/{model}/versions/{version}/`, then `manifest.json` last.

`ArtifactStore.begin_model_version` hands out a `ModelVersionWriter`; committing writes the manifest, which is what
makes the version exist (docs/architecture.md §5), so a crash or kill mid-upload never exposes a torn model.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from visiontune.names import MANIFEST, ModelVersionName, model_version_prefix
from visiontune.store_errors import ModelVersionExists, StoreError

if TYPE_CHECKING:
    from visiontune.store import ArtifactStore, ReadableStream

__all__ = ["ModelVersionWriter"]

log = logging.getLogger(__name__)

_RELPATH_SEGMENT = re.compile(r"^[^/\\]+$")


def _check_relpath(relpath: str) -> str:
    parts = relpath.split("/")
    if (
        not relpath
        or relpath.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or not all(_RELPATH_SEGMENT.match(p) for p in parts)
    ):
        raise ValueError(f"invalid artifact path {relpath!r}: use a relative path such as 'plots/loss.png'")
    if relpath == MANIFEST:
        raise ValueError(f"{MANIFEST!r} is written by commit(), not put directly")
    return relpath


class ModelVersionWriter:
    """Writes one model version's files, then commits it by writing `manifest.json` last.

    Use as a context manager: leaving the block without `commit()` (an exception included) aborts,
    deleting what was written.
    """

    def __init__(self, store: ArtifactStore, model: str, version: str) -> None:
        self.store = store
        self.model = model
        self.version = version
        self.prefix = model_version_prefix(model, version)
        self.written: list[str] = []
        self._state = "open"  # open | committed | aborted

    @property
    def name(self) -> str:
        return str(ModelVersionName(self.model, self.version))

    @property
    def committed(self) -> bool:
        return self._state == "committed"

    def _key(self, relpath: str) -> str:
        if self._state != "open":
            raise RuntimeError(f"{self.name} is {self._state}; no more files can be written")
        return self.prefix + _check_relpath(relpath)

    def put_file(self, relpath: str, path: Path | str) -> str:
        key = self._key(relpath)
        self.written.append(key)  # before the upload: a failed upload may still leave an object to abort
        self.store.put_file(key, path)
        return key

    def put_bytes(self, relpath: str, data: bytes, content_type: str | None = None) -> str:
        key = self._key(relpath)
        self.written.append(key)
        ctype = content_type or mimetypes.guess_type(relpath)[0] or "application/octet-stream"
        self.store.put_bytes(key, data, content_type=ctype)
        return key

    def put_stream(self, relpath: str, stream: ReadableStream, length: int = -1) -> str:
        key = self._key(relpath)
        self.written.append(key)
        self.store.put_stream(key, stream, length)
        return key

    def commit(self, manifest_json: bytes) -> None:
        """Write `manifest.json`, making the version visible. The manifest must be a JSON object."""
        if self._state != "open":
            raise RuntimeError(f"{self.name} is {self._state}; it cannot be committed")
        try:
            parsed = json.loads(manifest_json)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"the manifest of {self.name} is not valid JSON: {err}") from err
        if not isinstance(parsed, dict):
            raise ValueError(f"the manifest of {self.name} must be a JSON object")
        key = self.prefix + MANIFEST
        if self.store.exists(key):
            raise ModelVersionExists(
                f"S3 at {self.store.endpoint}: {self.name} was committed by someone else meanwhile",
                endpoint=self.store.endpoint,
                key=key,
            )
        self.store.put_bytes(key, manifest_json, content_type="application/json")
        self._state = "committed"

    def abort(self) -> int:
        """Delete everything written under the version's prefix; returns how many objects."""
        if self._state == "committed":
            raise RuntimeError(f"{self.name} is committed; delete it explicitly instead of aborting")
        self._state = "aborted"
        return self.store.delete_prefix(self.prefix)

    def __enter__(self) -> ModelVersionWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state != "open":
            return
        if exc is None:
            log.warning("%s left without commit(); aborting it", self.name)
        try:
            self.abort()
        except StoreError as err:
            # The store may be what failed; the version stays invisible without a manifest either way,
            # and the original exception matters more than the failed clean-up.
            log.warning("could not clean up uncommitted %s: %s", self.name, err)
            if exc is None:
                raise
