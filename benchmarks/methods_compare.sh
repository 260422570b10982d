#!/usr/bin/env bash
# Paired single-method runs for the method-review figures in RESULTS.md / PERFORMANCE.md (issue #18):
# each pair is the committed bench setting (5 tasks x 10 held-out Tiny-ImageNet classes, 30 train / 50
# test images per class, 5 epochs, seed 0, one thread) with one config field changed, run back to back.
# Usage: benchmarks/methods_compare.sh NAME METHOD [--set K=V ...]   (writes benchmarks/results/methods/NAME.json)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
PY=${PY:-.venv/bin/python}
name=$1; method=$2; shift 2
exec "$PY" -m edgecl train --method "$method" \
  --data "$SHARED/datasets/tinyimagenet-100-heldout" \
  --weights "$SHARED/weights/vit_tiny_p8_64_tin100.safetensors" --img-size 64 --patch-size 8 \
  --tasks 5 --num-classes 50 --limit-per-class 30 --test-limit-per-class 50 --epochs 5 --batch-size 16 \
  --seed 0 --threads 1 --quiet --out "benchmarks/results/methods/$name.json" "$@"
