"""The Python-backend model (`inference_service/triton/model.py`) outside Triton: its GPU refusal and its precision.

model.py imports Triton's `triton_python_backend_utils`, which exists only in Triton's stub; an empty module
stands in for it here (the functions tested never touch it). This machine has no GPU: the reduced-precision path
runs on the CPU in bf16 (the conversion, freezing and channels_last inputs are the same code the GPU runs); the
integration tests run the real file inside a real Triton.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from inference_service.placement import Precision
from inference_service.triton.repository import MODEL_FILE
from trainer_service.engine.models import build_classifier, export_torchscript, normalization
from trainer_service.spec.config import Architecture, ModelConfig

TORCHSCRIPT_WARNINGS = r"ignore:`torch\.jit\..*` is deprecated:FutureWarning"


@pytest.fixture(scope="module")
def model_py() -> types.ModuleType:
    fake = types.ModuleType("triton_python_backend_utils")  # the stand-in for Triton's stub module
    previous = sys.modules.get(fake.__name__)
    sys.modules[fake.__name__] = fake
    try:
        spec = importlib.util.spec_from_file_location("vt_triton_model", MODEL_FILE)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del sys.modules[fake.__name__]
        else:
            sys.modules[fake.__name__] = previous
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ModelConfig(architecture=Architecture.RESNET18)
    torch.manual_seed(0)
    model = build_classifier(config, num_classes=3, base_state=None).eval()
    mean, std = normalization(config)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        export_torchscript(model, 32, path, mean=mean, std=std)
    return path


def test_model_py_precisions_are_the_services(model_py: types.ModuleType) -> None:
    assert set(model_py.DTYPES) == {p.value for p in Precision}


@pytest.mark.filterwarnings(TORCHSCRIPT_WARNINGS)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_gpu_instance_without_cuda_refuses_to_load(model_py: types.ModuleType, exported: Path) -> None:
    args = {
        "model_config": json.dumps({"input": [{"name": "images"}], "output": [{"name": "logits"}]}),
        "model_instance_kind": "GPU",
        "model_instance_device_id": "1",
        "model_name": "m__v1",
        "model_repository": str(exported.parent.parent),
        "model_version": exported.parent.name,
    }
    with pytest.raises(RuntimeError, match=r"m__v1: instance kind GPU \(device 1\).*sees no CUDA device"):
        model_py.TritonPythonModel().initialize(args)
    cpu = dict(args, model_instance_kind="CPU")
    instance = model_py.TritonPythonModel()
    instance.initialize(cpu)  # the same model on a CPU instance loads
    assert instance.device == torch.device("cpu")


@pytest.mark.filterwarnings(TORCHSCRIPT_WARNINGS)
def test_reduced_precision_module_matches_fp32(model_py: types.ModuleType, exported: Path) -> None:
    cpu = torch.device("cpu")
    fp32 = model_py.load_module(str(exported), cpu, torch.float32)
    bf16 = model_py.load_module(str(exported), cpu, torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    prepared = model_py.prepare_batch(pixels, cpu, torch.bfloat16)
    assert prepared.dtype == torch.uint8  # pixels stay pixels: the graph converts them
    assert prepared.is_contiguous(memory_format=torch.channels_last)
    floats = model_py.prepare_batch(torch.rand(2, 3, 8, 8), cpu, torch.float16)
    assert floats.dtype == torch.float16
    assert floats.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = fp32(model_py.prepare_batch(pixels, cpu, torch.float32)).softmax(dim=1)
        got = bf16(prepared).float().softmax(dim=1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)  # bf16 keeps ~3 significant digits
