"""``edgecl fleet``: fleet learning on Flower (a SuperLink, one SuperNode per device, the edgecl apps).

``app`` writes the Flower app project (the run config: tasks, rounds, recipe); ``server`` starts the
SuperLink; ``device`` starts a SuperNode that trains on this device's images; ``run`` submits the app to
the SuperLink and streams its log. Flower is imported only by these subcommands (``edgecl[fleet]``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgecl.fleet import FLWR_HINT


def _tls(parser: argparse.ArgumentParser, server: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--insecure", action="store_true", help="plain HTTP (a trusted network or a test only)"
    )
    if server:
        group.add_argument(
            "--certificates",
            metavar="DIR",
            help="TLS: DIR/ca.crt, DIR/server.pem, DIR/server.key (see the README for the openssl commands)",
        )
    else:
        group.add_argument("--root-certificates", metavar="FILE", help="TLS: the CA certificate (ca.crt)")


def register(subparsers: Any) -> None:
    """Add ``fleet`` and its subcommands."""
    parser = subparsers.add_parser(
        "fleet",
        help="learn one task stream on many devices with Flower (only prompts and heads travel)",
        description="Fleet learning on Flower: see the README's Fleet section. Needs " + FLWR_HINT + ".",
    )
    sub = parser.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")

    app = sub.add_parser("app", help="write the Flower app project (run config) for `edgecl fleet run`")
    app.add_argument("dir", metavar="DIR")
    app.add_argument("--tasks", type=int, default=5)
    app.add_argument(
        "--classes",
        default="",
        help="comma-separated fleet class order (default: the sorted union of the devices' classes)",
    )
    app.add_argument("--rounds", type=int, default=3, help="rounds per task (default 3)")
    app.add_argument("--method", default="cps_prompt", choices=("cps_prompt", "coda_prompt"))
    app.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    app.add_argument("--epochs", type=int, default=2, help="local epochs per round (default 2)")
    app.add_argument("--batch-size", type=int, default=16)
    app.add_argument("--backbone", default="vit_tiny_patch16_224")
    app.add_argument("--img-size", type=int)
    app.add_argument("--patch-size", type=int)
    app.add_argument("--seed", type=int, default=0)
    app.add_argument("--fraction-train", type=float, default=1.0)
    app.add_argument("--min-train-nodes", type=int, default=1)
    app.add_argument("--min-available-nodes", type=int, default=2)
    app.add_argument("--min-train-replies", type=int, default=1)
    app.add_argument("--round-timeout", type=float, default=600.0, metavar="SECONDS")
    app.add_argument("--no-evaluate", action="store_true", help="devices skip the per-round evaluation")
    app.add_argument("--out", metavar="FILE", help="history JSON written by the ServerApp")
    app.set_defaults(func=run_app)

    server = sub.add_parser("server", help="start the Flower SuperLink (flower-superlink)")
    _tls(server, server=True)
    server.add_argument("--host", default="0.0.0.0")
    server.add_argument("--port", type=int, default=9093, help="the SuperLink's one HTTP(S) port")
    server.add_argument("--database", metavar="FILE", help="SuperLink state file (default: in memory)")
    server.add_argument(
        "--enable-supernode-auth",
        action="store_true",
        help="only SuperNodes registered with `flwr supernode register` may connect",
    )
    server.set_defaults(func=run_server)

    device = sub.add_parser("device", help="start a Flower SuperNode that trains on this device's images")
    _tls(device, server=False)
    device.add_argument("--superlink", required=True, metavar="HOST:PORT")
    source = device.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="ImageFolder root: train/<class>/* (+ val/<class>/*)")
    source.add_argument("--store", metavar="DIR", help="a daemon's data dir (edgecl serve --data-dir)")
    device.add_argument("--work-dir", required=True, metavar="DIR", help="committed model and round state")
    device.add_argument("--weights", metavar="FILE", help="backbone weights on this device")
    device.add_argument("--device", help="torch device (default cpu)")
    device.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    device.add_argument("--threads", type=int)
    device.add_argument("--memory-budget-mb", type=float)
    device.add_argument("--profile", help="device profile for the memory planner")
    device.add_argument("--auth-private-key", metavar="FILE", help="SuperNode authentication key (EC, PEM)")
    device.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's runtime API")
    device.set_defaults(func=run_device)

    run = sub.add_parser("run", help="submit the app to the SuperLink and stream its log (flwr run)")
    run.add_argument("dir", metavar="DIR", help="the app project written by `edgecl fleet app`")
    run.add_argument("--superlink", required=True, metavar="HOST:PORT")
    group = run.add_mutually_exclusive_group(required=True)
    group.add_argument("--insecure", action="store_true")
    group.add_argument("--root-certificates", metavar="FILE")
    run.add_argument("--flwr-home", metavar="DIR", help="Flower's config folder (default DIR-flwr-home)")
    run.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run-config value, as `flwr run --run-config`",
    )
    run.set_defaults(func=run_run)
    parser.set_defaults(func=lambda _a: parser.print_help() or 2)


def _tool(name: str) -> str:
    """A Flower executable next to this interpreter (or on PATH), or the install hint."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: edgecl fleet needs Flower, {FLWR_HINT}")
    return found


