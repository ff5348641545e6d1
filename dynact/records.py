"""Records of the activations dynact puts into a model, which :mod:`dynact.conversion` rebuilds them from.

A record is plain JSON: the module's class, registry name and constructor settings, plus the
record of its base for a module that wraps one. :func:`mark` makes a module carry its record in
every ``state_dict`` (in ``_metadata``); :func:`record` writes the records of a whole Hugging Face
model into ``model.config.dynact``. :func:`dynact.swap_activations` and
:func:`dynact.conversion.to_eafo` call both, so this module sits below either of them: it knows
dynact's own activation classes only as they register here (:func:`always_recorded`).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from torch import nn

from dynact.registry import activation_types

__all__ = ["RECORD_FORMAT", "RECORD_KEY", "always_recorded", "describe", "describe_activation", "mark", "record"]

#: Key of a module's record in ``state_dict._metadata`` and of the model's in ``config``.
RECORD_KEY = "dynact"
#: Version of the record's layout (``config.dynact["format"]``).
RECORD_FORMAT = 1
_SCALARS = (bool, int, float, str, type(None))


#: dynact's own activation classes (CRReLU, EAFOActivation): :func:`describe` lists their
#: modules even when dynact did not put them in (a model built with ``act="crrelu"``).
_ALWAYS_RECORDED: list[type] = []


def always_recorded(cls: type) -> type:
    """Class decorator: every module of ``cls`` (or a subclass) is in :func:`describe`."""
    _ALWAYS_RECORDED.append(cls)
    return cls


def class_path(cls: type) -> str:
    """How a record names a class: ``<module>.<qualified name>``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def init_settings(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments that ``module`` keeps as plain attributes of the same name
    (``ELU.alpha``, ``GELU.approximate``, ``CRReLU.learnable``, ``EAFOActivation.knots``).
    Tensors are left out: they are in the ``state_dict``."""
    out: dict[str, Any] = {}
    try:
        params = inspect.signature(type(module).__init__).parameters.values()
    except (TypeError, ValueError):
        return out
    for p in params:
        if p.name in ("self", "base", "device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        try:
            value = getattr(module, p.name)
        except AttributeError:
            continue
        if isinstance(value, _SCALARS) and not (isinstance(value, float) and value != value):
            out[p.name] = value
    return out


def describe_activation(module: nn.Module) -> dict[str, Any]:
    """The record of one activation module: JSON data that :func:`convert_like` rebuilds it from.

    ``{"class": <import path>, "name": <registry name or None>, "kwargs": {...}}``, plus
    ``"base"`` (the base's record) for a module that wraps one (:class:`~dynact.EAFOActivation`),
    and ``"calls"`` (each call site's record) for a :class:`~dynact.sites.CallSites`.
    """
    entry: dict[str, Any] = {
        "class": class_path(type(module)),
        "name": activation_types().get(type(module)),
        "kwargs": init_settings(module),
    }
    base = getattr(module, "base", None)
    if getattr(type(module), "wraps_base", False) and isinstance(base, nn.Module):
        entry["base"] = describe_activation(base)
    if getattr(type(module), "wraps_calls", False):  # dynact.sites.CallSites: one record per call site
        entry["calls"] = [describe_activation(call) for call in module.calls]
    return entry


def _record_hook(module, state_dict, prefix, local_metadata) -> None:
    local_metadata[RECORD_KEY] = describe_activation(module)


def mark(module: nn.Module) -> nn.Module:
    """Mark ``module`` as put in by dynact: its ``state_dict`` then carries its record, and
    :func:`describe` lists it. Called by :func:`dynact.conversion.to_eafo` and :func:`dynact.swap_activations`."""
    if not getattr(module, "_dynact_marked", False):
        module.register_state_dict_post_hook(_record_hook)
        module._dynact_marked = True
    return module


def describe(model: nn.Module) -> dict[str, dict]:
    """Records of the activations dynact put into ``model``, by qualified name.

    Lists every marked module (converted or swapped in by dynact) and every
    ``EAFOActivation``/``CRReLU``, outermost only (the base of an ``EAFOActivation`` is part
    of its record).
    """
    out: dict[str, dict] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(n + ".") for n in out):
            continue
        if getattr(module, "_dynact_marked", False) or isinstance(module, tuple(_ALWAYS_RECORDED)):
            out[name] = describe_activation(module)
    return out


def _is_hf_config(config: Any) -> bool:
    hf = sys.modules.get("transformers")
    return hf is not None and isinstance(config, getattr(hf, "PretrainedConfig", ()))


def _is_hf_model(module: nn.Module) -> bool:
    # Only a transformers model saves its config: PEFT's wrappers (PeftModel, LoraModel) show the
    # wrapped model's config too, but their names (base_model.model.*) are not the saved model's.
    hf = sys.modules.get("transformers")
    return hf is not None and isinstance(module, getattr(hf, "PreTrainedModel", ()))


def record(model: nn.Module) -> None:
    """Write :func:`describe` into the ``config`` of every Hugging Face model in ``model``
    (``config.dynact = {"format": 1, "modules": {...}}``, names relative to that model), so
    that ``save_pretrained`` stores it in ``config.json``. A config shared by a model and its
    submodels (GPT-2's ``transformer``) records the outermost. A model without dynact's
    activations loses a stale ``config.dynact``. Does nothing for other models."""
    seen: set[int] = set()
    for sub in model.modules():  # outermost first: a config shared with submodels is the outer model's
        config = getattr(sub, "config", None) if _is_hf_model(sub) else None
        if not _is_hf_config(config) or id(config) in seen:
            continue
        seen.add(id(config))
        modules = describe(sub)
        if modules:
            setattr(config, RECORD_KEY, {"format": RECORD_FORMAT, "modules": modules})
        elif hasattr(config, RECORD_KEY):
            delattr(config, RECORD_KEY)
