"""Accuracy vs images per class (issue #22 item 4): 5 tasks x 10 classes of the shared hold-out, 3 seeds.

Runs the cells (method, images per class, seed) in the order given, one after another in this process,
and writes each finished run to ``OUT/runs/<method>_ipc<N>_s<seed>.json`` at once; a cell whose file
exists is skipped, so the study resumes where it stopped. The frozen backbone's own passes (the plain
forward and the no-prompt query) are memoised by input bytes when no gradient is recorded, so cells
share the frozen features of identical evaluation batches: this changes no result, only time.
``python benchmarks/ipc_summary.py OUT`` tabulates whatever cells finished (mean and 95 % t-interval).

``nice -n 5 python benchmarks/ipc_study.py --methods simplecil,linear_probe,cps_prompt --ipc 10,20,50,100``
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from edgecl.backbone import FrozenViT, QueryOutput
from edgecl.runner import RunSpec, build_backbone, build_stream, machine_info, prepare_run

CELLS: dict[str, tuple[str, dict[str, Any]]] = {
    # label: (method, method options)
    "simplecil": ("simplecil", {}),
    "linear_probe": ("linear_probe", {}),
    "linear_probe+ridge": ("linear_probe", {"phase2_head": "ridge"}),
    "linear_probe+ridge lam=0.1": ("linear_probe", {"phase2_head": "ridge", "ridge_lambda": 0.1}),
    "linear_probe+ridge lam=10": ("linear_probe", {"phase2_head": "ridge", "ridge_lambda": 10.0}),
    "linear_probe+ridge lam=100": ("linear_probe", {"phase2_head": "ridge", "ridge_lambda": 100.0}),
    "linear_probe min_steps=100": ("linear_probe", {}),
    # cps_prompt and patchdropout name their (new) default head explicitly, so the cells do not depend on
    # the checkout's default; the cps_prompt cells at 10 and 20 images per class ran with ridge as default
    "cps_prompt": ("cps_prompt", {"phase2_head": "ridge"}),
    "cps_prompt+sgd": ("cps_prompt", {"phase2_head": "sgd"}),
    "cps_prompt+ridge": ("cps_prompt", {"phase2_head": "ridge"}),
    "cps_prompt+prototype": ("cps_prompt", {"phase2_head": "prototype"}),
    "patchdropout": ("patchdropout", {"phase2_head": "ridge"}),
    "coda_prompt": ("coda_prompt", {}),
    "l2p": ("l2p", {}),
    "dualprompt": ("dualprompt", {}),
    "hash": ("hash", {}),
    "dpw": ("dpw", {}),
    "iprompt": ("iprompt", {}),
}
# issue #22 item 5: CPS's sampling settings against PatchDropout (uniform), each with the ridge head;
# "mid" scores at block MID_LAYER instead of the last one (the reference hard-codes the last block)
for _layer in ("", "mid "):
    for _tau in (0.05, 0.1, 0.5, 1.0):
        if _layer or _tau != 0.1:  # last layer and tau 0.1 is the cps_prompt cell itself
            CELLS[f"cps {_layer}tau={_tau:g}"] = ("cps_prompt", {"phase2_head": "ridge", "temperature": _tau})
    CELLS[f"cps {_layer}topk"] = ("cps_prompt", {"phase2_head": "ridge", "sampling": "topk"})
MID_LAYER = 5
"""Block index of the "mid" sweep cells (0-based; the 6th of the 12 blocks of ViT-Tiny)."""


def _key(x: torch.Tensor, *extra: object) -> bytes:
    h = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(extra).encode())
    return h.digest()


def memoise_frozen_passes(backbone: FrozenViT) -> dict[str, int]:
    """Wrap ``features`` and ``query`` with a memo used only outside autograd; returns hit/miss counts."""
    feats_fn, query_fn = backbone.features, backbone.query
    memo: dict[bytes, Any] = {}
    counts = {"hits": 0, "misses": 0}

    def features(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return feats_fn(x)
        k = _key(x, "features")
        counts["hits" if k in memo else "misses"] += 1
        if k not in memo:
            memo[k] = feats_fn(x)
        return memo[k].clone()

    def query(x: torch.Tensor, keep_tokens: bool = False) -> QueryOutput:
        if torch.is_grad_enabled():
            return query_fn(x, keep_tokens=keep_tokens)
        k = _key(x, "query", backbone.score_layer)
        counts["hits" if k in memo else "misses"] += 1
        if k not in memo:
            memo[k] = query_fn(x, keep_tokens=False)
        q: QueryOutput = memo[k]
        tokens = None
        if keep_tokens:  # the patch embedding is cheap and big: recomputed, not kept
            with torch.no_grad():
                tokens = backbone.embed(x)
        return dataclasses.replace(q, cls=q.cls.clone(), scores=q.scores.clone(), tokens=tokens)

    backbone.features = features  # type: ignore[method-assign]
    backbone.query = query  # type: ignore[method-assign]
    return counts


def main(argv: list[str] | None = None) -> int:
    """Run every requested cell not yet on disk; print one line per finished cell."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="simplecil,linear_probe,cps_prompt,patchdropout")
    p.add_argument("--ipc", default="10,20,50,100", help="images per class, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--order", choices=["ipc", "method"], default="ipc", help="outer loop")
    p.add_argument("--out", default="benchmarks/results/ipc_study")
    p.add_argument("--data", default="../shared/datasets/tinyimagenet-100-heldout")
    p.add_argument("--weights", default="../shared/weights/vit_tiny_p8_64_tin100.safetensors")
    p.add_argument("--test-limit-per-class", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in CELLS]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; choose from {', '.join(CELLS)}")
    ipcs = [int(v) for v in args.ipc.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    base = RunSpec(
        data=args.data,
        weights=args.weights,
        img_size=64,
        patch_size=8,
        tasks=5,
        num_classes=50,
        test_limit_per_class=args.test_limit_per_class,
        epochs=args.epochs,
        threads=1,
    )
    backbone = build_backbone(base)
    counts = memoise_frozen_passes(backbone)
    streams: dict[int, Any] = {}
    runs = Path(args.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if args.order == "ipc":
        cells = [(label, ipc, seed) for ipc in ipcs for label in labels for seed in seeds]
    else:
        cells = [(label, ipc, seed) for label in labels for ipc in ipcs for seed in seeds]
    for label, ipc, seed in cells:
        path = runs / f"{label.replace(' ', '_')}_ipc{ipc}_s{seed}.json"
        if path.exists():
            continue
        method, options = CELLS[label]
        spec = dataclasses.replace(
            base, method=method, method_options=dict(options), limit_per_class=ipc, seed=seed
        )
        if ipc not in streams:
            streams[ipc] = build_stream(spec, backbone)
        stream = streams[ipc]
        spec.method_options.setdefault("expected_tasks", len(stream.tasks))
        if "min_steps=" in label:
            spec.min_steps = int(label.split("min_steps=")[1].split()[0])
        backbone.score_layer = MID_LAYER if label.startswith("cps mid ") else backbone.depth - 1
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        results = prepare_run(spec, backbone=backbone, stream=stream).fit()
        results["study"] = {
            "label": label,
            "images_per_class": ipc,
            "seed": seed,
            "wall_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0,
            "score_layer": backbone.score_layer,
            "memo": dict(counts),
            "machine": machine_info(),
            "load_average": list(os.getloadavg()),
        }
        results.pop("memory_series", None)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)
        train_s = sum(t.get("train_seconds") or 0.0 for t in results["tasks"])
        print(
            f"{label:22s} ipc {ipc:3d} seed {seed}: FAA {100 * results['final_average_accuracy']:5.2f}%  "
            f"AIA {100 * results['average_incremental_accuracy']:5.2f}%  train {train_s:6.1f} s  "
            f"cpu {results['study']['cpu_seconds']:6.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
