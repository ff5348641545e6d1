"""The density container on a uniform grid, and the grid's validation."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

__all__ = ["MAX_BINS", "MIN_BINS", "Density", "check_grid"]

#: Fewest bins any grid may have: derivatives and entropies need some resolution.
MIN_BINS = 8
#: Most bins a grid may have (2**24): beyond it one ``compute`` costs seconds and gigabytes.
MAX_BINS = 2**24
#: Largest ``|lo|``, ``|hi|`` of a grid. Float32 data stay below 3.4e38; past 1e100 the
#: squares and cubes of bin widths that the estimators form would overflow.
MAX_ABS = 1e100
#: Narrowest bin, absolute and relative to ``max(|lo|, |hi|)``: below them bin widths
#: underflow when squared, or neighbouring grid points round to the same float64.
MIN_STEP = 1e-100
MIN_REL_STEP = 1e-12


def check_grid(lo: float, hi: float, bins: int) -> tuple[float, float, int]:
    """Validate a grid specification; raise ``ValueError`` naming the bad argument.

    Valid: ``-1e100 <= lo < hi <= 1e100``, ``8 <= bins <= 2**24`` and a bin width
    ``(hi - lo) / bins`` of at least ``1e-100`` and of ``1e-12 * max(|lo|, |hi|)``.
    """
    try:
        lo_f, hi_f = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"lo and hi must be numbers, got lo={lo!r}, hi={hi!r}") from None
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise ValueError(f"lo and hi must be finite, got lo={lo!r}, hi={hi!r}")
    if lo_f >= hi_f:
        raise ValueError(f"lo must be below hi, got lo={lo!r} >= hi={hi!r}; swap them or widen the range")
    if max(abs(lo_f), abs(hi_f)) > MAX_ABS:
        raise ValueError(f"lo and hi must lie in [-{MAX_ABS:g}, {MAX_ABS:g}], got lo={lo!r}, hi={hi!r}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not MIN_BINS <= int(bins) <= MAX_BINS:
        raise ValueError(f"bins must be an integer in [{MIN_BINS}, {MAX_BINS}], got bins={bins!r}")
    step = (hi_f - lo_f) / int(bins)
    least = max(MIN_STEP, MIN_REL_STEP * max(abs(lo_f), abs(hi_f)))
    if not step >= least:
        raise ValueError(
            f"the bin width (hi - lo) / bins = {step:.3g} is below {least:.3g} (at least {MIN_STEP:g} and "
            f"{MIN_REL_STEP:g} * max(|lo|, |hi|)), got lo={lo!r}, hi={hi!r}, bins={bins!r}; widen [lo, hi] "
            "or use fewer bins"
        )
    return lo_f, hi_f, int(bins)


def grid_ends_ok(lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """:func:`check_grid`'s conditions on the ends, by row of the tensors ``lo`` and ``hi``, as a
    mask (no error, no read back): finite, ``lo < hi``, within ``MAX_ABS``, a bin width of at
    least ``MIN_STEP`` and ``MIN_REL_STEP`` times the larger end."""
    big = torch.maximum(lo.abs(), hi.abs())
    step = (hi - lo) / bins
    return (torch.isfinite(lo) & torch.isfinite(hi) & (lo < hi) & (big <= MAX_ABS)
            & (step >= torch.clamp_min(MIN_REL_STEP * big, MIN_STEP)))


@dataclass(frozen=True)
class Density:
    """A probability density sampled at the centres of a uniform grid.

    Attributes:
        grid: ``(B,)`` bin centres ``lo + (k + 1/2) * h``, ``h = (hi - lo) / B``.
        p: ``(B,)`` density values; ``sum(p) * h = 1 - outside``.
        dp: ``(B,)`` derivative ``p'`` at the same points.
        count: number of finite values behind the estimate (``inf`` for analytic densities).
        outside: fraction of the (finite) mass that lies beyond ``[lo, hi]``.
        nonfinite: number of NaN/Inf values seen and excluded.
        lo, hi: the grid's ends.

    All tensors are float64 on one device.
    """

    grid: torch.Tensor
    p: torch.Tensor
    dp: torch.Tensor
    count: float
    outside: float
    lo: float
    hi: float
    nonfinite: int = 0

    def __post_init__(self) -> None:
        lo, hi, bins = check_grid(self.lo, self.hi, int(self.grid.numel()))
        for name in ("grid", "p", "dp"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.numel() != bins:
                raise ValueError(f"Density.{name} must be a 1-d tensor of {bins} values")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"Density.{name} has non-finite values; estimate from finite data "
                    "(the estimators drop NaN/Inf) or fix the pdf"
                )
        if bool((self.p < 0).any()):
            raise ValueError("Density.p has negative values; a density must be >= 0")
        if not (0.0 <= float(self.outside) <= 1.0):
            raise ValueError(f"Density.outside must be a fraction in [0, 1], got {self.outside!r}")

    # ---------------------------------------------------------------- derived
    @property
    def bins(self) -> int:
        return int(self.grid.numel())

    @property
    def step(self) -> float:
        """Bin width ``h``."""
        return (self.hi - self.lo) / self.bins

    @property
    def edges(self) -> torch.Tensor:
        """``(B + 1,)`` bin edges."""
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=self.grid.dtype, device=self.grid.device)

    @property
    def mass(self) -> torch.Tensor:
        """``(B,)`` probability of each bin (``p * h``)."""
        return self.p * self.step

    def cdf(self) -> torch.Tensor:
        """CDF of the density restricted to the grid (renormalised), at the bin centres."""
        m = self.mass
        total = m.sum()
        if float(total) <= 0:
            raise ValueError("Density has no mass on its grid; widen [lo, hi]")
        return (torch.cumsum(m, 0) - 0.5 * m) / total

    def quantile(self, q: float) -> float:
        """The ``q``-quantile of the density restricted to its grid (linear within bins)."""
        if not 0.0 <= float(q) <= 1.0:
            raise ValueError(f"q must be a probability in [0, 1], got q={q!r}")
        mass = self.mass.clamp_min(0)
        total = float(mass.sum())
        if total <= 0:
            raise ValueError("the density has no mass on its grid; widen the estimator's [lo, hi]")
        cum = torch.cat([mass.new_zeros(1), torch.cumsum(mass, 0)]) / total
        edges = self.edges
        k = int(torch.searchsorted(cum, torch.tensor([float(q)], dtype=cum.dtype, device=cum.device))[0])
        k = min(max(k, 1), self.bins)
        c0, c1 = float(cum[k - 1]), float(cum[k])
        w = 0.5 if c1 <= c0 else min(max((q - c0) / (c1 - c0), 0.0), 1.0)
        return float(edges[k - 1] + w * (edges[k] - edges[k - 1]))

    def entropy(self) -> float:
        """Differential entropy ``-int p log p`` (nats) of the density on its grid."""
        m = self.p > 0
        return float(-(self.p[m] * torch.log(self.p[m])).sum() * self.step)

    def mean_std(self) -> tuple[float, float]:
        """Mean and standard deviation of the density on its grid."""
        w = self.mass / self.mass.sum()
        mean = (w * self.grid).sum()
        var = (w * (self.grid - mean) ** 2).sum()
        return float(mean), float(var.clamp_min(0).sqrt())

    def to(self, device: torch.device | str) -> "Density":
        """The same density with its tensors on ``device``."""
        return replace(self, grid=self.grid.to(device), p=self.p.to(device), dp=self.dp.to(device))

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_pdf(
        cls,
        pdf: Callable,
        lo: float,
        hi: float,
        bins: int,
        dpdf: Callable | None = None,
    ) -> "Density":
        """Sample an analytic density (for design work and tests).

        Args:
            pdf: callable mapping a float64 tensor (or numpy array) of points to densities,
                e.g. ``scipy.stats.norm.pdf`` or a torch expression.
            lo, hi, bins: the grid.
            dpdf: derivative of ``pdf``; if omitted, a central difference with step ``1e-5``
                (error ~1e-10 for smooth densities).

        The pdf must be normalised (integrate to 1 over the real line). Its mass on the grid,
        ``M = sum(p) * h``, is checked: a normalised pdf can exceed 1 there only by the midpoint
        rule's error, at most ``h`` times the pdf's total variation on the grid (each cell's
        error is at most ``h`` times the pdf's variation in it). A larger ``M`` means an
        unnormalised pdf (or a grid too coarse to resolve it) and raises ``ValueError``. An
        ``M`` below 1 is the mass beyond ``[lo, hi]``: ``outside = 1 - M``, with a warning when
        it is above one half (most of the pdf off the grid, or a pdf scaled below 1).

        Raises:
            TypeError: ``pdf`` or ``dpdf`` is not callable.
            ValueError: the grid is invalid, ``pdf`` returns values of the wrong shape,
                non-finite or negative ones, or its mass on the grid exceeds 1 (see above).
        """
        lo, hi, bins = check_grid(lo, hi, bins)
        for name, fn in (("pdf", pdf), ("dpdf", dpdf)):
            if not callable(fn) and not (name == "dpdf" and fn is None):
                raise TypeError(f"Density.from_pdf: {name} must be a callable mapping points to densities "
                                f"(e.g. scipy.stats.norm.pdf), got {name}={fn!r} ({type(fn).__name__})")
        h = (hi - lo) / bins
        grid = lo + h * (torch.arange(bins, dtype=torch.float64) + 0.5)
        p = _eval(pdf, grid, "pdf")
        if dpdf is not None:
            dp = _eval(dpdf, grid, "dpdf")
        else:
            e = 1e-5
            dp = (_eval(pdf, grid + e, "pdf") - _eval(pdf, grid - e, "pdf")) / (2 * e)
        if not bool(torch.isfinite(p).all()) or not bool(torch.isfinite(dp).all()):
            raise ValueError("pdf returned non-finite values on the grid; check the pdf and [lo, hi]")
        outside = _outside_of(p, h, lo, hi)
        return cls(grid=grid, p=p, dp=dp, count=math.inf, outside=outside, lo=lo, hi=hi)

    # ---------------------------------------------------------------- persistence
    def save(self, path) -> None:
        """Write the density to a ``.pt`` file (readable by :meth:`load` and ``dynact design``)."""
        torch.save(
            {
                "grid": self.grid.cpu(),
                "p": self.p.cpu(),
                "dp": self.dp.cpu(),
                "count": self.count,
                "outside": self.outside,
                "lo": self.lo,
                "hi": self.hi,
                "nonfinite": self.nonfinite,
            },
            path,
        )

    @classmethod
    def load(cls, path) -> "Density":
        """Read a density written by :meth:`save`."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"grid", "p", "dp", "count", "outside", "lo", "hi"} - set(state)
        if missing:
            raise ValueError(f"{path}: not a dynact density file (missing {sorted(missing)})")
        return cls(**{k: state[k] for k in ("grid", "p", "dp", "count", "outside", "lo", "hi")},
                   nonfinite=int(state.get("nonfinite", 0)))


def _eval(fn: Callable, x: torch.Tensor, name: str) -> torch.Tensor:
    try:
        out = fn(x)
    except TypeError:
        out = fn(x.numpy())
    try:
        out = torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"Density.from_pdf: {name} must return real numbers, got {type(out).__name__} "
                         f"{str(out)[:60]}") from None
    if out.shape != x.shape:
        raise ValueError(f"Density.from_pdf: {name} must return one value per point (shape {tuple(x.shape)}), "
                         f"got shape {tuple(out.shape)}")
    return out


