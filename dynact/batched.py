"""One update for every activation site: the plugin's update as ``(sites, bins)`` tensor work.

:class:`dynact.ActivationOptimizer` used to update one site at a time: per site a density, a
dozen host reads for its guards, a float64 copy of its module, its output figures and, for a
dynamic site, the refreshed spline. :func:`update_rows` does the same for all sites together:
the densities come as :class:`~dynact.density.rows.Rows`, every guard is a ``(sites,)`` mask,
the activations are evaluated once per kind of base on all their sites' grids, and everything
the host needs (guards, figures) is read back in one transfer at the end.

It takes the common path: a site with a finite window, a base without parameters of its own,
and for a dynamic site a ``refresh`` whose spline grid needs no move. A window whose density
grid must be re-fitted is common too (every site's first windows are): data spilling beyond the
grid (``"spill"``: only the mass outside is reported, as the one-site path does) or too few bins
on the data (``"coarse"``: figures of the activation as it is, no update); the caller makes the
new estimators from :attr:`Outcome.kind` and the host values returned. Any other site (a skip, a
spline grid to re-place, ``iterate``, a parametrised base, FSDP-sharded parameters) comes back as
not done and is left untouched, so the caller can run the one-site path on it, which handles
every case and warns as it always did. The arithmetic is
that of :func:`dynact.eafo.output_stats`, :meth:`dynact.EAFOActivation.refresh` and
:class:`~dynact.density.Density`, operation for operation, so the two paths agree to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from dynact.density import Density
from dynact.density.grid import grid_ends_ok
from dynact.density.rows import Rows
from dynact.eafo import FLAT_TOL, _float64_module, _second
from dynact.kernels.reference import _interp_uniform
from dynact.registry import activation_types
from dynact.spline import PLACE_QUANTILE, PLACE_WIDEN, TAPER, EAFOActivation

__all__ = ["Site", "Outcome", "update_rows", "density_of"]

# Quantiles that bound "the data" when a grid is fitted; the grid adds a margin around them.
_Q_LO, _Q_HI = 1e-3, 1.0 - 1e-3
# A grid is too coarse when the central 99.8% of the data covers fewer than 1/8 of its bins.
_MIN_FILL = 1.0 / 8.0
# Inputs spanning less than this times max(1, |x|) are treated as constant (see dynact.core).
_MIN_SPREAD = 3e-4
_SQRT_2PI = math.sqrt(2.0 * math.pi)
# An update is checked one site at a time when its outputs could come within this factor of
# the largest value of the input's dtype (dynact.update_guards.overflows decides then).
_OVERFLOW_MARGIN = 0.25
# Float64 copies of parameter-free bases, by (type, settings, device): built once, reused.
_BASES: dict[tuple, nn.Module] = {}


@dataclass
class Site:
    """What :func:`update_rows` needs of one site: its module, whether it is updated, and the
    dtype of its sampled inputs."""

    module: nn.Module
    dynamic: bool
    in_dtype: torch.dtype = torch.float32


@dataclass
class Outcome:
    """What :func:`update_rows` did, by site: ``done[i]`` (else nothing of site ``i`` was
    touched), which case a done site took (``kind[i]``: ``"update"``, or a density grid to
    re-fit: ``"spill"``, ``"coarse"``), the figures of done sites (metric name -> float), the
    knot values to store in a done dynamic site (``None`` otherwise) and the host values of each
    site's window: its extremes ``ends`` (``[-min, max]``) and its ``_Q_LO``, ``_Q_HI``
    quantiles ``q`` (what a grid is re-fitted from); ``new_grid[i]``: the spline grid ``(lo,
    hi)`` to store with ``new_s[i]`` where it was re-placed (``EAFOActivation.place_grid``),
    else ``None``."""

    done: list[bool]
    kind: list[str] = field(default_factory=list)
    figures: list[dict[str, float]] = field(default_factory=list)
    new_s: list[Optional[torch.Tensor]] = field(default_factory=list)
    count: list[float] = field(default_factory=list)
    outside: list[float] = field(default_factory=list)
    nonfinite: list[float] = field(default_factory=list)
    grid: list[tuple[float, float]] = field(default_factory=list)
    ends: list[tuple[float, float]] = field(default_factory=list)
    q: list[tuple[float, float]] = field(default_factory=list)
    new_grid: list[Optional[tuple[float, float]]] = field(default_factory=list)


# ---------------------------------------------------------------------------- entry point
@torch.no_grad()
def update_rows(sites: list[Site], rows: Rows, ends: torch.Tensor, mode: str, max_outside: float) -> Outcome:
    """Figures and refreshed splines of all ``sites`` from their densities ``rows`` and the
    ``(sites, 2)`` extremes ``[-min, max]`` of their windows (``-inf`` where none was finite).

    Writes nothing: the caller stores ``new_s`` and resets the estimators of done sites. Reads
    back to the host once.
    """
    n = len(sites)
    if n == 0:
        return Outcome(done=[])
    plan = _plan(sites, rows, mode)
    measured, inside, fits, fine, q_lo, q_hi = _window_checks(rows, ends, max_outside)
    edges = _linspace(rows.lo, rows.hi, rows.p.shape[1] + 1)
    base_edges = _evaluate(plan, edges, grad=False)[0]
    spline = _spline_state(plan, sites, rows.p.device)
    usable = measured & plan.batchable & spline.finite
    # The cases of dynact.core's one-site path, in its order: data beyond the density grid (re-fit
    # it to cover them, report only that mass), too few bins on the data (re-fit it around them,
    # figures of the activation as it is), else the update.
    spill = usable & ~inside
    coarse = usable & inside & fits & ~fine
    ok = usable & inside & fits & fine
    s_now = spline.s
    change = torch.zeros(n, dtype=torch.float64, device=rows.p.device)
    new_s = s_now
    lo, hi = spline.lo, spline.hi
    if any(site.dynamic for site in sites):
        new_s, change, dyn_ok, new_lo, new_hi = _refresh(plan, sites, rows, edges, spline, (q_lo, q_hi), max_outside)
        ok &= dyn_ok | ~spline.dynamic
        new_s = torch.where(ok.unsqueeze(1), new_s, s_now)
        lo, hi = torch.where(ok, new_lo, lo), torch.where(ok, new_hi, hi)
    f = base_edges + spline.eps.unsqueeze(1) * _spline_at(edges, new_s, lo, hi)
    f = torch.where(spline.is_eafo.unsqueeze(1), f, base_edges)
    stats, stats_ok = _stats(f, rows)
    ok &= stats_ok
    coarse &= stats_ok
    kind = ok.to(torch.float64) + 2 * spill.to(torch.float64) + 3 * coarse.to(torch.float64)
    outside = torch.where(spline.is_eafo, _outside_mass(rows, edges, lo, hi), rows.outside)
    moved = (lo != spline.lo) | (hi != spline.hi)
    table = torch.stack([kind, *stats.values(), outside, spline.eps, change, rows.total, rows.outside,
                         rows.nonfinite, rows.lo, rows.hi, ends[:, 0].double(), ends[:, 1].double(), q_lo, q_hi,
                         moved.to(torch.float64), lo, hi], dim=1)
    host = table.tolist()  # the one read back
    return _outcome(sites, host, list(stats), new_s)


_KINDS = {1: "update", 2: "spill", 3: "coarse"}


def _outcome(sites, host, names, new_s) -> Outcome:
    kinds = [_KINDS.get(int(row[0]), "") for row in host]
    out = Outcome(done=[bool(kind) for kind in kinds], kind=kinds)
    k = len(names)
    for i, (site, row) in enumerate(zip(sites, host, strict=True)):
        if kinds[i] == "spill":
            figures = {"outside": row[5 + k]}  # the mass beyond the density grid, nothing else
        else:
            figures = dict(zip(names, row[1:1 + k], strict=True))
            figures["outside"] = row[1 + k]
            if isinstance(site.module, EAFOActivation):
                figures["eps"] = row[2 + k]
            if site.dynamic and kinds[i] == "update":
                figures["update_size"], figures["accepted"] = row[3 + k], 1.0
        out.figures.append(figures)
        out.new_s.append(new_s[i] if site.dynamic and kinds[i] == "update" else None)
        out.count.append(row[4 + k])
        out.outside.append(row[5 + k])
        out.nonfinite.append(row[6 + k])
        out.grid.append((row[7 + k], row[8 + k]))
        out.ends.append((row[9 + k], row[10 + k]))
        out.q.append((row[11 + k], row[12 + k]))
        out.new_grid.append((row[14 + k], row[15 + k]) if out.new_s[i] is not None and row[13 + k] else None)
    return out


def density_of(rows: Rows, i: int, outcome: Outcome) -> Density:
    """Row ``i`` of ``rows`` as a :class:`~dynact.density.Density` (already checked: built
    without checking again, which would read values back)."""
    d = object.__new__(Density)
    (lo, hi), count = outcome.grid[i], outcome.count[i]
    outside, nonfinite = outcome.outside[i], outcome.nonfinite[i]
    for name, value in (("grid", rows.grid[i]), ("p", rows.p[i]), ("dp", rows.dp[i]), ("count", float(round(count))),
                        ("outside", min(1.0, max(0.0, outside))), ("lo", lo), ("hi", hi),
                        ("nonfinite", int(nonfinite))):
        object.__setattr__(d, name, value)
    return d


# ---------------------------------------------------------------------------- guards
def _window_checks(rows: Rows, ends: torch.Tensor, max_outside: float):
    """``(sites,)`` masks of ``dynact.core``'s guards, in its order: measured (no NaN/Inf, data
    seen, not constant), on the density grid, not nearly constant, not too coarse; and the
    ``_Q_LO``, ``_Q_HI`` quantiles."""
    low, high = -ends[:, 0].double(), ends[:, 1].double()
    seen = torch.isfinite(ends).all(1) & rows.ok & (rows.nonfinite == 0)
    spread = high - low > _MIN_SPREAD * torch.maximum(low.abs(), high.abs()).clamp_min(1.0)
    q_lo, q_hi = _quantiles(rows, (_Q_LO, _Q_HI))
    fit_lo = torch.minimum(torch.maximum(q_lo, low), high)
    fit_hi = torch.maximum(torch.minimum(q_hi, high), fit_lo)
    fits = fit_hi - fit_lo > _MIN_SPREAD * torch.maximum(fit_lo.abs(), fit_hi.abs()).clamp_min(1.0)
    fine = q_hi - q_lo >= _MIN_FILL * (rows.hi - rows.lo)
    return seen & spread, rows.outside <= max_outside, fits, fine, q_lo, q_hi


def _quantiles(rows: Rows, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """``Density.quantile`` by row, for each ``q`` of ``qs``."""
    bins = rows.p.shape[1]
    mass = (rows.p * rows.step).clamp_min(0)
    total = mass.sum(1, keepdim=True)
    cum = torch.cat([mass.new_zeros(mass.shape[0], 1), torch.cumsum(mass, 1)], dim=1) / total
    edges = _linspace(rows.lo, rows.hi, bins + 1)
    target = torch.tensor(qs, dtype=cum.dtype, device=cum.device).expand(cum.shape[0], -1).contiguous()
    k = torch.searchsorted(cum, target).clamp_(1, bins)
    c0, c1 = cum.gather(1, k - 1), cum.gather(1, k)
    w = ((target - c0) / (c1 - c0)).clamp(0.0, 1.0).where(c1 > c0, 0.5)
    e0, e1 = edges.gather(1, k - 1), edges.gather(1, k)
    return list((e0 + w * (e1 - e0)).unbind(1))


def _outside_mass(rows: Rows, edges: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``EAFOActivation.outside_mass`` by row, for spline grids ``[lo, hi]``."""
    cum = torch.cat([rows.p.new_zeros(rows.p.shape[0], 1), torch.cumsum(rows.p * rows.step, 1)], dim=1)
    n = edges.shape[1]
    step = (edges[:, 1] - edges[:, 0]).unsqueeze(1)
    x = torch.stack([lo, hi], dim=1)
    t = ((x - edges[:, :1]) / step).clamp(0.0, n - 1.0)
    j = t.floor().long().clamp(0, n - 2)
    w = t - j
    at = cum.gather(1, j) * (1 - w) + cum.gather(1, j + 1) * w
    return (1.0 - (at[:, 1] - at[:, 0])).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------- functions
