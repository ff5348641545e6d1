"""The constrained problem behind :meth:`dynact.EAFOActivation.iterate` (docs/math.md, "Iterating").

:mod:`dynact.spline` builds on this module; the activation comes in as anything with the
attributes of :class:`Spline`, so nothing here imports it back.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from dynact import eafo
from dynact.density import Density
from dynact.kernels.reference import _interp_clamped, _spline_ops

__all__ = ["SlopeProblem", "Spline", "finite_arg", "take_step"]


class Spline(Protocol):
    """What :class:`SlopeProblem` reads of an :class:`~dynact.EAFOActivation`: its knot values
    ``s``, scale ``eps``, grid ends ``lo`` and ``hi`` (tensors) and the knot positions."""

    s: torch.Tensor
    eps: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def knot_positions(self) -> torch.Tensor: ...


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


#: Slope below which the base counts as not rising (the same convention as
#: :func:`dynact.eafo.output_stats`'s flat cells).
_RISE_TOL = eafo.FLAT_TOL
#: Points per knot cell at which the base's slope is checked for the cell's minimum slope.
_SUBPOINTS = 8
#: Points per round, and rounds, of the search for where the base starts (or stops) rising
#: inside a density cell: the point is then known to 32**-5 of a cell.
_SEARCH_POINTS, _SEARCH_ROUNDS = 32, 5
#: Relative size of a float32 rounding of the knot values, with a safety factor: moves of the
#: activation below it are rounding, not a step.
_ROUNDING = 2.0**-20


def _slope(base64: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base's first derivative at ``x`` (autograd; ``relu'(0) = 0``)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (d1,) = torch.autograd.grad(base64(x).sum(), x, allow_unused=True)
    return torch.zeros_like(x) if d1 is None else d1.detach()


def _rise_starts(base64: nn.Module, a: torch.Tensor, b: torch.Tensor, rises_at_b: torch.Tensor) -> torch.Tensor:
    """In each cell ``[a, b]`` whose base rises at one end only, where its rising part begins
    (``rises_at_b``) or ends (otherwise), to ``32**-5`` of the cell, on the rising side."""
    frac = torch.linspace(0.0, 1.0, _SEARCH_POINTS + 1, dtype=a.dtype, device=a.device)
    for _ in range(_SEARCH_ROUNDS):
        x = a[:, None] + (b - a)[:, None] * frac
        up = _slope(base64, x) > _RISE_TOL
        up = torch.where(rises_at_b[:, None], up, ~up)  # True on the side that rises (resp. falls)
        up[:, -1] = True
        k = up.int().argmax(dim=1)  # the first point on the far side of the change
        a, b = x.gather(1, (k - 1).clamp_min(0)[:, None])[:, 0], x.gather(1, k[:, None])[:, 0]
    return torch.where(rises_at_b, b, a)


class SlopeProblem:
    """The constrained problem behind :meth:`EAFOActivation.iterate`, for one density.

    Variables ``u = log r`` on the free knot cells (where the base rises throughout); the
    knot values follow by summing the rises, with the other cells keeping their rise
    (:meth:`restore` may raise it on the cells around a minimum of the base).
    """

    def __init__(self, act: Spline, d: Density, base64: nn.Module, min_ratio: float,
                 max_ratio: float, min_slope: float) -> None:
        self.d, self.base64 = d, base64
        self.scale = d.mean_std()[1]
        self.eps = float(act.eps.detach().reshape(-1)[0])
        self.store_dtype = act.s.dtype
        self.lo, self.hi = act.lo.detach().double(), act.hi.detach().double()
        t = act.knot_positions()
        self.t, self.h = t, float(t[1] - t[0])
        with torch.no_grad():
            self.delta_b = torch.diff(base64(t))
        sub = t[:-1, None] + self.h * torch.linspace(0.0, 1.0, _SUBPOINTS + 1, dtype=t.dtype, device=t.device)
        slopes = _slope(base64, sub.reshape(-1)).view(sub.shape)
        up = slopes > _RISE_TOL
        slope_min, slope_avg = slopes.amin(dim=1), self.delta_b / self.h
        self.free = up.all(dim=1) & (slope_avg > _RISE_TOL)
        partly = up.any(dim=1) & ~self.free
        # A cell with a flat stretch of the base (ReLU's kink) keeps its rise exactly, so a dead
        # region stays dead; the others that rise only in part hold a minimum of the base, and
        # the correction must not fall there (the base's slope goes to 0 at the minimum).
        flat_stretch = ((slopes[:, :-1].abs() <= _RISE_TOL) & (slopes[:, 1:].abs() <= _RISE_TOL)).any(dim=1)
        self.pinned, self.raised = partly & flat_stretch, partly & ~flat_stretch
        self.pinned_slope = torch.where(up, slopes, torch.full_like(slopes, math.inf)).amin(dim=1)
        # The new cell's lowest slope is slope_min + (r - 1) * slope_avg: keep it above a floor
        # that is min_ratio of the base's, and min_slope where the base's lies above it.
        floor = torch.maximum(min_ratio * slope_min, torch.minimum(slope_min, torch.full_like(slope_min, min_slope)))
        lower = 1.0 + (floor - slope_min) / slope_avg.clamp_min(_RISE_TOL)
        self.lower = lower[self.free].clamp(min_ratio, 1.0)
        self.upper = torch.full_like(self.lower, max_ratio)
        self.set_fixed(act.s.detach().double())
        cum = torch.cat([d.p.new_zeros(1), torch.cumsum(d.mass, 0)])
        at_knots = _interp_clamped(t, d.edges, cum)
        self.cell_mass = torch.diff(at_knots)[self.free].clamp_min(1e-12)
        self._objective_cells(d, base64)

    def _objective_cells(self, d: Density, base64: nn.Module) -> None:
        """The parts of the density's cells where the base rises: whole cells, and the rising
        part of a cell holding a minimum (or a kink) of the base, split at the point it begins."""
        e = d.edges
        with torch.no_grad():
            self.base_edges = base64(e)
        mass = d.mass / d.mass.sum()
        up = _slope(base64, e) > _RISE_TOL
        whole = up[:-1] & up[1:] & (torch.diff(self.base_edges) > _RISE_TOL * d.step) & (mass > 0)
        split = (up[:-1] ^ up[1:]) & (mass > 0)
        a, b = e[:-1][split], e[1:][split]
        rises_at_b = up[1:][split]
        x0 = _rise_starts(base64, a, b, rises_at_b)
        a, b = torch.where(rises_at_b, x0, a), torch.where(rises_at_b, b, x0)
        with torch.no_grad():
            base_a, base_b = base64(a), base64(b)
        keep = (base_b - base_a) > _RISE_TOL * (b - a)  # a sliver the base barely rises on is left out
        self.x_left = torch.cat([e[:-1][whole], a[keep]])
        self.x_right = torch.cat([e[1:][whole], b[keep]])
        self.base_left = torch.cat([self.base_edges[:-1][whole], base_a[keep]])
        self.base_right = torch.cat([self.base_edges[1:][whole], base_b[keep]])
        self.obj_mass = torch.cat([mass[whole], (mass[split] * (b - a) / d.step)[keep]])
        self.mass, self.rising_mass = mass, float(self.obj_mass.sum())

    # ------------------------------------------------------------------ the variables
    def set_fixed(self, s: torch.Tensor) -> None:
        """Take the rises of the cells that are not variables from ``s``, and the end condition with them."""
        self.delta_s = torch.diff(s.detach().double())
        # s at the last knot is the sum of all rises of s: it must stay 0.
        self.target = float(self.delta_b[self.free].sum()) - self.eps * float(self.delta_s[~self.free].sum())

    def log_ratio(self, s: torch.Tensor) -> torch.Tensor:
        rise = self.delta_b[self.free] + self.eps * torch.diff(s)[self.free]
        return (rise / self.delta_b[self.free]).clamp_min(1e-12).log()

    def knot_values(self, u: torch.Tensor) -> torch.Tensor:
        delta_s = self.delta_s.clone() if not u.requires_grad else self.delta_s.clone().to(u.dtype)
        delta_s = delta_s.masked_scatter(self.free, (u.exp() - 1.0) * self.delta_b[self.free] / self.eps)
        s = torch.cat([delta_s.new_zeros(1), torch.cumsum(delta_s, 0)])
        return torch.cat([s[:-1], s.new_zeros(1)])  # the end knot is 0 (the residual is rounding)

    def reachable(self) -> bool:
        """Whether ratios within their bounds can meet the end condition."""
        w = self.delta_b[self.free]
        return float((w * self.lower).sum()) <= self.target * (1 + 1e-12) and \
            self.target <= float((w * self.upper).sum()) * (1 + 1e-12)

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """Rescale ``r = exp(u)`` by one factor and clip to the bounds so that ``s`` ends at 0."""
        r, w = u.detach().exp(), self.delta_b[self.free]
        # total(c) = sum w * clip(c r, lower, upper) is piecewise linear and increasing in c, with
        # kinks where a ratio reaches a bound: find the piece that holds the target, then solve.
        # Past its first kink a ratio follows c (the constant part loses w*lower, the slope gains
        # w*r); past its second it stays at the upper bound.
        kinks, order = torch.cat([self.lower / r, self.upper / r]).sort()
        wr = w * r
        const = torch.cat([-w * self.lower, w * self.upper])[order].cumsum(0) + float((w * self.lower).sum())
        slope = torch.cat([wr, -wr])[order].cumsum(0)
        totals = const + slope * kinks
        i = int(torch.searchsorted(totals, totals.new_tensor([self.target])).clamp(1, len(kinks) - 1))
        c0, c1, t0, t1 = float(kinks[i - 1]), float(kinks[i]), float(totals[i - 1]), float(totals[i])
        c = c0 + (self.target - t0) * (c1 - c0) / (t1 - t0) if t1 > t0 else c1
        return (r * c).clamp(self.lower, self.upper).log()

    # ------------------------------------------------------------------ feasibility
    def restore(self, s: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        """The feasible point for ``s``: ``(s_projected, "")``, or ``(None, why)`` where there is none.

        Where the base has a minimum the correction's rise is raised to at least 0; on the
        free cells the ratio is clipped into its bounds; one common factor on the free ratios
        then restores the end condition. Afterwards the fixed rises are those of the result.
        """
        delta = torch.diff(s.detach().double())
        low = self.pinned_slope[self.pinned] * self.h + self.eps * delta[self.pinned]
        if bool((low <= 0).any()):
            k = int(self.pinned.nonzero()[:, 0][low <= 0][0])
            return None, (
                f"activation not increasing on [{float(self.t[k]):.3g}, {float(self.t[k + 1]):.3g}] where its base "
                "rises, in a knot cell where the base is also flat (kept as it is, so the flat part stays "
                "flat): lower eps or refresh first"
            )
        raised = self.eps * delta[self.raised]
        delta[self.raised] = torch.where(raised < 0, torch.zeros_like(raised), delta[self.raised])
        self.set_fixed(torch.cat([delta.new_zeros(1), torch.cumsum(delta, 0)]))
        if not self.reachable():
            return None, (
                f"the slope bounds (ratio {float(self.lower.min()):.3g} to {float(self.upper.max()):.3g} of the "
                "base's rise) cannot hold with the spline zero at both grid ends, given the cells iterate "
                "keeps: refresh first, lower eps or raise max_ratio"
            )
        u = self.log_ratio(torch.cat([delta.new_zeros(1), torch.cumsum(delta, 0)]))
        u = u.clamp(self.lower.log(), self.upper.log())
        return self.knot_values(self.project(u)), ""

    def stored(self, s: torch.Tensor) -> torch.Tensor:
        """``s`` rounded to the module's dtype (candidates are judged as they will be stored),
        with the cells around a minimum of the base kept from falling by the rounding."""
        out = s.to(self.store_dtype).to(torch.float64)
        last = out.shape[0] - 1
        for k in self.raised.nonzero()[:, 0].tolist():
            if self.eps * float(out[k + 1] - out[k]) < 0:
                if k + 1 < last:
                    out[k + 1] = out[k]
                else:
                    out[k] = out[k + 1]
        return out

    def rounding(self, s: torch.Tensor) -> float:
        """The largest change of the activation that rounding could cause: of ``s`` to float32,
        and of float64 sums on the scale of the layer."""
        return abs(self.eps) * _ROUNDING * float(s.abs().max()) + 1e-12 * self.scale

    def feasible(self, s: torch.Tensor) -> bool:
        """Whether ``s`` meets the slope bounds, up to what rounding the knot values could cause."""
        delta = torch.diff(s.detach().double())
        slack = abs(self.eps) * _ROUNDING * (s[:-1].abs() + s[1:].abs()) + 1e-12 * self.scale * self.h
        phi = self.eps * delta
        if bool((phi[self.raised] < -slack[self.raised]).any()):
            return False
        if bool((self.pinned_slope[self.pinned] * self.h + phi[self.pinned] <= 0).any()):
            return False
        w = self.delta_b[self.free]
        rise, tol = w + phi[self.free], slack[self.free]
        return bool(((rise >= self.lower * w - tol) & (rise <= self.upper * w + tol)).all())

    def describe(self, s: torch.Tensor) -> str:
        """What is infeasible about ``s``, in words: a fold where the base rises, or slopes beyond the bounds."""
        folds = self.folds(s)
        if folds:
            a, b = folds[0]
            more = f" (and {len(folds) - 1} more stretches)" if len(folds) > 1 else ""
            return f"activation not increasing on [{a:.3g}, {b:.3g}]{more} where its base rises"
        u = self.log_ratio(s)
        bad = (u < self.lower.log() - 1e-9) | (u > self.upper.log() + 1e-9)
        if bool(bad.any()):
            where = self.free.nonzero()[:, 0][bad]
            a, b = float(self.t[int(where.min())]), float(self.t[int(where.max()) + 1])
            return f"slopes beyond the bounds (min_ratio, min_slope, max_ratio) on [{a:.3g}, {b:.3g}]"
        return "the correction falls at a minimum of the base"

    def folds(self, s: torch.Tensor) -> list[tuple[float, float]]:
        """Stretches ``(a, b)`` of the density's grid where the base rises but the activation does not."""
        with torch.no_grad():
            bad = self._slopes(s) <= 0
        if not bool(bad.any()):
            return []
        a, b = self.x_left[bad], self.x_right[bad]
        order = torch.argsort(a)
        out: list[list[float]] = []
        gap = 1.5 * self.d.step
        for lo_x, hi_x in zip(a[order].tolist(), b[order].tolist(), strict=True):
            if out and lo_x <= out[-1][1] + gap:
                out[-1][1] = max(out[-1][1], hi_x)
            else:
                out.append([lo_x, hi_x])
        return [(x, y) for x, y in out]

    # ------------------------------------------------------------------ the objective
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

    def _f(self, x: torch.Tensor, base: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return base + self.eps * _spline_ops(x, s, self.lo, self.hi)

    def _slopes(self, s: torch.Tensor) -> torch.Tensor:
        rise = self._f(self.x_right, self.base_right, s) - self._f(self.x_left, self.base_left, s)
        return rise / (self.x_right - self.x_left)

    def _objective(self, s: torch.Tensor) -> torch.Tensor:
        slopes = self._slopes(s)
        if bool((slopes <= 0).any()):
            return torch.tensor(math.nan, dtype=slopes.dtype)  # undefined: a fold where the base rises
        fe = self._f(self.d.edges, self.base_edges, s)
        a, b, m = fe[:-1], fe[1:], self.mass
        mean = (m * (a + b)).sum() / 2
        var = (m * (a * a + a * b + b * b)).sum() / 3 - mean * mean
        return (self.obj_mass * torch.log(slopes)).sum() - 0.5 * self.rising_mass * torch.log(var)


def take_step(problem: SlopeProblem, old: torch.Tensor, eta: float, max_log_change: float, limit: float,
              backtrack: int) -> dict:
    """One update of :meth:`EAFOActivation.iterate` on ``problem``: restore, then descend.

    Returns ``dict(s, accepted, reason, objective_before, objective_after, objective_restored, change, scale,
    feasible_before)`` with ``s`` the new knot values (``None`` when refused). ``objective_before`` is
    ``J(old)``, so it equals the previous update's ``objective_after`` on the same density;
    ``objective_restored`` is ``J`` at ``old``'s projection onto the bounds (``old`` itself when it
    meets them), where the descent starts.
    """
    out = dict(s=None, accepted=False, reason="", objective_before=math.nan, objective_after=math.nan,
               objective_restored=math.nan, change=0.0, scale=0.0, feasible_before=False)
    projected, why = problem.restore(old)
    if projected is None:
        out["reason"] = why
        out["objective_before"] = out["objective_after"] = problem.objective_of(old)
        return out
    projected = problem.stored(projected)
    moved = abs(problem.eps) * float((projected - old).abs().max())
    feasible = problem.feasible(old)
    out["feasible_before"] = feasible
    if feasible:
        start, moved = old, 0.0
        problem.set_fixed(old)
    else:
        start = projected
        if moved > limit:
            return _restore_part_way(problem, old, projected, moved, limit, out)
    return _descend(problem, old, start, moved, feasible, eta, max_log_change, limit, backtrack, out)


def _restore_part_way(problem: SlopeProblem, old: torch.Tensor, projected: torch.Tensor, moved: float,
                      limit: float, out: dict) -> dict:
    """Move as far onto the bounds as the trust region allows (rounding included)."""
    t = max(0.0, limit - 4 * problem.rounding(projected)) / moved
    new = problem.stored(old + t * (projected - old))
    out.update(s=new, accepted=True, change=abs(problem.eps) * float((new - old).abs().max()),
               objective_before=problem.objective_of(old), objective_after=problem.objective_of(new),
               objective_restored=problem.objective_of(projected),
               reason=f"restoring the slope bounds ({problem.describe(old)}): moved {t:.0%} of the "
                      f"way, within the trust region {limit:.3g}; the next updates go on")
    return out


def _descend(problem: SlopeProblem, old: torch.Tensor, start: torch.Tensor, moved: float, feasible: bool,
             eta: float, max_log_change: float, limit: float, backtrack: int, out: dict) -> dict:
    """The descent part of :func:`take_step` from ``start`` (``old`` itself, or its projection onto
    the bounds ``moved`` away from it): backtracking on the objective, inside the trust region."""
    j0 = out["objective_restored"] = problem.objective_of(start)
    # The record reports the module's own point (``old``), where the previous update ended, not
    # the projection the descent starts from: a refused step ends where it started.
    out["objective_before"] = out["objective_after"] = j0 if feasible else problem.objective_of(old)
    if not math.isfinite(j0):
        out["reason"] = f"{problem.describe(start)}: lower eps or refresh first"
        return out
    u0 = problem.log_ratio(start).clamp(problem.lower.log(), problem.upper.log())
    _, grad = problem.objective(u0, with_grad=True)
    direction = (-eta * grad / problem.cell_mass).clamp(-max_log_change, max_log_change)
    if not bool(torch.isfinite(direction).all()):
        direction = torch.zeros_like(direction)
    scale, j1 = 1.0, math.nan
    for _ in range(backtrack + 1):
        new, change, scale = _within_trust_region(problem, u0, direction, scale, old, start, moved, limit)
        if change > limit:
            break
        j1 = problem.objective_of(new)
        if math.isfinite(j1) and j1 < j0:
            out.update(s=new, accepted=True, reason="accepted", objective_after=j1, change=change, scale=scale)
            if not feasible:
                out["reason"] = f"restored the slope bounds ({problem.describe(old)}), then descended"
            return out
        scale *= 0.5
    if not feasible:
        out.update(s=start, accepted=True, change=moved, objective_after=j0,
                   reason=f"restored the slope bounds ({problem.describe(old)}); no descent step lowered the "
                          "objective from there yet")
        return out
    out["reason"] = (
        f"objective did not drop ({j0:.6g} -> {j1:.6g} at the smallest step tried, after {backtrack} halvings): "
        "the activation is at the objective's minimum under the slope bounds for this density, or eta is "
        "too large (lower it) or of the wrong sign"
    )
    return out


def _within_trust_region(problem: SlopeProblem, u0: torch.Tensor, direction: torch.Tensor, scale: float,
                         old: torch.Tensor, start: torch.Tensor, moved: float, limit: float):
    """Shrink the step ``scale * direction`` from ``u0`` into the trust region (what is left of it
    after restoring): ``(new knot values, change from old, scale)``; change > limit if it cannot."""
    new, change = None, math.inf
    for _ in range(30):
        new = problem.stored(problem.knot_values(problem.project(u0 + scale * direction)))
        change = abs(problem.eps) * float((new - old).abs().max())
        if change <= limit or scale == 0.0:
            break
        part = abs(problem.eps) * float((new - start).abs().max())
        scale *= min(0.5, max(0.0, 0.9 * (limit - moved) / max(part, 1e-300)))
    return new, change, scale
