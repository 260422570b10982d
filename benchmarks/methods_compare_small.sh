#!/usr/bin/env bash
# A small variant of methods_compare.sh for the method-review pairs that did not fit the full setting on the
# loaded shared VM: 2 tasks x 10 held-out Tiny-ImageNet classes, 20 train / 20 test images per class,
# 3 epochs, seed 0, one thread. Usage: benchmarks/methods_compare_small.sh NAME METHOD [--set K=V ...]
# (writes benchmarks/results/methods/small/NAME.json).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
PY=${PY:-.venv/bin/python}
name=$1; method=$2; shift 2
mkdir -p benchmarks/results/methods/small
exec "$PY" -m edgecl train --method "$method" \
  --data "$SHARED/datasets/tinyimagenet-100-heldout" \
  --weights "$SHARED/weights/vit_tiny_p8_64_tin100.safetensors" --img-size 64 --patch-size 8 \
  --tasks 2 --num-classes 20 --limit-per-class 20 --test-limit-per-class 20 --epochs 3 --batch-size 16 \
  --seed 0 --threads 1 --quiet --out "benchmarks/results/methods/small/$name.json" "$@"
