"""The GPU check's markdown summary, from its JSON report."""

from __future__ import annotations

from typing import Any


def _f(value: Any, fmt: str = ".1f", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, (int, float)):
        return format(value, fmt)
    return str(value)


def render_summary(report: dict[str, Any]) -> str:
    """The markdown summary: machine, one line per unit, then the tables of each step."""
    units = report["units"]
    m = report["machine"]
    lines = [
        f"# edgecl GPU check ({report['mode']})",
        "",
        f"Machine: {m.get('gpu') or 'no GPU'}; CPU {m.get('cpu')} ({m.get('cores')} cores); "
        f"torch {m.get('torch')} "
        f"(CUDA {m.get('torch_cuda')}); Python {m.get('python')}. Data: {report['data']}; weights: "
        f"{report['weights'] or 'random ViT'}. Wall time {report['wall_seconds']} s. Units: "
        + ", ".join(f"{v} {k}" for k, v in report["counts"].items()),
        "",
        "| unit | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, u in units.items():
        note = (u.get("error") or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {name} | {u['status']} | {_f(u.get('seconds'))} | {note} |")
    train = [u["result"] for n, u in units.items() if n.startswith("train:") and u.get("result")]
    if train:
        lines += [
            "",
            "## Training (per task: accuracy over seen classes, train s, CUDA peak MB, energy J, W)",
            "",
        ]
        lines += ["| method | task | acc | train s | CUDA alloc | CUDA reserved | energy J | mean W |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for r in train:
            for t in r["tasks"]:
                energy = _f(t["energy_j"], none="no sensor")
                lines.append(
                    f"| {r['method']} | {t['task'] + 1} | {100 * t['average_accuracy']:.1f}% | "
                    f"{_f(t['train_seconds'], '.2f')} | {_f(t['peak_cuda_allocated_mb'])} | "
                    f"{_f(t['peak_cuda_reserved_mb'])} | {energy} | {_f(t['mean_power_w'])} |"
                )
    budget = [(n, u) for n, u in units.items() if n.startswith("budget:") and u.get("result")]
    if budget:
        lines += [
            "",
            "## Memory budget",
            "",
            "| unit | budget MB | outcome | micro-batch | r | precision | predicted MB | measured MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, u in budget:
            r = u["result"]
            if n == "budget:probe":
                lines.append(
                    f"| {n} | none | full batch {r['batch_size']} needs {_f(r['predicted_peak_mb'])} + "
                    f"headroom {_f(r['headroom_mb'])}; minimum {_f(r['minimum_budget_mb'])} "
                    f"({r['memory_scope']}) | {r['micro_batch_size']} | | | {_f(r['predicted_peak_mb'])} | |"
                )
            elif r.get("refused"):
                lines.append(
                    f"| {n} | {_f(r['budget_mb'], '.0f')} | refused, minimum {_f(r['minimum_mb'], '.0f')} "
                    "MB | | | | | |"
                )
            elif r.get("budget") is None and r.get("skipped"):
                lines.append(f"| {n} | - | {r['skipped']} | | | | | |")
            else:
                lines.append(
                    f"| {n} | {_f(r['budget_mb'], '.0f')} | trained, within: {r['within_budget']} | "
                    f"{r['micro_batch_size']}/{r['batch_size']} | {_f(r['reduction_rate'], 'g')} | "
                    f"{r['precision']} | {_f(r['predicted_peak_mb'])} | {_f(r['measured_peak_mb'])} |"
                )
    prec = [u["result"] for n, u in units.items() if n.startswith("precision:") and u.get("result")]
    if prec:
        lines += [
            "",
            "## Precision (CPS-Prompt)",
            "",
            "| precision | accuracy | step ms | energy J | CUDA peak MB | GradScaler |",
            "|---|---|---|---|---|---|",
        ]
        for r in prec:
            if r.get("refused"):
                lines.append(f"| {r['precision']} | refused: {r['message'][:100]} | | | | |")
                continue
            lines.append(
                f"| {r['precision']} | {100 * r['final_average_accuracy']:.1f}% | "
                f"{_f(r['step_ms'], '.1f')} | "
                f"{_f(r['energy_j'], none='no sensor')} | {_f(r['peak_cuda_allocated_mb'])} | "
                f"{r['grad_scaler'] or '-'} |"
            )
    bench = units.get("bench", {}).get("result")
    if bench:
        lines += [
            "",
            f"## edgecl bench (ratios to {bench['reference']})",
            "",
            f"`{bench['command']}`",
            "",
            "| method | accuracy | peak MB | train s | energy J | memory x | time x | energy x |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in bench["rows"]:
            acc = r["final_average_accuracy"]
            lines.append(
                f"| {r['method']} | {_f(100 * acc if acc is not None else None)}% | "
                f"{_f(r['peak_memory_mb'])} | "
                f"{_f(r['train_seconds'], '.2f')} | {_f(r['energy_j'], none='no sensor')} | "
                f"{_f(r['peak_memory_mb_ratio'], '.2f')} | {_f(r['train_seconds_ratio'], '.2f')} | "
                f"{_f(r['energy_j_ratio'], '.2f')} |"
            )
    serve = units.get("serve", {}).get("result")
    if serve:
        p = serve.get("predict", {})
        lines += [
            "",
            "## edgecl serve",
            "",
            f"Ready in {serve.get('ready_s')} s; upload {serve.get('upload')}; job "
            f"{(serve.get('job') or {}).get('status')} in {(serve.get('job') or {}).get('seconds')} s; "
            "predict "
            f"{p.get('images')} images in {p.get('seconds')} s ({p.get('engine')}), accuracy "
            f"{_f(100 * p['accuracy'] if 'accuracy' in p else None)}% (chance 25%); exit code after SIGTERM "
            f"{serve.get('exit_code')}.",
        ]
    export = units.get("export", {}).get("result")
    if export:
        lines += [
            "",
            "## ONNX export",
            "",
            f"{export['onnx_mb']} MB; onnxruntime providers "
            f"{export['ort_session_providers']} vs torch on {export['torch_device']}: max |d logit| "
            f"{export['max_abs_logit_diff_ort_vs_torch_device']:.2e}, top-1 agreement "
            f"{100 * export['top1_agreement']:.0f}% on {export['images']} images (CPU parity at export "
            f"{export['export_parity_cpu_max_abs']:.1e}).",
        ]
    return "\n".join(lines) + "\n"
