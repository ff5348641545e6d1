"""dynact: activation functions a network can measure and improve while it trains.

Public names (see the README):

- :class:`CRReLU`, :func:`make_activation`, :func:`swap_activations` (``dynact.activations``)
- :class:`EAFOActivation` (``dynact.spline``)
- ``dynact.density``: :class:`~dynact.density.Histogram`, :class:`~dynact.density.KDE`,
  :class:`~dynact.density.Density`
- ``dynact.eafo``: ``correction``, ``step``, ``output_entropy``, ``wafbc``
- :class:`EAFOCallback` (``dynact.callbacks``), loaded on first use so that the math
  can be imported without Lightning.
"""

from __future__ import annotations

from importlib import import_module

from dynact import density, eafo
from dynact.activations import CRReLU, activation_names, make_activation, swap_activations
from dynact.density import Density

__version__ = "0.1.0"

__all__ = [
    "CRReLU",
    "Density",
    "EAFOActivation",
    "EAFOCallback",
    "activation_names",
    "density",
    "eafo",
    "make_activation",
    "swap_activations",
]

# Names whose modules pull in heavy dependencies (Lightning, timm) load lazily.
_LAZY = {
    "EAFOActivation": ("dynact.spline", "EAFOActivation"),
    "EAFOCallback": ("dynact.callbacks", "EAFOCallback"),
    "models": ("dynact.models", None),
    "callbacks": ("dynact.callbacks", None),
    "data": ("dynact.data", None),
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dynact' has no attribute {name!r}")
