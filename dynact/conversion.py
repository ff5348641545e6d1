"""Turning a model's activation modules into dynamic ones, and loading checkpoints across that.

:func:`to_eafo` wraps one module; :func:`convert_like_state_dict` converts the modules that a
saved state holds as converted, so that checkpoints load whichever way they were saved.
"""

from __future__ import annotations

import torch
from torch import nn

from dynact.activations import find_activations
from dynact.spline import EAFOActivation

__all__ = ["to_eafo", "convert_like_state_dict"]


def to_eafo(module: nn.Module, **kwargs) -> nn.Module:
    """An :class:`~dynact.EAFOActivation` whose base is ``module`` itself.

    The module keeps its settings and parameters (``ELU(alpha=0.3)``, GELU's
    ``approximate="tanh"``, a trained PReLU weight: the very ``Parameter``), so at conversion
    the new activation is the old one plus the initial correction ``eps * s``. The one
    change: an in-place module (``inplace=True``) is switched to out of place, because the
    spline reads the input after the base has run. The new module's own buffers follow the
    module's device.

    A converted activation also loads the state of the module it replaced (a checkpoint saved
    before conversion): the base takes its parameters and the correction keeps its current
    (initial) values.

    Args:
        module: the activation module to wrap (not an ``EAFOActivation``).
        kwargs: further arguments of ``EAFOActivation`` (``lo``, ``hi``, ``knots``, ``eps``, ...).

    Example:
        >>> act = to_eafo(nn.ELU(alpha=0.3))
        >>> act.base
        ELU(alpha=0.3)
    """
    if isinstance(module, EAFOActivation):
        raise ValueError("to_eafo: the module is already an EAFOActivation")
    if getattr(module, "inplace", False) is True:
        module.inplace = False
    act = EAFOActivation(base=module, **kwargs)
    ref = next(iter(list(module.parameters()) + list(module.buffers())), None)
    if ref is not None:
        # Only the correction's own tensors move: the base keeps its device and dtype.
        for name in ("s", "lo", "hi", "eps"):
            t = getattr(act, name)
            t.data = t.data.to(ref.device)
    act.register_load_state_dict_pre_hook(_accept_replaced_state)
    return act


def _accept_replaced_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Load-state pre-hook of converted activations: a state saved before conversion holds the
    base's tensors under ``prefix`` (``act.weight``) and no correction; move them under
    ``base.`` and keep the correction's current values."""
    if prefix + "s" in state_dict:
        return  # saved after conversion
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "base.")]:
        state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)
    for name in ("eps", "s", "lo", "hi"):
        state_dict.setdefault(prefix + name, getattr(module, name).detach().clone())


def convert_like_state_dict(model: nn.Module, state_dict: dict, prefix: str = "") -> list[str]:
    """Convert the activation modules of ``model`` that ``state_dict`` holds as converted ones.

    A checkpoint of a model whose activations were converted (by ``EAFOCallback`` or
    :func:`to_eafo`) has ``<layer>.s``, ``<layer>.lo``, ``<layer>.hi`` and ``<layer>.eps``
    where the freshly built model has a plain activation. This converts each such layer
    (keeping the module as the base, see :func:`to_eafo`, with the saved grid and knot count),
    so that ``model.load_state_dict(state_dict)`` then loads. Call it from a
    ``LightningModule.on_load_checkpoint`` (``ImageClassifier`` does), with ``prefix`` the
    model's key prefix inside ``state_dict`` if it has one.

    Returns:
        The qualified names of the converted layers.
    """
    done: list[str] = []
    for name, module in find_activations(model):
        key = f"{prefix}{name}."
        s = state_dict.get(key + "s")
        if s is None or not isinstance(s, torch.Tensor) or type(module).__name__ == "EAFOActivation":
            continue
        lo, hi = state_dict.get(key + "lo"), state_dict.get(key + "hi")
        grid = {} if lo is None or hi is None else {"lo": float(lo), "hi": float(hi)}
        model.set_submodule(name, to_eafo(module, knots=int(s.numel()), **grid))
        done.append(name)
    return done
