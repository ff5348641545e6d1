"""The activation registry: one table from a lower-case name to a factory, and the lookups on it.

:func:`resolve_activation` is the single resolver that every other part of dynact
(``make_activation``, ``swap_activations``, the models' ``act=`` and the CLI's ``--arms``) goes
through. dynact's own activations add themselves, since their modules build on this one:
``crrelu`` (:mod:`dynact.activations`) and ``eafo`` (:mod:`dynact.spline`). Users reach these
names through :mod:`dynact.activations`, which re-exports them.
"""

from __future__ import annotations

from typing import Callable, Iterable, Union

import torch
from torch import nn

__all__ = [
    "ActSpec",
    "activation_names",
    "activation_types",
    "channels",
    "elementwise",
    "family_of",
    "family_types",
    "find_activations",
    "make_activation",
    "register_activation",
    "register_timm_activations",
    "register_transformers_activations",
    "resolve_activation",
    "tensor_device",
    "unregistered_activations",
]


# name -> factory(**kw) returning an nn.Module. One line per activation.
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "prelu": nn.PReLU,
    "celu": nn.CELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu6": nn.ReLU6,  # MobileNetV2
    "leaky_relu": nn.LeakyReLU,
    "hardswish": nn.Hardswish,  # MobileNetV3
    "hardsigmoid": nn.Hardsigmoid,  # MobileNetV3's squeeze-excitation gates
    "selu": nn.SELU,
    # "crrelu" (dynact.activations.CRReLU) and "eafo" (dynact.spline.EAFOActivation) register
    # themselves, in that order: both modules build on this one.
}

ActSpec = Union[str, type, Callable[..., nn.Module], nn.Module, None]


#: Names that belong to a family other than their own: the family's name converts them too
#: (``convert=("gelu",)`` converts ``nn.GELU``, GPT-2's ``NewGELUActivation``, BERT's
#: ``GELUActivation`` and timm's ``GELU``; ``convert=("silu",)`` Llama's ``SiLUActivation``).
#: A member's own name converts its class alone.
_FAMILY: dict[str, str] = {}


def family_types(name: str) -> tuple[type, ...]:
    """The module classes that the activation name ``name`` stands for when converting: its own
    class and, for a family's name (``"gelu"``, ``"silu"``, ``"mish"``, ...), every registered
    variant of it (transformers' and timm's classes, once those libraries are loaded).

    Raises:
        ValueError: ``name`` is not a registered activation name.
    """
    key = name.strip().lower()
    resolve_activation(key)
    members = [key] + [n for n, head in _FAMILY.items() if head == key and n in _REGISTRY]
    return tuple(dict.fromkeys(f for n in members if isinstance(f := _REGISTRY[n], type)))


def family_of(cls: type) -> str | None:
    """The name that converts ``cls`` together with its variants (``NewGELUActivation -> "gelu"``)."""
    name = activation_types().get(cls)
    return None if name is None else _FAMILY.get(name, name)


def activation_names() -> list[str]:
    """The registered activation names, in registration order (transformers' once it is loaded)."""
    _register_loaded_libraries()
    return list(_REGISTRY)


def register_activation(name: str, factory: Callable[..., nn.Module], family: str | None = None) -> None:
    """Add ``factory`` (a class or a function building an ``nn.Module``) under ``name``.

    Names are lower case. A class registered here is also an activation type: models' modules
    of that class are found by :func:`find_activations` and measured by the training plugin.
    ``dynact.spline`` registers ``"eafo"`` this way. ``family`` (a registered name, e.g.
    ``"gelu"``) makes that name convert this class too (:func:`family_types`).
    """
    key = name.strip().lower()
    _REGISTRY[key] = factory
    if family is not None and family.strip().lower() != key:
        _FAMILY[key] = family.strip().lower()


def resolve_activation(spec: ActSpec) -> Callable[..., nn.Module] | None:
    """Turn a name, a class or a factory into a factory that builds an activation module.

    ``None`` passes through (callers decide their default). An unknown name raises
    :class:`ValueError` listing the registered names; anything else that is not callable
    raises :class:`TypeError`.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        key = spec.strip().lower()
        _register_loaded_libraries()
        if key in _TRANSFORMERS_ACTIVATIONS and key not in _REGISTRY:
            _register_transformers_if_installed()  # a transformers name asked for before loading it
        if key not in _REGISTRY:
            hint = " (a transformers activation: pip install transformers)" if key in _TRANSFORMERS_ACTIVATIONS else ""
            raise ValueError(f"unknown activation {spec!r}{hint}; choose one of: {', '.join(_REGISTRY)}")
        return _REGISTRY[key]
    if isinstance(spec, nn.Module):
        raise TypeError(
            f"expected an activation name, class or factory, got the module instance {spec!r}; "
            "pass its class (or a lambda returning a fresh module) so every site gets its own copy"
        )
    if callable(spec):
        return spec
    raise TypeError(
        f"expected an activation name, class or factory, got {type(spec).__name__}: {spec!r}"
    )


def make_activation(name: ActSpec, **kwargs) -> nn.Module:
    """Build an activation module by name (or class/factory), passing ``kwargs`` through.

    Names: ``relu, gelu, elu, prelu, celu, silu, mish, crrelu, eafo``.

    Example:
        >>> make_activation("crrelu", eps=0.02)
        CRReLU(eps=0.02, learnable=True)
    """
    factory = resolve_activation(name)
    if factory is None:
        raise ValueError("make_activation: name must not be None")
    module = factory(**kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"activation factory {name!r} returned {type(module).__name__}, not an nn.Module")
    return module


def tensor_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter (else buffer); None for a module without tensors.
    A module put in place of ``module`` is moved there."""
    ref = next(iter(list(module.parameters()) + list(module.buffers())), None)
    return None if ref is None else ref.device


