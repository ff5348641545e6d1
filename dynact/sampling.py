"""Where the training plugin's hooks put their samples until the update bins them.

A hook that bins its samples into an estimator at once costs a few dozen small tensor
operations per site and per forward. :class:`SampleBank` makes a hook cost three: draw
``sample_size`` random positions, gather the values there, copy them into a preallocated
``(sites, capacity)`` float32 buffer. The update then bins every site's window in one batched
pass (:func:`dynact.density.rows.bin_rows`).

Eager calls draw positions from a ``torch.Generator`` and count what they wrote on the host
(no synchronisation); a site whose buffer is full bins it into its estimator first, so no value
of a window is lost. Calls traced by ``torch.compile`` cannot use a generator or a host
counter: they draw positions from a counter-based hash of a per-site tensor counter and write
round the buffer at a tensor position, so the graph holds no Python number that changes
between calls (a window that brings more than ``capacity`` values keeps the latest ones).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["SampleBank", "capacity_for"]

# Buffers hold at most this many values per site (float32): 2 MiB.
_MAX_CAPACITY = 2**19
_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # a 32-bit integer hash multiplier (products stay below 2**59 in int64)


def capacity_for(sample_size: int, window: int) -> int:
    """Values a site's buffer holds: a whole window of one call per step where that fits in
    ``_MAX_CAPACITY``, else as many whole calls as fit (at least one)."""
    calls = max(1, min(window, _MAX_CAPACITY // sample_size))
    return sample_size * calls


def _hash32(k: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix of the low 32 bits of ``k`` (int64 in, int64 in [0, 2**32) out)."""
    k = k & _MASK32
    k = ((k >> 16) ^ k) * _MIX & _MASK32
    k = ((k >> 16) ^ k) * _MIX & _MASK32
    return (k >> 16) ^ k


def hashed_positions(counter: torch.Tensor, salt: int, n: int, numel) -> torch.Tensor:
    """``n`` pseudo-random positions in ``[0, numel)`` from the int64 ``counter`` (0-d) and a
    per-site ``salt``: traceable tensor arithmetic, no generator, nothing read back."""
    key = counter + torch.arange(n, device=counter.device)
    low = _hash32(key ^ salt)
    high = _hash32(_hash32(key >> 32) ^ low ^ (salt >> 32))
    return ((high << 31) | (low >> 1)) % numel


