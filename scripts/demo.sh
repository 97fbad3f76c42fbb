#!/usr/bin/env bash
# The main job, end to end on the local stack (`make demo`). Each issue that lands extends it.
# KEEP_STACK=1 leaves the stack running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR="${VISIONTUNE_DATA_DIR:-$PWD/.visiontune}"
export VISIONTUNE_DATA_DIR="$DATA_DIR"
WORK="$DATA_DIR/demo"
mkdir -p "$WORK"

stop_stack() { [ "${KEEP_STACK:-0}" = 1 ] || visiontune down; }
trap stop_stack EXIT

echo "== 1. start the local stack (S3 server, trainer, inference)"
visiontune up

echo
echo "== 2. make a small labelled image set and upload it"
rm -rf "$WORK/shapes"
visiontune dataset sample "$WORK/shapes" --labels 3 --per-label 40 --size 64
visiontune dataset push "$WORK/shapes" datasets/shapes

echo
echo "== 3. ask the trainer for a starting spec, and for a learning rate (LR range test)"
visiontune recommend datasets/shapes
visiontune lr-find examples/shapes-quick.yaml

echo
echo "== 4. train: MobileNetV2 (ImageNet weights, shipped offline) + a new head, followed live"
visiontune train examples/shapes-quick.yaml
visiontune jobs list

echo
echo "== 5. deploy the trained model into Triton (models/shapes: its newest version; older ones are replaced)"
visiontune deploy models/shapes --replace
visiontune deployments

echo
echo "== 6. classify images it has not seen: one of each trained shape, plus two of no trained class"
# --labels 4 adds a cross, a shape the model never saw; noise.png is random pixels. Both should come out UNKNOWN.
rm -rf "$WORK/new"
visiontune dataset sample "$WORK/new" --labels 4 --per-label 1 --seed 7
mkdir -p "$WORK/new/noise"
python -c 'import sys, numpy as np; from PIL import Image
Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(sys.argv[1])' \
  "$WORK/new/noise/noise.png"
visiontune classify "$WORK/new" --model models/shapes

echo
echo "== 7. report the truth about each image (the folder names it), from the same images classified as JSON"
visiontune classify "$WORK/new" --model models/shapes --json > "$WORK/predictions.json"
python - "$WORK/predictions.json" > "$WORK/feedback.txt" <<'PY'
import json, pathlib, sys
for row in json.load(open(sys.argv[1])):
    truth = pathlib.Path(row["file"]).parent.name
    known = truth in ("circle", "square", "triangle")  # what examples/shapes-quick.yaml trained on
    print(row["request_id"], row["index"], *(["--label", truth] if known else ["--unknown"]))
PY
while read -r request index truth; do
  # shellcheck disable=SC2086  # $truth is "--label LABEL" or "--unknown"
  visiontune feedback "$request" "$index" $truth
done < "$WORK/feedback.txt"

echo
echo "== 8. what Prometheus scrapes from the inference service"
visiontune metrics --grep 'model="shapes"'

echo
echo "== 9. the stack's state"
visiontune status
echo
echo "demo finished"