def activation_types() -> dict[type, str]:
    """Module classes of the registered activations, mapped to their registry names
    (``nn.ReLU -> "relu"``, ..., ``EAFOActivation -> "eafo"``)."""
    _register_loaded_libraries()
    return {factory: name for name, factory in _REGISTRY.items() if isinstance(factory, type)}


def find_activations(model: nn.Module, types: Iterable[type] | None = None) -> list[tuple[str, nn.Module]]:
    """Activation modules of ``model`` by qualified name, outermost only.

    An activation inside another activation (the ``base`` of an :class:`~dynact.EAFOActivation`)
    is part of it, not a layer of its own, so it is not listed.

    Args:
        types: the module types to list (default: every registered activation type).
    """
    kinds = tuple(activation_types())
    wanted = kinds if types is None else tuple(types)
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []  # names of activation modules seen so far (parents come first)
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(outer + ".") for outer in inside):
            continue
        if isinstance(module, kinds + wanted):
            inside.append(name)
            if isinstance(module, wanted):
                found.append((name, module))
    return found


# ----------------------------------------------------------------------------- Hugging Face transformers
#: transformers' own activation classes (its ``ACT2CLS`` table) that compute a function dynact
#: knows, by the name that table gives them; a ``_hf`` suffix where dynact's name already
#: means torch's class (``gelu_hf`` is ``GELUActivation``, ``gelu`` is ``nn.GELU``). Each class
#: computes one fixed function, so a converted layer keeps it: GPT-2's ``gelu_new`` stays
#: tanh-approximate, Llama's ``silu_hf`` stays SiLU. (``ACT2CLS``'s torch classes, ``nn.ReLU``,
#: ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.PReLU``, are in the registry already.)
_TRANSFORMERS_ACTIVATIONS = {
    "gelu_new": "NewGELUActivation",  # GPT-2
    "gelu_fast": "FastGELUActivation",
    "quick_gelu": "QuickGELUActivation",
    "gelu_pytorch_tanh": "GELUTanh",
    "gelu_pytorch_tanh_old": "PytorchGELUTanh",
    "gelu_accurate": "AccurateGELUActivation",
    "gelu_hf": "GELUActivation",  # BERT
    "gelu_10": "ClippedGELUActivation",
    "silu_hf": "SiLUActivation",  # Llama, Mistral, Qwen MLPs
    "mish_hf": "MishActivation",
    "laplace": "LaplaceActivation",
    "relu2": "ReLUSquaredActivation",
    "xielu": "XIELUActivation",
}
#: The family each transformers name belongs to (see :func:`family_types`).
_TRANSFORMERS_FAMILIES = {
    "gelu_new": "gelu", "gelu_fast": "gelu", "quick_gelu": "gelu", "gelu_pytorch_tanh": "gelu",
    "gelu_pytorch_tanh_old": "gelu", "gelu_accurate": "gelu", "gelu_hf": "gelu", "gelu_10": "gelu",
    "silu_hf": "silu", "mish_hf": "mish",
}


#: Activation classes that transformers defines in one model's file rather than in ACT2CLS:
#: registered when that model's module is loaded. ``name -> (module, class, family)``.
_TRANSFORMERS_MODEL_ACTIVATIONS = {
    "bloom_gelu": ("transformers.models.bloom.modeling_bloom", "BloomGelu", "gelu"),
}

_TRANSFORMERS_SEEN = False  # set once register_transformers_activations has run


def register_transformers_activations() -> list[str]:
    """Add transformers' activation classes to the registry; return the names added.

    After it, :func:`find_activations`, :func:`activation_types` and :func:`swap_activations`
    see GPT-2's ``NewGELUActivation`` (name ``gelu_new``), Llama's ``SiLUActivation``
    (``silu_hf``) and the others of :data:`_TRANSFORMERS_ACTIVATIONS`, so
    ``swap_activations(gpt2, "gelu_new", "crrelu")`` replaces every MLP activation. It runs by
    itself once ``transformers.activations`` has been imported (any transformers model imports
    it); calling it imports transformers. Raises :class:`ImportError` without transformers.
    """
    import transformers.activations as hf

    global _TRANSFORMERS_SEEN
    _TRANSFORMERS_SEEN = True
    added = []
    for name, cls_name in _TRANSFORMERS_ACTIVATIONS.items():
        cls = getattr(hf, cls_name, None)
        if isinstance(cls, type) and _REGISTRY.get(name) is not cls:
            register_activation(name, cls, _TRANSFORMERS_FAMILIES.get(name))
            added.append(name)
    return added


