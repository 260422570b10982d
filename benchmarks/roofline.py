"""Roofline note for the step benchmark: FLOPs per step from the model's shapes, the CPU's measured fp32
matmul rate, and the fraction of it each measured step reaches.

FLOPs are counted per image from ViT shapes (``D``, heads, depth, MLP ratio 4, ``T`` tokens, a prefix of
``P`` keys/values in the prompted layers) and multiplied by the batch: a linear of ``T`` tokens costs
``2·T·in·out``; attention ``4·T·(T+P)·D`` forward (scores and weighted values) and ``8·T·(T+P)·D``
backward (dV, dP, dQ, dK; the recomputation inside a flash kernel is not counted); a frozen linear's
backward is its input gradient only (``2·T·in·out``; no weight gradient). Each side is counted as it
computes: edgecl's last block runs for the CLS token only (keys/values of every token) and its prompted
pass reuses the query pass's patch embedding; the reference runs every block in full and embeds twice.
The first prompted block needs no input gradient (its input is the frozen embedding), so only its
attention and the layers above its qkv projection are counted backward. Heads, prompt composition and
norms are left out (< 0.5 %).

The matmul rate is measured here, one thread: ``torch.mm`` (the BLAS) and oneDNN's linear at a large
square shape and at the ViT-Tiny shapes; the best is the "measured peak".

    python benchmarks/roofline.py --bench benchmarks/results/step_bench_reference_*.json \
        --out benchmarks/results/roofline.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Shapes:
    """ViT-Tiny 224/16 and CODA-Prompt's prefixes, as benchmarked."""

    dim: int = 192
    depth: int = 12
    patches: int = 196
    patch_pixels: int = 16 * 16 * 3
    prefix: int = 4
    """Prefix keys (= values) per prompted layer: prompt length 8, half keys, half values."""
    prompt_layers: tuple[int, ...] = (0, 1, 2, 3, 4)
    batch: int = 16


def linear_flops(tokens: int, d: int) -> int:
    """qkv, proj, fc1, fc2 of one block over ``tokens`` tokens: 2·T·(3D² + D² + 4D² + 4D²)."""
    return 24 * tokens * d * d


def block_fwd(t: int, p: int, d: int, cls_only: bool) -> int:
    """Forward FLOPs of one block (``cls_only``: keys/values of all tokens, the rest for the CLS token)."""
    if cls_only:
        return 2 * t * 2 * d * d + linear_flops(1, d) - 2 * 2 * d * d + 4 * (t + p) * d
    return linear_flops(t, d) + 4 * t * (t + p) * d


def block_bwd(t: int, p: int, d: int, cls_only: bool, first: bool) -> int:
    """Backward FLOPs (input gradients only) of one block; ``first``: its input needs no gradient."""
    if cls_only:
        lin = 2 * t * 2 * d * d + linear_flops(1, d) - 2 * 2 * d * d
        att = 8 * (t + p) * d
    else:
        lin = linear_flops(t, d)
        att = 8 * t * (t + p) * d
    if first:
        lin -= 2 * t * 3 * d * d  # no gradient through its qkv projection to the frozen input
    return lin + att


def pass_flops(s: Shapes, tokens: int, prompted: bool, cls_last: bool, backward: bool) -> int:
    """One pass over the blocks (forward, or its backward) per image."""
    total = 0
    for i in range(s.depth):
        p = s.prefix if prompted and i in s.prompt_layers else 0
        cls_only = cls_last and i == s.depth - 1
        if backward:
            total += block_bwd(tokens, p, s.dim, cls_only, first=i == 0)
        else:
            total += block_fwd(tokens, p, s.dim, cls_only)
    return total


def kept_tokens(s: Shapes, r: float) -> int:
    """CLS plus floor((1 - r)·N) patches (both implementations keep this many)."""
    return 1 + math.floor((1 - r) * s.patches + 1e-9)


def step_flops(s: Shapes, impl: str, mode: str, r: float | None) -> int:
    """FLOPs of one step of ``mode`` (phase1 / phase2_recompute / inference) for the whole batch."""
    full = 1 + s.patches
    embed = 2 * s.patches * s.patch_pixels * s.dim
    edgecl = impl == "edgecl"
    query = embed + pass_flops(s, full, False, edgecl, False)
    prompted_embed = 0 if edgecl else embed
    if mode == "phase1":
        t = full if r is None else kept_tokens(s, r)
        fwd = prompted_embed + pass_flops(s, t, True, edgecl, False)
        bwd = pass_flops(s, t, True, edgecl, True)
        per_image = query + fwd + bwd
    elif mode in ("phase2_recompute", "inference"):
        per_image = query + prompted_embed + pass_flops(s, full, True, edgecl, False)
    else:
        raise ValueError(f"no FLOP count for mode {mode!r}; use phase1, phase2_recompute or inference")
    return per_image * s.batch


