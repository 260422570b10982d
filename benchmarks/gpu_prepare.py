"""Prepare ``.gpu/`` for the GPU check on a machine without network (``make gpu-wheels``, ``make gpu-data``).

``wheels``: downloads, for CPython 3.12 on x86-64 Linux, the wheels of edgecl's runtime packages that the GPU
machine lacks (the daemon's: FastAPI and what it needs that is not there), at the versions installed in this
environment, into ``.gpu/wheels`` (``benchmarks/gpu_check.sh`` installs them with ``pip --no-index``).

``data``: copies a class subset of the shared Tiny-ImageNet hold-out set (ImageFolder ``train/`` + ``val/``)
and the reference ViT-Tiny weights into ``.gpu/data``, and checks that the tree plus ``.gpu`` stays under the
device's 64 MiB transfer limit.

``.gpu/`` is git-ignored; name it in the device run's ``carry``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU = REPO / ".gpu"
MISSING_ON_GPU = (
    "fastapi",
    "starlette",
    "uvicorn",
    "python-multipart",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "annotated-doc",
    "typing-inspection",
    "typing-extensions",
    "confusable-homoglyphs",
    "prometheus-client",
)
"""edgecl's runtime packages (pyproject ``dependencies``) and their requirements that the GPU image does not
have, or may have too old (typing-extensions: pydantic needs >= 4.16); the rest (torch, timm, onnxruntime,
nvidia-ml-py, ...) is there."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT_MB = 64.0
DATASET = "datasets/tinyimagenet-100-heldout"
WEIGHTS = "weights/vit_tiny_p8_64_tin100.safetensors"


def wheels(dest: Path) -> list[Path]:
    """Download the wheels of :data:`MISSING_ON_GPU` at this environment's versions into ``dest``."""
    pins = []
    for name in MISSING_ON_GPU:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here; install edgecl first (make setup)") from None
    if dest.exists():
        shutil.rmtree(dest)  # one version of each package: two would stop the install
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + pins, check=True)
    got = sorted(dest.glob("*.whl"))
    size = sum(p.stat().st_size for p in got) / 2**20
    print(f"{len(got)} wheels in {dest} ({size:.1f} MB): {', '.join(pins)}")
    return got


def data(shared: Path, dest: Path, classes: int, train: int, val: int) -> None:
    """Copy ``classes`` classes (sorted wnids) x ``train``/``val`` images and the reference weights."""
    root = shared / DATASET
    weights = shared / WEIGHTS
    if not root.is_dir() or not weights.is_file():
        raise SystemExit(f"no shared dataset/weights under {shared}; pass --shared DIR")
    subset = dest / "tin-subset"
    if subset.exists():
        shutil.rmtree(subset)
    wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())[:classes]
    for split, n in (("train", train), ("val", val)):
        for wnid in wnids:
            out = subset / split / wnid
            out.mkdir(parents=True)
            for f in sorted((root / split / wnid).iterdir())[:n]:
                shutil.copy2(f, out / f.name)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights, dest / weights.name)
    json_file = weights.with_suffix(".json")
    if json_file.is_file():
        shutil.copy2(json_file, dest / json_file.name)
    print(f"{len(wnids)} classes x {train}/{val} images and {weights.name} in {dest}")


def tree_mb() -> tuple[float, float]:
    """(MB of the files that travel without carry: git's tracked and untracked-not-ignored, MB of .gpu)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    tree = sum((REPO / p.decode()).stat().st_size for p in listed if p and (REPO / p.decode()).is_file())
    gpu = sum(p.stat().st_size for p in GPU.rglob("*") if p.is_file()) if GPU.exists() else 0
    return tree / 2**20, gpu / 2**20


def main() -> int:
    """``wheels`` | ``data`` [--shared DIR] | ``size``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("what", choices=["wheels", "data", "size"])
    p.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared folder (../shared)")
    p.add_argument("--classes", type=int, default=15, help="classes to copy (3 tasks x 5)")
    p.add_argument("--train", type=int, default=60, help="training images per class")
    p.add_argument("--val", type=int, default=20, help="validation images per class")
    args = p.parse_args()
    if args.what == "wheels":
        wheels(GPU / "wheels")
    elif args.what == "data":
        data(Path(args.shared), GPU / "data", args.classes, args.train, args.val)
    tree, gpu = tree_mb()
    total = tree + gpu
    print(f"working tree {tree:.1f} MB + .gpu {gpu:.1f} MB = {total:.1f} MB (limit {LIMIT_MB:.0f} MiB)")
    return 0 if tree + gpu < LIMIT_MB - 4 else 1


if __name__ == "__main__":
    sys.exit(main())
