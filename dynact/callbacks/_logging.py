"""How :class:`~dynact.callbacks.EAFOCallback` writes what it measures.

One place builds tag names and talks to loggers, so the callback only hands over numbers:

- scalars go to every Lightning logger with an explicit step (``logger.log_metrics``); a
  callback's ``self.log`` was measured writing stale values at shifted steps when the
  trainer's ``log_every_n_steps`` differs from the callback's schedule;
- histograms and figures need TensorBoard's writer and go only to ``TensorBoardLogger`` s.
  Histograms reuse the bin counts the estimator already holds (``add_histogram_raw``), which
  was ~35x cheaper than letting TensorBoard bin the raw values again.

Everything here runs on global rank zero only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from dynact.density import Density

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

@rank_zero_only
def _log_scalars(trainer: "pl.Trainer", metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` at ``step`` to every logger of the trainer (none: nothing happens)."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _tensorboard_writers(trainer: "pl.Trainer") -> list["SummaryWriter"]:
    """The ``SummaryWriter`` of each TensorBoard logger (empty on other ranks and other loggers)."""
    if trainer.global_rank != 0:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _log_histogram(writer: "SummaryWriter", tag: str, density: Density, step: int) -> None:
    """A TensorBoard histogram of the values behind ``density``, from its bin masses.

    The counts of the values inside the grid are ``mass * count`` (``mass`` sums to
    ``1 - outside``); a KDE's smoothed masses give a smoothed histogram.
    """
    counts = (density.mass * float(density.count)).to(torch.float64).cpu()
    num = float(counts.sum())
    if not math.isfinite(num) or num <= 0:
        return
    centres = density.grid.to(torch.float64).cpu()
    limits = density.edges[1:].to(torch.float64).cpu()
    filled = torch.nonzero(counts > 0).flatten()
    writer.add_histogram_raw(
        tag,
        min=float(density.edges[int(filled[0])]),
        max=float(limits[int(filled[-1])]),
        num=num,
        sum=float((counts * centres).sum()),
        sum_squares=float((counts * centres * centres).sum()),
        bucket_limits=limits.tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


def _curve_figure(
    title: str,
    x: torch.Tensor,
    y: torch.Tensor,
    density: Density,
    base: Optional[torch.Tensor] = None,
) -> "Figure":
    """The activation ``y(x)`` over the input density (shaded), on the range of ``x``; with a
    ``base``, a second panel shows the correction ``y - base``, too small to see in the first."""
    # A bare Figure needs no pyplot state and no GUI backend (safe in workers and on servers).
    from matplotlib.figure import Figure

    xs = x.detach().double().cpu().numpy()
    ys = y.detach().double().cpu().numpy()
    fig = Figure(figsize=(4.0, 4.5 if base is not None else 3.0), dpi=80)
    axes = fig.subplots(2 if base is not None else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(xs, ys, color="C0", lw=1.5)
    ax.set_ylabel("activation")
    ax.set_title(title, fontsize=8)
    twin = ax.twinx()
    twin.fill_between(density.grid.double().cpu().numpy(), density.p.double().cpu().numpy(),
                      color="C1", alpha=0.3, lw=0)
    twin.set_ylabel("input density")
    twin.set_ylim(bottom=0)
    if base is not None:
        axes[1].plot(xs, ys - base.detach().double().cpu().numpy(), color="C2", lw=1.5)
        axes[1].axhline(0.0, color="0.6", lw=0.8)
        axes[1].set_ylabel("activation - base")
    axes[-1].set_xlabel("pre-activation")
    axes[-1].set_xlim(float(xs[0]), float(xs[-1]))
    fig.tight_layout()
    return fig
