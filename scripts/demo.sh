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
echo "== 5. the stack's state"
visiontune status
echo
echo "demo finished"
