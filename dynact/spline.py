"""The dynamic EAFO activation: ``base(x) + eps * s(x)`` with ``s`` a spline measured from data.

CRReLU adds ``eps * x * exp(-x**2/2)`` to ReLU, the EAFO correction of ReLU *if* the layer's
pre-activations were standard normal (eafo-math.md section 3). :class:`EAFOActivation` keeps
the same form, one learnable scalar ``eps`` per module, but takes the shape ``s`` from the
density the layer really sees: :meth:`EAFOActivation.update` recomputes ``s`` from a
:class:`~dynact.density.Density` with :func:`dynact.eafo.correction`.

``s`` is piecewise linear on ``knots`` uniform points from ``lo`` to ``hi``, zero at and beyond
both ends, so outside ``[lo, hi]`` the activation is exactly its base. The knot values and the
grid ends are buffers (saved in ``state_dict``, never touched by the optimizer).

Speed: the spline costs one clamp, one gather pair and one multiply-add per element. Eager mode
runs a custom autograd function that saves nothing but the input (the base saves it anyway) and
recomputes the segment index in backward; under ``torch.compile`` the same arithmetic is written
as plain tensor ops, which Inductor fuses with the base into one kernel per direction.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Literal

import torch
from torch import nn

from dynact import eafo
from dynact.activations import ActSpec, activation_types, make_activation
from dynact.density import Density, check_grid

__all__ = ["EAFOActivation", "DEFAULT_KNOTS"]

#: Default number of knots: a step of 12/256 ~ 0.047 on the default [-6, 6] grid, so the
#: linear interpolant of ``x*exp(-x**2/2)`` is within 6e-4 of it (error <= step**2 * max|s''| / 8).
DEFAULT_KNOTS = 257

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_MODES = ("refresh", "iterate")
#: Slope above which ``iterate`` counts a grid cell as rising (and keeps it rising).
_RISING = 1e-3
_INITS = ("crrelu", "zero")


# ----------------------------------------------------------------------------- spline kernels
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs index in float32: with 257 knots a bfloat16 index (8-bit mantissa)
    # would round every position to a knot and turn the spline into a staircase.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tables(
    s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded knot values and segment slopes, and the map ``u = a * x + b`` to knot coordinates.

    Knot ``i`` sits at ``u = i + 1``. The knot values are padded with one zero knot on the left
    and two on the right, and the end knots are read as zero, so every segment at or beyond the
    grid ends is flat zero: after clamping ``u`` to ``[0, K + 1]`` no mask is needed, and the
    slope (the input gradient) is zero outside the grid. On segment ``j``
    ``s(u) = value[j] + (u - j) * slope[j]``.
    """
    s = s.to(dtype)
    value = torch.cat([s.new_zeros(2), s[1:-1], s.new_zeros(3)])  # (K + 3,)
    slope = value[1:] - value[:-1]  # (K + 2,)
    a = (s.shape[0] - 1) / (hi.to(dtype) - lo.to(dtype))
    b = 1.0 - lo.to(dtype) * a
    return value, slope, a, b


