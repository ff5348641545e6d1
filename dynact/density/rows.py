"""Many estimators of one kind and size at once: densities as ``(rows, bins)`` tensors.

:class:`dynact.ActivationOptimizer` keeps one estimator per activation site. Binning each
site's samples and deriving each site's density one at a time costs a few dozen small tensor
operations per site; here the sites that share an estimator kind and a bin count are one
batch, each with its own grid ``[lo, hi]`` (float64 tensors of shape ``(rows,)``), so the cost
is a fixed number of operations whatever the number of sites, and nothing reads a value back
to the host.

The arithmetic repeats the estimators' (:mod:`dynact.density.estimators`) operation for
operation: :func:`bin_rows` gives bit for bit the state that ``update`` gives each estimator,
and :func:`finish_rows` the density of ``compute_from`` up to float64 rounding (the FFT length
differs). Rows a single estimator would refuse (no finite value) come back flagged, not raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dynact.density.estimators import (
    _BELOW,
    _FRACTION_STEP,
    _MIN_BANDWIDTH_BINS,
    _N_COUNTERS,
    _NONFINITE,
    _ROUNDOFF,
    _want_sync,
)
from dynact.density.kernels import (
    _DP_AMISE,
    _DP_RULE_FACTOR,
    _KERNEL_REACH,
    _PILOT_FACTOR,
    _PILOT_MIN_BINS,
    _locate,
)
from dynact.distributed import collective_device
from dynact.kernels import dispatch
from dynact.sampling import extremes

__all__ = ["Rows", "bin_rows", "finish_rows", "state_size", "sum_rows"]

_ABOVE = _BELOW + 1
# Elements binned per block: bounds the temporaries as the estimators' chunks do.
_BLOCK = 2**18


def state_size(kind: str, bins: int) -> int:
    """Values in the additive state of an estimator of ``kind`` (``"kde"``, ``"histogram"``)."""
    return bins + (2 if kind == "kde" else 0) + _N_COUNTERS


# ---------------------------------------------------------------------------- binning
@torch.no_grad()
def bin_rows(kind: str, bins: int, values: torch.Tensor, filled: torch.Tensor | None, lo: torch.Tensor,
             hi: torch.Tensor, ends: bool = False):
    """The additive states of ``rows`` estimators fed with the first ``filled[r]`` values of row ``r``.

    Args:
        kind: ``"kde"`` or ``"histogram"``.
        bins: the estimators' bin count.
        values: ``(rows, n)`` float32 samples; entries at or beyond ``filled`` are ignored.
        filled: ``(rows,)`` integer tensor, how many leading values of each row count (None:
            all of them).
        lo, hi: ``(rows,)`` float64 grid ends.
        ends: also return the ``(rows, 2)`` extremes ``[-min, max]`` of the same values
            (:func:`dynact.sampling.extremes`).

    Returns:
        ``(rows, state_size(kind, bins))`` float64, each row what ``update(values[r, :filled[r]])``
        adds to a fresh estimator on ``[lo[r], hi[r]]``; with ``ends``, ``(states, extremes)``.

    On the CPU in float32 one C++ pass per row does both (the same numbers, bit for bit), else
    the tensor ops below.
    """
    rows, n = values.shape
    out = torch.zeros((rows, state_size(kind, bins)), dtype=torch.float64, device=values.device)
    seen = torch.full((rows, 2), -math.inf, dtype=values.dtype, device=values.device) if ends else None
    if rows > 0 and n > 0 and not dispatch.bin_rows_cpu(kind, bins, values, filled, lo, hi, out, seen):
        _bin_blocks(kind, bins, values, filled, lo, hi, out)
        if ends:
            seen = extremes(values, filled)
    return (out, seen) if ends else out


def _bin_blocks(kind, bins, values, filled, lo, hi, out):
    # The tensor ops, in blocks of rows that bound the temporaries; writes the states into ``out``.
    rows, n = values.shape
    step = max(1, _BLOCK // n)
    cols = torch.arange(n, device=values.device)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        out[part] = _bin_block(kind, bins, values[part], None if filled is None else filled[part], lo[part],
                               hi[part], cols)


def _bin_block(kind, bins, values, filled, lo, hi, cols):
    if filled is None:
        s, off, counts = _locate(values, lo.unsqueeze(1), hi.unsqueeze(1), bins)
    else:
        # Unused slots become -inf: binned nowhere, counted as non-finite, and that count taken off.
        unused = cols >= filled.unsqueeze(1)
        s, off, counts = _locate(values.masked_fill(unused, -math.inf), lo.unsqueeze(1), hi.unsqueeze(1), bins)
        counts[:, _NONFINITE] -= unused.sum(1).to(torch.float64)
    nodes = _kde_nodes(s, off, bins) if kind == "kde" else _hist_nodes(s, off, bins)
    return torch.cat([nodes, counts], dim=1)


def _scatter(idx: torch.Tensor, width: int, weights: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Per-row ``index_add`` of ``(rows, n)`` indices into ``(rows, width)`` float64 sums."""
    rows = idx.shape[0]
    offsets = width * torch.arange(rows, dtype=idx.dtype, device=idx.device).unsqueeze(1)
    flat = idx.add_(offsets).reshape(-1)  # int32: rows * width stays far below 2**31
    out = []
    for w in weights:
        acc = torch.zeros(rows * width, dtype=torch.float64, device=idx.device)
        src = torch.ones((), dtype=acc.dtype, device=acc.device).expand(flat.numel()) if w is None else w
        out.append(acc.index_add_(0, flat, src.reshape(-1).to(acc.dtype)).view(rows, width))
    return out


