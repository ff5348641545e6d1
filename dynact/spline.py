"""The dynamic EAFO activation: ``base(x) + eps * s(x)`` with ``s`` a spline measured from data.

CRReLU adds ``eps * x * exp(-x**2/2)`` to ReLU, the EAFO correction of ReLU *if* the layer's
pre-activations were standard normal (``docs/math.md``, "CRReLU as one step"). :class:`EAFOActivation` keeps
the same form, one learnable scalar ``eps`` per module, but takes the shape ``s`` from the
density the layer really sees: :meth:`EAFOActivation.update` recomputes ``s`` from a
:class:`~dynact.density.Density` with :func:`dynact.eafo.correction`.

``s`` is piecewise linear on ``knots`` uniform points from ``lo`` to ``hi``, zero at and beyond
both ends, so outside ``[lo, hi]`` the activation is exactly its base. The knot values and the
grid ends are buffers (saved in ``state_dict``, never touched by the optimizer).

Speed: the spline costs one clamp, one gather and one multiply-add per element. Eager mode runs
the fused kernels of :mod:`dynact.kernels` (one pass over the tensor per direction, a ReLU
base included) and saves nothing but the input; where they cannot be built, a custom autograd
function over tensor ops (the reference path). Under ``torch.compile`` a CPU graph calls the
same kernels as custom ops; elsewhere the arithmetic is plain tensor ops, which Inductor fuses
with the base into one kernel per direction.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from dynact import eafo
from dynact._args import flag, real_number, shown
from dynact._slopes import SlopeProblem, finite_arg, take_step
from dynact.activations import eps_as_vector
from dynact.density import MAX_BINS, MIN_BINS, Density, check_grid
from dynact.kernels import dispatch
from dynact.kernels.reference import (
    _compute_dtype,
    _interp_clamped,
    _interp_uniform,
    _spline_ops,
    _SplineTerm,
    _tables,
)
from dynact.records import always_recorded
from dynact.registry import ActSpec, activation_types, elementwise, make_activation, register_activation

__all__ = ["EAFOActivation", "DEFAULT_KNOTS"]

#: Default number of knots: a step of 12/256 ~ 0.047 on the default [-6, 6] grid, so the
#: linear interpolant of ``x*exp(-x**2/2)`` is within 6e-4 of it (error <= step**2 * max|s''| / 8).
DEFAULT_KNOTS = 257

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_MODES = ("refresh", "iterate")
_INITS = ("crrelu", "zero")
#: Taper ``kappa`` of the correction for bases with a minimum (GELU, SiLU, Mish): it keeps the
#: refreshed shape of those bases within twice ReLU's peak under N(0, 1) (docs/math.md).
TAPER = 0.3
#: :meth:`EAFOActivation.place_grid`'s defaults: the new grid covers the data between these
#: quantiles (``q``, ``1 - q``), each end pushed out by this fraction of their distance.
PLACE_QUANTILE, PLACE_WIDEN = 5e-4, 0.1


# ----------------------------------------------------------------------------- the module
@always_recorded
class EAFOActivation(nn.Module):
    """``base(x) + eps * s(x)``: an activation whose correction shape is measured from data.

    ``s`` is piecewise linear on ``knots`` uniform points over ``[lo, hi]``, zero at both ends
    and beyond, so outside the grid the activation is exactly ``base``. Freshly built (with
    ``init="crrelu"``) ``s(x) = x * exp(-x**2/2)`` at the knots, so ``EAFOActivation()``
    computes ``CRReLU(eps)`` up to the interpolation error (below ``6e-4 * |eps|``).

    Updates from a measured :class:`~dynact.density.Density` (see :meth:`update`):

    - ``refresh``: ``s = -sqrt(2*pi) * sigma**3 * c_base`` with ``c_base =
      dynact.eafo.correction(base, p)`` and ``sigma`` the density's std (tapered for bases with a
      minimum). For ``p = N(0, sigma**2)`` and a ReLU base the activation is
      ``sigma * CRReLU_eps(x / sigma)``: ``eps`` keeps CRReLU's meaning at every scale.
    - ``iterate``: one step of a projected descent on the scale-free entropy, under slope
      bounds that give it a minimum (``docs/math.md``, "Iterating"). Works for every registry
      base; flat parts stay flat, kinks are never straddled, and the objective never rises.

    The grid follows the data with :meth:`place_grid`; :meth:`outside_mass` says how much of a
    density lies beyond the current grid.

    Buffers (persistent): ``s`` (``knots``,), ``lo`` and ``hi`` (0-d). Parameters: ``eps`` (one
    number, shape ``(1,)`` so that FSDP2 can shard it; checkpoints holding it 0-d load too) if
    ``learn_eps`` (else a buffer), plus the base's own (only PReLU has one), so with a
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

    #: :func:`dynact.swap_activations` builds it around the module it replaces.
    wraps_base = True

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
        lo_f, hi_f, knots = _check_knot_grid(lo, hi, knots)
        eps = real_number("EAFOActivation", "eps", eps)
        learn_eps = flag("EAFOActivation", "learn_eps", learn_eps)
        if not isinstance(init, str) or init not in _INITS:
            raise ValueError(f"EAFOActivation: init must be one of {_INITS}, got init={shown(init)}")
        self.base, self.base_name = _build_base(base)
        self.learn_eps = learn_eps
        self.register_buffer("lo", torch.tensor(lo_f))
        self.register_buffer("hi", torch.tensor(hi_f))
        grid = torch.linspace(lo_f, hi_f, knots, dtype=torch.float64)
        s = grid * torch.exp(-0.5 * grid**2) if init == "crrelu" else torch.zeros_like(grid)
        s[0] = s[-1] = 0.0
        self.register_buffer("s", s.float())
        value = torch.tensor([eps])  # (1,), not 0-d: FSDP2 cannot shard 0-d parameters
        if self.learn_eps:
            self.eps = nn.Parameter(value)
        else:
            self.register_buffer("eps", value)
        self.register_load_state_dict_pre_hook(eps_as_vector)
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
        if dispatch.eager_fused(x):
            # The common eager call: one fused autograd node, with tables built once per change
            # of the spline; a plain ReLU base runs inside the kernel, a plain GELU (CPU) inside
            # the node (in the kernel too for float32, see dispatch.gelu_base).
            base = self._base_code(x)
            y0 = None if base else self.base(x)
            eps = self._parameters.get("eps")  # as self.eps, without nn.Module.__getattr__ per call
            return dispatch.fused_spline(x, self._buffers["eps"] if eps is None else eps, y0,
                                         self._kernel_tables(x.dtype), base)
        eps = self.eps.view(())  # the stored (1,) as the 0-d scalar it is: 0-d inputs give 0-d outputs
        if torch.compiler.is_compiling() or dispatch.MODE == "ops":
            if dispatch.MODE != "ops" and dispatch.compiled_on_cpu(x):
                # On CPU the C++ kernels beat Inductor's loop: call them as opaque custom ops.
                base = self._base_code(x)
                y0 = None if base == dispatch.BASE_RELU else self.base(x)  # unused (dropped) if GELU runs in the op
                return dispatch.spline_op(x, eps, y0, self.s, self.lo, self.hi, gelu=base == dispatch.BASE_GELU)
            return self._plain(x)
        if dispatch.plain_ops_needed():  # torch.jit.trace, torch.func transforms, forward-mode AD
            return self._plain(x)
        value, slope, a, b, _ = self._eager_tables(_compute_dtype(x.dtype))
        return _SplineTerm.apply(x, self.base(x), eps, value, slope, a, b)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        # Plain differentiable tensor ops: fused by Inductor, traceable, and transformable.
        cdt = _compute_dtype(x.dtype)
        s = _spline_ops(x, self.s, self.lo, self.hi)
        return (self.base(x).to(cdt) + self.eps.reshape(()).to(cdt) * s).to(x.dtype)

    def _base_code(self, x: torch.Tensor) -> int:
        """How the fused spline gets its base: ReLU inside the kernel, GELU inside the same
        autograd node (CPU; :data:`dynact.kernels.dispatch.BASE_GELU`: computed in the kernel for
        float32 when the correction is not 0, else ATen's, see
        :func:`dynact.kernels.dispatch.gelu_base`), or ``BASE_GIVEN``: the base runs as itself
        (any other base, a hooked one, GELU on CUDA)."""
        base = self._modules["base"]
        kind = type(base)
        if (kind is nn.ReLU or kind is nn.GELU) and not (base._forward_hooks or base._forward_pre_hooks):
            if kind is nn.ReLU:
                return dispatch.BASE_RELU
            if base.approximate == "none" and x.is_cpu:
                return dispatch.BASE_GELU
        return dispatch.BASE_GIVEN

    def _kernel_tables(self, dtype: torch.dtype) -> dispatch.SplineTables:
        """The fused kernels' tables for inputs of ``dtype``, cached; rebuilt when ``s``, ``lo`` or
        ``hi`` is replaced (``.to()``, ``load_state_dict(assign=True)``) or changed in place
        (updates, ``load_state_dict``, ``copy_``: their version counters move)."""
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        buffers = self._buffers
        s, lo, hi = buffers["s"], buffers["lo"], buffers["hi"]
        hit = self._cache.get(cdt)
        try:
            if hit is not None:
                ks, klo, khi, vs, vlo, vhi = hit[0]
                if ks is s and klo is lo and khi is hi and (s._version, lo._version, hi._version) == (vs, vlo, vhi):
                    return hit[1]
            key = (s, lo, hi, s._version, lo._version, hi._version)
        except RuntimeError:  # inference tensors carry no version counter: build, do not cache
            return dispatch.SplineTables(*_tables(s, lo, hi, cdt))
        # Built outside inference mode even when called inside it: inference tensors cannot be
        # saved for backward, so cached ones would break the first training step after a
        # validation pass (Lightning validates under inference_mode).
        with torch.inference_mode(False), torch.no_grad():
            tables = dispatch.SplineTables(*_tables(s, lo, hi, cdt))
        self._cache[cdt] = (key, tables)
        return tables

    def _eager_tables(self, dtype: torch.dtype):
        """``(value, slope, a, b, pairs)``: :func:`_tables` and the fused kernels' packed table."""
        return self._kernel_tables(dtype).as_tuple()

    def clear_cache(self) -> None:
        """Forget the kernel tables built from ``s``, ``lo`` and ``hi``; the next call rebuilds them.

        Changes through the buffers themselves (in place, or by replacing them) are seen without
        it; call it after writing their memory some other way (through ``.data``, or a tensor
        that shares their storage without being a view of them).
        """
        self._cache.clear()

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
    def _base64(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        # A base with per-channel parameters (PReLU(C)) enters the numerics as its channel mean.
        return elementwise(copy.deepcopy(self.base).to(device=device, dtype=torch.float64))

    def _view(self, s: torch.Tensor, base64: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
        """The activation with knot values ``s`` as a float64 function (what forward computes)."""
        s64 = s.detach().to(torch.float64)
        lo, hi = self.lo.detach().double(), self.hi.detach().double()
        eps = float(self.eps.detach())

        def f(x: torch.Tensor) -> torch.Tensor:
            return base64(x) + eps * _spline_ops(x, s64, lo, hi)

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
            entropies are the mixed entropies (``output_stats(...)["entropy"]``, nats) of the
            activation before and after the call on ``density`` (equal when refused);
            ``change`` is the largest absolute change of the function on the knots (0 when
            refused). ``iterate`` adds ``objective_before``, ``objective_after``,
            ``objective_restored`` (its objective ``J``) and ``feasible_before``, and reports in
            ``eta`` the step size used after backtracking.
        """
        if mode == "refresh":
            return self.refresh(density)
        if mode == "iterate":
            return self.iterate(density, eta=eta, max_change=max_change, **guards)
        raise ValueError(f"update: mode must be one of {_MODES}, got mode={mode!r}")

    def refresh(self, density: Density) -> dict:
        """Set ``s = -sqrt(2*pi) * sigma**3 * correction(base, density)`` on the knots.

        ``sigma`` is the density's standard deviation. The factor makes the shape
        scale-equivariant (``docs/math.md``, "CRReLU as one step"): for ``X = sigma * Z`` with
        ``Z ~ N(0, 1)`` and a ReLU base, ``s(x) = x exp(-x**2 / (2 sigma**2))`` and the activation
        is ``sigma * CRReLU_eps(x / sigma)``, so ``eps`` means the same in every layer and at every
        refresh; ``sigma = 1`` gives CRReLU's shape exactly.

        Bases that decrease somewhere on the density's grid (GELU, SiLU, Mish) use the tapered
        correction (``taper=`` :data:`TAPER`), so ``s`` has no spike at their minimum.

        The correction is computed on ``density.grid`` and interpolated linearly onto the knots;
        knots beyond the density's grid get 0, and the end knots stay 0. ``eps`` is unchanged.
        Rejected (nothing written) only if the correction is not finite.
        """
        d = self._prepare(density)
        base64 = self._base64(d.grid.device)
        old = self.s.detach().to(torch.float64)
        h0 = eafo.output_stats(self._view(old, base64), d)["entropy"]
        record = dict(mode="refresh", accepted=False, reason="", entropy_before=h0, entropy_after=h0,
                      change=0.0, eta=0.0)
        sigma = d.mean_std()[1]
        _, d1, _ = eafo.derivatives(base64, d.grid)
        falling = bool(((d1 < -eafo.FLAT_TOL) & (d.p > 0)).any())
        c = eafo.correction(base64, d, taper=TAPER if falling else 0.0)
        if not (bool(torch.isfinite(c).all()) and math.isfinite(sigma) and sigma > 0):
            record["reason"] = "non-finite correction"
            return record
        new = self._stored(-_SQRT_2PI * sigma**3 * self._to_knots(c.to(torch.float64), d).to(old.device))
        h1 = eafo.output_stats(self._view(new, base64), d)["entropy"]
        self._write(new)
        record.update(accepted=True, reason="refreshed", entropy_after=h1,
                      change=abs(float(self.eps.detach())) * float((new - old).abs().max()))
        return record

    def iterate(self, density: Density, eta: float = 0.05, max_change: float | None = None,
                max_log_change: float = 0.1, min_ratio: float = 0.25, max_ratio: float = 4.0,
                min_slope: float = 0.05, backtrack: int = 5, min_eps: float = 1e-6) -> dict:
        """One step of a projected descent on the scale-free entropy (``docs/math.md``, "Iterating").

        Objective, over the set ``R`` where the *base* rises (input mass ``m_R``)::

            J(f) = integral_R p log f'  -  m_R log std(f(X))

        evaluated on the density's cells with ``f`` linear in each; the cell holding a minimum of
        the base (GELU, SiLU, Mish) or ReLU's kink counts only its rising part, so ``J`` does not
        depend on the grid's resolution. The falling part of a base enters only ``std``. For an
        activation that rises where its base rises and is flat elsewhere, ``J`` is the
        scale-free mixed entropy (:func:`dynact.eafo.output_stats`) up to a constant, unchanged
        by ``f -> a f``.

        Variables: on each knot cell where the base rises throughout, the ratio ``r`` of the
        activation's rise to the base's; other cells keep theirs (a flat part stays flat, so the
        dead mass never changes, and a kink is never straddled). Constraints, which make the
        minimum exist (the entropy alone has none):

        - ``r >= min_ratio``, and the slope never drops below ``min_slope`` where the base's is
          above it (nor below the base's where the base's is below it): no plateau forms;
        - ``r <= max_ratio``;
        - the correction does not fall on a knot cell holding a minimum of the base (it would
          fold ``f`` beside the minimum);
        - ``s`` stays zero at both ends of the grid (the activation is continuous and equals its
          base outside ``[lo, hi]``).

        A state outside these bounds (a fold where the base rises, say after a large ``eps``) is
        first projected onto them: each update moves it at most ``max_change`` towards the
        projection, and descends from there once it is reached. A descent step moves ``log r`` by
        ``-eta`` times the gradient of ``J`` per unit of mass, each component capped at
        ``max_log_change``, then projects back (one common factor on ``r`` and clipping). A step
        that would change the activation by more than ``max_change`` (default
        ``0.05 * std(density)``) is shrunk until it fits; one that does not lower ``J`` is halved
        up to ``backtrack`` times. A refused step leaves the module untouched, and ``reason`` says
        why and what to do. ``eta`` may be negative (ascent, to check the guard).

        Returns:
            the :meth:`update` record, plus ``objective_before``/``objective_after`` (``J`` of the module as
            the step finds and leaves it, so one step's ``objective_after`` is the next one's
            ``objective_before``; NaN where it folds where its base rises), ``feasible_before`` (whether
            it met the bounds) and ``objective_restored`` (``J`` of its projection onto them).
        """
        eta, max_log_change = _iterate_args(eta, max_change, max_log_change, min_ratio, max_ratio, min_slope, backtrack)
        d = self._prepare(density)
        base64 = self._base64(d.grid.device)
        old = self.s.detach().to(torch.float64)
        h0 = eafo.output_stats(self._view(old, base64), d)["entropy"]
        record = dict(mode="iterate", accepted=False, reason="", entropy_before=h0, entropy_after=h0,
                      change=0.0, eta=eta, objective_before=math.nan, objective_after=math.nan,
                      objective_restored=math.nan, feasible_before=False)
        problem = self._slope_problem(record, d, base64, float(min_ratio), float(max_ratio), float(min_slope),
                                      min_eps)
        if problem is not None:
            limit = float(max_change) if max_change is not None else 0.05 * d.mean_std()[1]
            self._apply_step(record, take_step(problem, old, eta, max_log_change, limit, backtrack), d, base64)
        return record

    def _slope_problem(self, record: dict, d: Density, base64: nn.Module, min_ratio: float, max_ratio: float,
                       min_slope: float, min_eps: float) -> SlopeProblem | None:
        """:meth:`iterate`'s problem on ``d``; None, with ``record["reason"]`` saying why, when
        there is nothing to optimise (``eps`` too small, no knot cell where the base rises)."""
        eps = float(self.eps.detach().reshape(-1)[0])
        if not math.isfinite(eps) or abs(eps) < min_eps:
            record["reason"] = (f"eps too small or not finite (eps = {eps:.3g}, min_eps = {min_eps:.3g}): "
                                "the spline cannot move the activation; set eps or refresh with mode='refresh'")
            return None
        problem = SlopeProblem(self, d, base64, min_ratio, max_ratio, min_slope)
        if not bool(problem.free.any()):
            record["reason"] = ("no knot cell where the base rises throughout: nothing to optimise; "
                                "move the grid onto the data with place_grid")
            return None
        return problem

    def _apply_step(self, record: dict, step: dict, d: Density, base64: nn.Module) -> None:
        """Copy :func:`~dynact._slopes.take_step`'s result into ``record``; write ``s`` if accepted."""
        record.update(reason=step["reason"], objective_before=step["objective_before"],
                      objective_after=step["objective_after"], objective_restored=step["objective_restored"],
                      feasible_before=step["feasible_before"],
                      eta=record["eta"] * step["scale"])
        if step["accepted"]:
            self._write(step["s"])
            h1 = eafo.output_stats(self._view(step["s"], base64), d)["entropy"]
            record.update(accepted=True, entropy_after=h1, change=step["change"])

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
        lo_q: float = PLACE_QUANTILE,
        hi_q: float = 1.0 - PLACE_QUANTILE,
        widen: float = PLACE_WIDEN,
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
        ends = (q_lo - widen * span, q_hi + widen * span)
        new_lo, new_hi = (float(torch.tensor(v, dtype=self.lo.dtype)) for v in ends)
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


def _build_base(base: ActSpec) -> tuple[nn.Module, str]:
    """:class:`EAFOActivation`'s base module and the name it goes by, or an error naming ``base``."""
    if isinstance(base, str) and base.strip().lower() == "eafo":
        raise ValueError(
            "EAFOActivation: base='eafo' would nest the dynamic activation in itself; "
            "choose a fixed base such as 'relu', 'gelu', 'silu' or 'crrelu'"
        )
    if base is None or not (isinstance(base, (str, nn.Module)) or callable(base)):
        raise TypeError(f"EAFOActivation: base must be a registry name, an activation class or factory, or a "
                        f"module, got base={shown(base)} ({type(base).__name__})")
    # A configured module (ELU(alpha=0.3), a trained PReLU) is used as it is, settings and
    # parameters included; names, classes and factories build a fresh one.
    try:
        module = base if isinstance(base, nn.Module) else make_activation(base)
    except ValueError as e:  # an unknown name, or the base's own constructor refusing
        raise ValueError(f"EAFOActivation: base={shown(base)}: {e}") from e
    if isinstance(module, EAFOActivation):
        raise ValueError("EAFOActivation: the base must be a fixed activation, not another EAFOActivation")
    if getattr(module, "inplace", False):
        # The spline reads the input after the base has run.
        raise ValueError("EAFOActivation: the base must not work in place; build it with inplace=False")
    if isinstance(base, str):
        return module, base
    if isinstance(base, nn.Module):
        return module, activation_types().get(type(base), type(base).__name__)
    return module, getattr(base, "__name__", type(module).__name__)


def _check_knot_grid(lo, hi, knots) -> tuple[float, float, int]:
    """:func:`~dynact.density.check_grid` for the knots, its messages speaking of ``knots``."""
    if isinstance(knots, bool) or not isinstance(knots, (int, np.integer)) or not MIN_BINS <= int(knots) <= MAX_BINS:
        raise ValueError(
            f"EAFOActivation: knots must be an integer in [{MIN_BINS}, {MAX_BINS}], got knots={shown(knots)}"
        )
    try:
        return check_grid(lo, hi, int(knots))
    except ValueError as e:  # lo and hi, or a knot spacing too fine for them
        raise ValueError(f"EAFOActivation: {e}".replace("bins", "knots")) from None


def _iterate_args(eta, max_change, max_log_change, min_ratio, max_ratio, min_slope, backtrack) -> tuple[float, float]:
    """Check :meth:`EAFOActivation.iterate`'s guards; return ``eta`` and ``max_log_change`` as floats."""
    eta = finite_arg("eta", eta, nonzero=True)
    max_log_change = finite_arg("max_log_change", max_log_change, positive=True)
    if max_change is not None:
        finite_arg("max_change", max_change, positive=True)
    if not (0 < float(min_ratio) <= 1 <= float(max_ratio) < math.inf):
        raise ValueError(
            f"iterate: need 0 < min_ratio <= 1 <= max_ratio < inf, got min_ratio={min_ratio!r}, "
            f"max_ratio={max_ratio!r}"
        )
    finite_arg("min_slope", min_slope, positive=True)
    if isinstance(backtrack, bool) or not isinstance(backtrack, int) or backtrack < 0:
        raise ValueError(f"iterate: backtrack must be an integer >= 0, got backtrack={backtrack!r}")
    return eta, max_log_change


register_activation("eafo", EAFOActivation)
