"""Where the training plugin's hooks put their samples until the update bins them.

A hook that bins its samples into an estimator at once costs a few dozen small tensor
operations per site and per forward. :class:`SampleBank` makes a hook cost two: draw
``sample_size`` random positions, gather the values there into a preallocated
``(sites, capacity)`` float32 buffer; for a float32 CPU input (in any layout), one call of the C++
operator ``dynact_op::sample`` does both, with the same draws, once its library is loaded. The
update then bins every site's window in one batched pass (:func:`dynact.density.rows.bin_rows`).

Eager calls draw positions from a ``torch.Generator`` and count what they wrote on the host
(no synchronisation); a site whose buffer is full bins it into its estimator first, so no value
of a window is lost. A call traced by ``torch.compile`` can neither draw from a generator nor
keep a host counter. It takes positions drawn ahead, outside the graph, by the same generator
calls an eager call would make (:meth:`SampleBank.draw_ahead`, once per step: the same positions
as in eager mode when each site runs once per step), and writes round its buffer at a tensor
position. So the graph holds no Python number that changes between calls, and a compiled model
samples what the eager one samples (a window that brings more than ``capacity`` values keeps the
latest ones).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from dynact.kernels import dispatch

__all__ = ["SampleBank", "capacity_for"]

# Buffers hold at most this many values per site (float32): 2 MiB.
_MAX_CAPACITY = 2**19


def capacity_for(sample_size: int, window: int) -> int:
    """Values a site's buffer holds: a whole window of one call per step where that fits in
    ``_MAX_CAPACITY``, else as many whole calls as fit (at least one)."""
    calls = max(1, min(window, _MAX_CAPACITY // sample_size))
    return sample_size * calls


class SampleBank:
    """Per-site sample buffers, one ``(sites, capacity)`` float32 tensor per device.

    ``slot`` numbers sites in the order they first write. ``pending[slot]`` counts the values
    eager calls wrote since the last flush (a host number); ``pos`` (``(sites,)`` int64, per
    device) counts what traced calls wrote.
    """

    def __init__(self, sample_size: int, capacity: int, sites: int = 1) -> None:
        self.sample_size, self.capacity = int(sample_size), int(capacity)
        #: Rows the first buffer of a device gets (the sites expected): a buffer grown one row per
        #: new site would be copied and faulted in anew by each (half a second at 48 sites).
        self.expected_sites = max(1, int(sites))
        self.values: dict[torch.device, torch.Tensor] = {}
        self.pos: dict[torch.device, torch.Tensor] = {}
        #: Positions drawn ahead for traced calls, ``(sites, sample_size)`` int64 per device.
        self.ahead: dict[torch.device, torch.Tensor] = {}
        self.pending: list[int] = []
        self.device_of: list[Optional[torch.device]] = []
        #: Elements of each site's input at its latest traced call (what draw_ahead draws for).
        self.numel: list[int] = []
        #: Whether a traced call wrote since the last clear (then flushes read the traced counts
        #: back), and whether one ever did (then positions are drawn ahead every sampled step).
        self.traced = self.traced_once = False

    def new_slot(self) -> int:
        self.pending.append(0)
        self.device_of.append(None)
        self.numel.append(0)
        return len(self.pending) - 1

    def ready(self, slot: int, device: torch.device) -> bool:
        """Whether ``slot`` was prepared on ``device`` (else :meth:`prepare` it, outside tracing)."""
        values = self.values.get(device)
        return self.device_of[slot] == device and values is not None and values.shape[0] > slot

    def prepare(self, slot: int, x: torch.Tensor, generator: Callable[[torch.device], torch.Generator],
                traced: bool) -> None:
        """Allocate (or grow) the buffers of ``x``'s device so that they hold ``slot``; for a
        ``traced`` call on ``x`` also draw its positions (this runs eagerly, before it)."""
        self._rows(x.device)
        self.device_of[slot] = x.device
        self.numel[slot] = x.numel()
        if traced:
            self.ahead[x.device][slot] = torch.randint(x.numel(), (self.sample_size,), device=x.device,
                                                       generator=generator(x.device))

    def draw_ahead(self, generator: Callable[[torch.device], torch.Generator]) -> None:
        """Draw the positions of every site's next traced call (eager, once per sampled step), in
        slot order, with the calls an eager forward would make."""
        for slot, (device, numel) in enumerate(zip(self.device_of, self.numel, strict=True)):
            if device is not None and numel > 0:
                self.ahead[device][slot] = torch.randint(numel, (self.sample_size,), device=device,
                                                         generator=generator(device))

    def _rows(self, device: torch.device) -> torch.Tensor:
        """The buffer of ``device``, with a row for every slot so far (zeros for new rows): the
        expected sites at first, then twice the rows whenever a slot finds none."""
        values = self.values.get(device)
        sites = len(self.pending)
        if values is None or values.shape[0] < sites:
            sites = max(sites, self.expected_sites) if values is None else max(sites, 2 * values.shape[0])
            grown = torch.zeros((sites, self.capacity), dtype=torch.float32, device=device)
            pos = torch.zeros(sites, dtype=torch.int64, device=device)
            ahead = torch.zeros((sites, self.sample_size), dtype=torch.int64, device=device)
            if values is not None:
                old = values.shape[0]
                grown[:old], pos[:old], ahead[:old] = values, self.pos[device], self.ahead[device]
            self.values[device], self.pos[device], self.ahead[device] = grown, pos, ahead
        return self.values[device]

    def write(self, slot: int, x: torch.Tensor, generator: Callable[[torch.device], torch.Generator],
              flush: Callable[[], None]) -> None:
        """Sample ``x`` (detached, floating, not empty) into ``slot``'s buffer (eager calls; in
        any grad mode: nothing here requires grad)."""
        device = x.device
        rows = self._rows(device)
        self.device_of[slot] = device
        size = self.sample_size
        gen = generator(device)
        start = self.pending[slot]
        if start + size > self.capacity:
            flush()  # draws nothing: the positions below are the same as if drawn before it
            start = self.pending[slot]
        sample = dispatch.sampler()
        if sample is not None and x.dtype is torch.float32 and x.is_cpu:
            # the same draws and values in one C++ call (any layout), written at the row's offset
            sample(x, rows, slot * self.capacity + start, size, gen)
        else:
            dest = rows[slot, start:start + size]
            idx = torch.randint(x.numel(), (size,), device=device, generator=gen)
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
        self.traced = self.traced_once = True
        self.numel[slot] = x.numel()
        pos, size = self.pos[device], self.sample_size
        idx = self.ahead[device][slot] % x.numel()  # in range even where the input shrank
        sample = x.reshape(-1)[idx] if x.is_contiguous() else x[torch.unravel_index(idx, x.shape)]
        at = (pos[slot] + torch.arange(size, device=device)) % self.capacity
        rows[slot].index_copy_(0, at, sample.to(torch.float32))
        pos[slot] += size

    def hand_to_traced(self, slot: int) -> None:
        """Count the values eager calls wrote into ``slot`` on the traced calls' tensor position,
        so that traced calls write after them (a compiled model whose first call of a window
        was sampled eagerly, see ``ActivationOptimizer._collect``)."""
        device = self.device_of[slot]
        if device is not None and self.pending[slot]:
            self.pos[device][slot] += self.pending[slot]
            self.pending[slot] = 0
        self.traced = self.traced_once = True

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

    def gather(self, slots: list[Optional[int]], device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(values, filled)`` of ``slots`` on ``device``: ``(len(slots), width)`` samples and the
        ``(len(slots),)`` count of each row that counts (0 for ``None``), or None where every row
        is full (known on the host when no traced call wrote); no read back."""
        n = len(slots)
        devices = {self.device_of[s] for s in slots if s is not None}
        # Columns that may hold values: the most any eager call wrote, unless a traced call wrote.
        width = self.capacity if self.traced else max([self.pending[s] for s in slots if s is not None], default=0)
        if slots == list(range(n)) and devices == {device} and device in self.values:
            # Every site wrote, in order, on this device: the buffer itself, no copy.
            rows = self.values[device][:n, :width]
            if not self.traced and all(count == width for count in self.pending[:n]):
                return rows, None
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
    if filled is not None:
        unused = torch.arange(values.shape[1], device=values.device) >= filled.unsqueeze(1)
        values = values.masked_fill(unused, math.nan)
    top = torch.nan_to_num(values, nan=-math.inf, posinf=-math.inf, neginf=-math.inf).amax(dim=1)
    bottom = torch.nan_to_num(values, nan=math.inf, posinf=math.inf, neginf=math.inf).amin(dim=1)
    return torch.stack([-bottom, top], dim=1)
