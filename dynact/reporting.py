"""Helpers the experiment commands (``dynact compare``, ``dynact dpo``) share: paired
statistics over seeds and result files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["OutputError", "mean_std", "paired_interval", "write_text"]


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value; None for none)."""
    import numpy as np

    if not len(values):
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def paired_interval(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean of paired differences with scipy's one-sample Student-t 95% interval.

    ``mean +- t_{0.975, n-1} * sd / sqrt(n)``; ``ci95`` and ``half_width`` are None for ``n < 2``,
    and the interval is ``[mean, mean]`` when every difference is the same.
    """
    import numpy as np
    from scipy import stats

    diffs = [float(d) for d in diffs]
    out: dict[str, Any] = {"n": len(diffs), "mean": None, "ci95": None, "half_width": None}
    if not diffs:
        return out
    out["mean"] = float(np.mean(diffs))
    if len(diffs) < 2:
        return out
    if float(np.ptp(diffs)) == 0.0:
        low = high = out["mean"]
    else:
        ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        low, high = float(ci.low), float(ci.high)
    out["ci95"] = [low, high]
    out["half_width"] = (high - low) / 2
    return out


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
