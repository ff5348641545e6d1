"""Checks that keep one layer's failed update from touching the model or stopping training.

:class:`dynact.ActivationOptimizer` snapshots a layer before updating it, checks the result
with these helpers, and restores the snapshot when an update cannot be made sensibly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from dynact.registry import channels
from dynact.spline import EAFOActivation

__all__ = ["Skip", "overflows", "nonfinite_tensors", "gathered", "restore"]


class Skip(Exception):
    """An update that cannot be made sensibly; ``reason`` keys the warning and the count."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def overflows(act: EAFOActivation, dtype: torch.dtype) -> bool:
    """Whether the correction makes ``act`` non-finite for a finite input of ``dtype``.

    The correction is piecewise linear and zero beyond the grid, so next to a monotone base the
    output's extremes are at the knots or at the ends of the dtype's range: evaluating there
    decides it (in ``dtype``, as the forward pass computes it). Only the correction's doing
    counts: a point where the base itself is already non-finite (torch's exact GELU gives
    ``inf`` at float32's largest value) is the base's behaviour, which the update cannot change
    and which an unconverted model has too.
    """
    big = torch.finfo(dtype).max
    x = act.knot_positions(torch.float64).clamp(-big, big)
    x = torch.cat([x, x.new_tensor([-big, big])]).to(dtype)
    c = channels(act)
    if c > 1:  # a per-channel base (PReLU(C)) takes the channels on dim 1
        x = x[:, None].expand(-1, c)
    with torch.no_grad():
        y, y0 = act(x), act.base(x)
    return bool((~torch.isfinite(y) & torch.isfinite(y0)).any())


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the module's floating parameters and buffers holding NaN/Inf."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Within it, the module's FSDP2-sharded parameters (``DTensor``, of which each process holds a
    part) are whole tensors, so an update can read them; on exit the sharded ones are put back.

    Gathering is a collective: every process must enter for the same modules in the same order
    (:class:`dynact.ActivationOptimizer` does, for every layer at every update). Updates write
    only the spline's buffers, which FSDP2 leaves replicated, so nothing needs scattering back.
    """
    swapped = []
    for name, param in list(module.named_parameters()):
        if callable(getattr(param, "full_tensor", None)):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            whole = nn.Parameter(param.full_tensor().detach().clone(), requires_grad=param.requires_grad)
            swapped.append((owner, leaf, param))
            owner._parameters[leaf] = whole
    try:
        yield
    finally:
        for owner, leaf, param in swapped:
            owner._parameters[leaf] = param


def restore(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back a state taken with ``state_dict`` (in place: parameters stay the same objects)."""
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if not torch.equal(value, saved[name]):
                value.copy_(saved[name])
