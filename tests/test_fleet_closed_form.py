"""Closed-form heads in the fleet against hand computations: three fake devices' statistics summed and the
head solved from the sums equal (float64) the ridge / prototype head fitted on the pooled features, and
updates whose statistics do not match their counts are refused with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgecl.fleet.aggregate import DeviceUpdate, GlobalModel, aggregate, check_update
from edgecl.fleet.closed_form import analytic_statistics
from edgecl.methods.analytic import AnalyticStats, fit_linear_head
from edgecl.methods.layers import ExpandableHead

D = 6
NAMES = ["c0", "c1", "c2", "c3"]  # task 0: c0; the round trains task 1: c1, c2, c3
TASK = NAMES[1:]
LAM = 0.7
DEVICES = {"a": {"c1": 5, "c2": 3}, "b": {"c2": 4, "c3": 6}, "c": {"c1": 2}}


def _feats(seed: int, counts: dict[str, int]) -> tuple[Tensor, Tensor]:
    """Random float64 features (shifted per class) and labels (class ids in NAMES order)."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for name, n in counts.items():
        c = NAMES.index(name)
        xs.append(torch.randn(n, D, generator=gen, dtype=torch.float64) + c)
        ys.append(torch.full((n,), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def _aug(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def _global() -> tuple[GlobalModel, Tensor, Tensor]:
    """The model inside task 1: task 0's statistics committed, a head, a prompt; and task 0's features."""
    x0, y0 = _feats(0, {"c0": 7})
    tensors = {
        "prompt.p_0": torch.zeros(2, D, dtype=torch.float64),
        "head.weight": torch.arange(4 * D, dtype=torch.float64).view(4, D) / 10,
        "head.bias": torch.tensor([0.5, 0.1, 0.2, 0.3], dtype=torch.float64),
        "analytic.class_sums": torch.cat([x0.sum(0, keepdim=True), torch.full((3, D), 9.0)]).double(),
        "analytic.class_counts": torch.tensor([7.0, 9, 9, 9], dtype=torch.float64),
        "analytic.gram_past": _aug(x0).T @ _aug(x0),
        "analytic.gram_task": torch.full((D + 1, D + 1), 5.0, dtype=torch.float64),  # an earlier round's
    }
    return GlobalModel(tensors, list(NAMES), {"head_classes": 4}, task=1, version=3), x0, y0


def _device(node: str, seed: int, model: GlobalModel, kind: str) -> tuple[DeviceUpdate, Tensor, Tensor]:
    """What a device sends after fitting the head on its own features (as the trainer's fit does)."""
    counts = DEVICES[node]
    x, y = _feats(seed, counts)
    stats = AnalyticStats(D).double()
    for k in ("class_sums", "class_counts", "gram_past", "gram_task"):
        setattr(stats, k, model.tensors[f"analytic.{k}"].clone())
    head = _head(model)
    fit_linear_head(head, stats, kind, x, y, [1, 2, 3], 4, LAM)
    rows = torch.tensor([NAMES.index(n) for n in counts])
    tensors = {
        "prompt.p_0": torch.full((2, D), float(seed), dtype=torch.float64),
        "analytic.class_sums": stats.class_sums[rows].clone(),
        "analytic.class_counts": stats.class_counts[rows].clone(),
        "analytic.gram_task": stats.gram_task.clone(),
    }
    update = DeviceUpdate(node, 1, 3, tensors, list(counts), list(counts.values()), sum(counts.values()))
    return update, x, y


def _head(model: GlobalModel) -> ExpandableHead:
    head = ExpandableHead(D)
    head.weight = nn.Parameter(model.tensors["head.weight"].clone())
    head.bias = nn.Parameter(model.tensors["head.bias"].clone())
    return head


def _round(kind: str) -> tuple[GlobalModel, GlobalModel, dict[str, str], Tensor, Tensor, Tensor, Tensor]:
    model, x0, y0 = _global()
    sent = [_device(n, i + 1, model, kind) for i, n in enumerate(DEVICES)]
    new, refused = aggregate(model, [u for u, _, _ in sent], TASK, stats=analytic_statistics(kind, LAM))
    x = torch.cat([x for _, x, _ in sent])
    y = torch.cat([y for _, _, y in sent])
    return model, new, refused, x, y, x0, y0


def test_ridge_head_is_the_pooled_data_solution() -> None:
    model, new, refused, x, y, x0, y0 = _round("ridge")
    assert refused == {} and new.version == 4
    tight = {"rtol": 1e-10, "atol": 1e-10}
    # statistics: the task's rows are sums over devices, the task's Gram matrix the pooled one
    onehot = F.one_hot(y, 4).double()
    assert torch.allclose(new.tensors["analytic.class_sums"][1:], (onehot.T @ x)[1:], **tight)
    assert torch.equal(
        new.tensors["analytic.class_counts"], torch.tensor([7.0, 7, 7, 6], dtype=torch.float64)
    )
    assert torch.allclose(new.tensors["analytic.gram_task"], _aug(x).T @ _aug(x), **tight)
    assert torch.equal(new.tensors["analytic.class_sums"][0], model.tensors["analytic.class_sums"][0])
    assert torch.equal(new.tensors["analytic.gram_past"], model.tensors["analytic.gram_past"])
    # the head, by hand: W = (G_past + G_task + λI)^-1 Q with Q the one-hot targets of all data seen
    xa, ya = _aug(torch.cat([x0, x])), F.one_hot(torch.cat([y0, y]), 4).double()
    sol = torch.linalg.solve(xa.T @ xa + LAM * torch.eye(D + 1, dtype=torch.float64), xa.T @ ya)
    assert torch.allclose(new.tensors["head.weight"], sol[:-1].T, **tight)
    assert torch.allclose(new.tensors["head.bias"], sol[-1], **tight)
    # ... which is what edgecl.methods.analytic fits on the pooled features on one device
    stats = AnalyticStats(D).double()
    stats.grow(4)
    stats.class_sums[0], stats.class_counts[0] = x0.sum(0), 7.0
    stats.gram_past.copy_(_aug(x0).T @ _aug(x0))
    head = _head(model)
    fit_linear_head(head, stats, "ridge", x, y, [1, 2, 3], 4, LAM)
    assert torch.allclose(new.tensors["head.weight"], head.weight, **tight)
    assert torch.allclose(new.tensors["head.bias"], head.bias, **tight)
    # non-statistics tensors are still the sample-weighted mean (8, 10 and 2 images)
    assert torch.allclose(
        new.tensors["prompt.p_0"], torch.full((2, D), (8 * 1 + 10 * 2 + 2 * 3) / 20.0, dtype=torch.float64)
    )


def test_prototype_rows_are_the_pooled_class_means() -> None:
    model, new, refused, x, y, _, _ = _round("prototype")
    assert refused == {}
    for c in (1, 2, 3):
        mean = x[y == c].mean(0)
        assert torch.allclose(new.tensors["head.weight"][c], mean / mean.norm(), rtol=1e-12, atol=1e-12)
        assert float(new.tensors["head.bias"][c]) == 0.0
    # task 0's row is not the task's: it stays global
    assert torch.equal(new.tensors["head.weight"][0], model.tensors["head.weight"][0])


def test_a_class_nobody_sent_has_no_data_in_the_sums() -> None:
    model, _, _ = _global()
    a, _, _ = _device("a", 1, model, "ridge")  # c1, c2 only
    new, _ = aggregate(model, [a], TASK, stats=analytic_statistics("ridge", LAM))
    assert torch.equal(
        new.tensors["analytic.class_counts"], torch.tensor([7.0, 5, 3, 0], dtype=torch.float64)
    )
    assert not bool(new.tensors["analytic.class_sums"][3].any())
    assert torch.allclose(new.tensors["head.weight"][3], torch.zeros(D, dtype=torch.float64), atol=1e-12)


def _tampered(change: str) -> DeviceUpdate:
    model, _, _ = _global()
    u, _, _ = _device("a", 1, model, "ridge")
    t = u.tensors
    if change == "count row":
        t["analytic.class_counts"] = t["analytic.class_counts"] + torch.tensor(
            [1.0, -1.0], dtype=torch.float64
        )
    elif change == "gram count":
        t["analytic.gram_task"][-1, -1] += 1.0
    elif change == "gram of other data":
        t["analytic.gram_task"][:-1, -1] += 3.0
        t["analytic.gram_task"][-1, :-1] += 3.0
    elif change == "row shape":
        t["analytic.class_sums"] = t["analytic.class_sums"][:1]
    elif change == "non-finite":
        t["analytic.gram_task"][0, 1] = float("nan")
    elif change == "sends the head":
        t["head.weight"] = torch.zeros(2, D, dtype=torch.float64)
    return u


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("count row", "differ from the declared class counts"),
        ("gram count", "counts 9.0 samples, num_examples is 8"),
        ("gram of other data", "does not match the class sums"),
        ("row shape", "analytic.class_sums has shape (1, 6), expected (2, 6)"),
        ("non-finite", "analytic.gram_task has non-finite values"),
        ("sends the head", "unexpected ['head.weight']"),
    ],
)
def test_inconsistent_statistics_are_refused(change: str, reason: str) -> None:
    model, _, _ = _global()
    stats = analytic_statistics("ridge", LAM)
    honest, _, _ = _device("b", 2, model, "ridge")
    assert check_update(_device("a", 1, model, "ridge")[0], model, TASK, stats=stats) is None
    new, refused = aggregate(model, [_tampered(change), honest], TASK, stats=stats)
    assert list(refused) == ["a"] and reason in refused["a"], refused
    # the refused update did not enter the sums
    assert torch.allclose(new.tensors["analytic.gram_task"], honest.tensors["analytic.gram_task"])
