"""Summary, report and plots of ``dynact dpo``, in the shape of the paper's Table 4.

``results.json`` holds the settings, the environment, every run and the summary;
``report.md`` the table (beta x arm: evaluation reward margin, accuracy and loss, mean ± sample
std over seeds), the paired differences against GELU with Student-t 95% intervals, the
per-layer entropy figures of every arm, and two plots (``metrics_vs_beta.png``,
``layers.png``).
"""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from dynact.experiments.dpo.models import CONTROL_ARM
from dynact.experiments.dpo.settings import DPOSettings
from dynact.experiments.reporting import mean_std, paired_interval, write_text

__all__ = ["METRICS", "summarize", "write_report", "write_results"]

#: Record key -> label, in Table 4's order.
METRICS = {"eval_margin": "eval reward margin", "eval_accuracy": "eval accuracy", "eval_loss": "eval loss"}
#: Per-layer figures shown in the report (from ``dynact.eafo.output_stats`` via the core).
LAYER_FIGURES = ("dead", "entropy", "entropy_scale_free", "log_slope", "std")
_DISPLAY = {"gelu": "GELU", "crrelu": "CRReLU", "eafo": "EAFO (dynamic, GELU base)", "relu": "ReLU"}
_PNG_METRICS = "metrics_vs_beta.png"
_PNG_LAYERS = "layers.png"


def summarize(runs: list[dict[str, Any]], arms: Sequence[str], betas: Sequence[float],
              control: str = CONTROL_ARM) -> dict[str, Any]:
    """Per ``"<arm>@<beta>"``: ``n``, ``seeds``, ``<metric>_mean`` / ``<metric>_std`` for each of
    :data:`METRICS`, ``delta`` (paired differences against ``control`` at the same beta and seed,
    per metric; ``None`` for the control) and ``layers`` (each layer's figures, mean over seeds)."""
    ok = {(r["arm"], float(r["beta"]), r["seed"]): r for r in runs if r.get("status") == "ok"}
    summary: dict[str, Any] = {}
    for beta in betas:
        for arm in arms:
            mine = {s: r for (a, b, s), r in ok.items() if a == arm and b == beta}
            cell: dict[str, Any] = {"arm": arm, "beta": beta, "n": len(mine), "seeds": sorted(mine)}
            for key in METRICS:
                cell[f"{key}_mean"], cell[f"{key}_std"] = mean_std([mine[s][key] for s in sorted(mine)])
            if arm == control:
                cell["delta"] = None
            else:
                base = {s: r for (a, b, s), r in ok.items() if a == control and b == beta}
                shared = sorted(set(mine) & set(base))
                cell["delta"] = {key: paired_interval([mine[s][key] - base[s][key] for s in shared]) for key in METRICS}
            layers: dict[str, dict[str, list[float]]] = {}
            for s in sorted(mine):
                for layer, figures in mine[s].get("layers", {}).items():
                    for name, value in figures.items():
                        layers.setdefault(layer, {}).setdefault(name, []).append(value)
            cell["layers"] = {layer: {k: sum(v) / len(v) for k, v in figs.items()} for layer, figs in layers.items()}
            summary[f"{arm}@{beta:g}"] = cell
    return summary


