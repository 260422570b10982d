#!/usr/bin/env bash
# The committed benchmark (benchmarks/RESULTS.md, benchmarks/results/): every registered method plus the CPS
# ablation on the first 50 (sorted) held-out Tiny-ImageNet classes with the reference ViT-Tiny (64 px,
# patch 8), on CPU. 5 tasks x 10 classes, 30 training and 50 test images per class (all of val/), 5 epochs
# (so DPCT's lambda = 0.4 splits them exactly 2 + 3), seed 0, one torch thread per child, pinned to one core
# (`taskset -c 0 benchmarks/run_bench.sh`); children run one after another. Run from the
# repository root on an otherwise idle machine (check `uptime`): times are only clean when nothing else runs.
# One thread, not two: with other load on this 2-core machine, 2 intra-op threads made a training step ~6x
# slower (wall and CPU) than 1 thread (OpenMP threads waiting on each other).
# Extra arguments are appended, e.g. `benchmarks/run_bench.sh --reuse` to continue an interrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-benchmarks/results}
exec .venv/bin/edgecl bench \
  --methods cps_prompt,coda_prompt,patchdropout,l2p,dualprompt,hash,dpw,iprompt,linear_probe,simplecil --ablation cps \
  --data "$SHARED/datasets/tinyimagenet-100-heldout" \
  --weights "$SHARED/weights/vit_tiny_p8_64_tin100.safetensors" --img-size 64 --patch-size 8 \
  --tasks 5 --num-classes 50 --limit-per-class 30 --test-limit-per-class 50 --epochs 5 \
  --seeds 0 --threads 1 --out "$OUT" "$@"
