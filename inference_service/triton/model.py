"""The Triton Python-backend model that serves one VisionTune model version.

This file is copied into the model repository as `{model}/1/model.py` and runs inside Triton's Python
backend stub, not in the service: it imports only torch and Triton's `triton_python_backend_utils`.
It loads `model.pt` (TorchScript, written by the trainer) from its version directory and runs each
batch Triton's dynamic batcher assembles. Tensors cross the process boundary through DLPack (zero-copy,
and independent of the stub's numpy ABI).

Input: [N, 3, S, S] as the manifest's input_format says: uint8 pixels for a network that normalises inside
(the trainer's export), or float32 already normalised by the service (versions exported before). Output:
float32 logits [N, C]; the service applies softmax and the open-set decision.

Parameters (config.pbtxt): `torch_threads`, and `precision` (fp32, fp16, bf16: the service's placement.Precision):
below fp32 the module is converted to that dtype and frozen, and float inputs are cast to it, channels_last.
A KIND_GPU instance whose torch sees no CUDA refuses to load rather than run on the CPU unnoticed.
"""

# mypy: ignore-errors
# (triton_python_backend_utils exists only inside Triton's stub process)

import json
import os

import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def instance_device(kind, device_id, model_name):
    """The torch device of a Triton instance of `kind` ("GPU" or "CPU"); raises for a GPU instance without CUDA."""
    if kind != "GPU":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{model_name}: instance kind GPU (device {device_id}), but torch {torch.__version__} in Triton's "
            f"Python backend stub sees no CUDA device (CUDA build: {torch.version.cuda}); refusing to run on the "
            "CPU instead. Give the stub a CUDA-enabled torch and the GPU, or start the service with --device cpu"
        )
    return torch.device("cuda", int(device_id))


def load_module(path, device, dtype):
    """The TorchScript module at `path` on `device`, in eval mode; converted to `dtype` and frozen below fp32."""
    module = torch.jit.load(path, map_location=device).eval()
    if dtype == torch.float32:
        return module
    # Freezing folds the converted weights into the graph as constants (and conv + batch-norm together).
    return torch.jit.freeze(module.to(dtype))


def prepare_batch(batch, device, dtype):
    """A request batch on `device`: float inputs cast to `dtype`; channels_last below fp32 (the layout the
    reduced-precision convolution kernels want). uint8 inputs stay uint8: the network converts them itself."""
    batch = batch.to(device)
    if dtype == torch.float32:
        return batch
    if batch.is_floating_point():
        batch = batch.to(dtype)
    return batch.contiguous(memory_format=torch.channels_last)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        threads = int(params.get("torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        precision = params.get("precision", "fp32")
        if precision not in DTYPES:
            raise ValueError(f"{args['model_name']}: precision {precision!r}, not one of {sorted(DTYPES)}")
        self.device = instance_device(
            args["model_instance_kind"], args.get("model_instance_device_id", "0"), args["model_name"]
        )
        self.dtype = DTYPES[precision]
        if self.device.type == "cpu" and self.dtype != torch.float32:
            raise ValueError(f"{args['model_name']}: precision {precision} on the CPU; CPU instances run fp32")
        weights = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        self.model = load_module(weights, self.device, self.dtype)

    def execute(self, requests):
        batches = [
            dlpack.from_dlpack(pb_utils.get_input_tensor_by_name(request, self.input_name).to_dlpack())
            for request in requests
        ]
        sizes = [batch.shape[0] for batch in batches]
        with torch.inference_mode():
            logits = self.model(prepare_batch(torch.cat(batches), self.device, self.dtype)).float().cpu()
        outputs = [
            pb_utils.Tensor.from_dlpack(self.output_name, dlpack.to_dlpack(part.contiguous()))
            for part in logits.split(sizes)
        ]
        return [pb_utils.InferenceResponse([output]) for output in outputs]
