"""Helpers the experiment commands (``dynact compare``, ``dynact dpo``) share: paired
statistics over seeds and result files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["OutputError", "mean_std", "paired_interval", "repeat_chance", "write_text"]


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value; None for none)."""
    import numpy as np

    if not len(values):
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def paired_interval(diffs: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences with scipy's one-sample Student-t intervals.

    ``ci95`` is the 95% interval ``mean +- t_{0.975, n-1} * sd / sqrt(n)``; ``ci`` the interval at
    ``confidence`` (e.g. ``1 - 0.05 / k`` for a Bonferroni-adjusted interval that holds for ``k``
    comparisons together) and ``half_width`` its half-width; ``repeat``: :func:`repeat_chance` of
    the verdict ``ci`` gives. Intervals are None for ``n < 2``, and ``[mean, mean]`` when every
    difference is the same.
    """
    import numpy as np
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    diffs = [float(d) for d in diffs]
    out: dict[str, Any] = {"n": len(diffs), "mean": None, "ci95": None, "confidence": confidence, "ci": None,
                           "half_width": None, "repeat": None}
    if not diffs:
        return out
    out["mean"] = float(np.mean(diffs))
    if len(diffs) < 2:
        return out
    for key, level in (("ci95", 0.95), ("ci", confidence)):
        if float(np.ptp(diffs)) == 0.0:
            out[key] = [out["mean"], out["mean"]]
        else:
            ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(level)
            out[key] = [float(ci.low), float(ci.high)]
    out["half_width"] = (out["ci"][1] - out["ci"][0]) / 2
    out["repeat"] = repeat_chance(out["mean"], out["half_width"], len(diffs), confidence)
    return out


def repeat_chance(mean: float, half_width: float, n: int, confidence: float) -> float:
    """The chance that an independent repeat (``n`` other seeds, or another machine) gives the
    same verdict as an interval ``mean +- half_width`` at ``confidence`` over ``n`` paired seeds.

    The verdict is "better" (the interval above 0), "worse" (below) or "not distinguishable".
    The repeat's mean is predicted as normal around ``mean`` with twice the variance of one
    estimate (the true difference is only known to within one standard error, and the repeat
    adds its own; a flat prior), and it gives the same verdict when it falls on the same side of
    the same threshold ``t * se``. A verdict whose interval just excludes 0 repeats about half the
    time; one far from 0 nearly always. The spread is taken as known (normal, not t), which for
    ``n >= 20`` moves the figure by well under 0.01.
    """
    from scipy import stats

    if half_width == 0.0:
        return 1.0
    t = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    se = half_width / t
    spread = se * 2.0 ** 0.5
    above = float(stats.norm.sf((half_width - mean) / spread))   # repeat says "better"
    below = float(stats.norm.cdf((-half_width - mean) / spread))  # repeat says "worse"
    if mean - half_width > 0:
        return above
    if mean + half_width < 0:
        return below
    return 1.0 - above - below


class OutputError(OSError):
    """A result file could not be written (disk full, read-only, permissions)."""

    def __init__(self, path: Path, err: OSError) -> None:
        super().__init__(err.errno, f"cannot write {path}: {err.strerror or err}")
        self.path, self.err = path, err

    def __str__(self) -> str:
        return self.strerror


def write_text(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is either the old file or the whole new one, never half.

    Raises:
        OutputError: the disk is full, read-only, or the folder not writable.
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; others may read results
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise OutputError(path, err) from err


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
