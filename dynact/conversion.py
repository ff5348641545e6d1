"""Turning a model's activation modules into dynamic ones, and rebuilding them when it is reloaded.

:func:`to_eafo` wraps one module. Every conversion or swap made by dynact leaves a *record* of
the new activation (its class, registry name, constructor settings, knots, base; written by
:mod:`dynact.records`), so that a freshly built model can be given the same modules before the
saved weights are loaded:

- in a ``state_dict``: the record rides in its ``_metadata`` (PyTorch's per-module metadata,
  kept by ``torch.save``/``torch.load`` and in Lightning checkpoints);
- in a Hugging Face model: the record of the whole model is ``model.config.dynact`` (plain
  JSON), which ``save_pretrained`` writes into ``config.json``.

:func:`convert_like` is the one implementation that reads a record back;
:func:`convert_like_state_dict` (plain ``state_dict`` and Lightning checkpoints) and
``dynact.integrations.transformers.from_pretrained`` both call it. State saved without a
record (by an older dynact) is recognised from its keys: ``<layer>.s`` is an
``EAFOActivation`` around the module the fresh model has there, a lone ``<layer>.eps`` a
``CRReLU``.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from dynact.activations import CRReLU, activation_types, find_activations, resolve_activation, tensor_device
from dynact.records import RECORD_FORMAT as RECORD_FORMAT  # re-exported: its old home
from dynact.records import RECORD_KEY, class_path, describe, describe_activation, init_settings, mark, record
from dynact.records import _record_hook as _record_hook  # pickles of marked models (torch.save) name it here
from dynact.sites import CallSites
from dynact.spline import EAFOActivation

__all__ = ["to_eafo", "convert_like", "convert_like_state_dict", "describe", "describe_activation", "record"]


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
    (initial) values. Its ``state_dict`` carries its record (see :func:`convert_like_state_dict`).

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
    device = tensor_device(module)
    if device is not None:
        # Only the correction's own tensors move: the base keeps its device and dtype.
        for name in ("s", "lo", "hi", "eps"):
            t = getattr(act, name)
            t.data = t.data.to(device)
    act.register_load_state_dict_pre_hook(_accept_replaced_state)
    return mark(act)


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


# ----------------------------------------------------------------------------- rebuilding
def _resolve(entry: Mapping) -> Any:
    """The registry factory that builds ``entry``'s module."""
    path, name = entry.get("class"), entry.get("name")
    if path == class_path(CallSites):
        return CallSites
    if name:
        try:
            factory = resolve_activation(name)
        except ValueError:
            factory = None
        if factory is not None and (not isinstance(factory, type) or path in (None, class_path(factory))):
            return factory
    for cls in activation_types():
        if class_path(cls) == path:
            return cls
    raise ValueError(
        f"the saved activation {path or name!r} is not in dynact's registry; register its class before "
        f"loading, e.g. dynact.activations.register_activation({(name or 'my_act')!r}, MyActivation)"
    )


def _matches(module: nn.Module, entry: Mapping) -> bool:
    """Whether ``module`` already is what ``entry`` describes (class, settings and base)."""
    if class_path(type(module)) != entry.get("class"):
        return False
    if "calls" in entry:
        calls = entry["calls"]
        return len(module.calls) == len(calls) and all(_matches(m, e) for m, e in zip(module.calls, calls, strict=True))
    settings = init_settings(module)
    if any(settings.get(k, v) != v for k, v in dict(entry.get("kwargs") or {}).items() if k != "inplace"):
        return False
    if "base" in entry:
        return isinstance(getattr(module, "base", None), nn.Module) and _matches(module.base, entry["base"])
    return True


def _build(entry: Mapping, old: Optional[nn.Module]) -> nn.Module:
    """A module as ``entry`` describes it; ``old`` (the fresh model's module at that place) is
    reused as the base when it is the recorded base, so its settings and parameters stay."""
    factory = _resolve(entry)
    kwargs = dict(entry.get("kwargs") or {})
    if "calls" in entry:  # the first site keeps the fresh module, the others get copies of it
        return mark(CallSites(_build(e, old if i == 0 else copy.deepcopy(old)) for i, e in enumerate(entry["calls"])))
    if "base" not in entry:
        return mark(factory(**kwargs))
    base_entry = entry["base"]
    base = old if old is not None and _matches(old, base_entry) else _build(base_entry, None)
    if factory is EAFOActivation:
        kwargs.pop("inplace", None)
        return to_eafo(base, **kwargs)
    if getattr(base, "inplace", None) is True:
        base.inplace = False
    return mark(factory(base=base, **kwargs))


