"""``report.md``: a table shaped like the paper's (arms as columns), one verdict per arm, the
per-layer measures, the plots, and one row per run. Every figure comes from ``results.json``
(and the wall times from ``timing.json``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from dynact.experiments.compare.records import PNG_ACC, PNG_DELTA, PNG_LAYERS, RECORDS, REPORT_FILE, write_text
from dynact.experiments.compare.stats import PLATEAU_EPOCHS, layer_order

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
    if d["ci"] is None:
        return f"{mean} [n/a, n=1]"
    low, high = (fmt(v * scale, digits, sign=True) for v in d["ci"])
    return f"{mean} [{low}, {high}] (±{fmt(d['half_width'] * scale, digits)})"


def seed_text(seeds: list[int]) -> str:
    """``[0, 1, 2, 3, 7, 9, 10]`` -> ``0-3, 7, 9-10``."""
    parts, start = [], None
    for i, seed in enumerate(seeds):
        if start is None:
            start = seed
        if i + 1 == len(seeds) or seeds[i + 1] != seed + 1:
            parts.append(str(seed) if seed == start else f"{start}-{seed}")
            start = None
    return ", ".join(parts) or "none"


def _level(results: dict[str, Any]) -> str:
    c = results["comparisons"]
    if c["count"] <= 1:
        return "95%"
    return f"{100 * c['confidence']:.4g}%"


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
    level = _level(results)
    row(f"Δ top-1 vs {name(control)}, points [{level} CI] (± half-width)",
        lambda s, a: "control" if a == control else _interval(s["delta_top1"], 100, 2))
    row(f"Δ NLL vs {name(control)} [{level} CI]",
        lambda s, a: "control" if a == control else _interval(s["delta_nll"], 1, 3))
    row(f"top-1 change over the last {PLATEAU_EPOCHS} epochs, points (mean, largest)",
        lambda s, a: f"{pct(s['plateau'][0], sign=True)}, {pct(s['plateau'][1], sign=True)}")
    for measure in ("dead", "entropy_scale_free"):
        row(f"{_MEASURE_NAMES[measure]} (mean over layers)", lambda s, a, m=measure: _layer_cell(s, m))
    if timing:
        walls = timing.get("wall_time_mean", {})
        cpus = timing.get("cpu_time_mean", {})
        row("time per run, s: CPU (wall) on this machine",
            lambda s, a: f"{fmt(cpus.get(a), 1)} ({fmt(walls.get(a), 1)})")
    return rows


def _layer_cell(s: dict[str, Any], measure: str) -> str:
    m = s["layers"].get(measure)
    return "n/a" if not m else f"{fmt(m['mean'][0])} ± {fmt(m['mean'][1])}"


def comparison_table(results: dict[str, Any]) -> list[str]:
    """One row per comparison: the paired top-1 and NLL differences with their simultaneous intervals."""
    c, level = results["comparisons"], _level(results)
    rows = [f"| comparison (paired by seed) | n | Δ top-1, points [{level} CI] (± half-width) | "
            f"Δ NLL, nats/image [{level} CI] |", "|---|---:|---:|---:|"]
    for pair in c["pairs"]:
        rows.append(f"| {name(pair['arm'])} − {name(pair['against'])} | {pair['top1']['n']} | "
                    f"{_interval(pair['top1'], 100, 2)} | {_interval(pair['nll'], 1, 3)} |")
    return rows


def comparisons_sentence(results: dict[str, Any]) -> str:
    c = results["comparisons"]
    if c["count"] == 0:
        return "One arm only: there is nothing to compare."
    if c["count"] == 1:
        return "The report makes one comparison; its interval is the Student-t 95% interval of the paired differences."
    return (f"The report makes {c['count']} comparisons, so each interval is Bonferroni-adjusted: a Student-t "
            f"interval at {_level(results)} ({100 * c['family_confidence']:.0f}% / {c['count']} of the risk each), "
            f"so that all {c['count']} hold together with {100 * c['family_confidence']:.0f}% confidence. "
            "A verdict says better or worse only when its interval excludes 0, and each gives the chance that "
            "a repeat of the sweep would give it again (a verdict at the edge of its interval repeats about "
            "half the time).")


def verdicts(results: dict[str, Any]) -> list[str]:
    """One plain sentence per comparison, from its simultaneous interval."""
    lines, level = [], _level(results)
    for pair in results["comparisons"]["pairs"]:
        arm, other, d = name(pair["arm"]), name(pair["against"]), pair["top1"]
        if d["mean"] is None:
            lines.append(f"- **{arm}** vs {other}: no seed finished for both; nothing to compare yet.")
            continue
        if d["ci"] is None:
            lines.append(f"- **{arm}** vs {other}: one paired seed ({pct(d['mean'], sign=True)} points top-1); "
                         "no interval at n=1, run more seeds.")
            continue
        low, high = d["ci"]
        if low > 0:
            word = f"better than {other}"
        elif high < 0:
            word = f"worse than {other}"
        else:
            word = f"not distinguishable from {other} at n={d['n']}"
        lines.append(f"- **{arm}** is {word}: top-1 {pct(d['mean'], sign=True)} points, {level} interval "
                     f"[{pct(low, sign=True)}, {pct(high, sign=True)}] (±{pct(d['half_width'])}) over {d['n']} "
                     f"paired seeds; a repeat (other seeds, another machine) would say so again with "
                     f"probability about {d['repeat']:.2f}.")
    return lines


def plateau_sentence(results: dict[str, Any]) -> str:
    """Whether every run trained to its plateau, with the run that moved most."""
    p = results["plateau"]
    bound = f"{pct(p['bound'])} points"
    if not p["checked"]:
        return (f"Plateau: not checked (no finished run has more than {p['epochs']} epochs); no claim is made "
                "that the runs trained to their plateau.")
    arm, seed, change = p["largest"]
    most = f"the run that moved most is {name(arm)} seed {seed}, {pct(change, sign=True)} points"
    if p["on_plateau"]:
        return (f"Every run trained to its plateau: each of the {p['checked']} runs' top-1 moved by less than "
                f"{bound} over its last {p['epochs']} epochs; {most}.")
    short = f"; {p['short']} runs were too short to check" if p["short"] else ""
    return (f"Not every run reached its plateau: {len(p['over'])} of {p['checked']} runs moved by {bound} or more "
            f"over their last {p['epochs']} epochs{short}; {most}. More epochs (--epochs) would settle them.")


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


def _header(results: dict[str, Any]) -> list[str]:
    """The report's title and the paragraph on what was run, where, and how to read the figures."""
    settings, env = results["settings"], results["environment"]
    done = [r for r in results["runs"] if r["status"] == "ok"]
    first = done[0] if done else {}
    sizes = first.get("data_sizes") or {}
    data = (f"{sizes['train']:,} training / {sizes['val']:,} validation images, a stratified split drawn "
            "anew at each seed" if {"train", "val"} <= set(sizes) else "n/a")
    steps = f" ({first['steps']} optimizer steps)" if "steps" in first else ""
    trainer = ", ".join(f"{k}={v}" for k, v in settings["trainer_kwargs"].items())
    planned = len(settings["arms"]) * len(settings["seeds"])
    return [
        f"# dynact compare: {settings['task']}, {first.get('model', settings['model'])}",
        "",
        f"What this is: {settings['about']}. Data: {data}. Model: {first.get('model', settings['model'])}. "
        f"{settings['epochs']} epochs per run{steps}; seeds {seed_text(settings['seeds'])}; "
        f"{len(done)} of {planned} runs finished. Machine: {env['machine']}; torch {env['torch']}, "
        f"lightning {env['lightning']}, dynact kernels {env.get('kernels', 'n/a')}. Trainer: {trainer}.",
        "",
        "Top-1 and top-5 are the percentage of validation images classified correctly at the last epoch; "
        "NLL is the mean negative log-likelihood per image; ± is the standard deviation over seeds. "
        "At each seed every arm starts from the same weights and sees the same split and batch order, so "
        "Δ is the mean over seeds of (arm − other arm) with a Student-t interval of those paired "
        "differences. The plateau row is each run's top-1 change over its last epochs. The layer measures "
        "are EAFOCallback's at its last update: the dead mass (where the activation is flat) and the "
        "entropy that does not change when the output is rescaled.",
    ]


