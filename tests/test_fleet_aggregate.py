"""The fleet's aggregation against hand computations: sample-weighted means, head rows aligned by class
name, and updates refused (with the reason logged) before they can enter the average."""

from __future__ import annotations

import logging

import pytest
import torch

from edgecl.fleet.aggregate import DeviceUpdate, GlobalModel, aggregate, check_update

TASK = ["c1", "c2"]  # the round trains task 1: classes c1, c2 (c0 is from task 0)


def _model() -> GlobalModel:
    return GlobalModel(
        {
            "prompt.p_0": torch.zeros(2, 2),
            "head.weight": torch.tensor([[7.0, 7.0], [0.0, 0.0], [0.0, 0.0]]),
            "head.bias": torch.tensor([7.0, 0.0, 0.0]),
        },
        ["c0", "c1", "c2"],
        {"head_classes": 3},
        task=1,
        version=4,
    )


def _update(node: str, p: list[list[float]], rows: dict[str, float], counts: dict[str, int]) -> DeviceUpdate:
    names = list(rows)
    return DeviceUpdate(
        node,
        1,
        4,
        {
            "prompt.p_0": torch.tensor(p, dtype=torch.float32),
            "head.weight": torch.tensor([[rows[n], rows[n]] for n in names]),
            "head.bias": torch.tensor([rows[n] for n in names]),
        },
        names,
        [counts[n] for n in names],
        sum(counts.values()),
    )


def test_weighted_mean_and_rows_aligned_by_class_name() -> None:
    # a: 3 images, all of class c2; b: 1 image of c1 and 1 of c2, its rows in the other order
    a = _update("a", [[1, 1], [1, 1]], {"c2": 1.0}, {"c2": 3})
    b = _update("b", [[5, 9], [1, 5]], {"c2": 5.0, "c1": 4.0}, {"c2": 1, "c1": 1})
    new, refused = aggregate(_model(), [a, b], TASK)
    assert refused == {}
    assert new.version == 5 and new.task == 1 and new.classes == ["c0", "c1", "c2"]
    # prompts: (3 * a + 2 * b) / 5
    expected_p = torch.tensor([[(3 + 10) / 5, (3 + 18) / 5], [(3 + 2) / 5, (3 + 10) / 5]])
    assert torch.allclose(new.tensors["prompt.p_0"], expected_p, atol=1e-6)
    # head: c0 untouched (nobody sent it), c1 only from b, c2 = (3 * 1 + 1 * 5) / 4 = 2
    assert torch.allclose(new.tensors["head.weight"], torch.tensor([[7.0, 7], [4, 4], [2, 2]]), atol=1e-6)
    assert torch.allclose(new.tensors["head.bias"], torch.tensor([7.0, 4, 2]), atol=1e-6)


def test_a_class_nobody_sent_keeps_its_global_row() -> None:
    a = _update("a", [[2, 2], [2, 2]], {"c1": 3.0}, {"c1": 2})
    new, _ = aggregate(_model(), [a], TASK)
    assert new.tensors["head.weight"][2].tolist() == [0.0, 0.0]  # c2: global
    assert new.tensors["head.weight"][1].tolist() == [3.0, 3.0]
    assert new.tensors["prompt.p_0"].tolist() == [[2.0, 2.0], [2.0, 2.0]]


def _bad(kind: str) -> DeviceUpdate:
    u = _update("bad", [[100, 100], [100, 100]], {"c1": 100.0}, {"c1": 5})
    if kind == "shape":
        u.tensors["prompt.p_0"] = torch.zeros(3, 2)
    elif kind == "head-shape":
        u.tensors["head.weight"] = torch.zeros(2, 2)  # two rows, one class named
    elif kind == "task":
        u.task = 0
    elif kind == "version":
        u.version = 3
    elif kind == "class":
        u.head_classes = ["c0"]  # a row of an earlier task
    elif kind == "counts":
        u.num_examples = 9
    elif kind == "nan":
        u.tensors["prompt.p_0"][0, 0] = float("nan")
    elif kind == "missing":
        del u.tensors["head.bias"]
    elif kind == "dtype":
        u.tensors["prompt.p_0"] = torch.zeros(2, 2, dtype=torch.int64)
    elif kind == "examples":
        u.num_examples = 0
        u.class_counts = [0]
    return u


REASONS = {
    "shape": "shape",
    "head-shape": "shape",
    "task": "task",
    "version": "version",
    "class": "outside the task",
    "counts": "add up",
    "nan": "non-finite",
    "missing": "missing",
    "dtype": "dtype",
    "examples": "num_examples",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_malformed_update_is_refused_with_a_logged_reason(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = _update("good", [[1, 2], [3, 4]], {"c1": 1.0}, {"c1": 2})
    bad = _bad(kind)
    reason = check_update(bad, _model(), TASK)
    assert reason is not None and REASONS[kind] in reason, reason
    with caplog.at_level(logging.WARNING, logger="edgecl.fleet"):
        new, refused = aggregate(_model(), [good, bad], TASK)
    assert list(refused) == ["bad"] and REASONS[kind] in refused["bad"]
    assert any("bad" in r.getMessage() and REASONS[kind] in r.getMessage() for r in caplog.records)
    alone, _ = aggregate(_model(), [good], TASK)  # the refused update changed nothing
    for name in alone.tensors:
        assert torch.equal(new.tensors[name], alone.tensors[name]), name


def test_no_acceptable_update_leaves_the_model_and_its_version() -> None:
    model = _model()
    new, refused = aggregate(model, [_bad("shape")], TASK)
    assert new is model and new.version == 4 and list(refused) == ["bad"]
