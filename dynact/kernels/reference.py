"""The spline's reference arithmetic: knot tables, segment lookup and linear interpolation.

:class:`dynact.EAFOActivation` computes ``s(x)`` with the fused kernels of
:mod:`dynact.kernels.dispatch` where they are built; these are the plain-PyTorch definitions they are
tested against, the path under ``torch.compile`` on CUDA and the fallback everywhere else.
The knot tables are padded so that no mask is needed (see :func:`_tables`).
"""

from __future__ import annotations

import torch


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
    """``y0 + eps * s(x)`` with a hand-written backward (the eager reference path, taken where
    the fused kernels of :mod:`dynact.kernels.dispatch` cannot be built or are turned off).

    Saves only ``x`` (already kept alive by the base) and the tiny tables; backward recomputes
    the segment index. ``grad_x = grad * eps * slope[j] * a``; ``grad_eps = sum(grad * s(x))``
    accumulated in float32 or wider; ``grad_y0 = grad``.
    """

    @staticmethod
    def forward(ctx, x, y0, eps, value, slope, a, b):  # noqa: D102 (documented on the class)
        last = slope.shape[0] - 1
        j, frac = _segment(x, a, b, last)
        v = _gather(value, j).addcmul_(frac, _gather(slope, j))
        out = torch.addcmul(y0, v, eps.reshape(()).to(v.dtype))  # eps: 0-d or (1,)
        ctx.save_for_backward(x, eps, value, slope, a, b)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, eps, value, slope, a, b = ctx.saved_tensors
        j, frac = _segment(x, a, b, slope.shape[0] - 1)
        grad_x = grad_eps = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad * _gather(slope * (a * eps.reshape(()).to(a.dtype)), j)).to(x.dtype)
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
    # (clamp_max takes a tensor: under torch.jit.trace ``last`` is one, recorded in the trace)
    last = slope.shape[0] - 1
    u = (x.to(a.dtype) * a + b).clamp_min(0.0).clamp_max(last)
    j = u.detach().long().clamp_min(0).clamp_max(last)
    return value[j] + (u - j) * slope[j]


def _interp_uniform(xq: torch.Tensor, x0, step, values: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``values`` given at ``x0 + k * step``; zero outside their span.

    ``values`` is one table ``(n,)`` or one per row ``(rows, n)``; for rows, ``xq`` is
    ``(rows, m)`` and ``x0``, ``step`` are ``(rows, 1)`` tensors."""
    n = values.shape[-1]
    t = (xq - x0) / step
    inside = (t >= -1e-9) & (t <= n - 1 + 1e-9)
    t = t.clamp(0.0, n - 1.0)
    j = t.floor().long().clamp(0, n - 2)
    w = t - j
    if values.dim() == 1:
        val = values[j] * (1 - w) + values[j + 1] * w
    else:
        val = values.gather(-1, j) * (1 - w) + values.gather(-1, j + 1) * w
    return torch.where(inside, val, torch.zeros_like(val))


def _interp_clamped(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``fp(xp)`` at ``x``, constant beyond the ends (``xp`` uniform)."""
    n = xp.shape[0]
    step = float(xp[1] - xp[0])
    t = ((x - xp[0]) / step).clamp(0.0, n - 1.0)
    j = t.floor().long().clamp(0, n - 2)
    w = t - j
    return fp[j] * (1 - w) + fp[j + 1] * w
