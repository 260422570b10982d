"""``make demo``: train CPS-Prompt with DPCT on a short class-incremental stream and print the table.

Uses the shared Tiny-ImageNet hold-out classes and the reference ViT-Tiny when ``../shared`` exists,
otherwise a SYNTHETIC procedural stream on a randomly initialised ViT (clearly labelled as such).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgecl.commands.train import print_results
from edgecl.runner import RunSpec, run_training


def demo_spec(shared: Path) -> RunSpec:
    """The embedded default job: real data when available, synthetic otherwise."""
    data = shared / "datasets" / "tinyimagenet-100-heldout"
    weights = shared / "weights" / "vit_tiny_p8_64_tin100.safetensors"
    if data.is_dir() and weights.is_file():
        return RunSpec(
            method="cps_prompt",
            data=str(data),
            weights=str(weights),
            img_size=64,
            patch_size=8,
            tasks=5,
            num_classes=50,
            limit_per_class=50,
            epochs=3,
            batch_size=16,
            method_options={"reduction_rate": 0.5, "temperature": 0.1, "phase_ratio": 0.4},
            progress=True,
            model_dir="runs/demo/model",
        )
    print("../shared not found: running on SYNTHETIC procedural classes with a RANDOM ViT (smoke run only)")
    return RunSpec(
        method="cps_prompt",
        data="synthetic",
        img_size=32,
        patch_size=8,
        tasks=3,
        num_classes=6,
        limit_per_class=32,
        epochs=3,
        batch_size=16,
        progress=True,
        model_dir="runs/demo/model",
    )


def main() -> int:
    """Run the demo job and write runs/demo/results.json."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default="../shared", help="the shared/ folder with datasets and weights")
    args = parser.parse_args()
    spec = demo_spec(Path(args.shared))
    print(f"edgecl demo: {spec.method} on {spec.data}, {spec.tasks} tasks, {spec.epochs} epochs")
    results = run_training(spec)
    print_results(results)
    out = Path("runs/demo/results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}   finished model: {spec.model_dir}")
    print(f"try: edgecl predict --model {spec.model_dir} IMAGE")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
