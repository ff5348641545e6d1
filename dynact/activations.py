"""Activations by name: CRReLU, the paper's baselines, and tools to swap them inside any model.

The name table and its lookups live in :mod:`dynact.registry` (one table maps a lower-case name
to a factory; :func:`resolve_activation` is the single resolver that every other part of dynact
goes through); this module re-exports them, so ``dynact.activations`` is the one place to import
them from. CRReLU registers itself here as ``"crrelu"``.
"""

from __future__ import annotations

from typing import Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn

from dynact._args import flag, real_number
from dynact.kernels import dispatch
from dynact.records import always_recorded, mark, record
from dynact.registry import (
    ActSpec,
    activation_names,
    activation_types,
    find_activations,
    make_activation,
    register_activation,
    register_transformers_activations,
    resolve_activation,
    tensor_device,
)
from dynact.sites import split_call_sites

__all__ = [
    "CRReLU",
    "crrelu",
    "activation_names",
    "register_activation",
    "resolve_activation",
    "make_activation",
    "swap_activations",
    "activation_types",
    "find_activations",
    "register_transformers_activations",
]


def crrelu(x: torch.Tensor, eps: Union[torch.Tensor, float]) -> torch.Tensor:
    """Functional CRReLU: ``relu(x) + eps * x * exp(-x**2 / 2)`` (``docs/math.md``, "CRReLU as one step").

    Works for any float dtype; the Gaussian factor is computed in the input's dtype, which
    keeps float16/bfloat16 graphs free of casts (``x*x`` is capped where the Gaussian is 0, so
    neither it nor its derivatives overflow: :func:`dynact.kernels.dispatch.gauss`). Written as plain
    tensor ops, so ``torch.compile`` fuses it into one kernel per direction, and ``torch.func``
    transforms, forward-mode AD and ``torch.jit.trace`` see standard ops.
    """
    return F.relu(x) + eps * x * dispatch.gauss(x)[1]