def _inferred(module: nn.Module, key: str, state: Mapping[str, Any]) -> Optional[dict]:
    """A record from the keys of a state saved without one (older dynact): ``<key>s`` is an
    EAFOActivation around ``module``, a lone ``<key>eps`` a CRReLU."""
    if isinstance(module, EAFOActivation):
        return None
    s = state.get(key + "s")
    if s is not None:
        # The knot count from the saved tensor or its shape; a bare name leaves the default.
        knots = s.numel() if isinstance(s, torch.Tensor) else None if isinstance(s, bool) else torch.Size(s).numel()
        return {"class": class_path(EAFOActivation), "name": "eafo",
                "kwargs": {} if knots is None else {"knots": int(knots)}, "base": describe_activation(module)}
    own = {k for k, _ in module.named_parameters()} | {k for k, _ in module.named_buffers()}
    if key + "eps" in state and "eps" not in own and not isinstance(module, CRReLU):
        return {"class": class_path(CRReLU), "name": "crrelu", "kwargs": {}}
    return None


def convert_like(
    model: nn.Module,
    records: Optional[Mapping[str, Mapping]] = None,
    keys: Optional[Mapping[str, Any] | Iterable[str]] = None,
) -> list[str]:
    """Give ``model`` (freshly built) the activation modules that ``records`` describe.

    The one implementation behind :func:`convert_like_state_dict` and
    ``dynact.integrations.transformers.from_pretrained``. Each record (see
    :func:`describe_activation`) replaces the module of that name, unless it already is the
    recorded one (or an ``EAFOActivation`` around it: a state saved before conversion loads
    into it); an ``EAFOActivation`` keeps the fresh module as its base when that is the
    recorded base (:func:`to_eafo`). Activations without a record are converted when
    ``keys`` (the saved names, or a mapping of names to tensors or shapes) say so:
    ``<layer>.s`` -> ``EAFOActivation``, a lone ``<layer>.eps`` -> ``CRReLU``. Only the
    modules change; load the weights afterwards.

    Returns:
        The qualified names of the replaced modules.
    """
    done: list[str] = []
    for name, entry in dict(records or {}).items():
        try:
            old = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"convert_like: the saved model has a dynact activation at {name!r} but this model has no "
                "such module; build the same architecture as the one that was saved"
            ) from err
        if _matches(old, entry) or (
            # saved before conversion: the converted module loads its base's state (see to_eafo)
            isinstance(old, EAFOActivation) and "base" not in entry and _matches(old.base, entry)
        ):
            continue
        model.set_submodule(name, _on_device(_build(entry, old), old))
        done.append(name)
    if keys is not None:
        state = keys if isinstance(keys, Mapping) else dict.fromkeys(keys, True)
        for name, module in find_activations(model):
            if records and name in records:
                continue
            entry = _inferred(module, name + ".", state)
            if entry is not None:
                model.set_submodule(name, _on_device(_build(entry, module), module))
                done.append(name)
    if done:
        record(model)
    return done


def _on_device(new: nn.Module, old: nn.Module) -> nn.Module:
    device = tensor_device(old)
    return new.to(device=device) if device is not None and device.type != "meta" else new


def convert_like_state_dict(model: nn.Module, state_dict: Mapping, prefix: str = "") -> list[str]:
    """Convert the activation modules of ``model`` to what ``state_dict`` was saved with.

    ``state_dict`` (or a Lightning checkpoint's ``checkpoint["state_dict"]``) from a model
    whose activations dynact converted or swapped (an ``EAFOActivation`` with any base, a
    ``CRReLU``, any registry activation put in by :func:`dynact.swap_activations`) carries each
    one's record in its ``_metadata``; this rebuilds those modules in the freshly built
    ``model`` (see :func:`convert_like`), so that ``model.load_state_dict(state_dict)`` then
    loads. States saved without records are recognised from their keys (``<layer>.s``,
    ``<layer>.eps``). Call it from a ``LightningModule.on_load_checkpoint``
    (``ImageClassifier`` does), with ``prefix`` the model's key prefix inside ``state_dict``
    if it has one.

    Returns:
        The qualified names of the converted layers.
    """
    meta = getattr(state_dict, "_metadata", None) or {}
    records: dict[str, Mapping] = {}
    for path, local in meta.items():
        entry = local.get(RECORD_KEY) if isinstance(local, Mapping) else None
        full = path + "."
        if entry is not None and full.startswith(prefix) and path != prefix.rstrip("."):
            records[full[len(prefix):-1]] = entry
    # Records of modules nested in recorded ones (a swapped module inside a swapped one) are theirs.
    records = {n: e for n, e in records.items() if not any(n.startswith(o + ".") for o in records)}
    keys = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return convert_like(model, records, keys)
