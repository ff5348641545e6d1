"""The one line a training run ends with: what it reached, what its layers look like, what it wrote.

``dynact train``, ``examples/quickstart.py`` and ``examples/plain_pytorch.py`` print it last, so
the answer a user came for is the last thing on the screen::

    result: val/acc1 0.9667, val/loss 0.1113 | 3 layers: dead 0..0.0312, entropy_scale_free 0.62..0.71,
    eps 0.0098..0.0101 | tensorboard runs/digits/lightning_logs/version_0, checkpoint runs/.../last.ckpt

(one line on the screen; wrapped here). :func:`result_line` needs only torch;
:func:`trainer_result_line` reads a Lightning ``Trainer`` after ``fit`` or ``validate``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from dynact.activations import find_activations
from dynact.core import tag

__all__ = ["FINAL_FIGURES", "LAYER_FIGURES", "layer_summary", "parameter_figures", "result_line", "trainer_result_line"]

#: Per-layer figures the line summarises (their spread over the layers), in this order.
LAYER_FIGURES = ("dead", "entropy_scale_free", "eps")
#: The final figures a Lightning run's line shows, those of them it logged (``ImageClassifier``'s names).
FINAL_FIGURES = ("val/acc1", "val/acc5", "val/loss")


def _number(value: float) -> str:
    return "0" if abs(value) < 1e-12 else f"{value:.4g}"  # rounding residue (a mass of 3e-17) reads as 0


def layer_summary(metrics: Mapping[str, float], figures: tuple[str, ...] = LAYER_FIGURES) -> str:
    """``"<n> layers: dead lo..hi, entropy_scale_free lo..hi, eps lo..hi"`` from figures keyed
    ``"<metric>/<layer>"`` (what :meth:`dynact.ActivationOptimizer.metrics` and the callbacks give).

    Each figure shows its smallest and largest value over the layers (one number when they are
    equal); non-finite values are left out. Without any of ``figures``: ``"no per-layer figures"``.
    """
    values: dict[str, list[float]] = {}
    layers: set[str] = set()
    for key, value in metrics.items():
        metric, _, layer = key.partition("/")
        if layer and metric in figures and math.isfinite(float(value)):
            values.setdefault(metric, []).append(float(value))
            layers.add(layer)
    if not values:
        return "no per-layer figures"
    parts = []
    for metric in figures:
        if metric in values:
            lo, hi = _number(min(values[metric])), _number(max(values[metric]))
            parts.append(f"{metric} {lo}" + ("" if lo == hi else f"..{hi}"))
    return f"{len(layers)} layer{'s' if len(layers) != 1 else ''}: " + ", ".join(parts)


def parameter_figures(model: nn.Module) -> dict[str, float]:
    """``{"eps/<layer>": value}`` for the activation modules of ``model`` with a scalar ``eps``
    (CRReLU, EAFOActivation): the per-layer figures of a run that nothing measured."""
    found = {}
    for name, module in find_activations(model):
        eps = getattr(module, "eps", None)
        if isinstance(eps, torch.Tensor) and eps.numel() == 1:
            found[tag("eps", name)] = float(eps.detach())
        elif isinstance(eps, (int, float)):
            found[tag("eps", name)] = float(eps)
    return found


def result_line(figures: Mapping[str, float], layers: Mapping[str, float],
                paths: Mapping[str, Optional[str]]) -> str:
    """``"result: <figures> | <layer summary> | <what> <path>, ..."``: one line, for the end of a run.

    Args:
        figures: the run's final numbers (``{"val/acc1": 0.97, "val/loss": 0.11}``), in order.
        layers: per-layer figures for :func:`layer_summary`.
        paths: what was written where (``{"tensorboard": "runs/x", "checkpoint": None}``);
            ``None`` entries are left out.
    """
    shown = ", ".join(f"{name} {_number(float(value))}" for name, value in figures.items()) or "no final figures"
    written = ", ".join(f"{what} {path}" for what, path in paths.items() if path) or "nothing written"
    return f"result: {shown} | {layer_summary(layers)} | {written}"


def trainer_result_line(trainer: Any, figures: Sequence[str] = FINAL_FIGURES, checkpoint: bool = True) -> str:
    """:func:`result_line` of a Lightning ``Trainer`` after ``fit`` / ``validate``.

    The figures are the last values in ``trainer.callback_metrics`` of those named in ``figures``;
    the layers' are those of the latest update of an :class:`~dynact.EAFOCallback` among the
    trainer's callbacks, or else the ``eps`` of the model's activations; the paths are every
    logger's ``log_dir`` (TensorBoard's run folder) and, with ``checkpoint`` (a run that trained),
    the checkpoint the run wrote last.
    """
    from dynact.callbacks import EAFOCallback  # optional dependency: Lightning

    final = {name: float(trainer.callback_metrics[name]) for name in figures if name in trainer.callback_metrics}
    layers: Mapping[str, float] = {}
    for callback in trainer.callbacks:
        if isinstance(callback, EAFOCallback) and callback.metrics:
            layers = callback.metrics
    if not layers and trainer.lightning_module is not None:
        layers = parameter_figures(trainer.lightning_module)
    paths: dict[str, Optional[str]] = {}
    for logger in trainer.loggers:
        kind = type(logger).__name__.removesuffix("Logger").lower() or "logger"
        paths[kind] = getattr(logger, "log_dir", None)
    saver = trainer.checkpoint_callback
    if checkpoint and saver is not None:
        paths["checkpoint"] = getattr(saver, "last_model_path", "") or getattr(saver, "best_model_path", "")
    return result_line(final, layers, paths)