class _CRReLUFunction(torch.autograd.Function):
    """Eager CRReLU with a hand-written backward.

    Autograd of :func:`crrelu` keeps four full-size intermediates alive until backward; this
    saves only ``x`` and recomputes the Gaussian factor, with in-place arithmetic on one
    temporary. Forward+backward ran 1.8x faster than the plain ops on CPU (see
    ``benchmarks/bench_activation.py``). The ``eps`` gradient is accumulated in float32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, eps)
        e = eps.reshape(()).to(x.dtype)
        corr = x * x
        corr.mul_(-0.5).exp_().mul_(x).mul_(e)  # eps * x * exp(-x^2/2)
        return torch.relu(x).add_(corr)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, eps = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            return dispatch.crrelu_grads(grad, x, eps, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        # x*x capped where the Gaussian is 0 (see dispatch.X2_CAP): no -inf * 0 in float16.
        x2 = (x * x).clamp_max_(dispatch.X2_CAP)
        gauss = (x2 * -0.5).exp_()
        grad_eps = None
        if ctx.needs_input_grad[1]:
            grad_eps = (grad * x * gauss).sum(dtype=torch.float32).to(eps.dtype).reshape(eps.shape)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx = 1[x > 0] + eps * (1 - x^2) * exp(-x^2/2)
            slope = x2.neg_().add_(1).mul_(gauss).mul_(eps.reshape(()).to(x.dtype)).add_(x > 0)
            grad_x = slope.mul_(grad)
        return grad_x, grad_eps


@always_recorded
class CRReLU(nn.Module):
    """Correction Regularized ReLU: ``relu(x) + eps * x * exp(-x**2/2)``.

    One EAFO step away from ReLU under a standard normal input (``docs/math.md``, "CRReLU as one
    step"):
    the step with size ``eta`` gives ``eps = -eta / sqrt(2*pi)``, so a *negative* ``eps``
    lowers the output entropy to first order. The published initialisation is ``+0.01``;
    with ``learnable=True`` training chooses the sign.

    Args:
        eps: initial value of the correction's scale.
        learnable: if True, ``eps`` is a :class:`torch.nn.Parameter` holding one number (shape
            ``(1,)``, which FSDP2 can shard; checkpoints holding it 0-d load too), otherwise a buffer.

    Example:
        >>> act = CRReLU(eps=0.01)
        >>> act(torch.tensor([-1.0, 0.0, 2.0])).shape
        torch.Size([3])
    """

    def __init__(self, eps: float = 0.01, learnable: bool = True) -> None:
        super().__init__()
        eps = real_number("CRReLU", "eps", eps)
        learnable = flag("CRReLU", "learnable", learnable)
        # Shape (1,), not 0-d: FSDP2 (fully_shard) cannot shard 0-d parameters.
        value = torch.tensor([eps])
        if learnable:
            self.eps = nn.Parameter(value)
        else:
            self.register_buffer("eps", value)
        self.learnable = learnable
        self.register_load_state_dict_pre_hook(eps_as_vector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eager: the fused kernels of dynact.kernels (one pass per direction) or, where they
        # cannot be built, the hand-written backward above. Compiled: the same kernels as a
        # custom op on CPU, plain ops (fused by Inductor) elsewhere. Traced, under torch.func
        # transforms or forward-mode AD: plain ops.
        if dispatch.eager_fused(x):
            return dispatch.FusedCRReLU.apply(x, self.eps)
        eps = self.eps.view(())  # the stored (1,) as the 0-d scalar it is: 0-d inputs give 0-d outputs
        if torch.compiler.is_compiling() or dispatch.MODE == "ops":
            if dispatch.MODE != "ops" and dispatch.compiled_on_cpu(x):
                return dispatch.crrelu_op(x, eps)  # on CPU the C++ kernel beats Inductor's loop
            return crrelu(x, eps.to(x.dtype))
        if dispatch.plain_ops_needed():
            return crrelu(x, eps.to(x.dtype))
        if not (x.requires_grad or eps.requires_grad):
            return crrelu(x, eps.to(x.dtype))
        return _CRReLUFunction.apply(x, eps)

    def extra_repr(self) -> str:
        return f"eps={float(self.eps.detach()):.4g}, learnable={self.learnable}"


def eps_as_vector(module, state_dict, prefix, *args) -> None:
    """Load-state pre-hook of CRReLU and EAFOActivation: a checkpoint from before ``eps`` had
    shape ``(1,)`` holds it 0-d; reshape it so that it loads."""
    eps = state_dict.get(prefix + "eps")
    if isinstance(eps, torch.Tensor) and eps.dim() == 0:
        state_dict[prefix + "eps"] = eps.reshape(1)


register_activation("crrelu", CRReLU)


def _as_types(old: Union[type, str, Iterable]) -> tuple[type, ...]:
    items = [old] if isinstance(old, (type, str)) else list(old)
    types: list[type] = []
    for item in items:
        if isinstance(item, str):
            factory = resolve_activation(item)
            if not isinstance(factory, type):
                raise ValueError(f"activation {item!r} is not a class; pass the module type to replace")
            types.append(factory)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError(f"swap_activations: old must be module types or names, got {item!r}")
    if not types:
        raise ValueError("swap_activations: old is empty; name at least one module type to replace")
    return tuple(types)


def swap_activations(model: nn.Module, old, new: ActSpec, *, sites: str = "call", **kwargs) -> list[str]:
    """Replace every submodule of the types in ``old`` by a fresh activation from ``new``.

    One activation per call site: a module of those types that the forward calls at k places
    (torchvision's ``BasicBlock.relu``, a ``self.act`` reused by every block) is first split
    into k modules (:func:`dynact.sites.split_call_sites`), and each gets its own replacement;
    ``sites="module"`` keeps such a module one module.

    Works anywhere in the module tree (nested modules, ``nn.Sequential``, ``nn.ModuleList``,
    ``nn.ModuleDict``, timm blocks), because it re-assigns attributes on each parent. Modules
    inside an activation (the ``base`` of an ``EAFOActivation``) are left alone.
    Each replacement is built separately (no shared parameters) and moved to the device and
    dtype of the module it replaces. A ``new`` that wraps a base (``"eafo"``: its
    ``wraps_base`` attribute is true) is built around the module it replaces, unless ``base=``
    is given: ``swap_activations(gpt2, "gelu_new", "eafo")`` keeps GPT-2's GELU as the base.
    The swap is recorded (:func:`dynact.records.mark`, :func:`~dynact.records.record`), so a
    ``state_dict`` or a Hugging Face folder saved afterwards can be loaded back with the same
    modules (:func:`dynact.conversion.convert_like_state_dict`,
    ``dynact.integrations.transformers.from_pretrained``).

    Args:
        model: the model to edit in place.
        old: a module type, a registry name, or an iterable of them.
        new: a registry name, a class or a factory (called with ``**kwargs``).
        sites: ``"call"`` (one new activation per call site) or ``"module"`` (per module).

    Returns:
        The qualified names (as in ``model.named_modules()``) of the replaced modules.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.GELU())
        >>> swap_activations(net, nn.GELU, "crrelu")
        ['1']
    """
    types = _as_types(old)
    factory = resolve_activation(new)
    if factory is None:
        raise ValueError("swap_activations: new must not be None")
    if isinstance(model, types):
        raise ValueError("swap_activations: the model itself is an activation; build the new one directly")
    if sites not in ("call", "module"):
        raise ValueError(f"swap_activations: sites must be 'call' or 'module', got sites={sites!r}")
    if sites == "call":
        split_call_sites(model, types=types)
    replaced = _replace_each(model, types, factory, kwargs)
    if replaced:
        record(model)  # a Hugging Face model's config says what was swapped (dynact.records)
    return replaced


def _replace_each(model: nn.Module, types: tuple[type, ...], factory, kwargs: dict) -> list[str]:
    """Put a fresh ``factory`` module in place of each module of ``types``; returns their names."""
    replaced: list[str] = []
    done: set[int] = set()
    # Collect first, then edit, so the traversal never sees half-edited state.
    for name, mod in find_activations(model, types):
        if id(mod) in done:  # registered under several names: one replacement, set where it was found first
            continue
        done.add(id(mod))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if getattr(factory, "wraps_base", False) and "base" not in kwargs:
            if getattr(mod, "inplace", None) is True:  # the wrapper reads the input after the base
                mod.inplace = False
            fresh = factory(base=mod, **kwargs)
        else:
            fresh = factory(**kwargs)
        device = tensor_device(mod)
        if device is not None:
            fresh = fresh.to(device=device)
        setattr(parent, child, mark(fresh))
        replaced.append(name)
    return replaced
