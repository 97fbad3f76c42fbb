"""The backbone weights a job's `ModelConfig` asks for, wherever they live (docs/architecture.md §4).

`WeightsSource.IMAGENET` comes from torchvision's cache ($TORCH_HOME, see `engine.models.imagenet_state_dict`);
`WeightsSource.URI` is a torch.save state_dict in S3, downloaded here to a temporary file so that the engine only
ever loads local files (`engine.models.load_state_dict_file`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch import Tensor
from visiontune.store import ArtifactStore, StoreError, sha256_file
from visiontune.uris import parse_location

from trainer_service.engine.models import WeightsUnavailable, imagenet_state_dict, load_state_dict_file
from trainer_service.spec.config import ModelConfig, WeightsSource


def load_base_weights(cfg: ModelConfig, store: ArtifactStore | None) -> dict[str, Tensor] | None:
    """The backbone weights `cfg.weights` asks for, as a state_dict for `build_classifier`; None for NONE.

    Raises WeightsUnavailable (ImageNet file neither cached nor downloadable, S3 object missing or not a
    state_dict), ValueError for a config without the URI it needs.
    """
    if cfg.weights is WeightsSource.NONE:
        return None
    if cfg.weights is WeightsSource.IMAGENET:
        return imagenet_state_dict(cfg.architecture)
    if not cfg.weights_uri:
        raise ValueError("model.weights_uri is required when model.weights is 'uri'")
    if store is None:
        raise ValueError("loading model weights from a URI needs an artifact store")
    return _load_from_store(cfg.weights_uri, store, cfg.weights_sha256)


def _load_from_store(uri: str, store: ArtifactStore, sha256: str | None) -> dict[str, Tensor]:
    try:
        location = parse_location(uri, default_bucket=store.bucket, folder=False)
    except ValueError as err:
        raise WeightsUnavailable(f"model weights {uri!r}: {err}") from err
    if not location.prefix:
        raise WeightsUnavailable(f"model weights {uri!r} name a bucket but no object")
    source = store.for_bucket(location.bucket)
    with tempfile.TemporaryDirectory(prefix="visiontune-weights-") as tmp:
        path = Path(tmp) / "weights.pth"
        try:
            source.download_file(location.prefix, path)
        except StoreError as err:
            raise WeightsUnavailable(f"model weights {location} could not be downloaded: {err}") from err
        if sha256 is not None:
            # Before the file is opened at all: torch.load's weights-only unpickler is the second line, not the first.
            actual = sha256_file(path)
            if actual != sha256:
                raise WeightsUnavailable(
                    f"model weights {location} have sha256 {actual}, but model.weights_sha256 is {sha256}: the "
                    "object is not the file the spec pinned; refusing to load it"
                )
        return load_state_dict_file(path, f"model weights {location}")
