"""The report's figures (matplotlib, PNG) and the TensorBoard run that overlays the arms.

- ``paired_differences.png``: for each comparison (each arm against the control, EAFO against
  CRReLU), the paired top-1 difference at each seed (one dot per seed), the mean and its
  simultaneous interval;
- ``acc_vs_epoch.png``: validation top-1 per epoch, mean over seeds with the min-max band;
- ``layer_measures.png``: dead mass and scale-free entropy of each layer per epoch, one line per
  arm (mean over seeds);
- ``by_arm/``: a TensorBoard run holding each arm's mean over seeds per epoch (tags
  ``top1/<arm>``, ``nll/<arm>``, ``<measure>/<layer>/<arm>``) and a custom-scalars layout with one
  chart per layer in which the arms' lines are named, so they are told apart without colours.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from dynact.experiments.compare.records import BY_ARM_RUN, PNG_ACC, PNG_DELTA, PNG_LAYERS, OutputError
from dynact.experiments.compare.report import name
from dynact.experiments.compare.stats import layer_order

_PLOTTED = ("dead", "entropy_scale_free")
_LABELS = {"dead": "dead mass", "entropy_scale_free": "scale-free entropy, nats"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise OutputError(path, err) from err
    finally:
        plt.close(fig)


def _ok_runs(results: dict[str, Any], arm: str) -> list[dict[str, Any]]:
    return [r for r in results["runs"] if r["arm"] == arm and r["status"] == "ok"]


def plot_paired(results: dict[str, Any], path: Path) -> None:
    """One column per comparison (each arm against the control, EAFO against CRReLU): a dot per
    seed and the mean with its simultaneous (Bonferroni-adjusted) interval."""
    plt = _pyplot()
    comps = results["comparisons"]
    pairs = comps["pairs"]
    fig, ax = plt.subplots(figsize=(1.8 + 1.7 * max(1, len(pairs)), 4.2))
    ax.axhline(0.0, color="0.4", lw=1)
    for i, pair in enumerate(pairs):
        d = pair["top1"]
        if not d["diffs"]:
            continue
        diffs = [100 * x for x in d["diffs"]]
        offsets = [i + 0.12 * ((k % 5) - 2) / 2 for k in range(len(diffs))]  # spread ties sideways
        ax.scatter(offsets, diffs, s=18, color=f"C{i}", zorder=3, alpha=0.8)
        if d["ci"] is not None:
            low, high = (100 * v for v in d["ci"])
            ax.errorbar([i + 0.3], [100 * d["mean"]], yerr=[[100 * d["mean"] - low], [high - 100 * d["mean"]]],
                        fmt="D", color="k", capsize=5, ms=6, zorder=4)
    ax.set_xticks(range(len(pairs)), [f"{name(p['arm'])}\n− {name(p['against'])}\n(n={p['top1']['n']})"
                                      for p in pairs], fontsize=8)
    ax.set_xlim(-0.6, max(1, len(pairs)) - 0.2)
    ax.set_ylabel("paired top-1 difference, points")
    level = "95%" if comps["count"] <= 1 else (
        f"{100 * comps['confidence']:.4g}% (Bonferroni, {comps['count']} comparisons)")
    ax.set_title(f"paired top-1 differences\ndots: seeds; diamond: mean with {level} interval", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, arm in enumerate(results["settings"]["arms"]):
        curves = [[row["acc1"] for row in r["epochs"] if "acc1" in row] for r in _ok_runs(results, arm)]
        if not curves:
            continue
        length = min(map(len, curves))
        acc = 100 * np.asarray([c[:length] for c in curves])
        x = np.arange(1, length + 1)
        ax.plot(x, acc.mean(0), marker="o", ms=3, color=f"C{i}", label=f"{name(arm)} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(x, acc.min(0), acc.max(0), color=f"C{i}", alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1, %")
    ax.set_title("validation top-1: mean over seeds, band = min to max")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _series(runs: list[dict[str, Any]], layer: str, measure: str) -> tuple[list[int], list[float]]:
    """Mean over runs of ``measure`` of ``layer`` at each epoch that every run measured."""
    by_epoch: dict[int, list[float]] = {}
    for r in runs:
        for row in r["epochs"]:
            value = row.get("layers", {}).get(layer, {}).get(measure)
            if value is not None:
                by_epoch.setdefault(row["epoch"], []).append(value)
    epochs = sorted(e for e, v in by_epoch.items() if len(v) == len(runs))
    return epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]


def _layers(results: dict[str, Any]) -> list[str]:
    return sorted({layer for r in results["runs"] if r["status"] == "ok" for row in r["epochs"]
                   for layer in row.get("layers", {})}, key=layer_order)


def plot_layers(results: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    layers = _layers(results) or ["(none)"]
    fig, axes = plt.subplots(len(_PLOTTED), len(layers), figsize=(3.6 * len(layers), 2.9 * len(_PLOTTED)),
                             squeeze=False, sharex=True)
    for col, layer in enumerate(layers):
        for row, measure in enumerate(_PLOTTED):
            ax = axes[row][col]
            for i, arm in enumerate(results["settings"]["arms"]):
                epochs, values = _series(_ok_runs(results, arm), layer, measure)
                if epochs:
                    ax.plot(epochs, values, color=f"C{i}", label=name(arm), lw=1.4)
            ax.set_title(layer.removeprefix("net."), fontsize=9)
            ax.set_ylabel(_LABELS[measure], fontsize=8)
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
            if row == len(_PLOTTED) - 1:
                ax.set_xlabel("epoch")
            if ax.lines and row == 0 and col == 0:
                ax.legend(fontsize=7)
            elif not ax.lines:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("per-layer measures at each epoch's last update, mean over seeds", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def write_tensorboard(results: dict[str, Any], out: Path) -> None:
    """The ``by_arm`` run (arms' means per epoch) and the custom-scalars layout."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    folder = out / BY_ARM_RUN
    for old in folder.glob("events.out.tfevents.*"):
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    layers = _layers(results)
    try:
        writer = SummaryWriter(str(folder))
        with contextlib.closing(writer):
            for arm in results["settings"]["arms"]:
                runs = _ok_runs(results, arm)
                for tag, key in (("top1", "acc1"), ("nll", "loss")):
                    curves = [[row[key] for row in r["epochs"] if key in row] for r in runs]
                    length = min(map(len, curves), default=0)
                    for k, v in enumerate(np.mean([c[:length] for c in curves], axis=0) if length else []):
                        writer.add_scalar(f"{tag}/{arm}", float(v), global_step=k + 1)
                for layer in layers:
                    for measure in _PLOTTED:
                        for epoch, value in zip(*_series(runs, layer, measure), strict=False):
                            writer.add_scalar(f"{measure}/{layer}/{arm}", value, global_step=epoch)
            layout = {"accuracy (mean over seeds)": {
                "validation top-1": ["Multiline", [r"^top1/"]],
                "validation NLL": ["Multiline", [r"^nll/"]]}}
            for measure in _PLOTTED:
                layout[f"{_LABELS[measure]} (mean over seeds)"] = {
                    layer: ["Multiline", [rf"^{measure}/{re.escape(layer)}/"]] for layer in layers}
            writer.add_custom_scalars(layout)
    except OSError as err:
        raise OutputError(folder, err) from err


def write_all(results: dict[str, Any], out: Path) -> list[str]:
    """Every figure and the TensorBoard overlay; returns the PNG names."""
    plot_paired(results, out / PNG_DELTA)
    plot_accuracy(results, out / PNG_ACC)
    plot_layers(results, out / PNG_LAYERS)
    write_tensorboard(results, out)
    return [PNG_DELTA, PNG_ACC, PNG_LAYERS]
