"""Activation call sites: one module called at k places in a forward is k activations.

torchvision's ``BasicBlock`` calls its one ``self.relu`` twice per forward (``Bottleneck``
three times), and many hand-written models build ``self.act = nn.GELU()`` once and call it in
every block. Measured as one module, such an activation mixes the inputs of all its call sites
into one density and gets one spline for all of them. :func:`split_call_sites` finds these
modules and puts a :class:`CallSites` in their place: a dispatcher holding one copy of the
module per call (``<name>.calls.0``, ``<name>.calls.1``, ...), the first being the original
module itself. The i-th call of a forward goes to ``calls[i]``, so each site is measured,
converted and updated on its own, under a name that is the same from run to run.

How the calls are counted: :mod:`torch.fx` traces the model symbolically (loops unrolled, no
data) and counts the calls of each activation module. Where the whole model cannot be traced
(Hugging Face models, data-dependent control flow), each module that owns an activation is
traced alone, with all its children as opaque leaves; a parent that cannot be traced either
counts as calling its activations once each. What this cannot see is listed in
``docs/user-guide/sites.md``: a module called a varying number of times per forward, and a
parent module that is itself called several times per forward and calls a shared activation
(each call of the parent is then counted once). The training plugin also compares, at each
update, how often each site ran during the window, and warns about a site that ran a whole
multiple of the others' count.

The dispatch is a counter taken modulo k, so a forward that calls all k sites leaves it where
it started. Under gradient checkpointing, the recomputation in the backward pass replays a
segment's calls with a counter of its own: correct whenever a checkpointed segment holds all
k calls of the module (a whole block), which is how torchvision blocks and transformers
layers are checkpointed. A module whose calls are spread over several checkpointed segments
cannot be told apart during recomputation; keep such a module shared (``sites="module"``).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Iterable, Optional

import torch
from torch import fx, nn

from dynact.records import always_recorded, mark
from dynact.registry import activation_types, find_activations

__all__ = ["CallSites", "count_calls", "recomputing", "split_call_sites"]


def recomputing() -> bool:
    """Whether the current forward runs inside a backward pass: the recomputation of gradient
    checkpointing (``torch.utils.checkpoint``, reentrant or not, and transformers'
    ``gradient_checkpointing_enable``), which replays calls already made."""
    if torch.compiler.is_compiling():
        return False
    return _graph_task is not None and _graph_task() != -1


_graph_task = getattr(torch._C, "_current_graph_task_id", None)  # -1 outside a backward pass


@always_recorded
class CallSites(nn.Module):
    """One activation per call of a module that a forward calls at ``len(calls)`` places.

    The i-th call made in a forward runs ``calls[i]``; the counter wraps after the last, so a
    forward that makes every call leaves it at 0 and ``torch.compile`` sees the same state at
    every step. Built by :func:`split_call_sites`; saved and rebuilt like dynact's other
    activations (its record lists each call's module).

    Args:
        calls: one module per call site, in the order the forward calls them.
    """

    #: Its record lists the record of every call's module (:func:`dynact.records.describe_activation`).
    wraps_calls = True

    def __init__(self, calls: Iterable[nn.Module]) -> None:
        super().__init__()
        self.calls = nn.ModuleList(calls)
        if len(self.calls) < 2:
            raise ValueError(f"CallSites needs at least 2 call sites, got {len(self.calls)}")
        self._next = 0
        self._replay = 0

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        k = len(self.calls)
        if recomputing():
            i, self._replay = self._replay, (self._replay + 1) % k
        else:
            i, self._next = self._next, (self._next + 1) % k
        return self.calls[i](x, *args, **kwargs)

    def reset(self) -> None:
        """Point the dispatch at the first call site again (after a forward that raised)."""
        self._next = self._replay = 0

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._next = self._replay = 0


def _activation_kinds() -> tuple[type, ...]:
    return tuple(activation_types()) + (CallSites,)


class _Counting(fx.Tracer):
    """A tracer that keeps activation modules opaque (and, for a parent traced alone, every child)."""

    def __init__(self, kinds: tuple[type, ...], all_leaves: bool = False) -> None:
        super().__init__()
        self.kinds, self.all_leaves = kinds, all_leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.all_leaves or isinstance(m, self.kinds) or super().is_leaf_module(m, qualname)


def _traced_calls(root: nn.Module, kinds: tuple[type, ...], all_leaves: bool) -> Optional[Counter]:
    """Calls of each activation module (by id) in one symbolic trace of ``root``; None if it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Counting(kinds, all_leaves).trace(root)
    except Exception:  # noqa: BLE001 - any failure of tracing means "count another way"
        return None
    counts: Counter = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            if isinstance(module, kinds):
                counts[id(module)] += 1
    return counts


def count_calls(model: nn.Module) -> dict[int, int]:
    """How many times one forward of ``model`` calls each activation module, by ``id``.

    A symbolic trace of the whole model first; if it fails, each module owning an activation
    is traced alone and the counts of all its owners are added up (see the module's docstring
    for what this cannot see). A module nobody could count is taken as called once.
    """
    kinds = _activation_kinds()
    whole = _traced_calls(model, kinds, all_leaves=False)
    if whole is not None:
        return dict(whole)
    counts: Counter = Counter()
    for parent in {id(m): m for m in model.modules()}.values():
        children = [c for c in parent.children() if isinstance(c, kinds)]
        if not children:
            continue
        traced = _traced_calls(parent, kinds, all_leaves=True)
        for child in {id(c): c for c in children}.values():
            counts[id(child)] += 1 if traced is None else traced.get(id(child), 0)
    return dict(counts)


def _stateless(module: nn.Module) -> bool:
    return next(iter(module.parameters()), None) is None and next(iter(module.buffers()), None) is None


def split_call_sites(
    model: nn.Module, stateful: bool = True, types: Optional[tuple[type, ...]] = None
) -> dict[str, int]:
    """Give every activation module that ``model``'s forward calls at k > 1 places k modules.

    Each such module is replaced, at every name it is registered under, by a :class:`CallSites`
    whose ``calls[0]`` is the module itself and ``calls[1:]`` independent copies (a copied PReLU
    gets its own weight, starting from the same values). Modules inside dynact's activations
    (an ``EAFOActivation``'s base) and modules already split are left alone.

    Args:
        model: the model, changed in place.
        stateful: also split modules with parameters or buffers; ``False`` splits only
            stateless ones (the ``state_dict`` keeps its keys; used when only measuring).
        types: split only modules of these types (default: every activation type).

    Returns:
        ``{name: k}`` of the modules split (their first registered name).
    """
    counts = count_calls(model)
    found: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in find_activations(model, _activation_kinds()):
        if isinstance(module, CallSites) or (types is not None and not isinstance(module, types)):
            continue
        found.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    split: dict[str, int] = {}
    for key, names in found.items():
        k, module = counts.get(key, 1), modules[key]
        if k < 2 or not (stateful or _stateless(module)):
            continue
        sites = mark(CallSites([module] + [copy.deepcopy(module) for _ in range(k - 1)]))
        for name in names:
            model.set_submodule(name, sites)
        split[names[0]] = k
    return split
