"""Argument checks shared by the public constructors and functions: one message shape everywhere.

A bad argument gets a ``TypeError`` (wrong kind of value) or a ``ValueError`` (right kind, out of
range) that names the owner, the argument, the value and what is accepted, instead of the raw
error of ``float()`` or of the first tensor operation that trips over it. Nothing here imports
dynact, so every layer may use it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

__all__ = ["flag", "real_number", "shown"]

_REAL = "one real number (an int, a float, or a tensor or array holding one)"


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a tensor's repr can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scalar(value: Any) -> float | None:
    """``value`` as a float if it is one real number (not a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor):
        real = value.dtype.is_floating_point or (not value.dtype.is_complex and value.dtype != torch.bool)
        return float(value.reshape(-1)[0]) if value.numel() == 1 and real else None
    if isinstance(value, np.ndarray):
        return float(value.reshape(-1)[0]) if value.size == 1 and value.dtype.kind in "iuf" else None
    return None


def real_number(owner: str, name: str, value: Any, *, low: float = -math.inf, low_open: bool = False,
                high: float = math.inf, need: str | None = None) -> float:
    """``value`` as a finite float in the given range, or an error naming ``owner``, ``name`` and the value.

    Args:
        owner: who checks (``"CRReLU"``, ``"EAFOActivation"``, ``"correction"``), the message's prefix.
        name, value: the argument.
        low, high: the accepted range (``low < value`` if ``low_open``, else ``low <= value``; ``value <= high``).
        need: the range in words for the message (default: built from ``low`` and ``high``).

    Raises:
        TypeError: ``value`` is not one real number (a string, None, a bool, a list, a tensor of
            several values).
        ValueError: it is NaN, infinite or out of range.
    """
    v = _scalar(value)
    if need is None:
        lower = "" if low == -math.inf else f" {'>' if low_open else '>='} {low:g}"
        upper = "" if high == math.inf else f"{' and' if lower else ''} <= {high:g}"
        need = f"a finite number{lower}{upper}"
    if v is None:
        raise TypeError(f"{owner}: {name} must be {need}, got {name}={shown(value)} ({type(value).__name__}), "
                        f"which is not {_REAL}")
    if not (math.isfinite(v) and (v > low if low_open else v >= low) and v <= high):
        raise ValueError(f"{owner}: {name} must be {need}, got {name}={shown(value)}")
    return v


def flag(owner: str, name: str, value: Any) -> bool:
    """``value`` as a bool if it is one (Python's or numpy's), else a ``TypeError`` naming it."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{owner}: {name} must be True or False, got {name}={shown(value)} ({type(value).__name__})")