def _fmt(value: Optional[float], digits: int = 4, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _name(arm: str) -> str:
    return _DISPLAY.get(arm, arm)


def _table(results: dict[str, Any]) -> list[str]:
    settings, summary = results["settings"], results["summary"]
    rows = ["| β | activation | " + " | ".join(METRICS.values()) + " | seeds |", "|---|---|---:|---:|---:|---:|"]
    for beta in settings["betas"]:
        for arm in settings["arms"]:
            c = summary[f"{arm}@{beta:g}"]
            cells = [f"{_fmt(c[f'{k}_mean'])} ± {_fmt(c[f'{k}_std'])}" for k in METRICS]
            rows.append(f"| {beta:g} | {_name(arm)} | " + " | ".join(cells) + f" | {c['n']} |")
    return rows


def _delta_table(results: dict[str, Any]) -> list[str]:
    settings, summary = results["settings"], results["summary"]
    control = settings["control"]
    rows = ["| β | activation | " + " | ".join(f"Δ {v} [95% CI]" for v in METRICS.values()) + " | pairs |",
            "|---|---|---:|---:|---:|---:|"]
    for beta in settings["betas"]:
        for arm in settings["arms"]:
            if arm == control:
                continue
            d = summary[f"{arm}@{beta:g}"]["delta"]
            cells = []
            for key in METRICS:
                x = d[key]
                if x["mean"] is None:
                    cells.append("n/a")
                    continue
                ci = "n/a" if x["ci95"] is None else f"{_fmt(x['ci95'][0], sign=True)}, {_fmt(x['ci95'][1], sign=True)}"
                cells.append(f"{_fmt(x['mean'], sign=True)} [{ci}]")
            n = d["eval_margin"]["n"]
            rows.append(f"| {beta:g} | {_name(arm)} | " + " | ".join(cells) + f" | {n} |")
    return rows


def _layer_table(results: dict[str, Any]) -> list[str]:
    """Each arm's per-layer figures at the end of DPO, mean over betas and seeds."""
    settings, summary = results["settings"], results["summary"]
    rows = ["| activation | layer | " + " | ".join(LAYER_FIGURES) + " |", "|---|---|" + "---:|" * len(LAYER_FIGURES)]
    for arm in settings["arms"]:
        pooled: dict[str, dict[str, list[float]]] = {}
        for beta in settings["betas"]:
            for layer, figs in summary[f"{arm}@{beta:g}"]["layers"].items():
                for k, v in figs.items():
                    pooled.setdefault(layer, {}).setdefault(k, []).append(v)
        for layer in sorted(pooled, key=_layer_order):
            cells = [_fmt(mean_std(pooled[layer].get(k, []))[0], 3) for k in LAYER_FIGURES]
            rows.append(f"| {_name(arm)} | {layer} | " + " | ".join(cells) + " |")
    return rows


def _layer_order(name: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _runs_section(results: dict[str, Any]) -> list[str]:
    """Every run's row, then where the TensorBoard runs and records are and the command."""
    lines = [
        "## Runs",
        "",
        "| activation | β | seed | eval margin | eval accuracy | eval loss | accepted EAFO updates "
        "| wall time, s | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["runs"]:
        status = r["status"] if r["status"] != "failed" else "failed: " + str(r.get("error"))[:100].replace("|", "/")
        lines.append(
            f"| {_name(r['arm'])} | {r['beta']:g} | {r['seed']} | {_fmt(r.get('eval_margin'))} | "
            f"{_fmt(r.get('eval_accuracy'))} | {_fmt(r.get('eval_loss'))} | {r.get('accepted_updates', 'n/a')} | "
            f"{_fmt(r.get('wall_time_s'), 1)} | {status} |")
    return [*lines, "", f"TensorBoard: `tensorboard --logdir {results['settings']['out']}` (one run per activation "
            "× β × seed, and one per SFT). Per-run records: `runs/`. "
            f"Command: `{results['command']}`.", ""]


def write_report(out: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write ``report.md`` for ``results`` into ``out``."""
    out = Path(out)
    settings, env = results["settings"], results["environment"]
    done = [r for r in results["runs"] if r["status"] == "ok"]
    first = done[0] if done else {}
    sizes = results.get("data_sizes") or {}
    total = sum(r["wall_time_s"] for r in done) + sum({(r["arm"], r["seed"]): r.get("sft", {}).get("wall_time_s", 0.0)
                                                       for r in done}.values())
    lines = [
        f"# dynact dpo: {settings['data']}, {settings['model']}",
        "",
        f"What this is: {settings['about']}. Data: {sizes.get('train', 'n/a')} training / {sizes.get('eval', 'n/a')} "
        f"evaluation pairs. Model: {settings['model']}, {first.get('params', 0):,} parameters (first arm run). "
        f"SFT {first.get('sft', {}).get('steps', 'n/a')} steps, then DPO {first.get('steps', 'n/a')} steps per β; "
        f"batch {settings['batch_size']}, RMSprop, lr {settings['lr']:g} after {settings['warmup_steps']} warm-up "
        f"steps, gradient norm ≤ {settings['max_grad_norm']:g}, max length {settings['max_length']} "
        f"(prompt {settings['max_prompt_length']}). Seeds {', '.join(map(str, settings['seeds']))}; "
        f"{len(done)} of {len(settings['arms']) * len(settings['betas']) * len(settings['seeds'])} runs finished, "
        f"{total / 60:.1f} min of training in all. Machine: {env['machine']}. Written {results['written']}.",
        "",
        "Evaluation figures of TRL's DPOTrainer on the held-out pairs after DPO: the reward margin "
        "β·(log-ratio of chosen − log-ratio of rejected), the fraction of pairs whose chosen reward is "
        "higher, and the DPO loss; mean ± sample standard deviation over seeds.",
        "",
        *_table(results),
        "",
        f"Paired differences against {_name(settings['control'])} (same seed, so the same initial weights and "
        "data order), mean over seeds with a Student-t 95% interval (n/a below 2 pairs). Higher margin and "
        "accuracy and lower loss are better.",
        "",
        *_delta_table(results),
        "",
        f"![evaluation figures vs β]({_PNG_METRICS})",
        "",
        "## Per-layer entropy figures",
        "",
        "Each MLP activation at the end of DPO, measured on its inputs by dynact's ActivationOptimizer "
        "(monitor mode for the static arms, so every arm is measured alike), mean over β and seeds: "
        "`dead` (output mass on flat parts), `entropy` (mixed output entropy, nats), `entropy_scale_free`, "
        "`log_slope` and `std` (docs/math.md).",
        "",
        *_layer_table(results),
        "",
        f"![per-layer figures]({_PNG_LAYERS})",
        "",
        *_runs_section(results),
    ]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_metrics(results: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    settings, summary = results["settings"], results["summary"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, (key, label) in zip(axes, METRICS.items(), strict=False):
        for i, arm in enumerate(settings["arms"]):
            cells = [summary[f"{arm}@{b:g}"] for b in settings["betas"]]
            xs = [b for b, c in zip(settings["betas"], cells, strict=False) if c[f"{key}_mean"] is not None]
            ys = [c[f"{key}_mean"] for c in cells if c[f"{key}_mean"] is not None]
            es = [c[f"{key}_std"] for c in cells if c[f"{key}_mean"] is not None]
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, color=f"C{i}", label=_name(arm))
        ax.set_xscale("log")
        _label(ax, label, "β")
    _finish(plt, fig, axes, "after DPO: mean ± std over seeds", path)


def _plot_layers(results: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    settings, summary = results["settings"], results["summary"]
    figures = ("entropy_scale_free", "log_slope", "std")
    fig, axes = plt.subplots(1, len(figures), figsize=(4.2 * len(figures), 3.6))
    for ax, figure in zip(axes, figures, strict=False):
        for i, arm in enumerate(settings["arms"]):
            pooled: dict[str, list[float]] = {}
            for beta in settings["betas"]:
                for layer, figs in summary[f"{arm}@{beta:g}"]["layers"].items():
                    if figure in figs:
                        pooled.setdefault(layer, []).append(figs[figure])
            layers = sorted(pooled, key=_layer_order)
            if layers:
                ax.plot(range(len(layers)), [sum(pooled[name]) / len(pooled[name]) for name in layers], marker="o",
                        ms=4, color=f"C{i}", label=_name(arm))
                ax.set_xticks(range(len(layers)), [name.replace("transformer.h.", "h.").replace(".mlp.act", "")
                                                   for name in layers], fontsize=7)
        _label(ax, figure, "layer")
    _finish(plt, fig, axes, "per-layer figures at the end of DPO (mean over β and seeds)", path)


def _label(ax, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def _finish(plt, fig, axes, title: str, path: Path) -> None:
    """Legend on the first panel, the figure's title, and the PNG written."""
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _environment() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    return {
        "machine": gpu or f"{os.cpu_count()} CPU cores ({cpu})",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def write_results(settings: DPOSettings, command: str, ok: dict, failed: dict,
                  sizes: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """Gather the runs in plan order (the finished ones in ``ok``, the failed in ``failed``, by
    ``(arm, beta, seed)``), summarise, plot, and write ``results.json`` and ``report.md``."""
    from dataclasses import asdict

    out = Path(settings.out)
    runs = []
    for seed in settings.seeds:
        for arm in settings.arms:
            for beta in settings.betas:
                key = (arm, beta, seed)
                rec = ok.get(key) or failed.get(key) or {"arm": arm, "beta": beta, "seed": seed, "status": "not run"}
                runs.append({k: v for k, v in rec.items() if k != "settings"})
    previous = out / "results.json"
    if sizes is None and previous.is_file():  # a resume with nothing left to run
        sizes = json.loads(previous.read_text()).get("data_sizes")
    results = {
        "settings": {**asdict(settings), "control": CONTROL_ARM},
        "environment": _environment(),
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "data_sizes": sizes,
        "summary": summarize(runs, settings.arms, settings.betas),
        "runs": runs,
        "report": "report.md",
        "plots": [_PNG_METRICS, _PNG_LAYERS],
    }
    _plot_metrics(results, out / _PNG_METRICS)
    _plot_layers(results, out / _PNG_LAYERS)
    write_text(out / "results.json", json.dumps(results, indent=2))
    write_report(out, results)
    return results
