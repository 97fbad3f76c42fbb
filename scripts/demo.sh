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
echo "== 3. the trainer's API answers over gRPC"
visiontune jobs list

echo
echo "== 4. the stack's state"
visiontune status
echo
echo "demo finished"
