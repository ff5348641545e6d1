"""Loading a Hugging Face folder back with the activations dynact put into the model.

``save_pretrained`` writes ``config.json`` from ``model.config``, and dynact keeps the record of
its conversions there (``config.dynact``, set by :func:`dynact.conversion.record` whenever dynact
converts or swaps a transformers model's activations). Plain ``from_pretrained`` builds the
architecture's own activations and drops the trained ones; :func:`from_pretrained` here builds
the recorded ones first, then lets transformers load every weight (sharded safetensors,
``dtype``, ``device_map`` and the other keywords work as usual).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from torch import nn

from dynact.conversion import convert_like
from dynact.records import RECORD_KEY, record

__all__ = ["from_pretrained", "write_record"]


def _local_config(path: Any, subfolder: str = "") -> Optional[dict]:
    file = os.path.join(str(path), subfolder, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _saved_keys(path: Any, subfolder: str = "") -> Optional[dict]:
    """Names of the saved tensors of a local folder's safetensors files, with the shapes of
    those a spline's knots are read from (``<layer>.s``); None if there is none to read."""
    folder = os.path.join(str(path), subfolder)
    if not os.path.isdir(folder):
        return None
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    keys: dict[str, Any] = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for key in f.keys():
                keys[key] = tuple(f.get_slice(key).get_shape()) if key.endswith(".s") else True
    return keys


def _concrete(model_cls: type, path: Any, kwargs: dict) -> type:
    """The model class an ``AutoModel...`` class would build for ``path``."""
    mapping = getattr(model_cls, "_model_mapping", None)
    if mapping is None:
        return model_cls
    from transformers import AutoConfig

    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        hub = {k: kwargs[k] for k in ("revision", "subfolder", "cache_dir", "token", "local_files_only",
                                      "trust_remote_code") if k in kwargs}
        config = AutoConfig.from_pretrained(config or path, **hub)
    return mapping[type(config)]


def from_pretrained(model_cls: type, path: Any, **kwargs: Any) -> nn.Module:
    """``model_cls.from_pretrained(path, **kwargs)`` with dynact's activations rebuilt.

    Loads a folder written by ``save_pretrained`` (or a ``Trainer`` checkpoint) of a model whose
    activations dynact converted (``EAFOTrainerCallback(convert=...)``, :func:`dynact.conversion.to_eafo`)
    or swapped (:func:`dynact.swap_activations`: ``EAFOActivation`` with any base, ``CRReLU``,
    any registry activation) and returns it with the same modules and trained numbers. The
    modules come from ``config.dynact`` in the folder's ``config.json``; a folder saved by an
    older dynact, without it, is recognised from its tensor names (``<layer>.s``, ``<layer>.eps``).
    A folder without any of dynact's activations loads exactly as ``model_cls.from_pretrained``.

    Plain ``model_cls.from_pretrained`` on such a folder reports the spline tensors as
    unexpected and returns the architecture's own activations: use this instead.

    Args:
        model_cls: a transformers model class (``GPT2LMHeadModel``) or an ``AutoModel...`` class.
        path: the folder (or hub name) given to ``from_pretrained``.
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ``revision``, ...).

    Raises:
        ValueError: the folder records a dynact activation whose tensors are not in its weights
            (a model loaded with plain ``from_pretrained`` and saved again), or an activation
            class that is not in dynact's registry.

    Example::

        >>> from transformers import GPT2LMHeadModel
        >>> from dynact.integrations.transformers import from_pretrained
        >>> model = from_pretrained(GPT2LMHeadModel, "out/checkpoint-500")    # doctest: +SKIP
    """
    model_cls = _concrete(model_cls, path, kwargs)
    subfolder = kwargs.get("subfolder", "")
    keys = _saved_keys(path, subfolder)
    config = _local_config(path, subfolder)
    if config is not None and RECORD_KEY not in config and not (
        keys and any(k.endswith((".s", ".eps")) for k in keys)
    ):
        return model_cls.from_pretrained(path, **kwargs)  # nothing of dynact's in this folder
    want_info = kwargs.pop("output_loading_info", False)
    model, info, converted = _load_rebuilt(model_cls, path, keys, kwargs)
    _check_weights(path, converted, info)
    record(model)
    return (model, info) if want_info else model


def _load_rebuilt(model_cls: type, path: Any, keys: Optional[dict], kwargs: dict) -> tuple[nn.Module, dict, list[str]]:
    """``model_cls.from_pretrained(path, output_loading_info=True, **kwargs)`` through a subclass
    that builds the recorded activations before transformers loads the weights; returns the model
    (a plain ``model_cls`` again), transformers' loading info and the names of the rebuilt modules."""
    converted: list[str] = []

    class _WithDynact(model_cls):  # builds the recorded modules before transformers loads the weights
        def __init__(self, config, *args, **kw):
            super().__init__(config, *args, **kw)
            saved = getattr(config, RECORD_KEY, None) or {}
            converted.extend(convert_like(self, saved.get("modules"), keys))

    for attr in ("__name__", "__qualname__", "__module__"):
        setattr(_WithDynact, attr, getattr(model_cls, attr))
    model, info = _WithDynact.from_pretrained(path, output_loading_info=True, **kwargs)
    model.__class__ = model_cls  # the plain class again: pickling, isinstance and save_pretrained as usual
    return model, info, converted


def _check_weights(path: Any, converted: list[str], info: dict) -> None:
    """Raise if the weights lack tensors of the rebuilt modules (see :func:`from_pretrained`)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if any(k.startswith(n + ".") for n in converted))
    if missing:
        raise ValueError(
            f"from_pretrained: {path} records dynact activations at {converted} but its weights lack "
            f"{missing[:6]}{' ...' if len(missing) > 6 else ''}; the folder was probably saved from a model loaded "
            "with plain from_pretrained. Load the original folder, or delete 'dynact' from its config.json "
            "to load the architecture's own activations"
        )


def write_record(model: Optional[nn.Module], folder: str) -> bool:
    """Bring ``folder``'s ``config.json`` up to date with the model's activations (the
    ``config.dynact`` record of :func:`dynact.conversion.record`); return whether it changed.

    ``EAFOTrainerCallback.on_save`` calls it for each ``checkpoint-<step>`` folder, so a checkpoint
    is loadable by :func:`from_pretrained` whatever converted its activations.
    """
    if model is None:
        return False
    record(model)
    config = getattr(model, "config", None)
    file = os.path.join(folder, "config.json")
    if config is None or not os.path.isfile(file):
        return False
    with open(file, encoding="utf-8") as f:
        saved = json.load(f)
    want = getattr(config, RECORD_KEY, None)
    if saved.get(RECORD_KEY) == want:
        return False
    if want is None:
        saved.pop(RECORD_KEY, None)
    else:
        saved[RECORD_KEY] = want
    tmp = file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, file)
    return True