def _kde_nodes(s: torch.Tensor, off: torch.Tensor, bins: int) -> torch.Tensor:
    # KDE._accumulate and KDE._fold, row by row (see there).
    t = s.add_(0.5).addcmul_(s, off, value=-1.0).add_(off, alpha=bins + 2)
    idx = t.to(torch.int32)
    frac = t.frac_().mul_(_FRACTION_STEP).round_().div_(_FRACTION_STEP)
    count, fraction = _scatter(idx, bins + 4, [None, frac])
    nodes = count - fraction
    nodes[:, 1:] += fraction[:, :-1]
    return nodes[:, : bins + 2]


def _hist_nodes(s: torch.Tensor, off: torch.Tensor, bins: int) -> torch.Tensor:
    # Histogram._accumulate and Histogram._fold, row by row.
    s.clamp_(max=bins - 0.5).addcmul_(s, off, value=-1.0).add_(off, alpha=bins + 0.5)
    (count,) = _scatter(s.to(torch.int32), bins + 1, [None])
    return count[:, :-1]


# ---------------------------------------------------------------------------- densities
@dataclass
class Rows:
    """Densities of many estimators: what :class:`~dynact.density.Density` holds, by row.

    ``p``, ``dp``, ``grid``: ``(rows, bins)``; ``lo``, ``hi``, ``total`` (finite values),
    ``outside``, ``nonfinite``: ``(rows,)``; ``ok``: ``(rows,)`` bool, False where an
    estimator's ``compute_from`` would raise or build no valid ``Density`` (no finite value,
    non-finite or negative ``p``). All float64 except ``ok``.
    """

    p: torch.Tensor
    dp: torch.Tensor
    grid: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    total: torch.Tensor
    outside: torch.Tensor
    nonfinite: torch.Tensor
    ok: torch.Tensor

    @property
    def step(self) -> torch.Tensor:
        """``(rows, 1)`` bin widths."""
        return ((self.hi - self.lo) / self.p.shape[1]).unsqueeze(1)


