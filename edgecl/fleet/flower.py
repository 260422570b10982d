"""The Flower side: an edgecl ServerApp and ClientApp (Message API), and the Flower app project they run in.

``flower-superlink`` hosts the run, one ``flower-supernode`` per device runs the ClientApp with that device's
``--node-config`` (its data folder, weights, compute device, work folder), and ``flwr run <app dir>`` starts
the ServerApp, which drives :class:`~edgecl.fleet.server.FleetServer` over Flower's grid. The fleet's
settings are the app's run config (``[tool.flwr.app.config]`` of the project written by
:func:`write_app`; override with ``flwr run --run-config``). This is the only edgecl module that imports
``flwr``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgecl.fleet import require_flwr

require_flwr()

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from edgecl.fleet.aggregate import DeviceUpdate, GlobalModel  # noqa: E402
from edgecl.fleet.device import FleetDevice, LocalData  # noqa: E402
from edgecl.fleet.protocol import EvalReply, EvalRequest, TrainReply, TrainRequest  # noqa: E402
from edgecl.fleet.server import FleetConfig, FleetServer  # noqa: E402

__all__ = [
    "GridTransport",
    "client_app",
    "config_from_run_config",
    "device_from_node_config",
    "server_app",
    "write_app",
]

log = logging.getLogger("edgecl.fleet")

QUERY, TRAIN, EVALUATE = "query", "train", "evaluate"


# ---- records <-> protocol ---------------------------------------------------------------------------
def _model_records(model: GlobalModel) -> dict[str, Any]:
    return {
        "model": ArrayRecord({k: v.detach().cpu().contiguous() for k, v in model.tensors.items()}),
        "model-config": ConfigRecord(
            {
                "classes": json.dumps(model.classes),
                "method-meta": json.dumps(model.method_meta),
                "task": model.task,
                "version": model.version,
            }
        ),
    }


def _model_from(content: RecordDict) -> GlobalModel:
    cfg = content.config_records["model-config"]
    return GlobalModel(
        dict(content.array_records["model"].to_torch_state_dict()),
        list(json.loads(str(cfg["classes"]))),
        dict(json.loads(str(cfg["method-meta"]))),
        int(cfg["task"]),  # type: ignore[arg-type]
        int(cfg["version"]),  # type: ignore[arg-type]
    )


def _request_config(spec: dict[str, Any], plan: list[list[str]], **extra: Any) -> ConfigRecord:
    return ConfigRecord({"spec": json.dumps(spec), "plan": json.dumps(plan), **extra})


def _evaluation_metrics(evaluation: Sequence[tuple[int, int]]) -> MetricRecord:
    return MetricRecord(
        {"correct": [int(c) for c, _ in evaluation] or [0], "total": [int(n) for _, n in evaluation] or [0]}
    )


def _evaluation_from(metrics: MetricRecord) -> list[tuple[int, int]]:
    pairs = list(zip(metrics["correct"], metrics["total"], strict=True))  # type: ignore[arg-type]
    return [(int(c), int(n)) for c, n in pairs if n]


def update_from(content: RecordDict, node: str) -> DeviceUpdate | None:
    """A device's update from its reply (values as sent: the server checks them before use)."""
    if "update" not in content.array_records:
        return None
    cfg = content.config_records["update-config"]
    return DeviceUpdate(
        node,
        int(cfg["task"]),  # type: ignore[arg-type]
        int(cfg["version"]),  # type: ignore[arg-type]
        dict(content.array_records["update"].to_torch_state_dict()),
        list(json.loads(str(cfg["head-classes"]))),
        list(json.loads(str(cfg["class-counts"]))),
        json.loads(str(cfg["num-examples"])),
    )