class SampleBank:
    """Per-site sample buffers, one ``(sites, capacity)`` float32 tensor per device.

    ``slot`` numbers sites in the order they first write. ``pending[slot]`` counts the values
    eager calls wrote since the last flush (a host number); ``pos`` (``(sites,)`` int64, per
    device) counts what traced calls wrote.
    """

    def __init__(self, sample_size: int, capacity: int, seed: int) -> None:
        self.sample_size, self.capacity, self.seed = int(sample_size), int(capacity), int(seed)
        self.values: dict[torch.device, torch.Tensor] = {}
        self.pos: dict[torch.device, torch.Tensor] = {}
        self.draws: dict[torch.device, torch.Tensor] = {}
        self.pending: list[int] = []
        self.device_of: list[Optional[torch.device]] = []
        #: Whether a traced call wrote (then a flush reads the traced counts back).
        self.traced = False

    def new_slot(self) -> int:
        self.pending.append(0)
        self.device_of.append(None)
        return len(self.pending) - 1

    def ready(self, slot: int, device: torch.device) -> bool:
        """Whether ``slot`` has its row on ``device`` (else :meth:`prepare` it, outside tracing)."""
        values = self.values.get(device)
        return values is not None and values.shape[0] > slot

    def prepare(self, slot: int, device: torch.device) -> None:
        """Allocate (or grow) ``device``'s buffer so that it holds ``slot``."""
        self._rows(device)
        self.device_of[slot] = device

    def _rows(self, device: torch.device) -> torch.Tensor:
        """The buffer of ``device``, grown to every slot so far (zeros for new rows)."""
        values = self.values.get(device)
        sites = len(self.pending)
        if values is None or values.shape[0] < sites:
            grown = torch.zeros((sites, self.capacity), dtype=torch.float32, device=device)
            pos = torch.zeros(sites, dtype=torch.int64, device=device)
            draws = torch.arange(sites, dtype=torch.int64, device=device) << 40
            if values is not None:
                old = values.shape[0]
                grown[:old], pos[:old], draws[:old] = values, self.pos[device], self.draws[device]
            self.values[device], self.pos[device], self.draws[device] = grown, pos, draws
        return self.values[device]

    def write(self, slot: int, x: torch.Tensor, generator: Callable[[torch.device], torch.Generator],
              flush: Callable[[], None]) -> None:
        """Sample ``x`` (detached, floating, not empty) into ``slot``'s buffer (eager calls)."""
        device = x.device
        rows = self._rows(device)
        self.device_of[slot] = device
        size = self.sample_size
        idx = torch.randint(x.numel(), (size,), device=device, generator=generator(device))
        if self.pending[slot] + size > self.capacity:
            flush()
        start = self.pending[slot]
        dest = rows[slot, start:start + size]
        if not x.is_contiguous():  # index without flattening: a flat copy would copy it whole
            dest.copy_(x[torch.unravel_index(idx, x.shape)])
        elif x.dtype == torch.float32:
            torch.index_select(x.view(-1), 0, idx, out=dest)
        else:
            dest.copy_(x.view(-1).index_select(0, idx))
        self.pending[slot] = start + size

    def write_traced(self, slot: int, x: torch.Tensor) -> None:
        """:meth:`write` for a call that ``torch.compile`` traces (see the module docstring);
        the slot must be :meth:`ready` on ``x``'s device."""
        device = x.device
        rows = self.values[device]
        self.traced = True
        pos, draws = self.pos[device], self.draws[device]
        size = self.sample_size
        salt = (self.seed * 1_000_003 + slot) & (2**62 - 1)
        idx = hashed_positions(draws[slot], salt, size, x.numel())
        sample = x.reshape(-1)[idx] if x.is_contiguous() else x[torch.unravel_index(idx, x.shape)]
        at = (pos[slot] + torch.arange(size, device=device)) % self.capacity
        rows[slot].index_copy_(0, at, sample.to(torch.float32))
        pos[slot] += size
        draws[slot] += size

    def filled(self, slot: int) -> tuple[torch.Tensor, int]:
        """``(values, n)`` of one slot for a flush: its buffer and how many values count (reads
        the traced count back, one synchronisation)."""
        device = self.device_of[slot]
        if device is None:
            return torch.zeros(0), 0
        traced = int(self.pos[device][slot]) if self.traced and device in self.pos else 0
        return self.values[device][slot], min(self.pending[slot] + traced, self.capacity)

    def clear(self, slot: Optional[int] = None) -> None:
        """Forget the buffered values of one slot (or of all)."""
        if slot is None:
            self.traced = False
        slots = range(len(self.pending)) if slot is None else (slot,)
        for s in slots:
            self.pending[s] = 0
        for pos in self.pos.values():
            if slot is None:
                pos.zero_()
            elif slot < pos.shape[0]:
                pos[slot] = 0

    def gather(self, slots: list[Optional[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, filled)`` of ``slots`` on ``device``: ``(len(slots), capacity)`` samples and
        the ``(len(slots),)`` count of each row that counts (0 for ``None``); no read back."""
        n = len(slots)
        devices = {self.device_of[s] for s in slots if s is not None}
        # Columns that may hold values: the most any eager call wrote, unless a traced call wrote.
        width = self.capacity if self.traced else max([self.pending[s] for s in slots if s is not None], default=0)
        if slots == list(range(n)) and devices == {device} and device in self.values:
            # Every site wrote, in order, on this device: the buffer itself, no copy.
            rows = self.values[device][:n, :width]
            filled = torch.tensor(self.pending[:n], device=device) + self.pos[device][:n]
            return rows, filled.clamp_max_(width)
        values = torch.zeros((n, self.capacity), dtype=torch.float32, device=device)
        filled = torch.tensor([0 if s is None else self.pending[s] for s in slots], device=device)
        by_device: dict[torch.device, list[int]] = {}
        for row, s in enumerate(slots):
            if s is not None and self.device_of[s] is not None:
                by_device.setdefault(self.device_of[s], []).append(row)
        for dev, rows in by_device.items():
            src = torch.tensor([slots[r] for r in rows], device=dev)
            at = torch.tensor(rows, device=device)
            values.index_copy_(0, at, self.values[dev].index_select(0, src).to(device))
            filled.index_add_(0, at, self.pos[dev].index_select(0, src).to(device))
        return values[:, :width], filled.clamp_max_(width)


def extremes(values: torch.Tensor, filled: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(rows, 2)`` ``[-min, max]`` of the finite values among each row's first ``filled``
    (all of them if None); ``-inf`` where there is none."""
    use = torch.isfinite(values)
    if filled is not None:
        use &= torch.arange(values.shape[1], device=values.device) < filled.unsqueeze(1)
    top = values.masked_fill(~use, -math.inf).amax(dim=1)
    bottom = values.masked_fill(~use, math.inf).amin(dim=1)
    return torch.stack([-bottom, top], dim=1)
