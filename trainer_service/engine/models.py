"""The classifier the trainer fine-tunes: a torchvision backbone plus a small head (docs/architecture.md §4).

`build_classifier` makes a `Classifier` from a `ModelConfig`, always with `weights=None` so torchvision never
downloads anything by itself; it takes the pretrained backbone weights as a state_dict: `imagenet_state_dict` reads
torchvision's own cache ($TORCH_HOME), `load_state_dict_file` a local torch.save file (`trainer_service.weights`
fetches `WeightsSource.URI` files from S3 and dispatches on `ModelConfig.weights`). A missing ImageNet
checkpoint is first seeded from an installed Python package (`visiontune.weights_cache`), so ImageNet MobileNetV2
works on a machine without a network. `export_torchscript` writes the weights in a form inference loads without
this code (docs/architecture.md §5).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import pickle
import tempfile
import urllib.error
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import torch
import torch.hub
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from visiontune.errors import FailedPrecondition
from visiontune.weights_cache import has_hash_prefix, hash_prefix, seed_weights_cache, weights_cache_dir

from trainer_service.spec.config import BLOCK_COUNTS, Activation, Architecture, ModelConfig

log = logging.getLogger(__name__)

_RESNETS = frozenset(
    {
        Architecture.RESNET18,
        Architecture.RESNET34,
        Architecture.RESNET50,
        Architecture.RESNET101,
        Architecture.RESNET152,
    }
)
_ACTIVATIONS: dict[Activation, type[nn.Module]] = {
    Activation.RELU: nn.ReLU,
    Activation.GELU: nn.GELU,
    Activation.SILU: nn.SiLU,
}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# How the legacy (pre-zip) torch.save format starts: its magic number pickled with protocol 2.
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]  # [:-1]: without pickle's STOP
# What torch.load raises on a damaged or truncated file (its unpickler surfaces low-level errors as they are).
_LOAD_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    pickle.UnpicklingError,
    EOFError,
    OSError,
    ValueError,
    IndexError,
    KeyError,
)
_CHUNK = 1024 * 1024
_EXPORT_ATOL = 1e-5


class WeightsUnavailable(FailedPrecondition):
    """Pretrained weights could not be obtained; the one-line message says what is missing and where."""


# -- the model ------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """`head(base(x))`: `base` maps [N, 3, H, W] images to [N, feature_dim] features, `head` maps them to logits.

    Frozen BatchNorm layers stay in eval mode even when the model is put in train mode: a frozen layer's
    running mean and variance are part of the pretrained weights, and letting them drift towards the
    statistics of a small, differently distributed training set changes the features the head is trained on
    (and breaks bottleneck-feature caching). A BatchNorm counts as frozen when none of its own parameters
    requires a gradient, so `unfreeze` of the last N blocks lets exactly those blocks' BatchNorms train.
    """

    def __init__(self, architecture: Architecture, base: nn.Sequential, feature_dim: int, head: nn.Sequential) -> None:
        super().__init__()
        self.architecture = architecture
        self.base = base
        self.head = head
        self.feature_dim = feature_dim

    def forward(self, x: Tensor) -> Tensor:
        result: Tensor = self.head(self.base(x))
        return result

    def blocks(self) -> list[nn.Module]:
        """The base's blocks in order, stem excluded: what "unfreeze the last N blocks" counts."""
        if self.architecture in _RESNETS:
            blocks = [self.base.get_submodule(f"layer{i}") for i in range(1, 5)]
        else:
            features = self.base.get_submodule("features")
            assert isinstance(features, nn.Sequential)
            blocks = list(features)[1:]
        # BLOCK_COUNTS (config.py) is what spec validation checks `last_n_blocks` against.
        assert len(blocks) == BLOCK_COUNTS[self.architecture], (self.architecture, len(blocks))
        return blocks

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        if mode:
            for module in _frozen_batch_norms(self.base):
                module.eval()
        return self


def _frozen_batch_norms(module: nn.Module) -> Iterator[nn.Module]:
    for sub in module.modules():
        if isinstance(sub, _BATCH_NORMS) and not any(p.requires_grad for p in sub.parameters(recurse=False)):
            yield sub


def _make_head(cfg: ModelConfig, feature_dim: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(feature_dim, cfg.classifier_dim),
        _ACTIVATIONS[cfg.activation](),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.classifier_dim, num_classes),
    )