@dataclass
class _Plan:
    """Sites grouped by base: ``groups`` maps a float64 base module to its site indices."""

    groups: list[tuple[nn.Module, torch.Tensor]]
    batchable: torch.Tensor
    mode: str


def _base_key(base: nn.Module) -> Optional[tuple]:
    """Sites whose bases share this key compute the same function (None: not batchable)."""
    if type(base) not in activation_types() or isinstance(base, EAFOActivation):
        return None
    if any(True for _ in base.parameters()) or any(True for _ in base.buffers()):
        return None
    return type(base), repr(base)


def _plan(sites: list[Site], rows: Rows, mode: str) -> _Plan:
    device = rows.p.device
    keys: dict[tuple, list[int]] = {}
    bases: dict[tuple, nn.Module] = {}
    batchable = []
    for i, site in enumerate(sites):
        module = site.module
        spline = isinstance(module, EAFOActivation)
        base = module.base if spline else module
        key = _base_key(base)
        usable = key is not None and (not site.dynamic or mode == "refresh") and (not spline or _plain_spline(module))
        batchable.append(usable)
        if usable:
            keys.setdefault(key, []).append(i)
            bases.setdefault(key, base)
    groups = []
    for key, idx in keys.items():
        base = _BASES.get((*key, device))
        if base is None:
            base = _BASES.setdefault((*key, device), _float64_module(bases[key], device))
        groups.append((base, torch.tensor(idx, device=device)))
    return _Plan(groups, torch.tensor(batchable, dtype=torch.bool, device=device), mode)


