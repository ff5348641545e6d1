"""Freezing trained dynamic activations into plain PyTorch for deployment.

:func:`bake` swaps every :class:`~dynact.EAFOActivation` and :class:`~dynact.CRReLU` of a model
for a module written only in standard tensor ops: no dynact custom op, no autograd Function and
no Python callback into dynact. The result can be traced (``torch.jit.trace``), exported
(``torch.export.export``, ``torch.onnx.export``) and run where dynact is not installed.

The spline is evaluated by index arithmetic on its uniform grid (the same tables and the same
clamp as the reference path of :mod:`dynact.kernels.reference`): ``u = clamp(a * x + b, 0, last)``,
``j = floor(u)``, ``value[j] + (u - j) * slope[j]``. No search, so the exported graph is a
handful of elementwise ops and two gathers.
"""

from __future__ import annotations

import torch
from torch import nn

from dynact.activations import CRReLU, crrelu, find_activations, tensor_device
from dynact.conversion import record
from dynact.kernels.reference import _tables
from dynact.spline import EAFOActivation

__all__ = ["bake", "BakedSpline", "BakedCRReLU"]


def _frozen_eps(eps: torch.Tensor) -> torch.Tensor:
    # eps is 0-d or of shape (1,); the baked module keeps a 0-d copy, so scalar inputs keep their shape.
    return eps.detach().clone().reshape(())


class BakedSpline(nn.Module):
    """``base(x) + eps * s(x)`` of a trained :class:`~dynact.EAFOActivation`, frozen, in plain ops.

    Buffers (all in ``state_dict``): ``value`` (``knots + 3``,) and ``slope`` (``knots + 2``,),
    the padded knot table of :func:`dynact.kernels.reference._tables`; ``a`` and ``b``, the map
    ``u = a * x + b`` from the input to knot coordinates (``a = 1 / step``); ``eps`` and the
    grid's ends ``lo``/``hi`` (kept for reference). ``base`` is the original base module,
    unchanged. Half-precision inputs are computed in float32, as the live module does.
    """

    def __init__(self, act: EAFOActivation) -> None:
        super().__init__()
        base = act.base
        self.base = bake(base) if isinstance(base, (EAFOActivation, CRReLU)) else base
        with torch.no_grad():
            dtype = torch.float64 if act.s.dtype == torch.float64 else torch.float32
            value, slope, a, b = _tables(act.s.detach(), act.lo.detach(), act.hi.detach(), dtype)
            for name, t in (("value", value), ("slope", slope), ("a", a), ("b", b),
                            ("lo", act.lo.detach().to(dtype)), ("hi", act.hi.detach().to(dtype))):
                self.register_buffer(name, t.clone())
            self.register_buffer("eps", _frozen_eps(act.eps).to(dtype))
        self.knots = act.knots
        self._last = float(slope.shape[0] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.base(x)
        # float64 inputs are computed in float64, every other dtype in the tables' (float32).
        cdt = torch.float64 if x.dtype == torch.float64 else self.value.dtype
        value, slope, a, b, eps = (t.to(cdt) for t in (self.value, self.slope, self.a, self.b, self.eps))
        u = torch.clamp(x.to(cdt) * a + b, 0.0, self._last)
        j = torch.floor(u)
        idx = j.to(torch.long)
        s = value[idx] + (u - j) * slope[idx]
        return (y0.to(cdt) + eps * s).to(x.dtype)

    def extra_repr(self) -> str:
        return f"knots={self.knots}, lo={float(self.lo):.4g}, hi={float(self.hi):.4g}, eps={float(self.eps):.4g}"


class BakedCRReLU(nn.Module):
    """A trained :class:`~dynact.CRReLU` frozen into :func:`dynact.activations.crrelu`'s plain ops;
    ``eps`` is a (0-d) buffer."""

    def __init__(self, act: CRReLU) -> None:
        super().__init__()
        self.register_buffer("eps", _frozen_eps(act.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return crrelu(x, self.eps.to(x.dtype))

    def extra_repr(self) -> str:
        return f"eps={float(self.eps):.4g}"


def _baked(module: nn.Module) -> nn.Module:
    baked = BakedSpline(module) if isinstance(module, EAFOActivation) else BakedCRReLU(module)
    device = tensor_device(module)
    if device is not None:
        baked = baked.to(device=device)
    return baked.train(module.training)


def bake(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``EAFOActivation`` and ``CRReLU`` of ``model`` by its frozen
    plain-PyTorch equivalent (:class:`BakedSpline`, :class:`BakedCRReLU`); return the model.

    Bake once training is over: the baked modules compute the same function (to float
    rounding) with the numbers the live modules had, but they are no longer activations that
    dynact measures or updates, and their ``eps`` is a buffer. Keep a copy of the model (or its
    checkpoint) to go on training. A model that is itself one of these activations cannot be
    edited in place: its baked replacement is returned.

    After ``bake``, ``torch.export.export`` finds no ``dynact`` op in the graph, ``torch.jit.trace``
    and ``torch.jit.save`` work, and ``torch.onnx.export`` writes a graph that onnxruntime runs.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), EAFOActivation("gelu"), nn.Linear(4, 2), CRReLU())
        >>> net = bake(net)
        >>> [type(m).__name__ for m in net]
        ['Linear', 'BakedSpline', 'Linear', 'BakedCRReLU']
    """
    if isinstance(model, (EAFOActivation, CRReLU)):
        return _baked(model)
    found = find_activations(model, (EAFOActivation, CRReLU))  # outermost: a CRReLU base is baked with its module
    for name, module in found:
        model.set_submodule(name, _baked(module))
    if found:
        record(model)  # a saved config no longer claims these layers are dynamic
    return model
