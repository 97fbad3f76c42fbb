"""What a checkpoint keeps of the model: `trained_state` (what training changes) and `load_trained_state` onto a
model built again the same way, which must give back the trained model exactly."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from trainer_service.engine.models import (
    Classifier,
    build_classifier,
    freeze_base,
    load_trained_state,
    trained_state,
    unfreeze,
    weights_digest,
)
from trainer_service.engine.recipe import checkpoint_bytes
from trainer_service.spec.config import Architecture, ModelConfig, WeightsSource

torch.set_num_threads(2)

CONFIG = ModelConfig(architecture=Architecture.MOBILENET_V3_SMALL, weights=WeightsSource.NONE, classifier_dim=16)
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)  # as recipe.train builds a repeat's model: the base's and the head's initialisation
    return build_classifier(CONFIG, 3, None)


def _images(n: int, seed: int) -> Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _train_a_little(model: Classifier, steps: int = 3) -> None:
    """A few SGD steps in train mode: the trainable weights move, and the BatchNorms that train update their
    running statistics."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(_images(4, step)), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        optimizer.step()
    model.eval()


def _block_keys(model: Classifier, block: torch.nn.Module) -> set[str]:
    (prefix,) = [name for name, m in model.named_modules() if m is block]
    return {f"{prefix}.{k}" for k in block.state_dict()}


def test_a_frozen_base_leaves_the_head_alone() -> None:
    model = _model()
    freeze_base(model)
    state = trained_state(model)
    assert set(state) == {f"head.{k}" for k in model.head.state_dict()}
    assert set(state) == {"head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias"}


def test_unfrozen_blocks_bring_their_parameters_and_batch_norm_statistics() -> None:
    model = _model()
    unfreeze(model, 1)
    state = trained_state(model)
    last = _block_keys(model, model.blocks()[-1])
    assert set(state) == {f"head.{k}" for k in model.head.state_dict()} | last
    assert any(k.endswith(_BUFFERS) for k in last)  # the last block's BatchNorm statistics are in it
    unfreeze(model, None)  # the whole base, stem included: the whole state_dict
    assert list(trained_state(model)) == list(model.state_dict())


def test_the_state_is_a_cpu_copy_that_training_does_not_change() -> None:
    model = _model()
    unfreeze(model, 1)
    state = trained_state(model)
    live = model.state_dict()
    assert all(v.device.type == "cpu" and v.data_ptr() != live[k].data_ptr() for k, v in state.items())
    kept = {k: v.clone() for k, v in state.items()}
    _train_a_little(model)
    assert all(torch.equal(state[k], kept[k]) for k in state)
    assert not all(torch.equal(state[k], model.state_dict()[k]) for k in state)  # the model did move


@pytest.mark.parametrize("last_n_blocks", [0, 2, None])
def test_a_model_built_again_with_the_trained_state_is_the_trained_model(last_n_blocks: int | None) -> None:
    trained = _model(seed=5)
    unfreeze(trained, last_n_blocks)  # 0: stage 1's frozen base
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    _train_a_little(trained)
    state = trained_state(trained)
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])}
    assert changed
    assert changed <= set(state)  # nothing that moved is left out

    again = _model(seed=5)
    assert weights_digest(again) != weights_digest(trained)
    load_trained_state(again, state)
    assert weights_digest(again) == weights_digest(trained)
    for key, value in trained.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    again.eval()
    images = _images(5, seed=9)
    with torch.no_grad():
        assert torch.equal(again(images), trained(images))


def test_a_state_that_does_not_fit_is_refused_before_anything_changes() -> None:
    model = _model()
    freeze_base(model)
    state = trained_state(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"1 unknown keys \(head.9.weight\)"):
        load_trained_state(model, {**{k: v + 1 for k, v in state.items()}, "head.9.weight": torch.zeros(1)})
    wrong = {**{k: v + 1 for k, v in state.items()}, "head.3.bias": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"head.3.bias \(7,\) instead of \(3,\)"):
        load_trained_state(model, wrong)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_the_digest_tells_fresh_models_apart() -> None:
    assert weights_digest(_model(seed=1)) == weights_digest(_model(seed=1))
    assert weights_digest(_model(seed=1)) != weights_digest(_model(seed=2))
    model = _model(seed=1)
    with torch.no_grad():
        model.base.get_parameter("features.0.0.weight")[0, 0, 0, 0] += 1e-6
    assert weights_digest(model) != weights_digest(_model(seed=1))


def test_a_stage_one_checkpoint_of_a_frozen_base_is_a_small_part_of_the_whole_model() -> None:
    model = _model()
    freeze_base(model)
    whole = len(checkpoint_bytes({"model": model.state_dict()}))
    trained = len(checkpoint_bytes({"model": trained_state(model)}))
    assert trained * 20 < whole, (trained, whole)