def _runs_section(results: dict[str, Any], walls: dict[str, Any]) -> list[str]:
    """Every run's row, then where the TensorBoard runs and records are and what the command took."""
    lines = [
        "## Runs",
        "",
        "| arm | seed | top-1 % | top-5 % | NLL | best top-1 % | steps | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['arm']} | {r['seed']} | {pct(r.get('top1_final'))} | {pct(r.get('top5_final'))} | "
            f"{fmt(r.get('nll_final'))} | {pct(r.get('top1_best'))} | {r.get('steps', 'n/a')} | {_status(r)} |"
        )
    total, cpu = walls.get("sweep_s"), walls.get("command_cpu_s")
    return [
        *lines,
        "",
        f"TensorBoard: `tensorboard --logdir {results['settings']['out']}` (runs `<arm>/seed<k>`; the CUSTOM "
        f"SCALARS tab overlays the arms' means per layer). Per-run records: `{RECORDS}/`. Command: "
        f"`{results['command']}`"
        + (f"; it took {total:.0f} s of wall time" if total else "")
        + (f" over {len(walls['attempts'])} attempts (--resume)" if len(walls.get("attempts", ())) > 1 else "")
        + (f" and {cpu:.0f} s of CPU time (all processes; wall time on a shared machine also counts waiting)."
           if cpu else "."),
        "",
    ]


def write_report(out: Path, results: dict[str, Any], timing: Optional[dict[str, Any]] = None) -> Path:
    """Write ``report.md`` for ``results`` (and ``timing``, optional) into ``out``."""
    walls = timing or {}
    lines = [
        *_header(results),
        "",
        *table(results, walls),
        "",
        "## Paired comparisons",
        "",
        comparisons_sentence(results),
        "",
        *comparison_table(results),
        "",
        *verdicts(results),
        "",
        plateau_sentence(results),
        "",
        f"![paired top-1 differences of every comparison, one dot per seed]({PNG_DELTA})",
        "",
        f"![validation top-1 vs epoch]({PNG_ACC})",
        "",
        "## Per-layer measures at the last update",
        "",
        *layer_table(results),
        "",
        f"![per-layer measures vs epoch]({PNG_LAYERS})",
        "",
        *_runs_section(results, walls),
    ]
    path = Path(out) / REPORT_FILE
    write_text(path, "\n".join(lines))
    return path


def _status(rec: dict[str, Any]) -> str:
    if rec["status"] == "failed":
        return "failed: " + str(rec.get("error"))[:120].replace("|", "/")
    return rec["status"]
