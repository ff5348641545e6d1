"""The options of the training plugin, checked once for every front door.

:class:`dynact.ActivationOptimizer`, :class:`dynact.EAFOCallback` and the Hugging Face
callback take the same options; :func:`validate_options` checks them when the object is
built, so a bad value fails at once with the accepted values named, never at the first update.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

from dynact.activations import activation_types
from dynact.density import KDE, MIN_BINS, Histogram, check_grid
from dynact.registry import family_types
from dynact.spline import EAFOActivation

__all__ = ["ESTIMATORS", "MODES", "validate_options", "convert_types"]

ESTIMATORS = {"kde": KDE, "hist": Histogram}
MODES = ("refresh", "iterate", "monitor")
#: ``"call"``: a module called at k places is k activations (dynact.sites); ``"module"``: one.
SITES = ("call", "module")
#: Multiplier separating the sampling seeds of different processes.
RANK_SEED_STRIDE = 7919
# Upper bounds of the options: beyond them one update costs seconds and gigabytes.
_MAX_BINS = 65_536
_MAX_SAMPLE = 2**20
# The generator seed is seed + RANK_SEED_STRIDE * rank and must fit in a signed 64-bit integer.
_MAX_SEED = 2**62


def validate_options(
    *, every_n_steps, estimator, mode, eta, bins, sample_size, window, convert, init_range, max_outside,
    collect_eval, seed, sites="call",
) -> dict[str, Any]:
    """Check the optimizer's options; returns them normalised. Shared by every front door so
    that a bad value fails when the front door is built, with the accepted values named."""
    every_n_steps = _positive_int("every_n_steps", every_n_steps)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got estimator={estimator!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta must be a finite number > 0 (the iterate step size), got eta={eta!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or not MIN_BINS <= bins <= _MAX_BINS:
        raise ValueError(f"bins must be an int in [{MIN_BINS}, {_MAX_BINS}], got bins={bins!r}")
    try:
        lo, hi, bins = check_grid(*tuple(init_range), bins)
    except (TypeError, ValueError) as err:
        raise ValueError(f"init_range and bins: {err} (got init_range={init_range!r}, bins={bins!r})") from None
    sample_size = _positive_int("sample_size", sample_size, _MAX_SAMPLE)
    window = min(every_n_steps, 20) if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= every_n_steps:
        raise ValueError(
            f"window must be an int in [1, every_n_steps={every_n_steps}] (or None for "
            f"min(every_n_steps, 20)), got window={window!r}"
        )
    if not (isinstance(max_outside, (int, float)) and 0 < max_outside < 1):
        raise ValueError(f"max_outside must be a fraction in (0, 1), got max_outside={max_outside!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**62], got seed={seed!r}")
    if sites not in SITES:
        raise ValueError(f"sites must be one of {SITES} (one activation per call site, or per module), "
                         f"got sites={sites!r}")
    return dict(
        every_n_steps=every_n_steps, estimator=estimator, mode=mode, eta=float(eta), bins=bins,
        sample_size=sample_size, window=window, convert=convert_types(convert), init_range=(lo, hi),
        max_outside=float(max_outside), collect_eval=bool(collect_eval), seed=int(seed), sites=sites,
    )


def _positive_int(name: str, value: Any, most: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (most is not None and value > most):
        bound = "" if most is None else f" in [1, {most}]"
        raise ValueError(f"{name} must be a positive int{bound}, got {name}={value!r}")
    return value


def convert_types(convert: Iterable[Union[type, str]]) -> tuple[type, ...]:
    """Activation module types from types or registry names; ``ValueError`` lists the table.

    A name stands for its family (:func:`dynact.registry.family_types`): ``"gelu"`` is every
    GELU variant, ``"silu"`` ``nn.SiLU`` and transformers' ``SiLUActivation``. A type stands for
    itself and its subclasses."""
    if isinstance(convert, (str, type)):
        convert = (convert,)
    if convert is None or not isinstance(convert, Iterable):
        raise TypeError(f"convert must be a tuple of activation types or names, got convert={convert!r}")
    registry = activation_types()
    types: list[type] = []
    for item in convert:
        try:
            kinds = family_types(item) if isinstance(item, str) else (item,)
        except ValueError:
            kinds = ()
        if not kinds or any(not isinstance(k, type) or k not in registry or issubclass(k, EAFOActivation)
                            for k in kinds):
            raise ValueError(
                f"convert must hold activation module types of the registry (or their names): "
                f"{', '.join(f'{n} ({t.__module__}.{t.__name__})' for t, n in registry.items())}; "
                f"got {item!r}. Register another class with dynact.activations.register_activation, "
                "or use convert=() to leave the model's activations as they are."
            )
        types.extend(kinds)
    return tuple(dict.fromkeys(types))
