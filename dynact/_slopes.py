"""The constrained problem behind :meth:`dynact.EAFOActivation.iterate` (docs/math.md, "Iterating")."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from dynact import eafo
from dynact._spline_ref import _interp_clamped, _spline_ops
from dynact.density import Density

if TYPE_CHECKING:  # pragma: no cover
    from dynact.spline import EAFOActivation

__all__ = ["SlopeProblem", "finite_arg"]


def finite_arg(name: str, value, *, positive: bool = False, nonzero: bool = False) -> float:
    """``value`` as a float, or a ValueError naming the argument and what it must be."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or (positive and v <= 0) or (nonzero and v == 0):
        need = "> 0" if positive else "non-zero" if nonzero else "finite"
        raise ValueError(f"iterate: {name} must be a finite number {need}, got {name}={value!r}")
    return v


#: Slope below which a cell of the base counts as not rising (the same convention as
#: :func:`dynact.eafo.output_stats`'s flat cells).
_RISE_TOL = eafo.FLAT_TOL
#: Points per knot cell at which the base's slope is checked for the cell's minimum slope.
_SUBPOINTS = 8


class SlopeProblem:
    """The constrained problem behind :meth:`EAFOActivation.iterate`, for one density.

    Variables ``u = log r`` on the free knot cells (where the base rises throughout); the
    knot values follow by summing the rises, with the fixed cells keeping their current rise.
    """

    def __init__(self, act: "EAFOActivation", d: Density, base64: nn.Module, min_ratio: float,
                 max_ratio: float, min_slope: float) -> None:
        self.d, self.base64 = d, base64
        self.eps = float(act.eps.detach())
        self.lo, self.hi = act.lo.detach().double(), act.hi.detach().double()
        t = act.knot_positions()
        h = float(t[1] - t[0])
        with torch.no_grad():
            self.delta_b = torch.diff(base64(t))
        sub = t[:-1, None] + h * torch.linspace(0.0, 1.0, _SUBPOINTS + 1, dtype=t.dtype, device=t.device)
        slope_min = eafo.derivatives(base64, sub.reshape(-1))[1].view(sub.shape).amin(dim=1)
        slope_avg = self.delta_b / h
        self.free = (slope_min > _RISE_TOL) & (slope_avg > _RISE_TOL)
        # The new cell's lowest slope is slope_min + (r - 1) * slope_avg: keep it above a floor
        # that is min_ratio of the base's, and min_slope where the base's lies above it.
        floor = torch.maximum(min_ratio * slope_min, torch.minimum(slope_min, torch.full_like(slope_min, min_slope)))
        lower = 1.0 + (floor - slope_min) / slope_avg.clamp_min(_RISE_TOL)
        self.lower = lower[self.free].clamp(min_ratio, 1.0)
        self.upper = torch.full_like(self.lower, max_ratio)
        self.delta_s = torch.diff(act.s.detach().double())
        # s at the last knot is the sum of all rises of s: it must stay 0.
        self.target = float(self.delta_b[self.free].sum()) - self.eps * float(self.delta_s[~self.free].sum())
        cum = torch.cat([d.p.new_zeros(1), torch.cumsum(d.mass, 0)])
        at_knots = _interp_clamped(t, d.edges, cum)
        self.cell_mass = torch.diff(at_knots)[self.free].clamp_min(1e-12)
        # The objective's cells: those of the density's grid where the base rises.
        with torch.no_grad():
            self.base_edges = base64(d.edges)
        mass = d.mass / d.mass.sum()
        rising = (torch.diff(self.base_edges) > _RISE_TOL * d.step) & (mass > 0)
        self.mass, self.rising = mass, rising
        self.rising_mass = float(mass[rising].sum())

    def log_ratio(self, s: torch.Tensor) -> torch.Tensor:
        rise = self.delta_b[self.free] + self.eps * torch.diff(s)[self.free]
        return (rise / self.delta_b[self.free]).clamp_min(1e-12).log()

    def knot_values(self, u: torch.Tensor) -> torch.Tensor:
        delta_s = self.delta_s.clone() if not u.requires_grad else self.delta_s.clone().to(u.dtype)
        delta_s = delta_s.masked_scatter(self.free, (u.exp() - 1.0) * self.delta_b[self.free] / self.eps)
        s = torch.cat([delta_s.new_zeros(1), torch.cumsum(delta_s, 0)])
        return torch.cat([s[:-1], s.new_zeros(1)])  # the end knot is 0 (the residual is rounding)

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """Rescale ``r = exp(u)`` by one factor and clip to the bounds so that ``s`` ends at 0."""
        r, w = u.detach().exp(), self.delta_b[self.free]

        def total(log_c: float) -> float:
            return float((w * (r * math.exp(log_c)).clamp(self.lower, self.upper)).sum())

        lo_c, hi_c = -30.0, 30.0
        for _ in range(80):  # total() is increasing in log_c: bisection
            mid = 0.5 * (lo_c + hi_c)
            lo_c, hi_c = (mid, hi_c) if total(mid) < self.target else (lo_c, mid)
        return (r * math.exp(0.5 * (lo_c + hi_c))).clamp(self.lower, self.upper).log()

    def objective_of(self, s: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self._objective(s))

    def objective(self, u: torch.Tensor, with_grad: bool = False) -> tuple[float, torch.Tensor]:
        u = u.detach().clone().requires_grad_(with_grad)
        with torch.enable_grad():
            value = self._objective(self.knot_values(u))
            if not with_grad or not bool(torch.isfinite(value)):
                return float(value.detach()), torch.full_like(u, math.nan)
            (grad,) = torch.autograd.grad(value, u)
        return float(value.detach()), grad

    def _objective(self, s: torch.Tensor) -> torch.Tensor:
        fe = self.base_edges + self.eps * _spline_ops(self.d.edges, s, self.lo, self.hi)
        rise = torch.diff(fe)[self.rising]
        if bool((rise <= 0).any()):
            return torch.tensor(math.inf, dtype=fe.dtype)
        a, b, m = fe[:-1], fe[1:], self.mass
        mean = (m * (a + b)).sum() / 2
        var = (m * (a * a + a * b + b * b)).sum() / 3 - mean * mean
        log_slope = (self.mass[self.rising] * torch.log(rise / self.d.step)).sum()
        return log_slope - 0.5 * self.rising_mass * torch.log(var)
