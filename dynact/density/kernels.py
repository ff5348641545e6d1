"""Bandwidth rules and grid convolutions behind the binned KDE (:class:`dynact.density.KDE`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# Names accepted by ``bandwidth`` / ``dp_bandwidth``.
_BANDWIDTH_RULES = ("silverman", "scott")

# dp uses the derivative of the fourth-order Gaussian kernel K = (3 - z^2)/2 phi(z):
# R(K') = 0.48485, mu_4(K) = -3. Its AMISE-optimal width is
# w = (_DP_AMISE / (R(p^(5)) n))^(1/11), _DP_AMISE = 3 R(K') / (8 (mu_4/24)^2); for a
# normal p, R(p^(5)) = 8.3306 / s^11, giving w = _DP_RULE_FACTOR s n^(-1/11).
_DP_AMISE = 11.6364
_DP_RULE_FACTOR = 1.0308
# Pilot width for estimating R(p^(5)) = -psi_10 (Wand & Jones 1995, eq. 3.7, normal
# reference for psi_12): g = (2 phi^(10)(0) / (-psi_12 n))^(1/13) = 1.2404 s n^(-1/13).
_PILOT_FACTOR = 1.2404
_PILOT_MIN_BINS = 3.0

# Gaussian kernels are truncated this many bandwidths out (mass beyond: 1e-15).
_KERNEL_REACH = 8.0

def _check_bandwidth(value: Any, name: str, allow_none: bool) -> str | float | None:
    accepted = f"{' or '.join(repr(r) for r in _BANDWIDTH_RULES)} or a positive float"
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if value.lower() not in _BANDWIDTH_RULES:
            raise ValueError(f"{name} must be {accepted}, got {value!r}")
        return value.lower()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be {accepted}, got {value!r}; pass a width > 0 in the units of x")
    return float(value)


def _rule(spec: str | float, std: float, iqr: float, n: float, derivative: bool) -> float:
    """Normal-reference bandwidths (Gaussian kernel) for a density or its derivative.

    Density (second-order Gaussian kernel): AMISE-optimal ``(4/3)^(1/5) s n^(-1/5)``
    (Scott) or Silverman's ``0.9 min(std, iqr/1.34) n^(-1/5)``. Derivative (derivative
    of the fourth-order Gaussian kernel): minimising
    ``R(K')/(n w^3) + w^8 (mu_4/4!)^2 R(p^(5))`` with ``R(K') = 0.4849``, ``mu_4 = -3``
    and ``R(p^(5)) = 8.331 / s^11`` for a normal ``p`` gives ``w = 1.0308 s n^(-1/11)``;
    ``s`` is the rule's scale.
    """
    if not isinstance(spec, str):
        return float(spec)
    scale = _rule_scale(spec, std, iqr)
    if derivative:
        return _DP_RULE_FACTOR * scale * n ** (-1 / 11)
    factor = 0.9 if spec == "silverman" else (4 / 3) ** 0.2
    return factor * scale * n ** (-0.2)


def _rule_scale(spec: str, std: float, iqr: float) -> float:
    """Silverman's robust scale ``min(std, iqr/1.34)`` (the positive one if one is 0), or the std."""
    if spec != "silverman":
        return std
    robust = iqr / 1.34
    return min(std, robust) if std > 0 and robust > 0 else max(std, robust)


def _plug_in_dp_width(nodes: torch.Tensor, total: float, scale: float, h: float) -> float:
    """Direct plug-in width for ``dp`` (one stage; Wand & Jones 1995, section 3.6).

    The AMISE-optimal width ``(_DP_AMISE / (R(p^(5)) n))^(1/11)`` needs the roughness
    ``R(p^(5)) = -psi_10``, estimated from the binned counts ``c`` as
    ``psi_10 = sum_kl c_k c_l phi_g^(10)(y_k - y_l) / n^2`` with a pilot width ``g`` from
    the normal reference. Unlike the normal-reference rule it narrows for multimodal or
    sharp densities: on a two-normal mixture (1e6 values) the worst error of ``dp`` drops
    from 0.16 to 0.024, while it matches the rule on normal and t(5) data. Falls back to
    the rule when the estimate is not positive.
    """
    rule = _DP_RULE_FACTOR * scale * total ** (-1 / 11)
    pilot = max(_PILOT_FACTOR * scale * total ** (-1 / 13), _PILOT_MIN_BINS * h)
    # In bin units (psi_10 scales as h**-11): h**11 over- or underflows for grids far from unit scale.
    psi10 = float((nodes * _convolve(nodes, [(pilot / h, 10)])[0]).sum()) / total**2
    if not math.isfinite(psi10) or psi10 >= 0:
        return rule
    return h * (_DP_AMISE / (-psi10 * total)) ** (1 / 11)