# ----------------------------------------------------------------------------- timm
#: timm's own activation classes (``timm.layers.activations``), by the name dynact gives them and
#: the family they join. timm's ConvNeXt builds ``act_layer="gelu"`` as its own ``GELU`` class.
_TIMM_ACTIVATIONS = {
    "gelu_timm": ("GELU", "gelu"),
    "gelu_tanh_timm": ("GELUTanh", "gelu"),
    "quick_gelu_timm": ("QuickGELU", "gelu"),
    "swish_timm": ("Swish", "silu"),
    "mish_timm": ("Mish", "mish"),
    "sigmoid_timm": ("Sigmoid", "sigmoid"),
    "tanh_timm": ("Tanh", "tanh"),
    "hardswish_timm": ("HardSwish", "hardswish"),
    "hardsigmoid_timm": ("HardSigmoid", "hardsigmoid"),
    "hard_mish_timm": ("HardMish", None),
}
_TIMM_SEEN = False


def register_timm_activations() -> list[str]:
    """Add timm's own activation classes (:data:`_TIMM_ACTIVATIONS`) to the registry; return the
    names added. Runs by itself once ``timm.layers`` has been imported (any timm model imports
    it). Raises :class:`ImportError` without timm."""
    import timm.layers.activations as tl

    global _TIMM_SEEN
    _TIMM_SEEN = True
    added = []
    for name, (cls_name, family) in _TIMM_ACTIVATIONS.items():
        cls = getattr(tl, cls_name, None)
        if isinstance(cls, type) and _REGISTRY.get(name) is not cls and cls not in _REGISTRY.values():
            register_activation(name, cls, family)
            added.append(name)
    return added


def _register_transformers_if_installed() -> None:
    # Only for a name of _TRANSFORMERS_ACTIVATIONS: importing transformers takes seconds.
    from importlib.util import find_spec

    if find_spec("transformers") is not None:
        register_transformers_activations()


def _register_loaded_libraries() -> None:
    # Cheap when nothing is loaded: a dict lookup. Never imports transformers itself.
    import sys

    if "transformers.activations" in sys.modules and not _TRANSFORMERS_SEEN:
        register_transformers_activations()
    if "timm.layers.activations" in sys.modules and not _TIMM_SEEN:
        register_timm_activations()
    for name, (module, cls_name, family) in _TRANSFORMERS_MODEL_ACTIVATIONS.items():
        cls = getattr(sys.modules.get(module), cls_name, None)
        if name not in _REGISTRY and isinstance(cls, type):
            register_activation(name, cls, family)


#: Words that mark a module class as an activation by its name (for :func:`unregistered_activations`).
_ACTIVATION_WORDS = ("relu", "gelu", "silu", "swish", "sigmoid", "tanh", "mish", "elu", "softplus", "glu")


def unregistered_activations(model: nn.Module) -> list[type]:
    """Classes of ``model``'s leaf modules whose name says "activation" (``BloomGelu``,
    ``MyReLU``) but which are not in the registry, so dynact does not see them; register one
    with :func:`register_activation`."""
    kinds = tuple(activation_types())
    found: dict[type, None] = {}
    for module in model.modules():
        cls = type(module)
        name = cls.__name__.lower()
        if (isinstance(module, kinds) or next(module.children(), None) is not None
                or not any(word in name for word in _ACTIVATION_WORDS)):
            continue
        found[cls] = None
    return list(found)


# ----------------------------------------------------------------------------- per-channel bases
def channels(module: nn.Module) -> int:
    """The channel count of an activation with per-channel parameters (``nn.PReLU(num_parameters=C)``):
    the length of its longest one-dimensional parameter; 1 for an elementwise activation."""
    return max((p.numel() for p in module.parameters() if p.dim() == 1), default=1)


class ChannelMean(nn.Module):
    """``mean_c f_c(x)`` of an activation ``f`` with ``C`` per-channel parameter sets, as a
    function of one value at a time (what :func:`elementwise` returns for such an ``f``)."""

    def __init__(self, f: nn.Module, c: int) -> None:
        super().__init__()
        self.f, self.c = f, int(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x.reshape(-1, 1).expand(-1, self.c)).mean(dim=1).reshape(x.shape)


def elementwise(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f`` as a function of one value at a time, for the EAFO numerics on a density's grid.

    An activation with per-channel parameters (``C`` channels) cannot run on a 1-D grid; its
    function is taken as the mean over its channels, ``mean_c f_c(x)`` (:class:`ChannelMean`):
    every channel sees the layer's one measured density, weighted alike. Elementwise
    activations pass through.
    """
    c = channels(f) if isinstance(f, nn.Module) else 1
    return ChannelMean(f, c) if c > 1 else f