@torch.no_grad()
def finish_rows(kind: str, bins: int, states: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                bandwidth: str | float = "silverman", dp_bandwidth: str | float | None = None) -> Rows:
    """The densities of ``states`` (``(rows, state_size)``, e.g. summed across processes), as
    each estimator's ``compute_from`` derives them; ``bandwidth`` and ``dp_bandwidth`` as the
    estimators take them (``bandwidth`` is ignored for histograms)."""
    nodes, counters = states[:, :-_N_COUNTERS], states[:, -_N_COUNTERS:]
    total = nodes.sum(1) + counters[:, _BELOW] + counters[:, _ABOVE]
    safe = torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(1)
    h = ((hi - lo) / bins).unsqueeze(1)
    if kind == "kde":
        bw, dp_bw = _bandwidths(bandwidth, dp_bandwidth, nodes, counters, safe, h, bins, first_cell=-1.0)
        smooth, slope = _convolve_rows(nodes, [(bw / h, 0), (dp_bw / h, 1)])
        p = (smooth[:, 1:-1] / (safe * h)).clamp_min_(0.0)
        dp = slope[:, 1:-1] / (safe * h * h)
    else:
        _, dp_bw = _bandwidths("silverman", dp_bandwidth, nodes, counters, safe, h, bins, first_cell=0.0)
        p = nodes / (safe * h)
        dp = _convolve_rows(nodes, [(dp_bw / h, 1)])[0] / (safe * h * h)
    grid = lo.unsqueeze(1) + h * (torch.arange(bins, dtype=torch.float64, device=states.device) + 0.5)
    spilled = (counters[:, _BELOW] + counters[:, _ABOVE]) / safe.squeeze(1)
    shortfall = 1.0 - p.sum(1) * h.squeeze(1)
    outside = torch.maximum(spilled, shortfall.where(shortfall > _ROUNDOFF, 0.0)).clamp(0.0, 1.0)
    ok = (total > 0) & torch.isfinite(p).all(1) & torch.isfinite(dp).all(1) & (p >= 0).all(1)
    return Rows(p=p, dp=dp, grid=grid, lo=lo, hi=hi, total=total, outside=outside,
                nonfinite=counters[:, _NONFINITE], ok=ok)


def _bandwidths(spec, dp_spec, nodes, counters, total, h, bins, first_cell):
    """``_BinnedEstimator._bandwidths`` by row: ``(rows, 1)`` widths of ``p`` and ``dp``."""
    std, iqr = _scale(nodes, counters, total, h, bins, first_cell)
    bw = _rule(spec, std, iqr, total, derivative=False)
    if dp_spec is None:
        dp_bw = torch.maximum(_plug_in_dp_width(nodes, total, _rule_scale("silverman", std, iqr), h), bw)
    else:
        dp_bw = _rule(dp_spec, std, iqr, total, derivative=True)
    floor = _MIN_BANDWIDTH_BINS * h
    return torch.maximum(bw, floor), torch.maximum(dp_bw, floor)


def _scale(nodes, counters, total, h, bins, first_cell):
    """``_BinnedEstimator._scale`` by row: ``(rows, 1)`` std and IQR in x units."""
    m = nodes
    centres = first_cell + 0.5 + torch.arange(m.shape[1], dtype=torch.float64, device=m.device)
    below, above = counters[:, _BELOW:_BELOW + 1], counters[:, _ABOVE:_ABOVE + 1]
    mean = ((m * centres).sum(1, keepdim=True) + above * bins) / total
    var = ((m * (centres - mean) ** 2).sum(1, keepdim=True) + below * mean**2 + above * (bins - mean) ** 2) / total
    cum = below + torch.cumsum(m, 1)
    target = torch.cat([0.25 * total, 0.75 * total], dim=1)
    idx = torch.searchsorted(cum, target).clamp_(0, m.shape[1] - 1)
    mass = m.gather(1, idx)
    frac = ((target - cum.gather(1, idx) + mass) / mass).nan_to_num_(0.0, 1.0, 0.0).clamp_(0.0, 1.0)
    q = (first_cell + idx + frac).clamp_(0.0, float(bins))
    return var.clamp_min(0).sqrt() * h, (q[:, 1:2] - q[:, 0:1]) * h