def _plain_spline(act: EAFOActivation) -> bool:
    # Whole float32 tensors (not FSDP2's sharded DTensors), one eps, the default dtypes.
    tensors = (act.s, act.lo, act.hi, act.eps)
    return (act.eps.numel() == 1 and all(t.dtype == torch.float32 for t in tensors)
            and not any(callable(getattr(t, "full_tensor", None)) for t in tensors))


def _evaluate(plan: _Plan, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each site's base (and its first two derivatives if ``grad``) at its row of ``x``,
    in float64 (0 for sites that are not batchable)."""
    y, d1, d2 = (torch.zeros_like(x) for _ in range(3))
    for base, idx in plan.groups:
        xs = x.index_select(0, idx).detach().clone().requires_grad_(grad)
        with torch.enable_grad() if grad else torch.no_grad():
            out = base(xs).to(torch.float64)
            if grad and out.requires_grad:
                (g1,) = torch.autograd.grad(out.sum(), xs, create_graph=True)
                d1.index_copy_(0, idx, g1.detach())
                d2.index_copy_(0, idx, _second(g1, xs, torch.zeros_like(xs)).detach())
        y.index_copy_(0, idx, out.detach())
    return y, d1, d2


@dataclass
class _Splines:
    """The spline state of every site, stacked (zeros for sites without a spline)."""

    s: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    eps: torch.Tensor
    is_eafo: torch.Tensor
    dynamic: torch.Tensor
    finite: torch.Tensor


def _spline_state(plan: _Plan, sites: list[Site], device: torch.device) -> _Splines:
    acts = [s.module if isinstance(s.module, EAFOActivation) else None for s in sites]
    plain = [a is not None and _plain_spline(a) for a in acts]
    knots = max((a.knots for a, ok in zip(acts, plain, strict=True) if ok), default=2)
    zeros = torch.zeros(knots, dtype=torch.float32, device=device)
    same = [ok and a.knots == knots for a, ok in zip(acts, plain, strict=True)]
    s = torch.stack([a.s.detach().to(device) if ok else zeros for a, ok in zip(acts, same, strict=True)])
    one = torch.zeros(1, dtype=torch.float32, device=device)
    lo, hi, eps = (torch.cat([getattr(a, name).detach().reshape(1).to(device) if ok else one
                              for a, ok in zip(acts, same, strict=True)]) for name in ("lo", "hi", "eps"))
    flags = torch.tensor([[ok, ok and site.dynamic] for ok, site in zip(same, sites, strict=True)],
                         dtype=torch.bool, device=device)
    is_eafo = flags[:, 0]
    mismatch = torch.tensor([a is not None and not ok for a, ok in zip(acts, same, strict=True)], device=device)
    finite = torch.isfinite(s).all(1) & torch.isfinite(torch.stack([lo, hi, eps], 1)).all(1) & ~mismatch
    hi = torch.where(is_eafo, hi, one + 1)  # a harmless grid for rows without a spline
    return _Splines(s.double(), lo.double(), hi.double(), eps.double(), is_eafo, flags[:, 1], finite)


def _spline_at(x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``kernels.reference._spline_ops`` by row: knot values ``s`` on ``[lo, hi]`` at ``x``."""
    value = torch.cat([s.new_zeros(s.shape[0], 2), s[:, 1:-1], s.new_zeros(s.shape[0], 3)], dim=1)
    slope = value[:, 1:] - value[:, :-1]
    a = ((s.shape[1] - 1) / (hi - lo)).unsqueeze(1)
    b = 1.0 - lo.unsqueeze(1) * a
    last = slope.shape[1] - 1
    u = (x * a + b).clamp_min(0.0).clamp_max(last)
    j = u.long().clamp_min(0).clamp_max(last)
    return value.gather(1, j) + (u - j) * slope.gather(1, j)


def _linspace(lo: torch.Tensor, hi: torch.Tensor, steps: int) -> torch.Tensor:
    """``torch.linspace(lo[r], hi[r], steps)`` by row, with its arithmetic (each half from its end)."""
    i = torch.arange(steps, dtype=torch.float64, device=lo.device)
    step = ((hi - lo) / (steps - 1)).unsqueeze(1)
    front = lo.unsqueeze(1) + step * i
    back = hi.unsqueeze(1) - step * (steps - 1 - i)
    return torch.where(i < steps // 2, front, back)


# ---------------------------------------------------------------------------- refresh
def _refresh(plan: _Plan, sites: list[Site], rows: Rows, edges: torch.Tensor, spline: _Splines, quantiles,
             max_outside: float):
    """``EAFOActivation.refresh`` of every dynamic site, after ``place_grid`` where
    ``dynact.core`` re-places the spline's grid first (the data left it or hardly fill it).

    Returns the new knot values (stored precision), the change ``|eps| max|new - old|``, a mask
    of the sites the common path may update (a grid it could place, a finite result, no risk of
    overflowing the input's dtype), and the spline grids ``(lo, hi)`` after the re-placing (the
    current ones where none was needed); ``spline`` itself is not changed."""
    inside = _outside_mass(rows, edges, spline.lo, spline.hi) <= max_outside
    wide = quantiles[1] - quantiles[0] >= _MIN_FILL * (spline.hi - spline.lo)
    lo, hi, s_old, placed = _place_grid(rows, spline, spline.dynamic & ~(inside & wide))
    p, dp, grid = rows.p, rows.dp, rows.grid
    h = rows.step
    mass = p * h
    w = mass / mass.sum(1, keepdim=True)
    mean = (w * grid).sum(1, keepdim=True)
    sigma = (w * (grid - mean) ** 2).sum(1).clamp_min(0).sqrt()
    _, d1, d2 = _evaluate(plan, grid, grad=True)
    falling = ((d1 < -FLAT_TOL) & (p > 0)).any(1, keepdim=True)
    rising = d1 > FLAT_TOL
    plain = torch.where(rising, dp - p * d2 / torch.where(rising, d1, 1.0), dp)
    c = torch.where(falling, dp - p * d1 * d2 / (d1 * d1 + TAPER * TAPER), plain)
    knots_x = _linspace(lo, hi, spline.s.shape[1])
    vals = _interp_uniform(knots_x, grid[:, :1], h, c)
    vals[:, 0] = vals[:, -1] = 0.0
    new = ((-_SQRT_2PI * sigma**3).unsqueeze(1) * vals).float().double()
    new = torch.where(spline.dynamic.unsqueeze(1), new, s_old)
    change = spline.eps.abs() * (new - s_old).abs().amax(1)
    finite = torch.isfinite(c).all(1) & torch.isfinite(sigma) & (sigma > 0) & torch.isfinite(new).all(1)
    safe = _no_overflow(plan, sites, spline, knots_x, new)
    return new, change, finite & placed & safe, lo, hi


def _place_grid(rows: Rows, spline: _Splines, move: torch.Tensor):
    """``EAFOActivation.place_grid`` (default arguments) of the rows in ``move``: the new ends
    (float32, as the buffers store them), the knot values resampled onto them (the old spline at
    the new knots, end knots 0, stored precision), and a mask that is False where the grid cannot
    be placed (``check_grid`` would refuse it: left to the one-site path, which skips the update
    with its warning). Rows not in ``move`` keep their grid and knot values."""
    q_lo, q_hi = _quantiles(rows, (PLACE_QUANTILE, 1.0 - PLACE_QUANTILE))
    span = torch.maximum(q_hi - q_lo, 2 * rows.step.reshape(-1))
    new_lo = (q_lo - PLACE_WIDEN * span).float().double()
    new_hi = (q_hi + PLACE_WIDEN * span).float().double()
    knots = spline.s.shape[1]
    x_new = _linspace(new_lo, new_hi, knots)
    resampled = _spline_at(x_new, spline.s, spline.lo, spline.hi)
    resampled[:, 0] = resampled[:, -1] = 0.0
    resampled = resampled.float().double()
    valid = grid_ends_ok(new_lo, new_hi, knots)
    m = move.unsqueeze(1)
    return (torch.where(move, new_lo, spline.lo), torch.where(move, new_hi, spline.hi),
            torch.where(m, resampled, spline.s), valid | ~move)




def _no_overflow(plan: _Plan, sites: list[Site], spline: _Splines, knots_x: torch.Tensor,
                 new: torch.Tensor) -> torch.Tensor:
    """Sites whose updated output stays far below their input dtype's largest value: a bound
    ``max |base| + |eps| max |s|`` over the knots (beyond the grid the output is the base's).
    The others are left to ``dynact.update_guards.overflows``, which evaluates them exactly."""
    base_knots = _evaluate(plan, knots_x, grad=False)[0]
    bound = (base_knots.abs() + spline.eps.abs().unsqueeze(1) * new.abs()).amax(1)
    limit = torch.tensor([_OVERFLOW_MARGIN * torch.finfo(s.in_dtype).max for s in sites],
                         dtype=torch.float64, device=bound.device)
    return bound < limit


# ---------------------------------------------------------------------------- figures
def _stats(fe: torch.Tensor, rows: Rows) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``dynact.eafo.output_stats`` by row, given each site's activation at its grid's edges;
    and a mask of the rows where it would have raised (non-finite values, no mass)."""
    h = rows.step
    raw = rows.p * h
    total = raw.sum(1, keepdim=True)
    mass = raw / total
    width = (fe[:, 1:] - fe[:, :-1]).abs()
    flat = width <= FLAT_TOL * h
    atoms, h_cont = _mixed_parts(fe, mass, flat)
    a, b = fe[:, :-1], fe[:, 1:]
    mean = (mass * (a + b) / 2).sum(1)
    second = (mass * (a * a + a * b + b * b) / 3).sum(1)
    std = (second - mean * mean).clamp_min(0.0).sqrt()
    dead = atoms.sum(1)
    entropy = -(atoms * torch.log(atoms)).where(atoms > 0, 0.0).sum(1) + h_cont
    slope = (b - a) / h
    rising = ~flat & (slope > 0)
    log_slope = (mass * torch.log(slope.where(rising, 1.0))).where(rising, 0.0).sum(1)
    scale_free = torch.where(std > 0, entropy - (1.0 - dead) * torch.log(std.where(std > 0, 1.0)), -math.inf)
    p = rows.p
    entropy_in = -(p * torch.log(p.where(p > 0, 1.0))).where(p > 0, 0.0).sum(1) * h.squeeze(1)
    ok = torch.isfinite(fe).all(1) & (total.squeeze(1) > 0)
    stats = {"entropy_in": entropy_in, "dead": dead, "entropy": entropy, "entropy_scale_free": scale_free,
             "log_slope": log_slope, "std": std}
    return stats, ok


def _mixed_parts(fe: torch.Tensor, mass: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eafo._mixed_parts`` by row: atom masses (``(rows, bins)``, zero-padded) and the
    continuous part's ``-int q log q``. Cells that are not part of the continuous part add
    knots with zero slope, which change no piece's integral."""
    starts = torch.cat([flat[:, :1], flat[:, 1:] & ~flat[:, :-1]], dim=1)
    run = (torch.cumsum(starts.long(), 1) - 1).clamp_min(0)
    atoms = torch.zeros_like(mass).scatter_add_(1, run, mass.where(flat, 0.0))
    wide = ~flat & (mass > 0)
    a = torch.minimum(fe[:, :-1], fe[:, 1:])
    b = torch.maximum(fe[:, :-1], fe[:, 1:])
    s = (mass / (b - a).where(wide, 1.0)).where(wide, 0.0)
    knots, order = torch.sort(torch.cat([a, b], dim=1), dim=1)
    slopes = torch.cat([s, -s], dim=1).gather(1, order)
    q = torch.cumsum(slopes, 1)[:, :-1].clamp_min(0)
    length = torch.diff(knots, dim=1)
    keep = (q > 0) & (length > 0)
    h_cont = -(q * torch.log(q.where(keep, 1.0)) * length).where(keep, 0.0).sum(1)
    return atoms, h_cont