def _call(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run a Flower tool with its own folder first on PATH (it starts flower-superexec, flwr-clientapp, ...
    by name)."""
    env = dict(env or os.environ)
    env["PATH"] = os.pathsep.join([str(Path(cmd[0]).parent), env.get("PATH", "")])
    return subprocess.call(cmd, env=env)


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_app(args: argparse.Namespace) -> int:
    """Write the app project."""
    from edgecl.fleet import require_flwr

    require_flwr()
    from edgecl.fleet.flower import write_app
    from edgecl.fleet.server import FleetConfig

    spec: dict[str, Any] = {
        "method": args.method,
        "method_options": _parse_set(args.set),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "backbone": args.backbone,
        "seed": args.seed,
    }
    if args.img_size:
        spec["img_size"] = args.img_size
    if args.patch_size:
        spec["patch_size"] = args.patch_size
    config = FleetConfig(
        tasks=args.tasks,
        classes=[c.strip() for c in args.classes.split(",") if c.strip()],
        rounds=args.rounds,
        fraction_train=args.fraction_train,
        min_train_nodes=args.min_train_nodes,
        min_available_nodes=args.min_available_nodes,
        min_train_replies=args.min_train_replies,
        round_timeout_s=args.round_timeout,
        evaluate=not args.no_evaluate,
        seed=args.seed,
        spec=spec,
        out=str(Path(args.out).resolve()) if args.out else None,
    )
    path = write_app(args.dir, config)
    print(f"wrote the Flower app project {path / 'pyproject.toml'}")
    return 0


def run_server(args: argparse.Namespace) -> int:
    """flower-superlink with edgecl's settings (no run-time dependency installation: offline devices)."""
    cmd = [_tool("flower-superlink"), "--host", args.host, "--port", str(args.port)]
    cmd.append("--disable-runtime-dependency-installation")
    if args.insecure:
        cmd.append("--insecure")
    else:
        d = Path(args.certificates)
        files = {
            "--ssl-ca-certfile": d / "ca.crt",
            "--ssl-certfile": d / "server.pem",
            "--ssl-keyfile": d / "server.key",
        }
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--certificates {d}: missing {missing} (README, Fleet: TLS)")
        for flag, path in files.items():
            cmd += [flag, str(path)]
    if args.database:
        cmd += ["--database", args.database]
    if args.enable_supernode_auth:
        cmd.append("--enable-supernode-auth")
    return _call(cmd)


def _quote(value: Any) -> str:
    return json.dumps(str(value)) if isinstance(value, (str, Path)) else str(value)


def run_device(args: argparse.Namespace) -> int:
    """flower-supernode with this device's --node-config."""
    node: dict[str, Any] = {"work-dir": Path(args.work_dir).resolve()}
    if args.store:
        if not (Path(args.store) / "edgecl.db").is_file():
            raise FileNotFoundError(f"--store {args.store}: no edgecl.db (a daemon's --data-dir is expected)")
        node["store"] = Path(args.store).resolve()
    else:
        if not (Path(args.data) / "train").is_dir():
            raise FileNotFoundError(
                f"--data {args.data}: no train/ folder (ImageFolder layout: train/<class>/*)"
            )
        node["data"] = Path(args.data).resolve()
    for key in ("weights", "device", "precision", "threads", "memory_budget_mb", "profile"):
        value = getattr(args, key)
        if value is not None:
            node[key.replace("_", "-")] = Path(value).resolve() if key == "weights" else value
    cmd = [_tool("flower-supernode"), "--superlink", args.superlink, "--port", str(args.port)]
    cmd += ["--insecure"] if args.insecure else ["--root-certificates", args.root_certificates]
    if args.auth_private_key:
        cmd += ["--auth-supernode-private-key", args.auth_private_key]
    cmd += ["--node-config", " ".join(f"{k}={_quote(v)}" for k, v in node.items())]
    return _call(cmd)


def run_run(args: argparse.Namespace) -> int:
    """``flwr run DIR`` against ``--superlink``, with a connection kept in its own Flower config folder."""
    app = Path(args.dir).resolve()
    if not (app / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app} has no pyproject.toml: write it with `edgecl fleet app {args.dir}`")
    home = Path(args.flwr_home).resolve() if args.flwr_home else app.with_name(app.name + "-flwr-home")
    home.mkdir(parents=True, exist_ok=True)
    conn = [f'address = "{args.superlink}"']
    conn.append(
        "insecure = true"
        if args.insecure
        else f"root-certificates = {json.dumps(str(Path(args.root_certificates).resolve()))}"
    )
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "edgecl"\n\n[superlink.edgecl]\n' + "\n".join(conn) + "\n"
    )
    cmd = [_tool("flwr"), "run", str(app), "edgecl", "--stream"]
    for item in args.run_config:
        cmd += ["--run-config", item]
    return _call(cmd, {**os.environ, "FLWR_HOME": str(home)})
