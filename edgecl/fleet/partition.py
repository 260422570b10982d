"""Split one labelled image set over devices: IID, or non-IID with a Dirichlet(alpha) label split.

For the tests, the bench and fleet demos; a real fleet's devices bring their own images.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from edgecl.fleet.device import LocalData

__all__ = ["partition"]


def partition(
    data: LocalData,
    devices: int,
    mode: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    share_test: bool = True,
) -> list[LocalData]:
    """``devices`` disjoint shares of ``data.train``; every device keeps the whole test set when
    ``share_test`` (a common hold-out), else the test images are split IID as well.

    ``iid``: each class's images dealt round-robin after a seeded shuffle. ``dirichlet``: each class's
    images split by proportions drawn from Dirichlet(alpha) over devices (small alpha: few devices hold
    most of a class), the usual non-IID label split of federated-learning papers.
    """
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if mode not in ("iid", "dirichlet"):
        raise ValueError(f"partition mode must be 'iid' or 'dirichlet', got {mode!r}")
    if mode == "dirichlet" and alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    shares: list[dict[str, list[str]]] = [{} for _ in range(devices)]
    for cls in sorted(data.train):
        files = list(data.train[cls])
        rng.shuffle(files)
        for d, chunk in enumerate(_split(files, devices, mode, alpha, nprng)):
            if chunk:
                shares[d][cls] = sorted(chunk)
    tests: list[dict[str, list[str]]]
    if share_test:
        tests = [dict(data.test) for _ in range(devices)]
    else:
        tests = [{} for _ in range(devices)]
        for cls in sorted(data.test):
            for d, chunk in enumerate(_split(sorted(data.test[cls]), devices, "iid", alpha, nprng)):
                if chunk:
                    tests[d][cls] = chunk
    return [LocalData(tr, te) for tr, te in zip(shares, tests, strict=True)]


def _split(
    files: Sequence[str], devices: int, mode: str, alpha: float, rng: np.random.Generator
) -> list[list[str]]:
    if mode == "iid":
        return [list(files[d::devices]) for d in range(devices)]
    p = rng.dirichlet([alpha] * devices)
    cuts = (np.cumsum(p)[:-1] * len(files)).round().astype(int).tolist()
    bounds = [0, *cuts, len(files)]
    return [list(files[bounds[d] : bounds[d + 1]]) for d in range(devices)]