#: Mass on the grid below which :meth:`Density.from_pdf` warns: most of the pdf would lie off the grid.
LOW_MASS = 0.5


def _outside_of(p: torch.Tensor, h: float, lo: float, hi: float) -> float:
    """``1 - sum(p) * h`` for :meth:`Density.from_pdf`, after checking that the pdf's mass fits a
    normalised pdf: above 1 by at most the midpoint rule's error bound, ``h`` times the total
    variation (that of the sampled values, with the pdf taken to 0 beyond both ends)."""
    if bool((p < 0).any()):
        raise ValueError("Density.from_pdf: pdf returned negative values; a density must be >= 0")
    mass = float(p.sum()) * h
    variation = float(p[0] + p[-1] + torch.diff(p).abs().sum())
    slack = h * variation + 1e-9
    if mass > 1.0 + slack:
        raise ValueError(
            f"Density.from_pdf: the pdf has mass {mass:.6g} on [{lo:g}, {hi:g}] (sum(p) * h), above the 1 of a "
            f"density by more than the quadrature error allows ({slack:.3g}); normalise the pdf (divide it by "
            f"its integral, {mass:.6g} here if all its mass is on the grid) or, if it is normalised, use more "
            "bins so that the grid resolves it"
        )
    if mass < LOW_MASS:
        warnings.warn(
            f"Density.from_pdf: the pdf has mass {mass:.4g} on [{lo:g}, {hi:g}]: {1 - mass:.0%} of it is taken to lie "
            "beyond the grid (outside). Widen [lo, hi] if that is so; if the pdf is not normalised, normalise it",
            stacklevel=3,
        )
    return min(1.0, max(0.0, 1.0 - mass))
