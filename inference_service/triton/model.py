"""The Triton Python-backend model that serves one VisionTune model version.

This file is copied into the model repository as `{model}/1/model.py` and runs inside Triton's Python
backend stub, not in the service: it imports only torch and Triton's `triton_python_backend_utils`.
It loads `model.pt` (TorchScript, written by the trainer) from its version directory and runs each
batch Triton's dynamic batcher assembles. Tensors cross the process boundary through DLPack (zero-copy,
and independent of the stub's numpy ABI).

Input: float32 [N, 3, S, S], already decoded and normalised by the service (the manifest's
preprocessing). Output: float32 logits [N, C]; the service applies softmax and the open-set decision.
"""

# mypy: ignore-errors
# (triton_python_backend_utils exists only inside Triton's stub process)

import json
import os

import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        threads = int(params.get("torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        if args["model_instance_kind"] == "GPU" and torch.cuda.is_available():
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")
        weights = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        self.model = torch.jit.load(weights, map_location=self.device).eval()

    def execute(self, requests):
        batches = [
            dlpack.from_dlpack(pb_utils.get_input_tensor_by_name(request, self.input_name).to_dlpack())
            for request in requests
        ]
        sizes = [batch.shape[0] for batch in batches]
        with torch.inference_mode():
            logits = self.model(torch.cat(batches).to(self.device)).float().cpu()
        outputs = [
            pb_utils.Tensor.from_dlpack(self.output_name, dlpack.to_dlpack(part.contiguous()))
            for part in logits.split(sizes)
        ]
        return [pb_utils.InferenceResponse([output]) for output in outputs]
