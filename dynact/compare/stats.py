"""Statistics over seeds: per-arm means, and paired differences against the control with
Student-t 95% intervals (scipy's)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from dynact.compare.settings import CONTROL
from dynact.reporting import mean_std, paired_interval

#: Per-layer measures summarised in the report (means over seeds, per layer and over layers).
LAYER_SUMMARY = ("dead", "entropy_scale_free", "entropy", "log_slope", "eps")
#: Epochs over which a run's top-1 change tells whether it is on its plateau.
PLATEAU_EPOCHS = 5


def paired(arm_runs: dict[int, dict], control_runs: dict[int, dict], key: str) -> dict[str, Any]:
    """Mean over shared seeds of ``rec[key](arm, s) - rec[key](control, s)`` with its 95% interval.

    The interval is scipy's one-sample t interval of the differences
    (``mean +- t_{0.975, n-1} * sd / sqrt(n)``); None for ``n < 2``; ``[mean, mean]`` when every
    difference is the same.
    """
    seeds = sorted(s for s in set(arm_runs) & set(control_runs)
                   if arm_runs[s].get(key) is not None and control_runs[s].get(key) is not None)
    diffs = [arm_runs[s][key] - control_runs[s][key] for s in seeds]
    return {"seeds": seeds, "diffs": diffs, **paired_interval(diffs)}


def plateau_change(rec: dict[str, Any]) -> Optional[float]:
    """Top-1 at the last epoch minus top-1 :data:`PLATEAU_EPOCHS` epochs earlier (None if shorter)."""
    acc = [row["acc1"] for row in rec.get("epochs", []) if "acc1" in row]
    return acc[-1] - acc[-1 - PLATEAU_EPOCHS] if len(acc) > PLATEAU_EPOCHS else None


def _layers(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``measure -> {"per_layer": {layer: [mean, std]}, "mean": [mean, std] of the layer mean}``."""
    out: dict[str, Any] = {}
    for measure in LAYER_SUMMARY:
        names = sorted({n for r in runs for n, m in r.get("layers", {}).items() if measure in m}, key=layer_order)
        if not names:
            continue
        per_layer = {n: list(mean_std([r["layers"][n][measure] for r in runs if measure in r["layers"].get(n, {})]))
                     for n in names}
        overall = [sum(r["layers"][n][measure] for n in names) / len(names)
                   for r in runs if all(measure in r["layers"].get(n, {}) for n in names)]
        out[measure] = {"per_layer": per_layer, "mean": list(mean_std(overall))}
    return out


def layer_order(name: str) -> list:
    # "blocks.10.mlp.act" after "blocks.9.mlp.act": compare digit runs as numbers.
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.replace("/", ".").split(".")]


def summarize(records: list[dict[str, Any]], arms: Sequence[str], control: str = CONTROL) -> dict[str, dict[str, Any]]:
    """Per-arm statistics over the seeds of the finished (``status == "ok"``) runs.

    For each arm: ``n`` and ``seeds``; ``top1``, ``top5``, ``nll``, ``top1_best``: ``[mean, std]``
    of the final validation figures (fractions; NLL in nats per image); ``plateau``: ``[mean,
    largest magnitude]`` of the top-1 change over the last :data:`PLATEAU_EPOCHS` epochs;
    ``layers``: the per-layer measures (:func:`_layers`); and, except for the control, ``delta_top1``
    and ``delta_nll``: :func:`paired` differences against ``control``.
    """
    ok: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for rec in records:
        if rec.get("status") == "ok" and rec.get("arm") in ok:
            ok[rec["arm"]][rec["seed"]] = rec
    summary: dict[str, dict[str, Any]] = {}
    for arm in arms:
        runs = [ok[arm][s] for s in sorted(ok[arm])]
        changes = [c for c in map(plateau_change, runs) if c is not None]

        def stat(key: str, runs: list = runs) -> list:
            return list(mean_std([r[key] for r in runs if r.get(key) is not None]))

        summary[arm] = {
            "n": len(runs),
            "seeds": sorted(ok[arm]),
            "top1": stat("top1_final"),
            "top5": stat("top5_final"),
            "nll": stat("nll_final"),
            "top1_best": stat("top1_best"),
            "plateau": [mean_std(changes)[0], max(changes, key=abs) if changes else None],
            "layers": _layers(runs),
            "delta_top1": None if arm == control else paired(ok[arm], ok.get(control, {}), "top1_final"),
            "delta_nll": None if arm == control else paired(ok[arm], ok.get(control, {}), "nll_final"),
        }
    return summary
