"""The fleet server's strategy: per task, R rounds of train-and-aggregate over whichever devices answer.

Transport-agnostic: :class:`FleetServer` talks to devices through a :class:`Transport` (the Flower grid in
:mod:`edgecl.fleet.flower`, direct calls in :class:`LocalTransport` for the simulation and the bench).

The server holds the method's trainable state with a randomly initialised backbone of the recipe's
architecture (shapes only: the backbone never runs here) and allocates each task itself (``begin_task``
under the trainer's seed), so every device of a round starts from the same tensors and a device that
missed rounds, or joins late, simply trains from the global model it is sent.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from edgecl.data.stream import split_tasks
from edgecl.fleet.aggregate import GlobalModel, Statistics, aggregate, weighted_accuracy
from edgecl.fleet.closed_form import closed_form_statistics
from edgecl.fleet.device import FleetDevice
from edgecl.fleet.protocol import EvalReply, EvalRequest, TrainReply, TrainRequest
from edgecl.methods.base import Phase, TaskInfo
from edgecl.methods.registry import create_method
from edgecl.runner import RunSpec, build_backbone
from edgecl.train.trainer import derive_seed

__all__ = ["FLEET_METHODS", "FleetConfig", "FleetServer", "LocalTransport", "Transport"]

log = logging.getLogger("edgecl.fleet")

FLEET_METHODS = ("cps_prompt", "coda_prompt")
"""Methods whose only class-indexed tensors are the head and whose ``end_task`` needs no data (so the
server can finish a task without images). Others keep per-class statistics the server cannot average."""


@dataclass
class FleetConfig:
    """One fleet run: the stream, the rounds, the sampling and the training recipe."""

    tasks: int = 5
    classes: list[str] = field(default_factory=list)
    """The fleet's class order; empty = the sorted union of the classes the devices report."""
    rounds: int = 3
    """Rounds per task; each round every sampled device trains ``spec['epochs']`` local epochs."""
    fraction_train: float = 1.0
    """Share of the connected devices sampled per round."""
    min_train_nodes: int = 1
    """Devices sampled at least, per round."""
    min_available_nodes: int = 1
    """Devices that must be connected before the first round (later rounds use whoever is there)."""
    min_train_replies: int = 1
    """Accepted updates a round needs to change the model; with fewer the global model stays as it was
    (a device that drops out only removes its own update)."""
    round_timeout_s: float = 600.0
    """How long a round waits for replies; a device slower than this is treated as dropped out."""
    evaluate: bool = True
    """Devices evaluate the model they receive on their own test images (the per-round history)."""
    seed: int = 0
    """Node sampling seed."""
    spec: dict[str, Any] = field(default_factory=dict)
    """The training recipe: ``RunSpec`` fields (method, method_options, epochs, batch_size, seed, backbone,
    img_size, patch_size); each device adds its own weights, compute device and budget."""
    out: str | None = None
    """Where the history JSON is written (rounds, accepted/refused updates, accuracy, bytes)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and a value that works."""
        if self.tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {self.tasks}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        for name in ("min_train_nodes", "min_available_nodes", "min_train_replies"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        method = self.spec.get("method", RunSpec.method)
        if method not in FLEET_METHODS:
            raise ValueError(f"method {method!r} cannot be federated; use one of {FLEET_METHODS}")
        if self.classes and len(self.classes) % self.tasks:
            raise ValueError(
                f"{len(self.classes)} classes cannot be split into tasks={self.tasks} equal tasks"
            )


class Transport(Protocol):
    """How the server reaches devices (Flower's grid, or direct calls)."""

    def nodes(self) -> list[str]:
        """Devices connected now."""
        ...

    def wait_for(self, count: int, timeout_s: float) -> list[str]:
        """Block until ``count`` devices are connected (or the timeout); the connected ones."""
        ...

    def query(self, nodes: Sequence[str], timeout_s: float) -> dict[str, list[str]]:
        """Each device's class names (devices that do not answer are left out)."""
        ...

    def train(self, requests: dict[str, TrainRequest], timeout_s: float) -> dict[str, TrainReply | str]:
        """Replies by node; a string is the error of a device that failed or dropped out."""
        ...

    def evaluate(self, requests: dict[str, EvalRequest], timeout_s: float) -> dict[str, EvalReply | str]:
        """Replies by node; a string is an error."""
        ...


class LocalTransport:
    """Direct calls to :class:`FleetDevice` objects in this process (simulation, bench, tests).

    ``offline`` holds the nodes that are down right now: a test or a bench takes devices off and back on.
    """

    def __init__(self, devices: dict[str, FleetDevice]) -> None:
        self.devices = devices
        self.offline: set[str] = set()

    def nodes(self) -> list[str]:
        """Devices not marked offline."""
        return [n for n in self.devices if n not in self.offline]

    def wait_for(self, count: int, timeout_s: float) -> list[str]:
        """No waiting in-process."""
        return self.nodes()

    def query(self, nodes: Sequence[str], timeout_s: float) -> dict[str, list[str]]:
        """Class names of the online devices."""
        return {n: self.devices[n].classes() for n in nodes if n not in self.offline}

    def train(self, requests: dict[str, TrainRequest], timeout_s: float) -> dict[str, TrainReply | str]:
        """Train each online device in turn."""
        out: dict[str, TrainReply | str] = {}
        for n, req in requests.items():
            out[n] = "offline" if n in self.offline else self.devices[n].train(req)
        return out

    def evaluate(self, requests: dict[str, EvalRequest], timeout_s: float) -> dict[str, EvalReply | str]:
        """Evaluate on each online device."""
        out: dict[str, EvalReply | str] = {}
        for n, req in requests.items():
            out[n] = "offline" if n in self.offline else self.devices[n].evaluate(req)
        return out


class FleetServer:
    """Runs :class:`FleetConfig` over a :class:`Transport`; ``history`` records every round."""

    def __init__(self, config: FleetConfig) -> None:
        config.validate()
        self.config = config
        self.spec = RunSpec(**{k: v for k, v in config.spec.items() if k not in ("weights", "pretrained")})
        self.rng = random.Random(config.seed)
        self.plan: list[list[str]] = []
        self.model: GlobalModel | None = None
        self.history: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        self.on_round: Any = None
        """Optional hook ``f(server, record)`` after every round (the simulation takes devices off there)."""
        self.stats: Statistics | None = None
        """How the method's closed-form head aggregates (None: an SGD head, rows averaged)."""

    # ---- set-up ----------------------------------------------------------------------------------
    def class_plan(self, transport: Transport, nodes: Sequence[str]) -> list[list[str]]:
        """The fleet's tasks: the configured classes, or the sorted union of the devices' classes."""
        names = list(self.config.classes)
        if not names:
            reported = transport.query(nodes, self.config.round_timeout_s)
            names = sorted({c for cls in reported.values() for c in cls})
            log.info("class plan from %d devices: %d classes", len(reported), len(names))
            if not names or len(names) % self.config.tasks:
                raise ValueError(
                    f"the devices report {len(names)} classes, which cannot be split into "
                    f"tasks={self.config.tasks} equal tasks; set tasks to a divisor or list the classes"
                )
        return [[names[i] for i in ids] for ids in split_tasks(len(names), self.config.tasks)]

    def _recipe(self) -> dict[str, Any]:
        recipe = dict(self.config.spec)
        options = dict(recipe.get("method_options", {}))
        options.setdefault("expected_tasks", len(self.plan))
        recipe["method_options"] = options
        return recipe

    def _sample(self, nodes: Sequence[str]) -> list[str]:
        want = max(self.config.min_train_nodes, int(len(nodes) * self.config.fraction_train))
        return sorted(self.rng.sample(list(nodes), min(want, len(nodes))))

    # ---- the run -----------------------------------------------------------------------------------
    def run(self, transport: Transport) -> dict[str, Any]:
        """Every task, every round, then a final evaluation (devices commit the global model)."""
        t_start = time.perf_counter()
        nodes = transport.wait_for(self.config.min_available_nodes, self.config.round_timeout_s)
        if len(nodes) < self.config.min_available_nodes:
            raise RuntimeError(
                f"{len(nodes)} devices connected, min_available_nodes={self.config.min_available_nodes}"
            )
        self.plan = self.class_plan(transport, nodes)
        recipe = self._recipe()
        spec = RunSpec(**{**asdict(self.spec), "method_options": recipe["method_options"]})
        torch.manual_seed(spec.seed)  # as build_run: the method's initial tensors
        method = create_method(spec.method, build_backbone(spec), dict(spec.method_options))
        self.stats = closed_form_statistics(method)
        if self.stats is not None and all(
            method.phase(e, spec.epochs) is not Phase.HEAD for e in range(spec.epochs)
        ):
            raise ValueError(
                f"a closed-form head is fitted in phase 2, which epochs={spec.epochs} never reaches: "
                "raise epochs (or min_prompt_epochs/phase_ratio lower)"
            )
        names: list[str] = []
        version = 0
        for t, task_names in enumerate(self.plan):
            n_past = len(names)
            names = names + task_names
            info = TaskInfo(index=t, classes=list(range(n_past, len(names))), n_past=n_past)
            torch.manual_seed(derive_seed(spec.seed, t, "begin"))  # as the trainer
            method.begin_task(info)
            version += 1
            self.model = GlobalModel(
                {k: v.detach().clone() for k, v in method.trainable_state_dict().items()},
                list(names),
                method.checkpoint_meta(),
                t,
                version,
            )
            for r in range(self.config.rounds):
                self._round(transport, recipe, t, r)
                method.load_state_dict(self.model.tensors, strict=False)
            method.end_task(info, [])
            self.model.method_meta = method.checkpoint_meta()
            if self.stats is not None:  # the task's Gram matrix folded into the past one, as on a device
                self.model.tensors = {k: v.detach().clone() for k, v in method.trainable_state_dict().items()}
            version = self.model.version
        self._final(transport, recipe)
        self.final["wall_seconds"] = time.perf_counter() - t_start
        self._write()
        return {"plan": self.plan, "history": self.history, "final": self.final}

    def _round(self, transport: Transport, recipe: dict[str, Any], t: int, r: int) -> None:
        assert self.model is not None
        t0 = time.perf_counter()
        sampled = self._sample(transport.nodes())
        request = TrainRequest(recipe, self.plan[: t + 1], t, r, self.model, self.config.evaluate)
        replies = transport.train(dict.fromkeys(sampled, request), self.config.round_timeout_s)
        updates, failed, empty, evaluation = [], {}, [], []
        for n in sampled:
            reply = replies.get(n, "no reply before the round's timeout")
            if isinstance(reply, str):
                failed[n] = reply
                log.warning("task %d round %d: device %s dropped out: %s", t, r, n, reply)
                continue
            evaluation.append(reply.evaluation)
            if reply.update is None:
                empty.append(n)
            else:
                reply.update.node = n
                updates.append(reply.update)
        model, refused = aggregate(self.model, updates, self.plan[t], stats=self.stats)
        accepted = [u.node for u in updates if u.node not in refused]
        if len(accepted) < self.config.min_train_replies:
            log.warning(
                "task %d round %d: %d accepted updates < min_train_replies=%d; the model is unchanged",
                t,
                r,
                len(accepted),
                self.config.min_train_replies,
            )
        else:
            self.model = model
        record = {
            "task": t,
            "round": r,
            "version": self.model.version,
            "sampled": sampled,
            "accepted": accepted,
            "refused": refused,
            "dropped": failed,
            "no_data": empty,
            "received_accuracy": _per_task(evaluation),
            "bytes_down_per_device": request.model.nbytes(),
            "bytes_up": {u.node: u.nbytes() for u in updates},
            "seconds": time.perf_counter() - t0,
        }
        self.history.append(record)
        log.info(
            "task %d round %d: %d/%d updates accepted, received-model accuracy %s",
            t,
            r,
            len(accepted),
            len(sampled),
            record["received_accuracy"],
        )
        if self.on_round is not None:
            self.on_round(self, record)

    def _final(self, transport: Transport, recipe: dict[str, Any]) -> None:
        assert self.model is not None
        nodes = transport.nodes()
        replies = transport.evaluate(
            {n: EvalRequest(recipe, self.plan, self.model, True) for n in nodes}, self.config.round_timeout_s
        )
        ok = {n: r for n, r in replies.items() if not isinstance(r, str)}
        self.final = {
            "version": self.model.version,
            "accuracy": _per_task([r.evaluation for r in ok.values()]),
            "digests": {n: r.digest for n, r in ok.items()},
            "model_dirs": {n: r.model_dir for n, r in ok.items()},
            "failed": {n: r for n, r in replies.items() if isinstance(r, str)},
        }

    def _write(self) -> None:
        if self.config.out:
            path = Path(self.config.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            doc = {
                "config": asdict(self.config),
                "plan": self.plan,
                "history": self.history,
                "final": self.final,
            }
            path.write_text(json.dumps(doc, indent=1, default=str))


def _per_task(evaluations: Sequence[Sequence[tuple[int, int]]]) -> list[float]:
    """Pooled accuracy per task over devices (each evaluation is (correct, total) per task)."""
    if not evaluations:
        return []
    width = max(len(e) for e in evaluations)
    return [weighted_accuracy([e[j] for e in evaluations if len(e) > j]) for j in range(width)]
