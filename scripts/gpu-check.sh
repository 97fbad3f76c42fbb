#!/usr/bin/env bash
# What a GPU box can show (`make gpu-check`): the GPU training path with AMP as a real job on the local stack,
# a multi-GPU job on every visible GPU, the model in Triton on the GPU, classification through it, the training
# and serving benches on the GPU, and the parity tests of JPEG decoding on it; everything it measured goes to
# bench/results/gpu.md.
#
# Needs the project set up (`make setup`) and an NVIDIA GPU that torch can use; it stops at once, saying so,
# without one. GPU_CHECK_ALLOW_CPU=1 runs the same steps on the CPU at toy size (a smoke test of the script itself:
# its report then says CPU and is written to $GPU_CHECK_OUT instead). KEEP_STACK=1 leaves the stack running.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
ALLOW_CPU="${GPU_CHECK_ALLOW_CPU:-0}"
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [ "$GPUS" = 0 ] && [ "$ALLOW_CPU" != 1 ]; then
  echo "gpu-check: torch sees no usable GPU here (nvidia-smi: $(nvidia-smi -L 2>&1 | head -n 1)); nothing to check" >&2
  echo "gpu-check: GPU_CHECK_ALLOW_CPU=1 runs the steps on the CPU as a smoke test" >&2
  exit 2
fi

DATA_DIR="${VISIONTUNE_DATA_DIR:-$PWD/.visiontune-gpu-check}"
export VISIONTUNE_DATA_DIR="$DATA_DIR"
WORK="$DATA_DIR/gpu-check"
RESULTS="$WORK/results"
REPORT="${GPU_CHECK_OUT:-bench/results/gpu.md}"
rm -rf "$WORK"
mkdir -p "$RESULTS"

if [ "$GPUS" = 0 ]; then
  # The smoke run: tiny data, one epoch a stage, the same steps.
  PER_LABEL=12 SIZE=64 EPOCHS=1 DEVICE=AUTO BATCH=16 WORKERS=0
  BENCH_ARGS=(--images 48 --val-images 16 --size 64 --epochs 1 --stage1-epochs 1 --rounds 1 --weights none)
  SERVE_ARGS=(--quick --images 16 --size 64 --weights none)
else
  PER_LABEL=400 SIZE=224 EPOCHS=3 DEVICE=CUDA BATCH=128 WORKERS=8
  BENCH_ARGS=(--device cuda --workers 8)
  SERVE_ARGS=()
fi

stop_stack() { [ "${KEEP_STACK:-0}" = 1 ] || visiontune down; }
trap stop_stack EXIT

echo "== 1. the machine"
"$PYTHON" - "$RESULTS/machine.json" <<'PY'
import json, sys, torch
from google.protobuf import json_format
from trainer_service.engine.hardware import probe
from trainer_service.jobs.results import compute_device
found = probe()
device = torch.device("cuda" if found.gpus else "cpu")
record = json_format.MessageToDict(compute_device(found, device, None), preserving_proto_field_name=True)
record["gpus"] = [g.name for g in found.gpus]
record["torch"] = torch.__version__
json.dump(record, open(sys.argv[1], "w"))
print(json.dumps(record, indent=1))
PY

echo
echo "== 2. the local stack (S3 server, trainer with one job slot per GPU, inference with Triton)"
visiontune up

echo
echo "== 3. a labelled image set: 4 labels x $PER_LABEL images at ${SIZE}px"
visiontune dataset sample "$WORK/data" --labels 4 --per-label "$PER_LABEL" --size "$SIZE"
visiontune dataset push "$WORK/data" datasets/gpu-check

train() {  # $1: job ID; the rest: more --set overrides. Follows the job to its end, then saves it as JSON.
  local job="$1"
  shift
  visiontune train examples/shapes-quick.yaml --job-id "$job" \
    --set dataset.uri=datasets/gpu-check --set "dataset.image_size=$SIZE" --set output_model=gpu-check \
    --set "run.device=$DEVICE" --set "run.data_loader_workers=$WORKERS" \
    --set "classifier.batch_size=$BATCH" --set fine_tuning.enabled=true \
    --set "fine_tuning.stage.epochs=$EPOCHS" --set "fine_tuning.stage.batch_size=$BATCH" "$@"
  visiontune jobs get "$job" --json >"$RESULTS/$job.json"
}

echo
echo "== 4. train with AMP (precision left at its default: bf16 where native, else fp16; fp32 on a CPU), stage 2 fine-tuning on the GPU"
train gpu-amp

echo
if [ "$GPUS" = 1 ]; then
  echo "== 4b. one GPU here: no multi-GPU job (run.devices needs at least 2)"
else
  # Every visible GPU (the smoke run: 2 processes on the CPU, gloo).
  DDP_DEVICES=$([ "$GPUS" = 0 ] && echo 2 || echo "$GPUS")
  echo "== 4b. one job on $DDP_DEVICES devices (run.devices: DistributedDataParallel, NCCL on GPUs)"
  train gpu-ddp --set "run.devices=$DDP_DEVICES"
fi

echo
echo "== 5. deploy it to Triton (on the GPU where there is one) and classify images it has not seen"
visiontune deploy models/gpu-check --replace
visiontune deployments | tee "$RESULTS/deployments.txt"
visiontune dataset sample "$WORK/new" --labels 4 --per-label 2 --size "$SIZE" --seed 7
visiontune classify "$WORK/new" --model models/gpu-check --json >"$RESULTS/classified.json"
visiontune down
trap - EXIT

echo
echo "== 6. the training bench on this device"
"$PYTHON" -m bench.train_throughput "${BENCH_ARGS[@]}" --out "$RESULTS/train_throughput.md"

echo
echo "== 7. the serving bench (Triton vs the model in-process) on this device"
"$PYTHON" -m bench.serve "${SERVE_ARGS[@]}" --output "$RESULTS/serve.md"

echo
if [ "$GPUS" = 0 ]; then
  JPEG_PARITY=(tests/unit/test_jpeg_on_device.py -k cpu)
else
  JPEG_PARITY=(tests/unit/test_jpeg_on_device.py tests/integration/test_inference_parity.py -k "cuda or jpeg-on-gpu")
fi
echo "== 7b. JPEG decoding on the device (nvJPEG) against the trainer's decoder: the train/serve parity tests"
"$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" -rs "${JPEG_PARITY[@]}" | tee "$RESULTS/jpeg_parity.txt"

echo
echo "== 8. the report: $REPORT"
"$PYTHON" -m bench.gpu_report "$RESULTS" "$REPORT"
echo "gpu-check finished"