def _segment(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment index ``j`` (int32) and position within it ``u - j`` for ``u`` clamped to ``[0, last]``."""
    xc = x if x.dtype == a.dtype else x.to(a.dtype)
    u = torch.addcmul(b, xc, a).clamp_(0.0, float(last))
    # The second clamp only matters for NaN inputs, whose integer cast is arbitrary.
    j = u.to(torch.int32).clamp_(0, last)
    return j, u.sub_(j)


def _gather(table: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, j.reshape(-1)).view(j.shape)


class _SplineTerm(torch.autograd.Function):
    """``y0 + eps * s(x)`` with a hand-written backward (eager path).

    Saves only ``x`` (already kept alive by the base) and the tiny tables; backward recomputes
    the segment index. ``grad_x = grad * eps * slope[j] * a``; ``grad_eps = sum(grad * s(x))``
    accumulated in float32 or wider; ``grad_y0 = grad``.
    """

    @staticmethod
    def forward(ctx, x, y0, eps, value, slope, a, b):  # noqa: D102 (documented on the class)
        last = slope.shape[0] - 1
        j, frac = _segment(x, a, b, last)
        v = _gather(value, j).addcmul_(frac, _gather(slope, j))
        out = torch.addcmul(y0, v, eps.to(v.dtype))
        ctx.save_for_backward(x, eps, value, slope, a, b)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, eps, value, slope, a, b = ctx.saved_tensors
        j, frac = _segment(x, a, b, slope.shape[0] - 1)
        grad_x = grad_eps = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad * _gather(slope * (a * eps.to(a.dtype)), j)).to(x.dtype)
        if ctx.needs_input_grad[2]:
            v = _gather(value, j).addcmul_(frac, _gather(slope, j))
            grad_eps = (grad * v).sum().to(eps.dtype).reshape(eps.shape)
        grad_y0 = grad if ctx.needs_input_grad[1] else None
        return grad_x, grad_y0, grad_eps, None, None, None, None


def _spline_ops(x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``s(x)`` in plain differentiable ops (compiled path, float64 views, resampling).

    Returns the compute dtype (float32 for half inputs, else the input's dtype).
    """
    value, slope, a, b = _tables(s, lo, hi, _compute_dtype(x.dtype))
    last = slope.shape[0] - 1
    u = (x.to(a.dtype) * a + b).clamp(0.0, float(last))
    j = u.detach().long().clamp(0, last)
    return value[j] + (u - j) * slope[j]


def _hermite(x: torch.Tensor, s: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Cubic Hermite (Catmull-Rom) interpolant of the knot values, zero outside ``[lo, hi]``.

    Used only to give :func:`dynact.eafo.correction` a twice-differentiable view of the spline:
    the linear interpolant has ``s'' = 0`` almost everywhere, which would hide the curvature
    term ``p f''/f'`` of eafo-math.md 2b from iterated steps.
    """
    knots = s.shape[0]
    step = (hi - lo) / (knots - 1)
    t = (x - lo) / step
    inside = (t >= 0) & (t <= knots - 1)
    t = t.clamp(0.0, knots - 1.0)
    j = t.detach().floor().long().clamp(0, knots - 2)
    w = t - j
    m = torch.empty_like(s)
    m[1:-1] = 0.5 * (s[2:] - s[:-2])
    m[0] = s[1] - s[0]
    m[-1] = s[-1] - s[-2]
    w2, w3 = w * w, w * w * w
    val = (
        (2 * w3 - 3 * w2 + 1) * s[j]
        + (w3 - 2 * w2 + w) * m[j]
        + (-2 * w3 + 3 * w2) * s[j + 1]
        + (w3 - w2) * m[j + 1]
    )
    return torch.where(inside, val, torch.zeros_like(val))


def _interp_uniform(xq: torch.Tensor, x0: float, step: float, values: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``values`` given at ``x0 + k * step``; zero outside their span."""
    n = values.shape[0]
    t = (xq - x0) / step
    inside = (t >= -1e-9) & (t <= n - 1 + 1e-9)
    t = t.clamp(0.0, n - 1.0)
    j = t.floor().long().clamp(0, n - 2)
    w = t - j
    val = values[j] * (1 - w) + values[j + 1] * w
    return torch.where(inside, val, torch.zeros_like(val))


# ----------------------------------------------------------------------------- the module
class EAFOActivation(nn.Module):
    """``base(x) + eps * s(x)``: an activation whose correction shape is measured from data.

    ``s`` is piecewise linear on ``knots`` uniform points over ``[lo, hi]``, zero at both ends
    and beyond, so outside the grid the activation is exactly ``base``. Freshly built (with
    ``init="crrelu"``) ``s(x) = x * exp(-x**2/2)`` at the knots, so ``EAFOActivation()``
    computes ``CRReLU(eps)`` up to the interpolation error (below ``6e-4 * |eps|``).

    Updates from a measured :class:`~dynact.density.Density` (see :meth:`update`):

    - ``refresh``: ``s = -sqrt(2*pi) * c_base`` with ``c_base = dynact.eafo.correction(base, p)``
      (eafo-math.md 2b). For a standard normal ``p`` and a ReLU base ``c = -x e^{-x²/2}/sqrt(2π)``,
      so ``s = x e^{-x²/2}``: CRReLU's shape, with ``eps`` keeping CRReLU's role.
    - ``iterate``: one guarded EAFO step of the *current* activation: the function moves by
      ``eta`` times a smoothed form of ``correction(f, p)`` (``s += step / eps``), limited by a
      trust region, and is kept only if it stays increasing where it rose and
      :func:`dynact.eafo.output_entropy` on the same density really drops (section 5). Suits
      bases that increase over the bulk of the density (``elu``, ``celu``, softplus-like);
      ReLU's flat half and GELU/SiLU/Mish's dip make most steps fail the guards, so use
      ``refresh`` with those.

    The grid follows the data with :meth:`place_grid`; :meth:`outside_mass` says how much of a
    density lies beyond the current grid.

    Buffers (persistent): ``s`` (``knots``,), ``lo`` and ``hi`` (0-d). Parameters: ``eps`` (0-d)
    if ``learn_eps`` (else a buffer), plus the base's own (only PReLU has one), so with a
    parameter-free base the parameter count equals CRReLU's.

    Args:
        base: the base activation, any registry name except ``"eafo"`` (``relu, gelu, elu,
            prelu, celu, silu, mish, crrelu``), a class / factory building a module, or a
            module instance, used as it is (its settings and parameters are kept).
        lo, hi: the grid's ends.
        knots: number of knots (>= 8); default :data:`DEFAULT_KNOTS` = 257.
        eps: initial scale of the correction (CRReLU's 0.01).
        learn_eps: if True ``eps`` is an ``nn.Parameter``.
        init: ``"crrelu"`` (``s = x e^{-x²/2}``) or ``"zero"`` (the activation starts as its base).

    Shapes: any input shape; elementwise. Dtypes: float16/bfloat16 inputs are indexed and
    interpolated in float32 and returned in their own dtype; ``grad_eps`` is accumulated in
    float32 or wider.

    Example:
        >>> from scipy.stats import norm
        >>> act = EAFOActivation("relu")           # CRReLU(0.01) until updated
        >>> d = Density.from_pdf(norm.pdf, -8, 8, 640)
        >>> act.update(d, mode="refresh")["accepted"]
        True
        >>> act(torch.randn(4, 8)).shape
        torch.Size([4, 8])
    """

    #: "auto" (custom autograd function in eager, plain ops under torch.compile), "function" or
    #: "ops": forced paths for tests and benchmarks.
    _impl: str = "auto"

    def __init__(
        self,
        base: ActSpec = "relu",
        lo: float = -6.0,
        hi: float = 6.0,
        knots: int = DEFAULT_KNOTS,
        eps: float = 0.01,
        learn_eps: bool = True,
        init: Literal["crrelu", "zero"] = "crrelu",
    ) -> None:
        super().__init__()
        if isinstance(base, str) and base.strip().lower() == "eafo":
            raise ValueError(
                "EAFOActivation: base='eafo' would nest the dynamic activation in itself; "
                "choose a fixed base such as 'relu', 'gelu', 'silu' or 'crrelu'"
            )
        lo_f, hi_f, knots = check_grid(lo, hi, knots)
        if not math.isfinite(float(eps)):
            raise ValueError(f"EAFOActivation: eps must be a finite number, got eps={eps!r}")
        if init not in _INITS:
            raise ValueError(f"EAFOActivation: init must be one of {_INITS}, got init={init!r}")
        # A configured module (ELU(alpha=0.3), a trained PReLU) is used as it is, settings and
        # parameters included; names, classes and factories build a fresh one.
        self.base = base if isinstance(base, nn.Module) else make_activation(base)
        if isinstance(self.base, EAFOActivation):
            raise ValueError("EAFOActivation: the base must be a fixed activation, not another EAFOActivation")
        if getattr(self.base, "inplace", False):
            # The spline reads the input after the base has run.
            raise ValueError("EAFOActivation: the base must not work in place; build it with inplace=False")
        if isinstance(base, str):
            self.base_name = base
        elif isinstance(base, nn.Module):
            self.base_name = activation_types().get(type(base), type(base).__name__)
        else:
            self.base_name = getattr(base, "__name__", type(self.base).__name__)
        self.learn_eps = bool(learn_eps)
        self.register_buffer("lo", torch.tensor(lo_f))
        self.register_buffer("hi", torch.tensor(hi_f))
        grid = torch.linspace(lo_f, hi_f, knots, dtype=torch.float64)
        s = grid * torch.exp(-0.5 * grid**2) if init == "crrelu" else torch.zeros_like(grid)
        s[0] = s[-1] = 0.0
        self.register_buffer("s", s.float())
        value = torch.tensor(float(eps))
        if self.learn_eps:
            self.eps = nn.Parameter(value)
        else:
            self.register_buffer("eps", value)
        self._cache: dict = {}

    # ------------------------------------------------------------------ forward
    @property
    def knots(self) -> int:
        return int(self.s.shape[0])

    @property
    def knot_step(self) -> float:
        """Spacing of the knots, ``(hi - lo) / (knots - 1)``."""
        return (float(self.hi) - float(self.lo)) / (self.knots - 1)

    def knot_positions(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``(knots,)`` positions of the knots."""
        return torch.linspace(float(self.lo), float(self.hi), self.knots, dtype=dtype, device=self.s.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.base(x)
        impl = self._impl
        if impl == "ops" or (impl == "auto" and torch.compiler.is_compiling()):
            cdt = _compute_dtype(x.dtype)
            return (y0.to(cdt) + self.eps.to(cdt) * _spline_ops(x, self.s, self.lo, self.hi)).to(x.dtype)
        value, slope, a, b = self._eager_tables(_compute_dtype(x.dtype))
        return _SplineTerm.apply(x, y0, self.eps, value, slope, a, b)

    def _eager_tables(self, dtype: torch.dtype):
        # The tables are a few hundred numbers, but building them costs several tiny kernel
        # launches per call; reuse them until a buffer is replaced or modified in place.
        if torch.compiler.is_compiling():
            return _tables(self.s, self.lo, self.hi, dtype)
        try:
            key = (self.s, self.lo, self.hi, self.s._version, self.lo._version, self.hi._version)
        except RuntimeError:  # inference tensors carry no version counter
            return _tables(self.s, self.lo, self.hi, dtype)
        hit = self._cache.get(dtype)
        if hit is not None and all(a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(hit[0], key)):
            return hit[1]
        with torch.no_grad():
            tables = _tables(self.s, self.lo, self.hi, dtype)
        self._cache[dtype] = (key, tables)
        return tables

    def __getstate__(self):
        # Pickling and deepcopy drop the table cache; it is rebuilt on the next call.
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def extra_repr(self) -> str:
        return (
            f"base={self.base_name!r}, lo={float(self.lo):.4g}, hi={float(self.hi):.4g}, "
            f"knots={self.knots}, eps={float(self.eps.detach()):.4g}, learn_eps={self.learn_eps}"
        )

    # ------------------------------------------------------------------ float64 views for dynact.eafo
    def _base64(self, device: torch.device) -> nn.Module:
        return copy.deepcopy(self.base).to(device=device, dtype=torch.float64)

    def _view(self, s: torch.Tensor, base64: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The activation with knot values ``s`` as a float64 function (what forward computes)."""
        s64 = s.detach().to(torch.float64)
        lo, hi = self.lo.detach().double(), self.hi.detach().double()
        eps = float(self.eps.detach())

        def f(x: torch.Tensor) -> torch.Tensor:
            return base64(x) + eps * _spline_ops(x, s64, lo, hi)

        return f

    def _smooth_view(self, base64: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        s64 = self.s.detach().to(torch.float64)
        lo, hi, eps = float(self.lo), float(self.hi), float(self.eps.detach())

        def f(x: torch.Tensor) -> torch.Tensor:
            return base64(x) + eps * _hermite(x, s64, lo, hi)

        return f

    def _to_knots(self, values: torch.Tensor, density: Density) -> torch.Tensor:
        """Values on ``density.grid`` resampled onto the knots; zero outside, ends pinned to 0."""
        out = _interp_uniform(self.knot_positions().to(values.device), float(density.grid[0]), density.step, values)
        out[0] = out[-1] = 0.0
        return out

    def _prepare(self, density: Density) -> Density:
        if not isinstance(density, Density):
            raise TypeError(
                f"expected a dynact.density.Density, got {type(density).__name__}; build one with "
                "Histogram/KDE(...).compute() or Density.from_pdf"
            )
        return density.to(self.s.device)

    def _stored(self, s_new: torch.Tensor) -> torch.Tensor:
        # Candidates are judged at the precision they will be stored in.
        return s_new.to(self.s.dtype).to(torch.float64)

    def _write(self, s_new: torch.Tensor) -> None:
        with torch.no_grad():
            self.s.copy_(s_new.to(self.s.dtype))

    # ------------------------------------------------------------------ updates
    def update(
        self,
        density: Density,
        mode: Literal["refresh", "iterate"] = "refresh",
        eta: float = 0.05,
        max_change: float | None = None,
        **guards,
    ) -> dict:
        """Recompute the spline from a measured density; returns a record for logging.

        Args:
            density: the layer's pre-activation density.
            mode: ``"refresh"`` (see :meth:`refresh`) or ``"iterate"`` (see :meth:`iterate`).
            eta, max_change: step size and trust region of ``iterate`` (ignored by ``refresh``);
                further guards are keywords of :meth:`iterate`.

        Returns:
            ``dict(mode, accepted, reason, entropy_before, entropy_after, change, eta)``:
            entropies are :func:`dynact.eafo.output_entropy` (nats) of the activation before and
            after the call on ``density`` (equal when refused); ``change`` is the largest
            absolute change of the function (0 when refused). ``iterate`` adds
            ``entropy_candidate`` (of the last candidate tried) and reports in ``eta`` the step
            size actually used after the trust region and backtracking.
        """
        if mode == "refresh":
            return self.refresh(density)
        if mode == "iterate":
            return self.iterate(density, eta=eta, max_change=max_change, **guards)
        raise ValueError(f"update: mode must be one of {_MODES}, got mode={mode!r}")

    def refresh(self, density: Density) -> dict:
        """Set ``s = -sqrt(2*pi) * correction(base, density)`` on the knots (eafo-math.md 2b, 3).

        The correction is computed on ``density.grid`` and interpolated linearly onto the knots;
        knots beyond the density's grid get 0, and the end knots stay 0. ``eps`` is unchanged.
        Rejected (nothing written) only if the correction is not finite.
        """
        d = self._prepare(density)
        base64 = self._base64(d.grid.device)
        old = self.s.detach().to(torch.float64)
        h0 = eafo.output_entropy(self._view(old, base64), d)
        c = eafo.correction(base64, d)
        record = dict(mode="refresh", accepted=False, reason="", entropy_before=h0, entropy_after=h0,
                      change=0.0, eta=0.0)
        if not bool(torch.isfinite(c).all()):
            record["reason"] = "non-finite correction"
            return record
        new = self._stored(-_SQRT_2PI * self._to_knots(c.to(torch.float64), d).to(old.device))
        h1 = eafo.output_entropy(self._view(new, base64), d)
        self._write(new)
        record.update(accepted=True, reason="refreshed", entropy_after=h1,
                      change=abs(float(self.eps.detach())) * float((new - old).abs().max()))
        return record

    def iterate(
        self,
        density: Density,
        eta: float = 0.05,
        max_change: float | None = None,
        smooth: float = 0.25,
        backtrack: int = 3,
        flat: float = 0.05,
        min_eps: float = 1e-6,
    ) -> dict:
        """One guarded EAFO step of the current activation ``f = base + eps * s``.

        Direction: the correction ``c = correction(f, density)`` of eafo-math.md 2b, with
        ``f''`` from a cubic Hermite view of the knots (the linear spline has none). ``c`` is
        ``f' * r`` with ``r = -dH/df``, and descent in ``f`` is anti-diffusive (section 5: no
        minimum), so on a grid it amplifies the spline's own wiggles. The step therefore
        follows a smoothed direction that is still a descent direction to first order:
        ``df = eta * w * G[w * c / f']`` with ``G`` a Gaussian of width ``smooth * std(density)``
        and ``w = sqrt(f')`` tapered to 0 as ``f'`` falls from ``2 * flat`` to ``flat`` (where
        the activation flattens, ``c ~ p f''/f'`` is singular; there ``df = 0``). With
        ``smooth=0`` and a steep ``f`` this is exactly the step ``eta * c`` of
        :func:`dynact.eafo.step`. It is stored as ``s += df / eps``.

        Guards (eafo-math.md section 5), all on the same density:

        - trust region: ``max|df|`` on the knots is at most ``max_change`` (default
          ``0.05 * std(density)``); a larger step is shrunk to fit;
        - finite values only; refused if ``|eps| < min_eps`` (``s`` would absorb ``1/eps``);
        - the activation must stay increasing on every grid cell with mass where it was
          increasing (the entropy formula and the update assume an invertible ``f``);
        - accepted only if :func:`dynact.eafo.output_entropy` drops.

        A candidate failing the last two is halved up to ``backtrack`` times. A refused step
        leaves the module untouched and ``record["reason"]`` says why. ``eta`` may be
        negative (an ascent step, to check the guard): the entropy test then refuses it.
        Repeated steps lower the entropy until the activation would have to fold where the
        density is high; then they are refused (reason ``"would stop being increasing"``).
        """
        if not math.isfinite(float(eta)) or float(eta) == 0.0:
            raise ValueError(f"iterate: eta must be a finite non-zero number, got eta={eta!r}")
        if max_change is not None and not (float(max_change) > 0):
            raise ValueError(f"iterate: max_change must be > 0 or None (automatic), got max_change={max_change!r}")
        if not (math.isfinite(float(smooth)) and smooth >= 0):
            raise ValueError(f"iterate: smooth must be a finite number >= 0, got smooth={smooth!r}")
        if isinstance(backtrack, bool) or not isinstance(backtrack, int) or backtrack < 0:
            raise ValueError(f"iterate: backtrack must be an integer >= 0, got backtrack={backtrack!r}")
        d = self._prepare(density)
        base64 = self._base64(d.grid.device)
        old = self.s.detach().to(torch.float64)
        current = self._view(old, base64)
        h0 = eafo.output_entropy(current, d)
        record = dict(mode="iterate", accepted=False, reason="", entropy_before=h0, entropy_after=h0,
                      change=0.0, eta=float(eta), entropy_candidate=math.nan)
        eps = float(self.eps.detach())
        if abs(eps) < min_eps:
            record["reason"] = f"eps too small (|eps| = {abs(eps):.3g} < min_eps = {min_eps:.3g})"
            return record
        std = d.mean_std()[1]
        smooth_view = self._smooth_view(base64)
        _, d1, _ = eafo.derivatives(smooth_view, d.grid)
        c = eafo.correction(smooth_view, d, flat_tol=flat)
        if not bool(torch.isfinite(c).all()):
            record["reason"] = "non-finite correction"
            return record
        # Weight sqrt(f'), tapered to 0 between slopes 2*flat and flat, so the step vanishes
        # continuously where the activation flattens (c ~ p f''/f' is singular there).
        rising = d1 > flat
        weight = d1.clamp_min(0).sqrt() * (d1 / flat - 1.0).clamp(0.0, 1.0)
        r = torch.where(rising, weight * c / torch.where(rising, d1, torch.ones_like(d1)), torch.zeros_like(c))
        direction = weight * _gaussian_smooth(r, d.step, float(smooth) * std)
        step = float(eta) * self._to_knots(direction, d).to(old.device)
        size = float(step.abs().max())
        if not math.isfinite(size):
            record["reason"] = "non-finite step"
            return record
        if size == 0.0:
            record["reason"] = "zero step on the grid (the activation is flat where the density is)"
            return record
        limit = float(max_change) if max_change is not None else 0.05 * std
        if size > limit:
            step = step * (limit / size)
        edges = d.edges
        with torch.no_grad():
            # Cells with mass where the activation clearly rises (slope > _RISING) must keep rising.
            rising = (current(edges).diff() > _RISING * d.step) & (d.mass > 1e-7)
        for _ in range(backtrack + 1):
            new = self._stored(old + step / eps)
            record["eta"] = float(eta) * float(step.abs().max()) / size
            if not bool(torch.isfinite(new).all()):
                record["reason"] = "non-finite candidate"
                return record
            candidate = self._view(new, base64)
            with torch.no_grad():
                folds = bool((rising & ~(candidate(edges).diff() > 0)).any())
            if folds:
                record["reason"] = "would stop being increasing where the density has mass"
            else:
                h1 = eafo.output_entropy(candidate, d)
                record["entropy_candidate"] = h1
                if math.isfinite(h1) and h1 < h0:
                    self._write(new)
                    record.update(accepted=True, reason="accepted", entropy_after=h1,
                                  change=float(step.abs().max()))
                    return record
                record["reason"] = f"entropy did not drop ({h0:.6g} -> {h1:.6g})"
            step = 0.5 * step
        return record

    # ------------------------------------------------------------------ grid placement
    def outside_mass(self, density: Density) -> float:
        """Fraction of ``density``'s mass beyond ``[lo, hi]`` (including its own ``outside``)."""
        d = self._prepare(density)
        cum = torch.cat([d.p.new_zeros(1), torch.cumsum(d.mass, 0)])
        ends = torch.tensor([float(self.lo), float(self.hi)], dtype=cum.dtype, device=cum.device)
        lo_m, hi_m = _interp_clamped(ends, d.edges, cum).tolist()
        return float(min(1.0, max(0.0, 1.0 - (hi_m - lo_m))))

    def place_grid(
        self,
        density: Density,
        lo_q: float = 5e-4,
        hi_q: float = 1.0 - 5e-4,
        widen: float = 0.1,
    ) -> dict:
        """Move the grid to cover ``density`` and resample ``s`` so the activation is unchanged.

        New ends: the ``lo_q`` and ``hi_q`` quantiles of the density (restricted to its grid),
        each pushed out by ``widen`` times their distance. The new knot values are the current
        activation's spline at the new knots, so the function is unchanged *at every new knot*;
        between new knots the change is the linear-interpolation error of the old spline,
        at most ``|eps| * new_step * max|slope jump| / 4``, and beyond the old grid ``s`` is 0 (the
        activation stays its base there). If the new grid is narrower than the old one, the
        end knots are set to 0, which changes the function next to the new ends.

        Returns ``dict(lo, hi, old_lo, old_hi, outside_before, outside_after)``.
        """
        if not (0.0 < lo_q < hi_q < 1.0):
            raise ValueError(f"place_grid: need 0 < lo_q < hi_q < 1, got lo_q={lo_q!r}, hi_q={hi_q!r}")
        if not (math.isfinite(widen) and widen >= 0):
            raise ValueError(f"place_grid: widen must be a finite number >= 0, got widen={widen!r}")
        d = self._prepare(density)
        q_lo, q_hi = d.quantile(lo_q), d.quantile(hi_q)
        span = max(q_hi - q_lo, 2 * d.step)
        # The knots must sit where forward will put them: at the ends as the buffers store them.
        new_lo, new_hi = (float(torch.tensor(v, dtype=self.lo.dtype)) for v in (q_lo - widen * span, q_hi + widen * span))
        record = dict(old_lo=float(self.lo), old_hi=float(self.hi), outside_before=self.outside_mass(d))
        check_grid(new_lo, new_hi, self.knots)
        x_new = torch.linspace(new_lo, new_hi, self.knots, dtype=torch.float64, device=self.s.device)
        new = _spline_ops(x_new, self.s.detach().double(), self.lo.detach().double(), self.hi.detach().double())
        new[0] = new[-1] = 0.0
        with torch.no_grad():
            self.lo.fill_(new_lo)
            self.hi.fill_(new_hi)
        self._write(new)
        record.update(lo=float(self.lo), hi=float(self.hi), outside_after=self.outside_mass(d))
        return record


def _gaussian_smooth(values: torch.Tensor, step: float, sigma: float) -> torch.Tensor:
    """Convolve values on a uniform grid with a normalised Gaussian of width ``sigma``."""
    if sigma < 0.5 * step:
        return values
    radius = int(math.ceil(4.0 * sigma / step))
    offsets = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device) * step
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    return torch.nn.functional.conv1d(values[None, None], kernel[None, None], padding=radius)[0, 0][: values.shape[0]]


def _interp_clamped(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``fp(xp)`` at ``x``, constant beyond the ends (``xp`` uniform)."""
    n = xp.shape[0]
    step = float(xp[1] - xp[0])
    t = ((x - xp[0]) / step).clamp(0.0, n - 1.0)
    j = t.floor().long().clamp(0, n - 2)
    w = t - j
    return fp[j] * (1 - w) + fp[j + 1] * w