# ---- the server ---------------------------------------------------------------------------------------
class GridTransport:
    """:class:`~edgecl.fleet.server.Transport` over Flower's grid: one message per sampled node, replies
    collected until the round's timeout (a node that does not answer in time has dropped out)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self._group = 0

    def nodes(self) -> list[str]:
        """Connected SuperNodes."""
        return [str(n) for n in self.grid.get_node_ids()]

    def wait_for(self, count: int, timeout_s: float) -> list[str]:
        """Poll until ``count`` SuperNodes are connected."""
        deadline = time.monotonic() + timeout_s
        while len(nodes := self.nodes()) < count and time.monotonic() < deadline:
            log.info("waiting for devices: %d connected, %d needed", len(nodes), count)
            time.sleep(1.0)
        return nodes

    def _send(self, records: dict[str, RecordDict], kind: str, timeout_s: float) -> dict[str, Message]:
        self._group += 1
        messages = [
            Message(content=rd, message_type=kind, dst_node_id=int(n), group_id=str(self._group))
            for n, rd in records.items()
        ]
        replies = self.grid.send_and_receive(messages, timeout=timeout_s)
        return {str(m.metadata.src_node_id): m for m in replies}

    def query(self, nodes: Sequence[str], timeout_s: float) -> dict[str, list[str]]:
        """Each device's class names."""
        out: dict[str, list[str]] = {}
        for n, m in self._send({n: RecordDict() for n in nodes}, QUERY, timeout_s).items():
            if not m.has_error():
                out[n] = list(json.loads(str(m.content.config_records["classes"]["names"])))
        return out

    def train(self, requests: dict[str, TrainRequest], timeout_s: float) -> dict[str, TrainReply | str]:
        """Send the round; decode what comes back (a Flower error reply becomes its reason)."""
        records = {}
        for n, req in requests.items():
            records[n] = RecordDict(
                {
                    **_model_records(req.model),
                    "config": _request_config(
                        req.spec, req.plan, task=req.task, round=req.round, evaluate=req.evaluate
                    ),
                }
            )
        out: dict[str, TrainReply | str] = {}
        for n, m in self._send(records, TRAIN, timeout_s).items():
            if m.has_error():
                out[n] = f"error reply: {m.error.reason}"
                continue
            try:
                metrics = m.content.metric_records["metrics"]
                out[n] = TrainReply(
                    update_from(m.content, n),
                    _evaluation_from(metrics),
                    float(metrics["train-seconds"]),  # type: ignore[arg-type]
                )
            except (KeyError, ValueError, TypeError) as err:
                out[n] = f"malformed reply: {err!r}"
        return out

    def evaluate(self, requests: dict[str, EvalRequest], timeout_s: float) -> dict[str, EvalReply | str]:
        """Final evaluation (and commit) of the global model on every device."""
        records = {
            n: RecordDict({**_model_records(r.model), "config": _request_config(r.spec, r.plan, save=r.save)})
            for n, r in requests.items()
        }
        out: dict[str, EvalReply | str] = {}
        for n, m in self._send(records, EVALUATE, timeout_s).items():
            if m.has_error():
                out[n] = f"error reply: {m.error.reason}"
                continue
            cfg = m.content.config_records["result"]
            out[n] = EvalReply(
                _evaluation_from(m.content.metric_records["metrics"]),
                str(cfg["digest"]),
                str(cfg["model-dir"]) or None,
            )
        return out