def _rule_scale(spec, std, iqr):
    if spec != "silverman":
        return std
    robust = iqr / 1.34
    both = (std > 0) & (robust > 0)
    return torch.where(both, torch.minimum(std, robust), torch.maximum(std, robust))


def _rule(spec, std, iqr, n, derivative):
    if not isinstance(spec, str):
        return torch.full_like(std, float(spec))
    scale = _rule_scale(spec, std, iqr)
    if derivative:
        return _DP_RULE_FACTOR * scale * n ** (-1 / 11)
    factor = 0.9 if spec == "silverman" else (4 / 3) ** 0.2
    return factor * scale * n ** (-0.2)


def _plug_in_dp_width(nodes, total, scale, h):
    """``kernels._plug_in_dp_width`` by row (the rule where the estimate is not usable)."""
    rule = _DP_RULE_FACTOR * scale * total ** (-1 / 11)
    pilot = torch.maximum(_PILOT_FACTOR * scale * total ** (-1 / 13), _PILOT_MIN_BINS * h)
    psi10 = (nodes * _convolve_rows(nodes, [(pilot / h, 10)])[0]).sum(1, keepdim=True) / total**2
    usable = torch.isfinite(psi10) & (psi10 < 0)
    width = h * (_DP_AMISE / (-psi10.where(usable, -1.0) * total)) ** (1 / 11)
    return torch.where(usable, width, rule)


def _convolve_rows(m: torch.Tensor, kernels: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """``kernels._convolve`` by row: ``(rows, 1)`` widths in bins, one set per row.

    Each row's kernels are cut at that row's reach (``_KERNEL_REACH`` times its widest kernel,
    at most ``M - 1``), as the single-row version cuts them; the transform is sized for the
    widest reach possible, so no row's width is read back to size it.
    """
    n = m.shape[1]
    reach = n - 1
    u = torch.arange(-reach, reach + 1, dtype=torch.float64, device=m.device)
    widest = torch.stack([w for w, _ in kernels]).amax(0)
    cut = u.abs() <= (_KERNEL_REACH * widest).ceil().clamp_max(reach)
    rows = []
    for width, order in kernels:
        z = u / width
        g = torch.exp(-0.5 * z * z) / (width * math.sqrt(2 * math.pi))
        if order == 0:
            k = g
        elif order == 1:
            k = -z * (5.0 - z * z) / (2.0 * width) * g
        else:
            he_prev, he = torch.ones_like(z), z
            for j in range(1, order):
                he_prev, he = he, z * he - j * he_prev
            k = (-1) ** order * he * g / width**order
        rows.append(torch.where(cut, k, 0.0))
    k = torch.stack(rows, dim=1)  # (rows, kernels, 2 * reach + 1)
    size = 1 << (n + 2 * reach - 1).bit_length()
    out = torch.fft.irfft(torch.fft.rfft(m, size).unsqueeze(1) * torch.fft.rfft(k, size), size)
    return list(out[:, :, reach : reach + n].unbind(1))


def sum_rows(states: torch.Tensor, maxima: torch.Tensor, sync: bool | None = None,
             group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~dynact.density.sum_states` for stacked states: ``(rows, size)`` states summed and
    ``(rows, 2)`` maxima maxed across processes in one ``all_reduce``, both back on the states'
    device (float64), with nothing read back to the host. One process: returned as they are."""
    import torch.distributed as dist

    maxima = maxima.to(torch.float64)
    if not _want_sync(sync, group):
        return states, maxima
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = collective_device(group)
    block = torch.zeros((world, *maxima.shape), dtype=torch.float64, device=device)
    block[rank] = maxima.to(device)
    buf = torch.cat([states.to(device=device, dtype=torch.float64).reshape(-1), block.reshape(-1)])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    summed, block = buf.split([states.numel(), block.numel()])
    return (summed.view(states.shape).to(states.device),
            block.view(world, *maxima.shape).amax(0).to(states.device))