def _split_torchvision(architecture: Architecture, model: nn.Module) -> tuple[nn.Sequential, int, str]:
    """(base, feature_dim, the prefix of the ImageNet classifier's state_dict keys) of a torchvision model."""
    if architecture in _RESNETS:
        fc = model.get_submodule("fc")
        assert isinstance(fc, nn.Linear)
        # Children in torchvision's order and names (conv1, bn1, relu, maxpool, layer1..4, avgpool), so the
        # base's state_dict keys are exactly the ImageNet checkpoint's minus `fc.*`.
        parts = OrderedDict((name, child) for name, child in model.named_children() if name != "fc")
        parts["flatten"] = nn.Flatten(1)
        return nn.Sequential(parts), fc.in_features, "fc."
    classifier = model.get_submodule("classifier")
    first_linear = next(m for m in classifier.modules() if isinstance(m, nn.Linear))
    base = nn.Sequential(
        OrderedDict(
            features=model.get_submodule("features"),
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
        )
    )
    return base, first_linear.in_features, "classifier."


def build_classifier(cfg: ModelConfig, num_classes: int, base_state: Mapping[str, Tensor] | None) -> Classifier:
    """A `Classifier` for `cfg`: the backbone loaded from `base_state` (when given) and a fresh head.

    `base_state` is a state_dict of the whole torchvision model (an ImageNet checkpoint): the keys of its own
    classifier (`fc.*` / `classifier.*`) are dropped, every other key must match the backbone exactly.
    Raises ValueError on a mismatch or a bad size.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if cfg.classifier_dim < 1:
        raise ValueError(f"model.classifier_dim must be at least 1, got {cfg.classifier_dim}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
    # weights=None: the builder never downloads; pretrained weights are loaded below from base_state.
    torchvision_model = torchvision.models.get_model(cfg.architecture.value, weights=None)
    base, feature_dim, classifier_prefix = _split_torchvision(cfg.architecture, torchvision_model)
    if base_state is not None:
        _load_base_state(cfg.architecture, base, base_state, classifier_prefix)
    return Classifier(cfg.architecture, base, feature_dim, _make_head(cfg, feature_dim, num_classes))


def _names(keys: set[str], limit: int = 5) -> str:
    listed = ", ".join(sorted(keys)[:limit])
    more = len(keys) - limit
    return f"{listed} and {more} more" if more > 0 else listed


def _shape_mismatches(given: Mapping[str, Any], expected: Mapping[str, Tensor]) -> set[str]:
    """The keys both have whose value in `given` is not a tensor of the expected shape, each in words."""
    return {
        f"{k} {_shape(given[k])} instead of {tuple(expected[k].shape)}"
        for k in set(given) & set(expected)
        if not isinstance(given[k], Tensor) or given[k].shape != expected[k].shape
    }


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else f"a {type(value).__name__}"


def _load_base_state(
    architecture: Architecture, base: nn.Module, state: Mapping[str, Tensor], classifier_prefix: str
) -> None:
    given = {k: v for k, v in state.items() if not k.startswith(classifier_prefix)}
    expected = base.state_dict()
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    mismatched = _shape_mismatches(given, expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} keys of the wrong shape ({_names(mismatched)})")
    if problems:
        raise ValueError(f"the base weights do not fit {architecture.value}: " + "; ".join(problems))
    base.load_state_dict(given, strict=True)


# -- freezing -------------------------------------------------------------------------------------------------


def freeze_base(model: Classifier) -> None:
    """Stage 1: only the head trains; the base's BatchNorm statistics stay fixed too."""
    model.base.requires_grad_(False)
    model.head.requires_grad_(True)
    model.train(model.training)  # re-apply the mode so frozen BatchNorms switch to eval now