def config_from_run_config(run_config: dict[str, Any]) -> FleetConfig:
    """The fleet's settings from the app's run config (keys as written by :func:`write_app`)."""
    classes = str(run_config.get("classes", "")).strip()
    return FleetConfig(
        tasks=int(run_config.get("tasks", 5)),
        classes=[c.strip() for c in classes.split(",") if c.strip()],
        rounds=int(run_config.get("rounds", 3)),
        fraction_train=float(run_config.get("fraction-train", 1.0)),
        min_train_nodes=int(run_config.get("min-train-nodes", 1)),
        min_available_nodes=int(run_config.get("min-available-nodes", 1)),
        min_train_replies=int(run_config.get("min-train-replies", 1)),
        round_timeout_s=float(run_config.get("round-timeout", 600.0)),
        evaluate=bool(run_config.get("evaluate", True)),
        seed=int(run_config.get("seed", 0)),
        spec=dict(json.loads(str(run_config.get("recipe", "{}")))),
        out=str(run_config.get("out", "")) or None,
    )


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """Run the fleet: every task, every round, then the final evaluation."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    config = config_from_run_config(dict(context.run_config))
    result = FleetServer(config).run(GridTransport(grid))
    log.info("fleet done: final accuracy per task %s", result["final"].get("accuracy"))


# ---- the device -------------------------------------------------------------------------------------------
NODE_KEYS = (
    "data",
    "store",
    "work-dir",
    "weights",
    "device",
    "precision",
    "threads",
    "memory-budget-mb",
    "profile",
)
"""``--node-config`` keys of a SuperNode: its images (``data``: an ImageFolder root with ``train/`` and
``val/``, or ``store``: a daemon's data dir), a folder for its committed model and round state, and its own
RunSpec fields."""


def device_from_node_config(node_config: dict[str, Any], node_id: int | str = "device") -> FleetDevice:
    """The :class:`FleetDevice` a SuperNode's ``--node-config`` describes."""
    unknown = sorted(set(node_config) - set(NODE_KEYS) - {"limit-per-class"})
    if unknown:
        raise ValueError(f"unknown --node-config keys {unknown}; known: {NODE_KEYS + ('limit-per-class',)}")
    if ("data" in node_config) == ("store" in node_config) or "work-dir" not in node_config:
        raise ValueError(
            "--node-config needs work-dir=<folder> and one of data=<ImageFolder root> "
            "or store=<daemon data dir>"
        )
    limit = node_config.get("limit-per-class")
    if "store" in node_config:
        data = LocalData.from_store(str(node_config["store"]))
    else:
        data = LocalData.from_image_folder(str(node_config["data"]), int(limit) if limit else None)
    local: dict[str, Any] = {}
    for key in ("weights", "device", "precision", "profile"):
        if key in node_config:
            local[key] = str(node_config[key])
    if "threads" in node_config:
        local["threads"] = int(node_config["threads"])
    if "memory-budget-mb" in node_config:
        local["memory_budget_mb"] = float(node_config["memory-budget-mb"])
    return FleetDevice(data, str(node_config["work-dir"]), local=local, name=str(node_id))


client_app = ClientApp()


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    """Report the device's class names (never its images)."""
    device = device_from_node_config(dict(context.node_config), context.node_id)
    names = ConfigRecord({"names": json.dumps(device.classes())})
    return Message(RecordDict({"classes": names}), reply_to=msg)


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    """One round on the device's own images; only the trainable tensors and counts go back."""
    device = device_from_node_config(dict(context.node_config), context.node_id)
    cfg = msg.content.config_records["config"]
    request = TrainRequest(
        json.loads(str(cfg["spec"])),
        json.loads(str(cfg["plan"])),
        int(cfg["task"]),  # type: ignore[arg-type]
        int(cfg["round"]),  # type: ignore[arg-type]
        _model_from(msg.content),
        bool(cfg["evaluate"]),
    )
    reply = device.train(request)
    metrics = _evaluation_metrics(reply.evaluation)
    metrics["train-seconds"] = float(reply.train_seconds)
    metrics["num-examples"] = reply.update.num_examples if reply.update is not None else 0
    content = RecordDict({"metrics": metrics})
    if reply.update is not None:
        u = reply.update
        content["update"] = ArrayRecord(u.tensors)
        content["update-config"] = ConfigRecord(
            {
                "task": u.task,
                "version": u.version,
                "head-classes": json.dumps(u.head_classes),
                "class-counts": json.dumps(u.class_counts),
                "num-examples": json.dumps(u.num_examples),
            }
        )
    return Message(content, reply_to=msg)


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model and commit it as the device's model."""
    device = device_from_node_config(dict(context.node_config), context.node_id)
    cfg = msg.content.config_records["config"]
    request = EvalRequest(
        json.loads(str(cfg["spec"])),
        json.loads(str(cfg["plan"])),
        _model_from(msg.content),
        bool(cfg["save"]),
    )
    reply = device.evaluate(request)
    result = ConfigRecord({"digest": reply.digest, "model-dir": reply.model_dir or ""})
    return Message(
        RecordDict({"metrics": _evaluation_metrics(reply.evaluation), "result": result}), reply_to=msg
    )


# ---- the Flower app project ------------------------------------------------------------------------------
def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_app(directory: str | Path, config: FleetConfig, name: str = "edgecl-fleet") -> Path:
    """Write the Flower app project (``pyproject.toml``) that ``flwr run`` ships to the SuperLink.

    The components are edgecl's own apps, imported from the installed package: edgecl[fleet] must be
    installed on the SuperLink's machine and on every SuperNode (the project lists no dependencies, so
    Flower has nothing to install at run time).
    """
    config.validate()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    run_config = {
        "tasks": config.tasks,
        "classes": ",".join(config.classes),
        "rounds": config.rounds,
        "fraction-train": float(config.fraction_train),
        "min-train-nodes": config.min_train_nodes,
        "min-available-nodes": config.min_available_nodes,
        "min-train-replies": config.min_train_replies,
        "round-timeout": float(config.round_timeout_s),
        "evaluate": config.evaluate,
        "seed": config.seed,
        "recipe": json.dumps(config.spec, sort_keys=True),
        "out": config.out or "",
    }
    lines = [
        "# A Flower app that runs edgecl's fleet ServerApp/ClientApp (written by `edgecl fleet app`).",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f"name = {_toml(name)}",
        'version = "1.0.0"',
        'description = "edgecl fleet learning: prompts and heads federated over Flower"',
        'license = "Apache-2.0"',
        "dependencies = []  # edgecl[fleet] is installed on the SuperLink and every SuperNode",
        "",
        "[tool.flwr.app]",
        'publisher = "edgecl"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "edgecl.fleet.flower:server_app"',
        'clientapp = "edgecl.fleet.flower:client_app"',
        "",
        "[tool.flwr.app.config]",
        *[f"{k} = {_toml(v)}" for k, v in run_config.items()],
        "",
    ]
    (d / "pyproject.toml").write_text("\n".join(lines))
    (d / "README.md").write_text(
        "edgecl fleet app: `flwr run . <superlink connection> --stream` "
        "(see the Fleet section of edgecl's README).\n"
    )
    return d
