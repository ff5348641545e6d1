"""EAFO numerics: the entropy-lowering correction, its step, output entropy and the WAFBC.

Everything here works for any elementwise torch callable ``f`` (a function such as
``torch.tanh`` or a module such as :class:`dynact.CRReLU`) and any :class:`~dynact.density.Density`
(measured by :mod:`dynact.density` estimators or built with ``Density.from_pdf``). Results are
float64 tensors on ``density.grid`` (entropies are floats, in nats). The formulas are derived
in ``docs/math.md``; section names below refer to it.

Derivatives of ``f`` come from autograd in float64 at the grid points, never from differences
on a coarse grid. Modules are evaluated on a float64 copy, without their hooks, so evaluating
an activation here never feeds a training-time hook and never changes the model.

Example:
    >>> import torch
    >>> from scipy.stats import norm
    >>> from dynact.density import Density
    >>> from dynact import eafo
    >>> d = Density.from_pdf(norm.pdf, -8, 8, 3200)
    >>> round(eafo.output_entropy(lambda x: x, d), 3)   # N(0,1): 0.5*log(2*pi*e)
    1.419
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Union

import torch
from scipy.interpolate import PchipInterpolator
from torch import nn

from dynact._args import real_number, shown
from dynact.density import Density

__all__ = [
    "ActivationError",
    "derivatives",
    "correction",
    "step",
    "output_entropy",
    "output_stats",
    "wafbc",
    "Tabulated",
]

Activation = Union[Callable[[torch.Tensor], torch.Tensor], nn.Module]

#: Slope below which an activation counts as flat (docs/math.md, "Per-layer measures").
FLAT_TOL = 1e-8
#: Most output bins ``output_entropy`` will build; beyond it ``delta`` is too small for the range.
_MAX_OUTPUT_BINS = 10_000_000


class ActivationError(TypeError, ValueError):
    """The object given as an activation cannot be used as one (not callable, not elementwise,
    or non-finite on the grid). Catch it as ``ValueError`` or ``TypeError``."""


# --------------------------------------------------------------------------- evaluation
def _float64_module(module: nn.Module, device: torch.device) -> nn.Module:
    """A float64 copy of ``module`` on ``device`` with every hook removed.

    Hooks (for example EAFOCallback's collectors) are shared into the copy by the deepcopy
    memo, not copied, and then dropped from it, so neither they nor their owners are cloned.
    """
    memo: dict[int, object] = {}
    hook_dicts = (
        "_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
        "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    )
    for m in module.modules():
        for attr in hook_dicts:
            d = getattr(m, attr, None)
            if d:
                memo[id(d)] = type(d)()  # the copy gets an empty dict of the same kind
    clone = copy.deepcopy(module, memo)
    for m in clone.modules():  # derivatives need the input intact: no in-place activation
        if getattr(m, "inplace", None) is True:
            m.inplace = False
    return clone.to(device=device, dtype=torch.float64).eval()


def _as_function(f: Activation, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(f, nn.Module):
        return _float64_module(f, device)
    if not callable(f):
        raise ActivationError(
            f"the activation must be callable (a torch function or an nn.Module), got "
            f"{type(f).__name__}: {f!r}; for a name use dynact.make_activation(name)"
        )
    return f


def _evaluate(fn: Callable, x: torch.Tensor, *, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fn(x)`` and, if ``grad``, its first and second derivatives, all float64 and detached."""
    # A copy: an in-place function must not overwrite the caller's tensor.
    x = x.detach().to(torch.float64, copy=True).requires_grad_(grad)
    with torch.enable_grad() if grad else torch.no_grad():
        y = fn(x)
        if not isinstance(y, torch.Tensor):
            raise ActivationError(f"the activation returned {type(y).__name__}, expected a tensor")
        if y.shape != x.shape:
            raise ActivationError(
                f"the activation must be elementwise: input shape {tuple(x.shape)} gave output "
                f"shape {tuple(y.shape)}"
            )
        y = y.to(torch.float64)
        zeros = torch.zeros_like(x)
        if not grad or not y.requires_grad:
            d1 = d2 = zeros.detach()
        else:
            (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
            d2 = _second(d1, x, zeros)
    out = (y.detach(), d1.detach(), d2.detach())
    for name, t in zip(("values", "first derivative", "second derivative"), out, strict=False):
        if not bool(torch.isfinite(t).all()):
            bad = x.detach()[~torch.isfinite(t)][:3].tolist()
            raise ActivationError(
                f"the activation's {name} is not finite on the grid (e.g. at x = {bad}); "
                "restrict the density's [lo, hi] to where the activation is defined"
            )
    return out


#: Most distinct slopes of a function taken as piecewise linear (its f'' is 0 between kinks).
_PIECEWISE_SLOPES = 8


def _second(d1: torch.Tensor, x: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """f'' from f' by autograd. Some piecewise-linear ops have no double backward
    (``hardsigmoid``); their f'' is 0 between the kinks (autograd's convention at a kink, as for
    ReLU), so a function with at most a few distinct slopes gets 0. Any other error is raised."""
    if not d1.requires_grad:
        return zeros
    try:
        (d2,) = torch.autograd.grad(d1.sum(), x, allow_unused=True)
    except RuntimeError as err:
        if "not implemented" not in str(err) or torch.unique(d1.detach()).numel() > _PIECEWISE_SLOPES:
            raise
        return zeros
    return zeros if d2 is None else d2


def derivatives(f: Activation, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values, first and second derivatives of an elementwise activation at ``x`` (float64).

    Computed by autograd, so they are exact for analytic activations; at a kink autograd's
    one-sided convention applies (``relu'(0) = 0``).

    Returns:
        ``(f(x), f'(x), f''(x))``, each shaped like ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"eafo.derivatives: x must be a tensor of points, got x={shown(x)} ({type(x).__name__}); "
                        "wrap it with torch.tensor(..., dtype=torch.float64)")
    return _evaluate(_as_function(f, x.device), x, grad=True)


# --------------------------------------------------------------------------- correction and step
def _check_density(density: Density) -> Density:
    if not isinstance(density, Density):
        raise TypeError(
            f"expected a dynact.density.Density, got {type(density).__name__}; build one with "
            "Density.from_pdf(...) or an estimator's compute()"
        )
    return density


def _correction_from(
    density: Density, d1: torch.Tensor, d2: torch.Tensor, flat_tol: float, taper: float = 0.0
) -> torch.Tensor:
    # c = p' - p f''/f' where f rises, c = p' where it is flat (docs/math.md, "The correction").
    # With a taper kappa > 0, f''/f' becomes f' f'' / (f'^2 + kappa^2): equal where |f'| >> kappa,
    # smooth and bounded where f' crosses zero (the minimum of GELU, SiLU, Mish).
    if taper > 0:
        return density.dp - density.p * d1 * d2 / (d1 * d1 + taper * taper)
    c = density.dp.clone()
    mono = d1 > flat_tol
    c[mono] = density.dp[mono] - density.p[mono] * d2[mono] / d1[mono]
    return c


def correction(f: Activation, density: Density, flat_tol: float = FLAT_TOL, taper: float = 0.0) -> torch.Tensor:
    """The EAFO correction ``c(x) = p'(x) - p(x) f''(x) / f'(x)`` on ``density.grid``.

    Where ``f'(x) <= flat_tol`` (flat or decreasing parts) the ``f''/f'`` term is dropped and
    ``c = p'``. A step ``f + eta * c`` with ``eta > 0`` lowers the output entropy to first order
    on the rising parts. For ReLU and ``p = N(0, 1)``, ``c(x) = -x exp(-x^2/2)/sqrt(2 pi)``.

    For activations that are not monotone (GELU, SiLU, Mish have a minimum) the term
    ``f''/f'`` is singular where ``f'`` crosses zero. ``taper = kappa > 0`` replaces it by
    ``f' f'' / (f'^2 + kappa^2)``, which equals it where ``|f'| >> kappa`` and is bounded
    (``|f''| / (2 kappa)``) next to the minimum; ``flat_tol`` is then not used. See
    ``docs/math.md``, "The correction".

    Returns:
        ``(B,)`` float64 tensor.
    """
    density = _check_density(density)
    taper = real_number("eafo.correction", "taper", taper, low=0.0, need="a finite number >= 0 (0: no taper)")
    flat_tol = real_number("eafo.correction", "flat_tol", flat_tol, low=0.0)
    _, d1, d2 = derivatives(f, density.grid)
    return _correction_from(density, d1, d2, flat_tol, taper)


#: Tail mass (each side) beyond which method "g" leaves the inverse as it is: the step is
#: taken, and ``f`` must be invertible and C^1, only where the density has mass.
G_TAIL = 1e-6
#: How far ``|f'(x_k+1) - f'(x_k)|`` may exceed ``h * max |f''|`` before it counts as a kink.
_KINK_SAFETY = 4.0


def _kinks(d1: torch.Tensor, d2: torch.Tensor, h: float) -> torch.Tensor:
    """Grid intervals ``[x_k, x_k+1]`` where ``f'`` jumps, i.e. ``f`` is not C^1 there.

    Where ``f'`` is continuous, ``|f'(x_k+1) - f'(x_k)| = h |f''(xi)|`` for some ``xi`` in the
    interval, which the larger ``|f''|`` at the two ends bounds up to a safety factor (also when
    ``f''`` changes sign inside, or jumps, as ELU's does at 0). A jump of ``f'`` (ReLU,
    leaky ReLU, ELU with ``alpha != 1``) is O(1) while ``h |f''|`` is O(h) at the ends.

    Returns:
        ``(B - 1,)`` bool tensor, True for intervals that hold a kink.
    """
    jump = (d1[1:] - d1[:-1]).abs()
    bound = h * torch.maximum(d2[1:].abs(), d2[:-1].abs())
    atol = 1e-9 * (1.0 + float(d1.abs().max()))  # round-off of autograd's f'
    return jump > _KINK_SAFETY * bound + atol


def _unfold(x_new: torch.Tensor, dg: torch.Tensor, eta: float, x: torch.Tensor) -> torch.Tensor:
    """The moved grid of method "g", made increasing where ``f''`` jumps; else a clear error.

    Where ``f''`` jumps (ELU at 0: from 1 to 0), so does ``dg``, by ``eta p [f''] / f'^2``
    (0.02 for ELU, N(0, 1), eta 0.05); a downward jump wider than the grid step folds the moved
    points over one another. The x-step has an upward jump of ``f~`` there; the exact analogue
    is the increasing rearrangement of the moved inverse (sorting ``x + dg`` against the
    unchanged ``f(x)``), a steep rise across the fold. A fold spread over several intervals,
    where ``dg`` falls faster than ``x`` rises on a smooth stretch, is a step too large instead.
    """
    fall = torch.diff(x_new) <= 0
    if not bool(fall.any()):
        return x_new
    ddg = torch.diff(dg).abs()
    neighbour = torch.zeros_like(ddg)
    neighbour[1:] = ddg[:-1]
    neighbour[:-1] = torch.maximum(neighbour[:-1], ddg[1:])
    isolated = ddg > _KINK_SAFETY * neighbour
    smooth = ~isolated & (torch.diff(dg) < 0)
    if bool((fall & ~isolated).any()):
        # On a smooth stretch x + dg rises iff eta * max(-d(dg/eta)/dx) < 1.
        worst = int(torch.argmax(torch.where(smooth, -torch.diff(dg), torch.zeros_like(ddg))))
        limit = eta * float(x[1] - x[0]) / float(-(dg[worst + 1] - dg[worst]))
        raise ValueError(
            f"eta={eta} is too large for method='g': the moved inverse is no longer increasing near "
            f"x = {float(x[worst]):.3g} (where dg = -eta (p'/f' - p f''/f'^2) falls steeply); use eta below about "
            f"{limit:.2g}, or method='x'"
        )
    x_new = torch.sort(x_new).values
    if bool((torch.diff(x_new) <= 0).any()):  # coinciding points: PCHIP needs distinct ones
        raise ValueError(f"method='g' with eta={eta}: moved points coincide; use a smaller eta or method='x'")
    return x_new


def step(f: Activation, density: Density, eta: float, method: str = "x", flat_tol: float = FLAT_TOL) -> torch.Tensor:
    """One EAFO update of ``f`` with step size ``eta``; the new activation's values on ``density.grid``.

    - ``method="x"`` (``docs/math.md``, "The correction"; any activation): ``f~ = f + eta * correction(f, density)``.
    - ``method="g"`` (exact in the inverse): the inverse ``g`` moves by
      ``dg(f(x)) = -eta * (p'/f' - p f''/f'^2)``; the points ``(x + dg, f(x))`` lie on the new
      activation, which is resampled onto the grid by monotone (PCHIP) interpolation. Needs
      ``f`` strictly increasing and C^1 (a continuous slope; ELU with ``alpha=1``, softplus,
      tanh, sigmoid) where the density has mass, and moves only there (the inverse is left as
      it is beyond the ``G_TAIL`` quantiles); otherwise it raises ``ValueError`` (use ``"x"``).

    The two agree to O(eta^2). Use :class:`Tabulated` to turn the result into a callable.
    """
    density = _check_density(density)
    if method not in ("x", "g"):
        raise ValueError(f"method must be 'x' or 'g', got {method!r}")
    eta = real_number("eafo.step", "eta", eta)
    flat_tol = real_number("eafo.step", "flat_tol", flat_tol, low=0.0)
    y, d1, d2 = derivatives(f, density.grid)
    if method == "x":
        return y + eta * _correction_from(density, d1, d2, flat_tol)
    return _step_inverse(f, density, eta, flat_tol, y, d1, d2)


def _step_inverse(f: Activation, density: Density, eta: float, flat_tol: float, y: torch.Tensor,
                  d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """:func:`step` with ``method="g"``, given ``f`` and its first two derivatives on the grid."""
    x = density.grid
    # Section 2a moves the inverse g = f^{-1}, which exists and is smooth only where f is
    # strictly increasing and C^1; that is required, and the step taken, on the density's bulk
    # (tail mass G_TAIL each side). Beyond it dg = 0: a saturating f (tanh, sigmoid) has
    # f' ~ 1e-7 or 0 in far tails that hold ~1e-15 of the mass, where p f''/f'^2 is noise.
    cdf = density.cdf()
    bulk = (cdf >= G_TAIL) & (cdf <= 1.0 - G_TAIL)
    if not bool(bulk.any()):
        raise ValueError("method='g': the density has no bulk on its grid; widen [lo, hi]")
    pair = bulk[1:] & bulk[:-1]
    rising = (d1 > flat_tol) | ~bulk
    if not bool(rising.all()) or bool((torch.diff(y)[pair] <= 0).any()):
        where = x[~rising]
        span = (f"; it is flat or decreasing on [{float(where.min()):.3g}, {float(where.max()):.3g}]"
                if where.numel() else "")
        raise ValueError(
            "method='g' needs an activation that is strictly increasing where the density has mass, "
            f"x in [{float(x[bulk][0]):.3g}, {float(x[bulk][-1]):.3g}]{span}; "
            "use method='x', which works for every activation"
        )
    kinks = _kinks(d1, d2, density.step) & pair
    if bool(kinks.any()):
        k = int(torch.nonzero(kinks)[0])
        raise ValueError(
            "method='g' needs a C^1 activation (a continuous slope), but its slope jumps between "
            f"x = {float(x[k]):.3g} and {float(x[k + 1]):.3g} (a kink, as in ReLU or leaky ReLU); "
            "use method='x', which works for every activation"
        )
    dg = torch.zeros_like(x)
    dg[bulk] = -eta * (density.dp[bulk] / d1[bulk] - density.p[bulk] * d2[bulk] / d1[bulk] ** 2)
    x_new = _unfold(x + dg, dg, eta, x)
    interp = PchipInterpolator(x_new.cpu().numpy(), y.cpu().numpy(), extrapolate=False)
    out = torch.as_tensor(interp(x.cpu().numpy()), dtype=torch.float64, device=x.device)
    # Grid points beyond the moved ends: the inverse keeps the end's shift there, so
    # f~(x) = f(x - dg_end). (A cubic extrapolated over several steps need not be monotone.)
    for beyond, shift in ((x < x_new[0], dg[0]), (x > x_new[-1], dg[-1])):
        if bool(beyond.any()):
            out[beyond] = _evaluate(_as_function(f, x.device), x[beyond] - shift, grad=False)[0]
    return out


# --------------------------------------------------------------------------- entropy
def _pushforward(fe: torch.Tensor, mass: torch.Tensor, delta: float) -> tuple[torch.Tensor, float, float]:
    """Bin masses of ``Y = f(X)`` at resolution ``delta``, and Y's mean and std.

    Input cell ``k`` (between edges ``k`` and ``k+1``) carries ``mass[k]``, spread uniformly over
    ``[f(e_k), f(e_k+1)]`` (``f`` linear within a cell); a cell that ``f`` maps to a single point
    is an atom. The output CDF is then piecewise linear with known kinks, so the mass of every
    output bin follows exactly from sorted cumulative sums: O(B log B), no sampling.
    """
    a = torch.minimum(fe[:-1], fe[1:])
    b = torch.maximum(fe[:-1], fe[1:])
    width = b - a
    scale = max(1.0, float(b.max().abs()), float(a.min().abs()))
    atom = width <= 1e-9 * scale

    y0 = math.floor(float(a.min()) / delta) * delta
    nbins = int(math.ceil((float(b.max()) - y0) / delta)) + 1
    if nbins > _MAX_OUTPUT_BINS:
        raise ValueError(
            f"delta={delta:g} gives {nbins} output bins for an output range of "
            f"{float(b.max() - a.min()):.4g}; pass a larger delta"
        )
    edges = y0 + delta * torch.arange(nbins + 1, dtype=torch.float64, device=fe.device)

    # CDF of the spread cells: sum_k s_k * (relu(y - a_k) - relu(y - b_k)), s_k = m_k / w_k.
    wide = ~atom
    s = mass[wide] / width[wide]
    knots = torch.cat([a[wide], b[wide]])
    slopes = torch.cat([s, -s])
    order = torch.argsort(knots)
    knots, slopes = knots[order], slopes[order]
    cum_s = torch.cat([slopes.new_zeros(1), torch.cumsum(slopes, 0)])
    cum_sz = torch.cat([slopes.new_zeros(1), torch.cumsum(slopes * knots, 0)])
    idx = torch.searchsorted(knots, edges, right=False)  # knots strictly below each edge
    cdf = edges * cum_s[idx] - cum_sz[idx]
    # Atoms: a step of m_k at a_k.
    if bool(atom.any()):
        at, am = a[atom], mass[atom]
        order = torch.argsort(at)
        at, cum_m = at[order], torch.cat([am.new_zeros(1), torch.cumsum(am[order], 0)])
        # right=False counts atoms strictly below each edge, so an atom sitting on an edge
        # lands in the bin that starts there (never before the first edge).
        cdf = cdf + cum_m[torch.searchsorted(at, edges, right=False)]
    bin_mass = torch.diff(cdf).clamp_min(0)

    mean, std = _moments(fe, mass)
    return bin_mass, mean, std


def _moments(fe: torch.Tensor, mass: torch.Tensor) -> tuple[float, float]:
    """Mean and std of ``Y`` when cell ``k``'s mass is uniform on ``[f(e_k), f(e_k+1)]``."""
    a, b = fe[:-1], fe[1:]
    mean = float((mass * (a + b) / 2).sum())
    second = float((mass * (a * a + a * b + b * b) / 3).sum())
    return mean, math.sqrt(max(second - mean * mean, 0.0))


def _discrete_entropy(bin_mass: torch.Tensor, delta: float) -> float:
    # H_delta = -sum P_i log P_i + log delta (docs/math.md, "Why not a binned entropy").
    P = bin_mass / bin_mass.sum()
    P = P[P > 0]
    return float(-(P * torch.log(P)).sum()) + math.log(delta)


def _resolve_delta(density: Density, delta: float | None) -> float:
    if delta is None:
        return density.step
    return real_number("eafo.output_entropy", "delta", delta, low=0.0, low_open=True,
                       need="a positive number (the output resolution)")


def _cell_masses(density: Density) -> torch.Tensor:
    mass = density.mass
    total = float(mass.sum())
    if total <= 0:
        raise ValueError("the density has no mass on its grid; widen [lo, hi] or feed the estimator data")
    return mass / total


def output_entropy(f: Activation, density: Density, delta: float | None = None) -> float:
    """Discretised entropy ``H_delta[f(X)]`` (nats) of the activation's output, ``X ~ density``.

    The density is pushed through ``f`` exactly (``docs/math.md``, "Per-layer measures"); no output samples are
    needed. It is finite for activations with flat parts (ReLU's atom at 0), equals the
    differential entropy in the limit for smooth increasing ``f``, and is comparable across
    activations and layers when ``delta`` is the same. The density is renormalised to its grid
    (mass outside ``[lo, hi]`` is not pushed).

    Args:
        delta: output bin width; defaults to ``density.step``.
    """
    density = _check_density(density)
    delta = _resolve_delta(density, delta)
    fe, _, _ = _evaluate(_as_function(f, density.grid.device), density.edges, grad=False)
    bin_mass, _, _ = _pushforward(fe, _cell_masses(density), delta)
    return _discrete_entropy(bin_mass, delta)


def _mixed_parts(
    fe: torch.Tensor, mass: torch.Tensor, step: float, flat_tol: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Split the push-forward of the grid's cells into atoms and a continuous part.

    Input cell ``k`` carries ``mass[k]`` spread uniformly over ``[f(e_k), f(e_k+1)]``. A cell on
    which ``|f(e_k+1) - f(e_k)| <= flat_tol * step`` is flat: its mass is an atom at the cell's
    value. Runs of adjacent flat cells form one atom (ReLU's negative half is one atom at 0).

    Returns:
        ``(atoms, flat, h_cont)``: the atom masses, a mask of the flat cells, and the
        continuous part's ``-int q log q dy`` (``q`` the sub-density of the non-flat cells; where
        cells overlap, as on the two sides of GELU's minimum, their densities add).
    """
    width = (fe[1:] - fe[:-1]).abs()
    flat = width <= flat_tol * step
    # Atoms: one per run of adjacent flat cells.
    starts = torch.cat([flat[:1], flat[1:] & ~flat[:-1]])
    run_id = torch.cumsum(starts.long(), 0) - 1
    atoms = mass.new_zeros(int(starts.sum())).index_add_(0, run_id[flat], mass[flat])
    # Continuous part: q is piecewise constant between the sorted cell ends; integrate
    # -q log q exactly on each piece (the same sorted-knot construction as _pushforward).
    wide = ~flat & (mass > 0)
    a = torch.minimum(fe[:-1], fe[1:])[wide]
    b = torch.maximum(fe[:-1], fe[1:])[wide]
    if a.numel() == 0:
        return atoms, flat, 0.0
    s = mass[wide] / (b - a)
    knots = torch.cat([a, b])
    slopes = torch.cat([s, -s])
    order = torch.argsort(knots)
    knots, slopes = knots[order], slopes[order]
    q = torch.cumsum(slopes, 0)[:-1].clamp_min(0)  # density on [knots[i], knots[i+1]]
    length = torch.diff(knots)
    keep = (q > 0) & (length > 0)
    h_cont = float(-(q[keep] * torch.log(q[keep]) * length[keep]).sum())
    return atoms, flat, h_cont


def output_stats(f: Activation, density: Density, flat_tol: float = FLAT_TOL) -> dict[str, float]:
    """Per-layer figures of the output ``Y = f(X)``, ``X ~ density``, each resolution-free.

    The density is pushed through ``f`` exactly, cell by cell (``f`` evaluated at the cell
    edges, linear within a cell); no output samples and no output resolution are involved.
    See ``docs/math.md``, "Per-layer measures".

    Returns a dict of floats:
        - ``dead``: the output's atomic mass, i.e. the mass of the cells on which ``f`` is flat
          (``|slope| <= flat_tol``). Decreasing parts (GELU's dip) are not dead.
        - ``entropy``: the mixed entropy (nats): ``-sum_k P_k log P_k`` over the atoms (counting
          measure) plus ``-int q log q dy`` over the continuous part (Lebesgue measure). ReLU
          under N(0, 1): 1.0561; the identity: 1.4189.
        - ``entropy_scale_free``: ``entropy - (1 - dead) * log(std)``, unchanged by ``Y -> aY``
          (only the continuous part stretches). Jumps where an atom turns into a narrow
          continuous part (ReLU -> CRReLU with any ``eps != 0``): read it beside ``dead``.
        - ``log_slope``: ``E[log f'(X); f'(X) > 0]``, the mean log-slope over the rising mass.
          For an increasing ``f`` the continuous part's entropy is the input's entropy on that
          mass plus this term: it is what an EAFO step changes.
        - ``std``: standard deviation of ``Y``;
        - ``entropy_in``: differential entropy of the input density.

    The density is renormalised to its grid (mass outside ``[lo, hi]`` is not pushed).
    """
    density = _check_density(density)
    flat_tol = real_number("eafo.output_stats", "flat_tol", flat_tol, low=0.0)
    fn = _as_function(f, density.grid.device)
    fe, _, _ = _evaluate(fn, density.edges, grad=False)
    mass = _cell_masses(density)
    atoms, flat, h_cont = _mixed_parts(fe, mass, density.step, flat_tol)
    _, std = _moments(fe, mass)
    dead = float(atoms.sum())
    atoms = atoms[atoms > 0]
    entropy = float(-(atoms * torch.log(atoms)).sum()) + h_cont
    slope = (fe[1:] - fe[:-1]) / density.step
    rising = ~flat & (slope > 0)
    log_slope = float((mass[rising] * torch.log(slope[rising])).sum())
    live = 1.0 - dead
    return {
        "dead": dead,
        "entropy": entropy,
        "entropy_scale_free": entropy - live * math.log(std) if std > 0 else -math.inf,
        "log_slope": log_slope,
        "std": std,
        "entropy_in": density.entropy(),
    }


# --------------------------------------------------------------------------- WAFBC
def wafbc(density: Density, lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    """The worst activation with boundary conditions: ``lower + (upper - lower) * F_p(x)``.

    ``F_p`` is the CDF of the density (restricted to its grid). Among activations with range
    ``(lower, upper)`` it maximises the output entropy, at ``log(upper - lower)``: its output is
    uniform (``docs/math.md``, "The worst activation").

    Returns:
        ``(B,)`` values on ``density.grid``; wrap with :class:`Tabulated` to evaluate elsewhere.
    """
    density = _check_density(density)
    lower, upper = real_number("eafo.wafbc", "lower", lower), real_number("eafo.wafbc", "upper", upper)
    if not lower < upper:
        raise ValueError(f"eafo.wafbc: need lower < upper, got lower={lower!r}, upper={upper!r}")
    return lower + (upper - lower) * density.cdf()


class Tabulated(nn.Module):
    """An activation given by its values on a grid, as a module: piecewise-linear in between,
    extended linearly beyond the ends. Turns :func:`step` and :func:`wafbc` results into
    something :func:`output_entropy` and plots can call.

    Example:
        >>> d = Density.from_pdf(norm.pdf, -8, 8, 1600)
        >>> worst = Tabulated(d.grid, wafbc(d))
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        x = torch.as_tensor(x, dtype=torch.float64).flatten()
        y = torch.as_tensor(y, dtype=torch.float64).flatten()
        if x.numel() != y.numel() or x.numel() < 2:
            raise ValueError(f"x and y need the same length >= 2, got {x.numel()} and {y.numel()}")
        if bool((torch.diff(x) <= 0).any()):
            raise ValueError("x must be strictly increasing")
        self.register_buffer("x", x)
        self.register_buffer("y", y)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x, y = self.x.to(t.device, t.dtype), self.y.to(t.device, t.dtype)
        i = torch.searchsorted(x, t.detach().contiguous()).clamp(1, x.numel() - 1)
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        return y0 + (t - x0) * (y1 - y0) / (x1 - x0)
