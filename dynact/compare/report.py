"""``report.md``: a table shaped like the paper's (arms as columns), one verdict per arm, the
per-layer measures, the plots, and one row per run. Every figure comes from ``results.json``
(and the wall times from ``timing.json``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from dynact.compare.records import PNG_ACC, PNG_DELTA, PNG_LAYERS, RECORDS, REPORT_FILE, write_text
from dynact.compare.stats import PLATEAU_EPOCHS, layer_order

DISPLAY = {"relu": "ReLU", "crrelu": "CRReLU", "eafo": "EAFO (dynamic)", "gelu": "GELU", "elu": "ELU",
           "prelu": "PReLU", "celu": "CELU", "silu": "SiLU", "mish": "Mish"}
_MEASURE_NAMES = {"dead": "dead mass", "entropy_scale_free": "scale-free entropy, nats",
                  "entropy": "mixed entropy, nats", "log_slope": "E[log f'] over the rising mass",
                  "eps": "learned eps"}


def name(arm: str) -> str:
    return DISPLAY.get(arm, arm)


def fmt(value: Optional[float], digits: int = 3, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if round(value, digits) == 0:
        value = 0.0  # no "-0.00"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def pct(value: Optional[float], digits: int = 2, sign: bool = False) -> str:
    """A fraction as percent (points): 0.9712 -> ``97.12``."""
    return fmt(None if value is None else 100 * value, digits, sign)


def _interval(d: Optional[dict[str, Any]], scale: float, digits: int) -> str:
    if not d or d["mean"] is None:
        return "n/a (no paired seeds)"
    mean = fmt(d["mean"] * scale, digits, sign=True)
    if d["ci95"] is None:
        return f"{mean} [n/a, n=1]"
    low, high = (fmt(v * scale, digits, sign=True) for v in d["ci95"])
    return f"{mean} [{low}, {high}] (±{fmt(d['half_width'] * scale, digits)})"


def table(results: dict[str, Any], timing: Optional[dict[str, Any]] = None) -> list[str]:
    """The main table: one column per arm."""
    settings, summary = results["settings"], results["summary"]
    arms, control = settings["arms"], settings["control"]
    rows = ["| | " + " | ".join(name(a) for a in arms) + " |", "|---|" + "---:|" * len(arms)]

    def row(label: str, cell) -> None:
        rows.append(f"| {label} | " + " | ".join(cell(summary[a], a) for a in arms) + " |")

    row("top-1 %, mean ± std", lambda s, a: f"{pct(s['top1'][0])} ± {pct(s['top1'][1])} (n={s['n']})")
    row("top-5 %, mean ± std", lambda s, a: f"{pct(s['top5'][0])} ± {pct(s['top5'][1])}")
    row("validation NLL, nats/image", lambda s, a: f"{fmt(s['nll'][0])} ± {fmt(s['nll'][1])}")
    row(f"Δ top-1 vs {name(control)}, points [95% CI] (± half-width)",
        lambda s, a: "control" if a == control else _interval(s["delta_top1"], 100, 2))
    row(f"Δ NLL vs {name(control)} [95% CI]",
        lambda s, a: "control" if a == control else _interval(s["delta_nll"], 1, 3))
    row(f"top-1 change over the last {PLATEAU_EPOCHS} epochs, points (mean, largest)",
        lambda s, a: f"{pct(s['plateau'][0], sign=True)}, {pct(s['plateau'][1], sign=True)}")
    for measure in ("dead", "entropy_scale_free"):
        row(f"{_MEASURE_NAMES[measure]} (mean over layers)", lambda s, a, m=measure: _layer_cell(s, m))
    if timing:
        walls = timing.get("wall_time_mean", {})
        row("wall time per run, s (this machine)", lambda s, a: fmt(walls.get(a), 1))
    return rows


def _layer_cell(s: dict[str, Any], measure: str) -> str:
    m = s["layers"].get(measure)
    return "n/a" if not m else f"{fmt(m['mean'][0])} ± {fmt(m['mean'][1])}"


def verdicts(results: dict[str, Any]) -> list[str]:
    """One plain sentence per arm against the control."""
    settings, summary = results["settings"], results["summary"]
    control = name(settings["control"])
    lines = []
    for arm in settings["arms"]:
        d = summary[arm]["delta_top1"]
        if arm == settings["control"]:
            continue
        if not d or d["mean"] is None:
            lines.append(f"- **{name(arm)}**: no seed finished for both it and {control}; nothing to compare yet.")
            continue
        if d["ci95"] is None:
            lines.append(f"- **{name(arm)}**: one paired seed ({pct(d['mean'], sign=True)} points top-1); "
                         "no interval at n=1, run more seeds.")
            continue
        low, high = d["ci95"]
        if low > 0:
            word = f"better than {control}"
        elif high < 0:
            word = f"worse than {control}"
        else:
            word = f"not distinguishable from {control} at n={d['n']}"
        lines.append(f"- **{name(arm)}** is {word}: top-1 {pct(d['mean'], sign=True)} points, 95% interval "
                     f"[{pct(low, sign=True)}, {pct(high, sign=True)}] over {d['n']} paired seeds.")
    return lines


def layer_table(results: dict[str, Any]) -> list[str]:
    """Dead mass and scale-free entropy of each layer at the last update (mean ± std over seeds)."""
    summary, arms = results["summary"], results["settings"]["arms"]
    measures = [m for m in ("dead", "entropy_scale_free", "eps")
                if any(m in summary[a]["layers"] for a in arms)]
    if not measures:
        return ["No per-layer measures were recorded (EAFOCallback.metrics was empty)."]
    layers = sorted({n for a in arms for m in measures for n in summary[a]["layers"].get(m, {}).get("per_layer", {})},
                    key=layer_order)
    head = "| layer | measure | " + " | ".join(name(a) for a in arms) + " |"
    rows = [head, "|---|---|" + "---:|" * len(arms)]
    for layer in layers:
        for m in measures:
            cells = []
            for a in arms:
                v = summary[a]["layers"].get(m, {}).get("per_layer", {}).get(layer)
                cells.append("n/a" if v is None else f"{fmt(v[0])} ± {fmt(v[1])}")
            rows.append(f"| {layer} | {_MEASURE_NAMES[m]} | " + " | ".join(cells) + " |")
    return rows


def write_report(out: Path, results: dict[str, Any], timing: Optional[dict[str, Any]] = None) -> Path:
    """Write ``report.md`` for ``results`` (and ``timing``, optional) into ``out``."""
    out = Path(out)
    settings, env = results["settings"], results["environment"]
    runs = results["runs"]
    done = [r for r in runs if r["status"] == "ok"]
    first = done[0] if done else {}
    sizes = first.get("data_sizes") or {}
    data = (f"{sizes['train']:,} training / {sizes['val']:,} validation images, a stratified split drawn "
            "anew at each seed" if {"train", "val"} <= set(sizes) else "n/a")
    steps = f" ({first['steps']} optimizer steps)" if "steps" in first else ""
    trainer = ", ".join(f"{k}={v}" for k, v in settings["trainer_kwargs"].items())
    planned = len(settings["arms"]) * len(settings["seeds"])
    walls = timing or {}
    lines = [
        f"# dynact compare: {settings['task']}, {first.get('model', settings['model'])}",
        "",
        f"What this is: {settings['about']}. Data: {data}. Model: {first.get('model', settings['model'])}. "
        f"{settings['epochs']} epochs per run{steps}; seeds {', '.join(map(str, settings['seeds']))}; "
        f"{len(done)} of {planned} runs finished. Machine: {env['machine']}; torch {env['torch']}, "
        f"lightning {env['lightning']}. Trainer: {trainer}.",
        "",
        "Top-1 and top-5 are the percentage of validation images classified correctly at the last epoch; "
        "NLL is the mean negative log-likelihood per image; ± is the standard deviation over seeds. "
        "At each seed every arm starts from the same weights and sees the same split and batch order, so "
        "Δ is the mean over seeds of (arm − control) with a Student-t 95% interval of those paired "
        "differences. The plateau row is each run's top-1 change over its last epochs. The layer measures "
        "are EAFOCallback's at its last update: the dead mass (where the activation is flat) and the "
        "entropy that does not change when the output is rescaled.",
        "",
        *table(results, walls),
        "",
        *verdicts(results),
        "",
        f"![paired differences against {name(settings['control'])}, one dot per seed]({PNG_DELTA})",
        "",
        f"![validation top-1 vs epoch]({PNG_ACC})",
        "",
        "## Per-layer measures at the last update",
        "",
        *layer_table(results),
        "",
        f"![per-layer measures vs epoch]({PNG_LAYERS})",
        "",
        "## Runs",
        "",
        "| arm | seed | top-1 % | top-5 % | NLL | best top-1 % | steps | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['arm']} | {r['seed']} | {pct(r.get('top1_final'))} | {pct(r.get('top5_final'))} | "
            f"{fmt(r.get('nll_final'))} | {pct(r.get('top1_best'))} | {r.get('steps', 'n/a')} | {_status(r)} |"
        )
    total = walls.get("sweep_s")
    lines += [
        "",
        f"TensorBoard: `tensorboard --logdir {settings['out']}` (runs `<arm>/seed<k>`; the CUSTOM SCALARS tab "
        f"overlays the arms' means per layer). Per-run records: `{RECORDS}/`. Command: `{results['command']}`"
        + (f"; it took {total:.0f} s of wall time." if total else "."),
        "",
    ]
    path = out / REPORT_FILE
    write_text(path, "\n".join(lines))
    return path


def _status(rec: dict[str, Any]) -> str:
    if rec["status"] == "failed":
        return "failed: " + str(rec.get("error"))[:120].replace("|", "/")
    return rec["status"]