def _rate(fn: Any, flops: float, seconds: float = 1.5) -> float:
    """GFLOP/s of ``fn`` (process CPU time, after two warm-up calls), repeated for about ``seconds``."""
    fn()
    fn()
    n, c0 = 0, time.process_time()
    while time.process_time() - c0 < seconds:
        fn()
        n += 1
    return flops * n / (time.process_time() - c0) / 1e9


def measure_gemm(threads: int = 1) -> dict[str, Any]:
    """fp32 matmul rates (GFLOP/s, one thread): BLAS ``mm`` and oneDNN linear, square and ViT shapes."""
    import torch

    torch.set_num_threads(threads)
    shapes = {"square_2048": (2048, 2048, 2048), "qkv": (3152, 192, 576), "fc1": (3152, 192, 768),
              "fc2": (3152, 768, 192), "proj": (3152, 192, 192)}  # fmt: skip
    out: dict[str, Any] = {"threads": threads}
    for name, (m, k, n) in shapes.items():
        a, b, w = torch.randn(m, k), torch.randn(k, n), torch.randn(n, k)
        flops = 2.0 * m * k * n
        out[f"mm_{name}"] = _rate(lambda a=a, b=b: a @ b, flops)
        try:
            out[f"onednn_{name}"] = _rate(
                lambda a=a, w=w: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""), flops
            )
        except (RuntimeError, AttributeError):
            out[f"onednn_{name}"] = None
        ab, bb = a.bfloat16(), b.bfloat16()
        out[f"mm_bf16_{name}"] = _rate(lambda ab=ab, bb=bb: ab @ bb, flops)
    fp32 = [v for k, v in out.items() if k.startswith(("mm_", "onednn_")) and "bf16" not in k and v]
    out["peak_fp32_gflops"] = max(fp32)
    return out


def roofline(bench: dict[str, Any], gemm: dict[str, Any], s: Shapes) -> list[dict[str, Any]]:
    """Per (impl, kernels, variant, mode) of a step-bench summary: FLOPs, GFLOP/s reached, % of peak."""
    rows = []
    for row in bench.get("summary", []):
        if row["mode"] not in ("phase1", "phase2_recompute", "inference"):
            continue
        r = None
        if row["variant"].startswith("cps_prompt") and row["mode"] == "phase1":
            r = float(row["variant"].split("reduction_rate=")[1].split(",")[0])
        flops = step_flops(s, row["impl"], row["mode"], r)
        rate = flops / row["cpu_s_per_step"] / 1e9
        rows.append(
            {
                "impl": row["impl"],
                "kernels": row["kernels"],
                "variant": row["variant"],
                "mode": row["mode"],
                "gflop_per_step": flops / 1e9,
                "cpu_s_per_step": row["cpu_s_per_step"],
                "gflops_reached": rate,
                "fraction_of_peak": rate / gemm["peak_fp32_gflops"],
                "floor_s_at_peak": flops / 1e9 / gemm["peak_fp32_gflops"],
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the matmul rate, count FLOPs, read a step-bench JSON, print and write the note."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--bench", nargs="*", default=[], help="step_bench.py JSONs with a 'summary' (side-by-side runs)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/roofline.json")
    args = ap.parse_args(argv)
    s = Shapes()
    gemm = measure_gemm(args.threads)
    counts = {
        f"{impl}/{mode}/{r}": step_flops(s, impl, mode, r) / 1e9
        for impl in ("edgecl", "reference")
        for mode, rs in (("phase1", (None, 0.5, 0.4)), ("phase2_recompute", (None,)), ("inference", (None,)))
        for r in rs
    }
    out: dict[str, Any] = {"shapes": asdict(s), "gemm": gemm, "gflop_per_step": counts}
    if args.bench:
        summary = [row for path in args.bench for row in json.loads(Path(path).read_text())["summary"]]
        out["bench"] = args.bench
        out["rows"] = roofline({"summary": summary}, gemm, s)
    print(f"measured fp32 matmul peak, {args.threads} thread(s): {gemm['peak_fp32_gflops']:.1f} GFLOP/s")
    for k, v in gemm.items():
        if k not in ("threads", "peak_fp32_gflops") and v:
            print(f"  {k:<22} {v:7.1f} GFLOP/s")
    for k, v in counts.items():
        print(f"{k:<34} {v:7.2f} GFLOP/step")
    for row in out.get("rows", []):
        print(
            f"{row['impl']:<10} {row['kernels'] or '-':<6} {row['variant']:<32} {row['mode']:<17} "
            f"{row['gflop_per_step']:6.1f} GFLOP  {row['gflops_reached']:6.1f} GFLOP/s  "
            f"{100 * row['fraction_of_peak']:5.1f} % of peak  (floor {row['floor_s_at_peak']:.3f} s)"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