def unfreeze(model: Classifier, last_n_blocks: int | None) -> None:
    """Stage 2: make the whole base (None) or only its last N blocks trainable; the head stays trainable.

    The rest of the base is frozen, so the result depends only on `last_n_blocks`; 0 is the same as
    `freeze_base`. The stem is unfrozen only with None.
    """
    blocks = model.blocks()
    if last_n_blocks is not None and not 0 <= last_n_blocks <= len(blocks):
        raise ValueError(
            f"last_n_blocks must be between 0 and {len(blocks)} for {model.architecture.value}, got {last_n_blocks}"
        )
    if last_n_blocks is None:
        model.base.requires_grad_(True)
    else:
        model.base.requires_grad_(False)
        for block in blocks[len(blocks) - last_n_blocks :]:
            block.requires_grad_(True)
    model.head.requires_grad_(True)
    model.train(model.training)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require a gradient, in module order: what the optimizer gets."""
    return [p for p in model.parameters() if p.requires_grad]


# -- what training changes ------------------------------------------------------------------------------------


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """The part of `model`'s state_dict that training can change, as detached CPU copies: every parameter that
    requires a gradient, and the buffers (BatchNorm running statistics) of each module that owns one.

    The rest is the frozen base, unchanged since the model was built: its parameters get no gradient, and a
    BatchNorm without a trainable parameter of its own stays in eval mode (`Classifier.train`), so its statistics
    stay too. Building the model again from the same base weights and seed restores that part, and
    `load_trained_state` puts this one back on top: a stage-1 checkpoint of a frozen base is the head alone.
    Copies, never views: a caller may keep or serialise them while the model trains on.
    """
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        own = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            dot = f"{prefix}." if prefix else ""
            keys.update(dot + name for name in own)
            keys.update(dot + name for name, _ in module.named_buffers(recurse=False))
    # state_dict's order, and only what it holds (a non-persistent buffer is no part of a model's state).
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in keys}


def load_trained_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Put a `trained_state` back onto `model`, which must be built as the one it came from was (same base
    weights, same seed): the keys `state` lacks are that frozen base and stay as built.

    Raises ValueError, before anything is changed, on a key `model` does not have or a tensor of another shape
    (a state of another architecture or head).
    """
    expected = model.state_dict()
    unknown = set(state) - set(expected)
    mismatched = _shape_mismatches(state, expected)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown keys ({_names(unknown)})")
    if mismatched:
        problems.append(f"{len(mismatched)} keys of the wrong shape ({_names(mismatched)})")
    if problems:
        raise ValueError("the trained state does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def weights_digest(model: nn.Module) -> str:
    """sha256 over `model`'s whole state_dict (names, dtypes, shapes and values): a fresh model's digest says
    whether one built again later is the same, which a resume from a `trained_state` relies on."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(value.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


# -- pretrained weights ---------------------------------------------------------------------------------------


def imagenet_weights(architecture: Architecture) -> WeightsEnum:
    """The torchvision ImageNet checkpoint `WeightsSource.IMAGENET` means for an architecture.

    Always IMAGENET1K_V1 rather than torchvision's DEFAULT (V2 for some architectures): one fixed file per
    architecture, whatever else is cached, and the MobileNetV2 checkpoint that installs offline is V1.
    """
    weights: WeightsEnum = torchvision.models.get_model_weights(architecture.value)["IMAGENET1K_V1"]
    return weights


def _checkpoint_file_name(weights: WeightsEnum) -> str:
    url: str = weights.url
    return url.rsplit("/", 1)[-1]


def _cause(exc: BaseException) -> str:
    """A short one-line cause; torch's messages run over several lines."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return " ".join(f"{type(exc).__name__}: {exc.reason}".split())[:300]
    lines = [line for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return " ".join(f"{type(exc).__name__}: {first}".split())[:300]


def _check_state_dict(obj: object, source: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise WeightsUnavailable(f"{source} is not a state_dict (a mapping of names to tensors)")
    return dict(obj)


def imagenet_state_dict(architecture: Architecture) -> dict[str, Tensor]:
    """The ImageNet backbone weights `WeightsSource.IMAGENET` means, from torchvision's cache ($TORCH_HOME).

    A missing file is seeded from an installed offline package or downloaded by torchvision itself. Raises
    WeightsUnavailable when the file is neither cached nor downloadable, or damaged.
    """
    weights = imagenet_weights(architecture)
    file_name = _checkpoint_file_name(weights)
    cache_dir = weights_cache_dir()
    cached = cache_dir / file_name
    prefix = hash_prefix(file_name)

    def intact() -> bool:
        # torch.hub checks the hash only of a download and trusts a cached file as it is; checking it here
        # names a damaged file as such instead of failing somewhere inside torch.load.
        return cached.exists() and (prefix is None or has_hash_prefix(cached, prefix))

    if not intact():
        seed_weights_cache(cache_dir)  # an installed package may ship it; cheap when none does
    if cached.exists() and not intact():
        raise WeightsUnavailable(
            f"ImageNet weights for {architecture.value} ({weights}): the cached file {cached} is damaged (its "
            f"sha256 does not start with {prefix}); replace it with a good copy of {weights.url}"
        )
    try:
        # torchvision's own path: the cached file when present, else a download (hash-checked) into the
        # cache, so a pre-filled cache, a mirror or a network all work.
        state = weights.get_state_dict(progress=False, check_hash=True, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as err:
        # OSError includes urllib's URLError/HTTPError (no network, no such host); RuntimeError is a failed
        # hash check of a download.
        if cached.exists():
            raise WeightsUnavailable(
                f"ImageNet weights for {architecture.value} ({weights}): the cached file {cached} cannot be loaded "
                f"({_cause(err)}); replace it with a good copy of {weights.url}"
            ) from err
        raise WeightsUnavailable(
            f"ImageNet weights for {architecture.value} ({weights}) are not in torchvision's cache and could not "
            f"be downloaded ({_cause(err)}): put {file_name} from {weights.url} at {cached}"
        ) from err
    return _check_state_dict(state, str(cached))


def load_state_dict_file(path: Path, source: str) -> dict[str, Tensor]:
    """The state_dict in a local torch.save file (loaded weights-only, on the CPU); `source` names it in errors.

    Raises WeightsUnavailable when the file is not a torch.save file, does not load, or holds no state_dict.
    """
    if not _is_torch_file(path):
        raise WeightsUnavailable(f"{source} are not a torch.save file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as err:
        raise WeightsUnavailable(f"{source} are not a loadable state_dict ({_cause(err)})") from err
    return _check_state_dict(state, source)


def _is_torch_file(path: Path) -> bool:
    """Whether `path` starts like a torch.save file: a zip archive (torch >= 1.6) or the legacy pickle format
    (which older torchvision checkpoints such as mobilenet_v2-b0353104.pth still use)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


# -- preprocessing and export ---------------------------------------------------------------------------------


def normalization(cfg: ModelConfig) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per RGB channel of the inputs: the ImageNet statistics every torchvision backbone expects."""
    transform = imagenet_weights(cfg.architecture).transforms()
    mean = tuple(float(v) for v in transform.mean)
    std = tuple(float(v) for v in transform.std)
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])


class Uint8Input(nn.Module):
    """The exported graph: uint8 RGB [N, 3, S, S] -> float, / 255, (x - mean) / std, channels_last -> `classifier`.

    The arithmetic is `visiontune.preprocessing.normalize`'s, so the network sees the same input as when the
    caller normalises. `type_as(mean)`: a module converted to fp16/bf16 for serving normalises in that dtype.
    """

    def __init__(self, classifier: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        scaled = images.type_as(mean).mul(1.0 / 255)
        logits: Tensor = self.classifier(scaled.sub(mean).div(std).contiguous(memory_format=torch.channels_last))
        return logits


def export_torchscript(
    model: Classifier, image_size: int, path: Path, *, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    """Write `model` in eval mode as a TorchScript file (`torch.jit.load`, no trainer code needed) that takes
    uint8 RGB [N, 3, image_size, image_size] and normalises with `mean`/`std` itself (`Uint8Input`); its weights
    are channels_last, the layout convolutions run fastest in on GPUs.

    Traced on a CPU copy, so the training model keeps its mode and device and the file loads anywhere.
    The traced module is checked against the eager one fed the caller-normalised float input on a batch of 2
    (another batch size than the trace's example); a mismatch raises RuntimeError. Written atomically.
    """
    eager = copy.deepcopy(model).cpu().eval()
    wrapped = Uint8Input(copy.deepcopy(eager).to(memory_format=torch.channels_last), mean, std).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (1, 3, image_size, image_size), generator=generator, dtype=torch.uint8)
    batch = torch.randint(0, 256, (2, 3, image_size, image_size), generator=generator, dtype=torch.uint8)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    with torch.no_grad(), warnings.catch_warnings():
        # This torch (2.14) marks TorchScript deprecated in favour of torch.export; it is still the format the
        # inference side loads with a bare `torch.jit.load`, so the per-call FutureWarnings are only noise.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\..*` is deprecated", category=FutureWarning)
        traced = torch.jit.trace(wrapped, example)  # type: ignore[no-untyped-call]
        expected = eager((batch.float() / 255 - mean_t) / std_t)
        got = traced(batch)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=_EXPORT_ATOL, rtol=_EXPORT_ATOL):
        raise RuntimeError(
            f"the traced {model.architecture.value} differs from the eager model on a batch of 2 "
            f"(max difference {(got - expected).abs().max().item():.3g})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\..*` is deprecated", category=FutureWarning)
            torch.jit.save(traced, tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