def _locate(x: torch.Tensor, lo, hi, bins: int):
    """Positions of one chunk in bin units, and where each value went.

    ``lo`` and ``hi`` are floats, or float64 tensors that broadcast against ``x`` (one grid per
    row of a ``(rows, n)`` chunk); tensors keep a traced caller free of guards on their values.
    Either way the arithmetic is ``x``'s dtype, with the ends rounded to it, so a row binned
    with tensor ends lands exactly where a float call puts it.

    Returns ``s`` (``(x - lo) / h`` clamped to ``[0, bins]``; 0 for non-finite values),
    ``off`` (1.0 for values that are outside or non-finite, else 0.0) and float64 counts
    ``[below, above, nonfinite]`` (``(..., 3)``, summed over the last dimension). Only clamps
    and arithmetic (no masks, ``where`` or boolean indexing): cheap on CPU, and no
    synchronisation on accelerators.
    """
    span = hi - lo
    low, high, scale = lo - span, hi + span, bins / span
    if isinstance(span, torch.Tensor):
        lo, hi, low, high, scale = (t.to(x.dtype) for t in (lo, hi, low, high, scale))
    # Bounding x keeps (x - lo)/h finite for huge finite values; NaN passes through.
    xc = x.clamp(low, high).nan_to_num_(0.0)
    bad = torch.sub(x, x).nan_to_num_(1.0)  # x - x is NaN exactly for NaN and +-Inf
    xc.addcmul_(bad, xc, value=-1.0)  # park non-finite values at lo
    xc = xc.addcmul_(bad, lo) if isinstance(lo, torch.Tensor) else xc.add_(bad, alpha=lo)
    # Indicators from the sign of an exact float difference: ceil(clamp(d, 0, 1)) = [d > 0].
    below = torch.rsub(xc, lo).clamp_(0.0, 1.0).ceil_()
    above = torch.sub(xc, hi).clamp_(0.0, 1.0).ceil_()
    counts = torch.stack([below.sum(-1), above.sum(-1), bad.sum(-1)], dim=-1).to(torch.float64)
    s = xc.sub_(lo).mul_(scale).clamp_(0.0, float(bins))
    off = above.add_(below).add_(bad)
    return s, off, counts


def _convolve(m: torch.Tensor, kernels: list[tuple[float, int]]) -> torch.Tensor:
    """Convolve ``m`` (M,) with Gaussian-family kernels given as ``(width in bins, order)``.

    Order 0: the Gaussian (density); 1: the derivative of the fourth-order Gaussian kernel
    ``(3 - z^2)/2 phi(z)``, whose bias is O(w^4) instead of O(w^2); 10: the tenth derivative
    of the Gaussian (for the plug-in width). Kernels are sampled at integer offsets,
    truncated at ``_KERNEL_REACH`` widths (and at M - 1, the farthest offset between two
    entries), zero beyond the ends (mass off the grid stays off it). One batched real
    FFT: O(M log M). Returns ``(len(kernels), M)`` per bin: divide by ``h^order`` for
    x units.
    """
    n = m.numel()
    reach = min(n - 1, int(math.ceil(_KERNEL_REACH * max(w for w, _ in kernels))))
    u = torch.arange(-reach, reach + 1, dtype=torch.float64, device=m.device)
    rows = []
    for width, order in kernels:
        z = u / width
        g = torch.exp(-0.5 * z * z) / (width * math.sqrt(2 * math.pi))
        if order == 0:
            rows.append(g)
        elif order == 1:
            rows.append(-z * (5.0 - z * z) / (2.0 * width) * g)
        else:  # probabilists' Hermite polynomial: phi^(r)(z) = (-1)^r He_r(z) phi(z)
            he_prev, he = torch.ones_like(z), z
            for k in range(1, order):
                he_prev, he = he, z * he - k * he_prev
            rows.append((-1) ** order * he * g / width**order)
    k = torch.stack(rows)
    size = 1 << (n + 2 * reach - 1).bit_length()
    out = torch.fft.irfft(torch.fft.rfft(m, size) * torch.fft.rfft(k, size), size)
    return out[:, reach : reach + n]


