"""Triton kernels of the fused activations (CUDA): one pass over the tensor per direction.

Same arithmetic as the C++ kernels (``dynact.kernels.cpu``): half inputs are computed in float32, the eps gradient is a
per-block sum (a fixed tree inside each block) written to a buffer and added by ``torch.sum``,
which is deterministic for a fixed size, so deterministic mode needs nothing more. Scalars are
read from device memory, so no call synchronises with the host. Inputs are dense (their
elements fill their memory once each) and share one layout, which the outputs keep; the
kernels run over that memory as one flat array. Used through
:mod:`dynact.kernels.dispatch`; if Triton is missing or a kernel fails to compile, :func:`available`
turns false after one warning and the reference path runs.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

try:  # Triton ships with PyTorch's CUDA wheels; without it the reference path runs.
    import triton
    import triton.language as tl
except Exception as err:  # pragma: no cover - depends on the installation
    triton = None
    _IMPORT_ERROR = f"{type(err).__name__}: {err}"
else:
    _IMPORT_ERROR = ""

_BLOCK = 1024
_state: Optional[bool] = None


def reset() -> None:
    global _state
    _state = None


def available() -> bool:
    """True if CUDA and Triton are present and the kernels compile (tried once per process)."""
    global _state
    if _state is None:
        if not torch.cuda.is_available():
            _state = False
        elif triton is None:
            _state = False
            warnings.warn(f"dynact: Triton is not available ({_IMPORT_ERROR}); the fused CUDA kernels "
                          "are off and the slower reference path runs", RuntimeWarning, stacklevel=3)
        else:
            try:  # compile once on a tiny input, so a broken toolchain shows here, not mid-training
                x = torch.linspace(-3, 3, 8, device="cuda").requires_grad_(False)
                pairs = torch.zeros(4, 2, device="cuda")
                one = torch.ones((), device="cuda")
                eafo_backward(x, x, True, pairs, one, one, one, True, True)
                crrelu_backward(x, x, one, True, True)
                eafo_forward(x, None, pairs, one, one, one)
                crrelu_forward(x, one)
                torch.cuda.synchronize()
                _state = True
            except Exception as err:
                _state = False
                warnings.warn(f"dynact: the fused CUDA kernels could not be built ({type(err).__name__}: "
                              f"{err}); using the slower reference path", RuntimeWarning, stacklevel=3)
    return _state


if triton is not None:

    @triton.jit
    def _segment(x, a, b, last):
        u = tl.fma(x, a, b)  # fused, as the CPU kernels and ATen's addcmul: the same segments at knots
        u = tl.where(u < 0.0, 0.0, u)
        u = tl.where(u > last, last, u)
        j = tl.where(u == u, u, 0.0).to(tl.int32)  # NaN: segment 0, frac NaN
        return j, u - j.to(tl.float32)

    @triton.jit
    def _eafo_fwd_kernel(x_ptr, y0_ptr, out_ptr, n, pairs_ptr, a_ptr, b_ptr, eps_ptr, last,
                         RELU: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        j, frac = _segment(x, tl.load(a_ptr), tl.load(b_ptr), last)
        value = tl.load(pairs_ptr + 2 * j, mask=mask, other=0.0)
        s = tl.fma(frac, tl.load(pairs_ptr + 2 * j + 1, mask=mask, other=0.0), value)
        if RELU:
            base = tl.where(x < 0.0, 0.0, x)
        else:
            base = tl.load(y0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.fma(s, tl.load(eps_ptr).to(tl.float32), base)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _eafo_bwd_kernel(g_ptr, x_ptr, gx_ptr, part_ptr, n, pairs_ptr, a_ptr, b_ptr, eps_ptr, last,
                         RELU: tl.constexpr, GX: tl.constexpr, GE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr)
        j, frac = _segment(x, a, tl.load(b_ptr), last)
        slope = tl.load(pairs_ptr + 2 * j + 1, mask=mask, other=0.0)
        if GX:
            spline = g * (slope * (a * tl.load(eps_ptr).to(tl.float32)))
            if RELU:
                gx = tl.where(x > 0.0, g + spline, spline)
            else:
                gx = spline
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if GE:
            s = tl.fma(frac, slope, tl.load(pairs_ptr + 2 * j, mask=mask, other=0.0))
            tl.store(part_ptr + pid, tl.sum(g * s, axis=0))

    @triton.jit
    def _crrelu_fwd_kernel(x_ptr, out_ptr, n, eps_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gauss = tl.exp(x * x * -0.5)
        y = tl.where(x < 0.0, 0.0, x) + gauss * x * tl.load(eps_ptr).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _crrelu_bwd_kernel(g_ptr, x_ptr, gx_ptr, part_ptr, n, eps_ptr, GX: tl.constexpr, GE: tl.constexpr,
                           BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = x * x
        x2 = tl.where(x2 > 1e4, 1e4, x2)  # as the CPU kernels: (1 - x2) * gauss is 0, not -inf * 0, for huge |x|
        gauss = tl.exp(x2 * -0.5)
        if GX:
            slope = (1.0 - x2) * gauss * tl.load(eps_ptr).to(tl.float32) + tl.where(x > 0.0, 1.0, 0.0)
            tl.store(gx_ptr + offs, (slope * g).to(gx_ptr.dtype.element_ty), mask=mask)
        if GE:
            tl.store(part_ptr + pid, tl.sum(g * x * gauss, axis=0))


def _blocks(n: int) -> int:
    return triton.cdiv(n, _BLOCK)


def eafo_forward(x, y0, pairs, a, b, eps):
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        with torch.cuda.device(x.device):
            _eafo_fwd_kernel[(_blocks(n),)](x, x if y0 is None else y0, out, n, pairs, a, b, eps,
                                            float(pairs.shape[0] - 2), RELU=y0 is None, BLOCK=_BLOCK)
    return out


def _backward(kernel, grad, x, need_x, need_eps, *args, **meta):
    """Launch a backward kernel: ``grad_x`` (if asked) and per-block partial sums of the ``eps``
    gradient (if asked), summed in a fixed order so the result is deterministic."""
    n = x.numel()
    grad = grad.to(x.dtype)
    gx = torch.empty_like(x) if need_x else None
    part = torch.zeros(max(_blocks(n), 1), device=x.device, dtype=torch.float32) if need_eps else None
    if n:
        with torch.cuda.device(x.device):
            kernel[(_blocks(n),)](grad, x, x if gx is None else gx, x if part is None else part, n, *args,
                                  GX=need_x, GE=need_eps, BLOCK=_BLOCK, **meta)
    return gx, (None if part is None else part.sum())


def eafo_backward(grad, x, relu, pairs, a, b, eps, need_x, need_eps):
    return _backward(_eafo_bwd_kernel, grad, x, need_x, need_eps, pairs, a, b, eps, float(pairs.shape[0] - 2),
                     RELU=relu)


def crrelu_forward(x, eps):
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        with torch.cuda.device(x.device):
            _crrelu_fwd_kernel[(_blocks(n),)](x, out, n, eps, BLOCK=_BLOCK)
    return out


def crrelu_backward(grad, x, eps, need_x, need_eps):
    return _backward(_crrelu_bwd_kernel, grad, x, need_x, need_eps, eps)
