"""dynact: activation functions a network can measure and improve while it trains.

Public names (see the README):

- :class:`CRReLU`, :func:`make_activation`, :func:`swap_activations` (``dynact.activations``)
- :class:`EAFOActivation` (``dynact.spline``)
- ``dynact.density``: :class:`~dynact.density.Histogram`, :class:`~dynact.density.KDE`,
  :class:`~dynact.density.Density`
- ``dynact.eafo``: ``correction``, ``step``, ``output_stats``, ``output_entropy``, ``wafbc``
- :class:`ActivationOptimizer` (``dynact.core``): the framework-free training plugin
- :func:`bake` (``dynact.bake``): trained dynamic activations frozen into plain PyTorch for export
- its front doors: :class:`EAFOCallback` (Lightning, ``dynact.callbacks``) and
  ``dynact.integrations.transformers.EAFOTrainerCallback`` (Hugging Face), loaded on first use
  so that the core can be imported without Lightning or transformers.
"""

from __future__ import annotations

from importlib import import_module

from dynact import density, eafo
from dynact.activations import CRReLU, activation_names, make_activation, swap_activations
from dynact.bake import bake
from dynact.core import ActivationOptimizer
from dynact.density import Density
from dynact.spline import EAFOActivation

__version__ = "0.1.0"

__all__ = [
    "ActivationOptimizer",
    "CRReLU",
    "Density",
    "EAFOActivation",
    "EAFOCallback",
    "activation_names",
    "bake",
    "density",
    "eafo",
    "make_activation",
    "swap_activations",
]

# Names whose modules pull in heavy dependencies (Lightning, timm) load lazily.
_LAZY = {
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
