"""ActivationOptimizer: the framework-free core of dynact's training plugin.

It measures every activation's input density while a model trains, computes the per-layer
measures of :func:`dynact.eafo.output_stats`, and applies EAFO updates to the dynamic
activations (:class:`~dynact.EAFOActivation`). It needs nothing but PyTorch; the front doors
are thin adapters over it:

- plain PyTorch: call :meth:`ActivationOptimizer.step` after each ``optimizer.step()``;
- Lightning: :class:`dynact.EAFOCallback`;
- Hugging Face ``Trainer`` / TRL: :class:`dynact.integrations.transformers.EAFOTrainerCallback`.

Data flow::

    forward pre-hook -> random subsample (float32) -> the layer's row of a sample buffer
    every N optimizer steps: all buffers binned at once (dynact.density.rows), summed across
        processes -> densities as (layers, bins) -> one batched refresh and output_stats for
        all layers (dynact.batched) -> metrics(); a layer the batched path does not cover
        (a skip, a grid to re-fit or move, iterate) -> EAFOActivation.update alone

The math lives in :mod:`dynact.eafo`, :mod:`dynact.density` and :mod:`dynact.spline`; this
module only schedules it.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Literal, Optional, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dynact import activations, eafo
from dynact.activations import find_activations
from dynact.batched import Site, density_of, update_rows
from dynact.conversion import record, to_eafo
from dynact.density import Density, sum_states
from dynact.density.rows import bin_rows, finish_rows, sum_rows
from dynact.distributed import is_distributed, single_thread
from dynact.options import ESTIMATORS, RANK_SEED_STRIDE, validate_options
from dynact.registry import activation_types, elementwise, family_of, unregistered_activations
from dynact.sampling import SampleBank, capacity_for, extremes
from dynact.sites import recomputing, split_call_sites
from dynact.spline import EAFOActivation
from dynact.update_guards import Skip, gathered, nonfinite_tensors, overflows, restore

__all__ = ["ActivationOptimizer", "LOGGED_STATS", "tag"]

#: Figures of :func:`dynact.eafo.output_stats` reported per layer at each update.
LOGGED_STATS = ("entropy_in", "dead", "entropy", "entropy_scale_free", "log_slope", "std")
# Quantiles that bound "the data" when a grid is fitted; the grid adds a margin around them.
_Q_LO, _Q_HI = 1e-3, 1.0 - 1e-3
# A grid is too coarse when the central 99.8% of the data covers fewer than 1/8 of its bins.
_MIN_FILL = 1.0 / 8.0
#: Relative margin added on each side of the central mass when a grid is fitted to it.
_GRID_MARGIN = 0.25
#: Relative margin added around the extremes seen when a grid must grow to cover spilled data.
_SPILL_MARGIN = 0.05
#: Narrowest half-width of a fitted grid, relative to max(1, |x|) (a constant input too).
_MIN_HALF_WIDTH = 1e-3
# Inputs spanning less than this times max(1, |x|) are treated as constant: even the narrowest
# grid `around` fits (half-width _MIN_HALF_WIDTH * max(1, |x|)) would be too coarse for them.
_MIN_SPREAD = 3e-4


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def tag(metric: str, layer: str) -> str:
    """The key of a per-layer figure: metric first, then the layer's qualified name made safe as
    a logger tag (``"dead/net.blocks.3.mlp.act"``; the model itself is ``"model"``).

    TensorBoard groups panels by the first component, so each group compares one figure
    across layers. Every front door uses these keys.
    """
    return f"{metric}/{_UNSAFE.sub('_', layer).strip('_') or 'model'}"


@dataclass
class _Layer:
    """One hooked activation module and what the optimizer keeps about it."""

    name: str
    module: nn.Module
    dynamic: bool
    estimator: Any
    handle: Optional[RemovableHandle] = None
    # [-min, max] of the finite values sampled this window, on the module's device; reduced
    # with MAX across processes when the grid has to grow to the data.
    extrema: Optional[torch.Tensor] = None
    # Updates skipped, by reason ("nonfinite", "constant", "parameters", "grid", "overflow", or
    # the name of the error the update raised); each reason is warned about once per layer.
    skips: dict[str, int] = field(default_factory=dict)
    # dtype of the inputs last sampled: an update must not make the activation overflow it.
    in_dtype: torch.dtype = torch.float32
    # Calls sampled in the current window (a site that runs k times as often as the others is
    # likely k call sites that could not be told apart; see _check_calls).
    calls: int = 0
    # This layer's row in the optimizer's SampleBank (None until its hook first samples).
    slot: Optional[int] = None
    bank: Optional[SampleBank] = None
    device: Optional[torch.device] = None  # where its row is (the hook's input's device)

    @property
    def skipped(self) -> int:
        return sum(self.skips.values())


def _get_estimator(layer: _Layer) -> Any:
    # Reading a layer's estimator bins what its hook has buffered first, so that its counts
    # and state_dict hold the whole window so far.
    _flush(layer)
    return layer._estimator


def _set_estimator(layer: _Layer, estimator: Any) -> None:
    # A new estimator starts empty: buffered values of the old one are dropped with it.
    bank, slot = getattr(layer, "bank", None), getattr(layer, "slot", None)
    if bank is not None and slot is not None:
        bank.clear(slot)
    layer._estimator = estimator


# The dataclass's __init__ assigns `estimator` through this property.
_Layer.estimator = property(_get_estimator, _set_estimator)


def _flush(layer: _Layer) -> None:
    """Bin the values buffered for ``layer`` into its estimator and its extremes (eager)."""
    bank, slot = layer.bank, layer.slot
    if bank is None or slot is None:
        return
    values, n = bank.filled(slot)
    bank.clear(slot)
    if n == 0:
        return
    with torch.no_grad():
        sample = values[:n]
        layer._estimator.update(sample)
        ends = extremes(sample.unsqueeze(0), torch.tensor([n], device=sample.device))[0]
        prev = layer.extrema
        layer.extrema = ends if prev is None else torch.maximum(prev.to(ends.device), ends)


class ActivationOptimizer:
    r"""Measure every activation's input density during training, report per-layer measures, and
    apply EAFO updates to dynamic activations.

    At construction it converts the model's activation modules of the ``convert`` types to
    :class:`~dynact.EAFOActivation` (with that type as its base), so build it *before* the
    weight optimizer: the new ``eps`` parameters must reach it. It then hooks every activation
    module: instances of the classes in dynact's activation registry and
    :class:`~dynact.EAFOActivation`. Activations called as functions (``F.relu(x)``) are not
    seen: use modules.

    During the ``window`` optimizer steps before each update, a forward pre-hook takes
    ``sample_size`` random values of each layer's input (on the model's device, float32) and
    copies them into the layer's row of a preallocated buffer (three small ops, no host
    synchronisation; under ``torch.compile`` the same positions, drawn ahead); no activation
    tensor is kept and the global RNG is not touched. Hooks ignore modules in evaluation mode
    unless ``collect_eval=True``. At the update every layer's window is binned, and every
    layer updated, in one batched pass with one read back to the host.

    Call :meth:`step` once after every optimizer step. Every ``every_n_steps`` steps each
    layer's estimator is summed across processes and turned into a
    :class:`~dynact.density.Density`; every process applies the same update, so dynamic
    activations stay identical on all ranks. The per-layer figures of that update are returned
    by :meth:`step` and kept in :meth:`metrics`, keyed ``"<metric>/<layer>"``:

    ==========================  ==================================================================
    ``entropy_in``              differential entropy of the input (nats)
    ``dead``                    output mass on an atom: where the activation is flat
    ``entropy``                 mixed entropy of the output (resolution-free, nats)
    ``entropy_scale_free``      ``entropy - (1 - dead) log std``: unchanged by output rescaling
    ``log_slope``               ``E[log f'(X)]`` over the rising mass
    ``std``                     standard deviation of the output
    ``eps``                     the correction's scale (CRReLU, EAFOActivation)
    ``outside``                 mass beyond the grid (the spline's, for dynamic layers)
    ``update_size``             largest change of the activation (dynamic layers)
    ``accepted``                1 if the update was applied, else 0 (dynamic layers)
    ``nonfinite``               NaN/Inf values sampled in the window
    ``skipped``                 running count of this layer's skipped updates
    ==========================  ==================================================================

    ``docs/math.md`` defines each measure.

    Skips: a layer whose update cannot be made sensibly is skipped for that update: its window
    held NaN/Inf values, its input was constant (spanning less than ``3e-4 * max(1, |x|)``), its
    own parameters (``eps``) are not finite, its grid cannot be stored in the activation's dtype
    (float16 beyond 65504, bfloat16's coarse steps), the update would make it overflow its
    input's dtype, or the update's numerics raised. Nothing of that layer changes (its
    activation is restored if the update got half-way), one warning per layer and reason names
    it, ``skipped`` counts it and :attr:`skips` holds the counts by reason; every other layer
    proceeds.

    Conversion keeps each converted module as the new activation's base, settings and
    parameters included (:func:`dynact.conversion.to_eafo`); ``mode="monitor"`` converts nothing.

    Grids: each estimator starts on ``init_range`` with ``bins`` bins. When a window's data
    spill beyond it (more than ``max_outside`` of the mass) or fill less than 1/8 of it, the
    estimator's grid is re-fitted and that layer's update waits for the next window. A dynamic
    layer's spline grid is re-placed (:meth:`EAFOActivation.place_grid`) under the same two
    conditions, just before its update.

    Args:
        model: the model; its activation modules are found, converted and hooked.
        every_n_steps: optimizer steps between updates.
        estimator: ``"kde"`` (binned Gaussian KDE) or ``"hist"`` (histogram).
        mode: ``"refresh"`` (``s`` = the EAFO correction of the base under the measured
            density), ``"iterate"`` (constrained descent steps on the scale-free entropy, size
            ``eta``) or ``"monitor"`` (measure only, never change the model).
        eta: step size of ``"iterate"`` (ignored by the other modes).
        bins: bins of each estimator's grid.
        sample_size: values sampled per layer per forward pass.
        window: optimizer steps before each update during which the hooks sample
            (``1 <= window <= every_n_steps``); default ``min(every_n_steps, 20)``.
        convert: activation module types (or registry names) to replace by
            an ``EAFOActivation`` with the module itself as base; ``()`` leaves the model as it is.
        init_range: ``(lo, hi)`` of the estimators' first grid.
        max_outside: mass beyond a grid that triggers re-fitting it.
        collect_eval: also sample forward passes made in evaluation mode while a window is open.
        seed: seed of the sampling generator (offset by the process rank).
        sites: ``"call"`` (default): a module called at k places per forward is k activations
            (:func:`dynact.sites.split_call_sites`); ``"module"``: one activation per module.
        rank: this process's rank (seeds and state); default: torch.distributed's, else 0.

    Valid ranges: ``8 <= bins <= 65536``, ``1 <= sample_size <= 2**20``, ``0 <= seed <= 2**62``,
    ``init_range`` within ``[-1e100, 1e100]``.

    Raises:
        ValueError: an argument is out of range; the message names it and the accepted values.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynact import ActivationOptimizer
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> act_opt = ActivationOptimizer(model, every_n_steps=5, window=5, sample_size=64)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2)   # after: it sees eps
        >>> for _ in range(5):
        ...     loss = model(torch.randn(64, 8)).pow(2).mean()
        ...     opt.zero_grad(); loss.backward(); opt.step()
        ...     updated = act_opt.step()
        >>> sorted(k for k in updated if k.startswith("dead/"))
        ['dead/1']
    """

    #: Where the hooks buffer their samples (built at the first sampled call).
    _bank: Optional[SampleBank] = None
    #: Calls a compiled graph could not sample (their site had no buffer yet): ``(layer, x)``,
    #: sampled eagerly by the next :meth:`step` (see :meth:`_collect`).
    _deferred: Optional[list] = None

    def __init__(
        self,
        model: nn.Module,
        every_n_steps: int = 100,
        estimator: Literal["kde", "hist"] = "kde",
        mode: Literal["refresh", "iterate", "monitor"] = "refresh",
        eta: float = 0.05,
        bins: int = 256,
        sample_size: int = 4096,
        window: Optional[int] = None,
        convert: Iterable[Union[type, str]] = (nn.ReLU,),
        init_range: tuple[float, float] = (-8.0, 8.0),
        max_outside: float = 0.01,
        collect_eval: bool = False,
        seed: int = 0,
        rank: Optional[int] = None,
        sites: Literal["call", "module"] = "call",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"ActivationOptimizer: model must be a torch.nn.Module, got {type(model).__name__}: {model!r}"
            )
        _refuse_second_plugin(model)
        self._origin = _caller()
        self.options = validate_options(
            every_n_steps=every_n_steps, estimator=estimator, mode=mode, eta=eta, bins=bins,
            sample_size=sample_size, window=window, convert=convert, init_range=init_range,
            max_outside=max_outside, collect_eval=collect_eval, seed=seed, sites=sites,
        )
        for key, value in self.options.items():
            setattr(self, key, value)
        if rank is None:
            rank = torch.distributed.get_rank() if is_distributed() else 0
        self.rank = int(rank)
        self.model = model
        self._layers: dict[str, _Layer] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._metrics: dict[str, float] = {}
        #: The densities the latest update measured, by layer (for histograms and figures).
        self.densities: dict[str, Density] = {}
        self.global_step = 0
        self.num_updates = 0
        #: ``{name: k}`` of the modules called at k places per forward that were split into k
        #: sites (:func:`dynact.sites.split_call_sites`); empty with ``sites="module"``.
        self.split = split_call_sites(model, stateful=self.mode != "monitor") if self.sites == "call" else {}
        self.converted = self._convert(model)
        for name, module in _unique_activations(model):
            dynamic = isinstance(module, EAFOActivation) and self.mode != "monitor"
            self._layers[name] = _Layer(name, module, dynamic, self._new_estimator(*self.init_range))
        self._warned_calls: set[str] = set()
        self._deferred = []
        self._checked_eps = False
        self.attach()
        if self.rank == 0:
            self._warn_setup(model)

    def _warn_setup(self, model: nn.Module) -> None:
        """The warnings of a plugin that will not do what was likely meant (rank 0 only)."""
        unseen = unregistered_activations(model)
        if unseen:
            warnings.warn(
                f"ActivationOptimizer: the model has activation-like modules dynact does not know, so they are "
                f"neither measured nor converted: {', '.join(c.__module__ + '.' + c.__qualname__ for c in unseen)}. "
                f"Register each before building the plugin, e.g. dynact.activations.register_activation("
                f"{unseen[0].__name__.lower()!r}, {unseen[0].__name__}, family='gelu') (family: the name whose "
                "conversion should include it).",
                stacklevel=3,
            )
        if not self._layers:
            warnings.warn(
                "ActivationOptimizer found no activation modules to measure; it hooks modules of "
                f"the activation registry ({', '.join(activations.activation_names())}), not "
                "functions such as F.relu. Use nn.ReLU() etc. in the model, or register your activation "
                "class with dynact.activations.register_activation.",
                stacklevel=3,
            )
        elif self.mode != "monitor" and not any(layer.dynamic for layer in self._layers.values()):
            asked = tuple(t.__name__ for t in self.convert)
            warnings.warn(
                f"ActivationOptimizer: none of the {len(self._layers)} activation modules is an "
                f"EAFOActivation, so it only measures (convert={asked} matched none of them). The model has: "
                f"{_present(model)}. Pass one of those names (or classes) in convert=..., e.g. convert=(\"gelu\",) "
                "for every GELU variant, or build the model with act='eafo'.",
                stacklevel=3,
            )
        self._checked_eps = self._warn_frozen(stacklevel=4)  # warned once is enough

    def _warn_frozen(self, stacklevel: int) -> bool:
        """Warn if a converted layer's learnable eps does not require grad (rank 0); True if it did."""
        frozen = [layer.name for layer in self._layers.values() if layer.dynamic and layer.module.learn_eps
                  and not layer.module.eps.requires_grad]
        if frozen and self.rank == 0:
            warnings.warn(
                f"ActivationOptimizer: eps of {len(frozen)} converted layer(s) does not require grad (e.g. "
                f"{frozen[0]!r}; PEFT's get_peft_model freezes every parameter outside its adapters), so it is "
                "not trained. Build the plugin after get_peft_model, or call "
                "act_opt.train_eps() before building the weight optimizer.",
                stacklevel=stacklevel,
            )
        return bool(frozen)

    def __repr__(self) -> str:
        return (f"ActivationOptimizer(every_n_steps={self.every_n_steps}, mode={self.mode!r}, "
                f"layers={len(self._layers)}) created at {self._origin}")

    def train_eps(self) -> list[str]:
        """Make every converted layer's ``eps`` trainable again (``requires_grad=True``), e.g. after
        PEFT's ``get_peft_model`` froze it; returns the layers changed. Call it before the
        weight optimizer is built, so that the optimizer sees them."""
        changed = []
        for layer in self._layers.values():
            eps = getattr(layer.module, "eps", None)
            if layer.dynamic and layer.module.learn_eps and isinstance(eps, nn.Parameter) and not eps.requires_grad:
                eps.requires_grad_(True)
                changed.append(layer.name)
        return changed

    # ------------------------------------------------------------------ public API
    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the hooked activation modules."""
        return list(self._layers)

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The hooked activation modules by qualified name."""
        return {name: layer.module for name, layer in self._layers.items()}

    @property
    def skips(self) -> dict[str, dict[str, int]]:
        """Skipped updates per layer, by reason (``{"net.1": {"nonfinite": 2}}``)."""
        return {name: dict(layer.skips) for name, layer in self._layers.items()}

    def metrics(self) -> dict[str, float]:
        """The per-layer figures of the latest update (empty before the first)."""
        return dict(self._metrics)

    def step(self, global_step: Optional[int] = None) -> dict[str, float]:
        """Count one optimizer step (call it after ``optimizer.step()``); update when due.

        Args:
            global_step: the number of optimizer steps completed so far, if the caller keeps
                its own count (Lightning, Hugging Face); default: this object's count + 1.

        Returns:
            the figures of this step's update, or an empty dict if no update was due.
        """
        self.global_step = self.global_step + 1 if global_step is None else int(global_step)
        if not self._checked_eps:  # PEFT may have frozen eps after this plugin was built
            self._checked_eps = True
            self._warn_frozen(stacklevel=3)
        updated: dict[str, float] = {}
        if self._deferred:
            self._sample_deferred()
        self._collecting = False  # the update's own evaluations of the modules are not data
        if self.global_step > 0 and self.global_step % self.every_n_steps == 0:
            self._check_calls()
            with single_thread(torch.device("cpu")):  # O(bins) grid work: no thread wake-ups
                updated = self._update_all()
        self._collecting = self._in_window(self.global_step)
        bank = self._bank
        if self._collecting and bank is not None and bank.traced_once:
            bank.draw_ahead(self._generator)  # positions for the next traced calls
        return updated

    def set_step(self, global_step: int) -> None:
        """Align the step count with the training loop's (after resuming from a checkpoint)."""
        self.global_step = int(global_step)
        self._collecting = self._in_window(self.global_step)

    def attach(self) -> None:
        """Hook the layers again after :meth:`remove` (nothing happens to hooked layers)."""
        for layer in self._layers.values():
            if layer.handle is None:
                _drop_dead_hooks(layer.module)
                layer.handle = layer.module.register_forward_pre_hook(_SampleHook(self, layer))
        self._collecting = self._in_window(self.global_step)

    def remove(self) -> None:
        """Remove the hooks (the converted modules stay in the model)."""
        for layer in self._layers.values():
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
        self._collecting = False
        self._deferred = []  # inputs kept for a step() that will not come

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's own state (estimators, counters, sampling generators) and a copy of
        every dynamic activation's tensors (``"activations"``).

        The spline buffers are also in the model's ``state_dict``; the copy here is what restores
        them where the model's checkpoint leaves them out (a PEFT adapter checkpoint). Under data
        parallelism this is the calling process's state: save rank 0's.
        """
        return {
            "global_step": self.global_step,
            "num_updates": self.num_updates,
            "generators": {key: gen.get_state() for key, gen in self._generators.items()},
            "layers": {
                name: {
                    "range": (layer.estimator.lo, layer.estimator.hi),
                    "estimator": layer.estimator.state_dict(),
                    "extrema": None if layer.extrema is None else layer.extrema.detach().cpu(),
                    "skips": dict(layer.skips),
                }
                for name, layer in self._layers.items()
            },
            # The dynamic activations themselves (spline, grid, eps, base): a PEFT adapter checkpoint
            # holds only the adapters, so a resume restores the activations from here.
            "activations": {
                name: {k: v.detach().cpu().clone() for k, v in layer.module.state_dict().items()}
                for name, layer in self._layers.items() if layer.dynamic
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. A checkpoint holds rank 0's state: every process restores
        the grids and counters; only rank 0 keeps the partial window's counts, so the sum across
        processes never counts them twice (the other ranks' partial counts are dropped)."""
        self.global_step = int(state.get("global_step", self.global_step))
        self.num_updates = int(state["num_updates"])
        saved = state["layers"]
        unknown = sorted(set(saved) - set(self._layers))
        if unknown:
            warnings.warn(f"ActivationOptimizer: the state has layers this model lacks: {unknown}", stacklevel=2)
        own = self.rank == 0
        if own:
            self._generators = {}
            for key, gen_state in state["generators"].items():
                if key.startswith("cuda") and not torch.cuda.is_available():
                    continue  # a GPU run resumed on CPU draws from a fresh generator
                gen = torch.Generator(device=key)
                gen.set_state(gen_state)
                self._generators[key] = gen
        for name, layer_state in saved.items():
            layer = self._layers.get(name)
            if layer is None:
                continue
            layer.estimator = self._new_estimator(*layer_state["range"])
            skips = layer_state.get("skips")
            if skips is None:  # older states counted non-finite windows only
                skips = {"nonfinite": int(layer_state["skipped"])} if layer_state.get("skipped") else {}
            layer.skips = {str(k): int(v) for k, v in skips.items()}
            if own:
                layer.estimator.load_state_dict(layer_state["estimator"])
                layer.extrema = layer_state["extrema"]
        for name, tensors in state.get("activations", {}).items():
            layer = self._layers.get(name)
            if layer is not None and layer.dynamic:
                with torch.no_grad():
                    layer.module.load_state_dict(tensors)
        self._collecting = self._in_window(self.global_step)

    # ------------------------------------------------------------------ conversion
    def _convert(self, model: nn.Module) -> list[str]:
        converted: list[str] = []
        if not self.convert or self.mode == "monitor":  # monitoring never changes the model
            return converted
        # Outermost activations only: an EAFOActivation's own base is never converted. The
        # module itself becomes the base: its settings and parameters stay.
        for name, module, names in _unique_activations(model, every_name=True):
            if any(isinstance(module, k) for k in self.convert):
                new = to_eafo(module)
                for other in names:  # a module registered under several names stays one module
                    model.set_submodule(other, new)
                converted.append(name)
        if converted:
            record(model)  # a Hugging Face model's config says what was converted (dynact.conversion)
        return converted

    # ------------------------------------------------------------------ collection
    def _in_window(self, step: int) -> bool:
        # Updates happen after optimizer steps k*N; samples come from steps [k*N - window, k*N).
        return step % self.every_n_steps >= self.every_n_steps - self.window

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + RANK_SEED_STRIDE * self.rank)
            self._generators[key] = gen
        return gen

    def _collect(self, layer: _Layer, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: feed ``sample_size`` random input values to the layer's estimator."""
        if not self._collecting or not (module.training or self.collect_eval):
            return
        compiling = torch.compiler.is_compiling()
        if not compiling:
            if recomputing():
                return  # a checkpointed segment's recomputation replays calls already sampled
            layer.calls += 1  # (a Python counter in a traced hook would recompile)
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0 or x.is_meta:
            return
        # Random positions and their values, into the layer's buffer; the update bins all layers'
        # buffers at once (dynact.sampling).
        if not compiling:
            self._write_eager(layer, x.detach())
            return
        with torch.no_grad():
            x = x.detach()
            bank = self._bank
            if bank is None or layer.device != x.device:
                # No buffer for this site yet, and making one is eager work: a graph break here
                # would split the model's graph at every site for good. The input is kept
                # instead and the next step() samples it eagerly, with the draws an eager call
                # makes; the next call finds the site ready and is traced again, whole.
                self._deferred.append((layer, x))
                return
            bank.write_traced(layer.slot, x)
            layer.in_dtype = x.dtype

    def _write_eager(self, layer: _Layer, x: torch.Tensor) -> None:
        """An eager call's sample of ``x`` (detached) into ``layer``'s buffer, made first if needed."""
        bank = self._bank
        if bank is None or layer.device != x.device:
            bank = self._prepare_sampling(layer, x, False)
        bank.write(layer.slot, x, self._generator, partial(_flush, layer))
        layer.in_dtype = x.dtype

    def _sample_deferred(self) -> None:
        """Sample, eagerly and in call order, the inputs of the traced calls that found no buffer
        (:meth:`_collect`); later traced calls take positions drawn ahead (:meth:`SampleBank.draw_ahead`)."""
        deferred, self._deferred = self._deferred, []
        with torch.no_grad():
            for layer, x in deferred:
                self._write_eager(layer, x)
        for layer in {id(layer): layer for layer, _ in deferred}.values():
            self._bank.hand_to_traced(layer.slot)  # traced calls write after these values, and draw ahead

    @torch.compiler.disable
    def _prepare_sampling(self, layer: _Layer, x: torch.Tensor, traced: bool) -> SampleBank:
        """The sample bank, with a row for ``layer`` on ``x``'s device (eager even under
        torch.compile: a traced call then finds its buffers and positions in place)."""
        bank = self._bank
        if bank is None:
            bank = self._bank = SampleBank(self.sample_size, capacity_for(self.sample_size, self.window),
                                          sites=len(self._layers))
        if layer.slot is None:
            layer.bank, layer.slot = bank, bank.new_slot()
        elif bank.ready(layer.slot, x.device):
            return bank  # a compiled frame traced before the bank existed calls this again: no new draw
        bank.prepare(layer.slot, x, self._generator, traced)
        layer.device = x.device
        return bank

    def _check_calls(self) -> None:
        """Warn (once per layer) about a layer that ran a whole multiple of the other layers' calls
        in the window: most likely one module called at several places that
        :func:`dynact.sites.split_call_sites` could not count."""
        counts = {name: layer.calls for name, layer in self._layers.items() if layer.calls > 0}
        for layer in self._layers.values():
            layer.calls = 0
        if len(counts) < 2 or self.rank != 0:
            return
        least = min(counts.values())
        for name, n in counts.items():
            if n >= 2 * least and n % least == 0 and name not in self._warned_calls:
                self._warned_calls.add(name)
                warnings.warn(
                    f"ActivationOptimizer: layer {name!r} ran {n // least} times as often as the least-called "
                    "layer in the last window, so it is probably one module called at several places per forward "
                    "that dynact could not count (its forward could not be traced with torch.fx); those calls "
                    "share one density and one spline. Give each call its own module in the model to measure them "
                    "apart.",
                    stacklevel=4,
                )

    # ------------------------------------------------------------------ update
    def _update_all(self) -> dict[str, float]:
        self.num_updates += 1
        layers = list(self._layers.values())
        metrics: dict[str, float] = {}
        self.densities = {}
        batch, rest = _split_batch(layers)
        for layer in rest:
            _flush(layer)  # before the batch's window empties every buffer
        if batch:
            self._update_batch(batch, metrics)
        if rest:
            # One collective for these layers, in the same order on every process: counts summed,
            # the extremes of the finite values maxed (None where no process saw one).
            states, extrema = _reduce_windows(rest)
            for layer, state, ends in zip(rest, states, extrema, strict=True):
                self._update_one(layer, state, ends, metrics)
        for layer in layers:
            metrics[tag("skipped", layer.name)] = float(layer.skipped)
            layer.extrema = None
        self._metrics = metrics
        return dict(metrics)

    def _update_one(self, layer: _Layer, state: torch.Tensor, ends: Optional[torch.Tensor],
                    metrics: dict[str, float]) -> None:
        with gathered(layer.module):  # FSDP2-sharded parameters read whole, on every process alike
            used = self._update_layer(layer, state, ends, metrics)
        if used is not None:
            self.densities[layer.name] = used

    def _update_batch(self, layers: list[_Layer], metrics: dict[str, float]) -> None:
        """Update ``layers`` (one estimator kind and size) together (:func:`dynact.batched.update_rows`);
        a layer the common path does not cover is updated alone, from the same window."""
        states, ends, grids = self._window_states(layers)
        est = layers[0]._estimator
        rows = finish_rows(est._kind, est.bins, states, grids[:, 0], grids[:, 1],
                           getattr(est, "bandwidth", "silverman"), est.dp_bandwidth)
        sites = [Site(layer.module, layer.dynamic, layer.in_dtype) for layer in layers]
        out = update_rows(sites, rows, ends, self.mode, self.max_outside)
        cleared, targets, values = [], [], []
        for i, layer in enumerate(layers):
            if not out.done[i]:
                row = ends[i].detach().float().cpu()
                self._update_one(layer, states[i].cpu(), row if bool(torch.isfinite(row).all()) else None, metrics)
                continue
            metrics[tag("nonfinite", layer.name)] = out.nonfinite[i]
            metrics.update({tag(name, layer.name): value for name, value in out.figures[i].items()})
            # The density grid re-fitted as the one-site path does (_measure), from the same host values.
            (lo, hi), (e_min, e_max), (q_lo, q_hi) = out.grid[i], out.ends[i], out.q[i]
            if out.kind[i] == "spill":  # nothing measured: the next window runs on a grid covering the data
                layer.estimator = self._new_estimator(*_cover(lo, hi, e_min, e_max))
                continue
            self.densities[layer.name] = density_of(rows, i, out)
            if out.kind[i] == "coarse":
                layer.estimator = self._new_estimator(*around(*_fit_range(q_lo, q_hi, e_min, e_max)))
                continue
            cleared.append(layer._estimator.additive_state)
            if out.new_s[i] is not None:
                targets.append(layer.module.s)
                values.append(out.new_s[i].to(device=layer.module.s.device, dtype=layer.module.s.dtype))
            if out.new_grid[i] is not None:  # the spline's grid re-placed first (EAFOActivation.place_grid)
                with torch.no_grad():
                    layer.module.lo.fill_(out.new_grid[i][0])
                    layer.module.hi.fill_(out.new_grid[i][1])
        with torch.no_grad():
            if cleared:
                torch._foreach_zero_(cleared)
            if targets:
                torch._foreach_copy_(targets, values)

    def _window_states(self, layers: list[_Layer]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The windows of ``layers`` as rows: estimator counts plus the buffered samples binned,
        summed across processes (one collective), the ``[-min, max]`` of their finite values
        maxed, and the grids ``[lo, hi]``; the buffers are emptied. Nothing is read back."""
        bank = self._bank
        device = _update_device(bank, layers)
        grids = torch.tensor([[layer._estimator.lo, layer._estimator.hi] for layer in layers],
                             dtype=torch.float64, device=device)
        est = layers[0]._estimator
        states = torch.stack([layer._estimator.additive_state.to(device) for layer in layers])
        ends = torch.stack([torch.full((2,), -math.inf, device=device) if layer.extrema is None
                            else layer.extrema.detach().float().to(device) for layer in layers])
        if bank is not None:
            values, filled = bank.gather([layer.slot for layer in layers], device)
            binned, seen = bin_rows(est._kind, est.bins, values, filled, grids[:, 0], grids[:, 1], ends=True)
            states = states + binned
            ends = torch.maximum(ends, seen)
            bank.clear()
        states, ends = sum_rows(states, ends)
        return states, ends, grids

    def _update_layer(
        self, layer: _Layer, state: torch.Tensor, ends: Optional[torch.Tensor], metrics: dict[str, float]
    ) -> Optional[Density]:
        """Update one layer from its summed counts, add its figures to ``metrics`` and start its
        next window; returns the density its figures describe (None if it was not measured).

        Every decision depends only on the summed counts and extremes, so all processes decide
        alike.
        """
        count, nonfinite = layer.estimator.counts(state)
        metrics[tag("nonfinite", layer.name)] = float(nonfinite)
        if nonfinite > 0:
            return self._skip(layer, "nonfinite", f"saw {nonfinite} NaN/Inf pre-activation value(s) in the window")
        if count == 0 or ends is None:  # the layer did not run during the window
            return None
        low, high = -float(ends[0]), float(ends[1])
        if high - low <= _MIN_SPREAD * max(1.0, abs(low), abs(high)):
            return self._skip(
                layer, "constant",
                f"had a constant input in the window (all values in [{low:.6g}, {high:.6g}]), which has no "
                "density to measure",
            )
        bad = nonfinite_tensors(layer.module)
        if bad:
            return self._skip(
                layer, "parameters",
                f"has non-finite parameters/buffers {bad} while its input is finite; look at training "
                "(learning rate, loss scale) rather than the data",
            )
        saved = {k: v.detach().clone() for k, v in layer.module.state_dict().items()}
        try:
            density = layer.estimator.compute_from(state.cpu())
            figures: dict[str, float] = {}
            used = self._measure(layer, density, ends, figures)
            if used is not None and layer.dynamic:
                bad = nonfinite_tensors(layer.module)
                if bad:
                    raise Skip("update", f"got non-finite {bad} from its update (undone)")
                if overflows(layer.module, layer.in_dtype):
                    raise Skip(
                        "overflow",
                        f"would overflow its {layer.in_dtype} input's range (|f(x)| > "
                        f"{torch.finfo(layer.in_dtype).max:.5g} for a finite x) after its update (undone)",
                    )
        except Skip as skip:
            restore(layer.module, saved)
            return self._skip(layer, skip.reason, skip.message)
        except (ArithmeticError, ValueError, RuntimeError, TypeError, IndexError) as err:
            # The numerics could not handle this window (e.g. a range they cannot resolve):
            # undo whatever got half-way and go on; the warning carries the error.
            restore(layer.module, saved)
            return self._skip(layer, type(err).__name__, f"raised {type(err).__name__} in its update (undone): {err}")
        metrics.update(figures)
        return used

    def _measure(
        self, layer: _Layer, density: Density, ends: torch.Tensor, metrics: dict[str, float]
    ) -> Optional[Density]:
        """Grid upkeep, the update of a dynamic layer and its figures (the part that may raise)."""
        if density.outside > self.max_outside:
            # The data reach beyond the grid: re-measure on a grid that covers them first.
            metrics[tag("outside", layer.name)] = density.outside
            layer.estimator = self._new_estimator(*_covering(density, ends))
            return None
        q_lo, q_hi = density.quantile(_Q_LO), density.quantile(_Q_HI)
        # Quantiles are resolved to a bin; the extremes seen bound them exactly, so a grid left
        # far too wide by huge values fits the data again in one window, not in many.
        fit_lo, fit_hi = _fit_range(q_lo, q_hi, float(ends[0]), float(ends[1]))
        if fit_hi - fit_lo <= _MIN_SPREAD * max(1.0, abs(fit_lo), abs(fit_hi)):
            # Nearly all the mass at one value (a few outliers aside): no grid resolves it.
            raise Skip("constant", f"had nearly all its input at {fit_lo:.6g}, which has no density to measure")
        coarse = q_hi - q_lo < _MIN_FILL * (density.hi - density.lo)
        # The next window's grid is settled first, so that it follows the data even when what
        # comes next raises and the update is skipped.
        if coarse:  # too few bins on the data: re-measure on a grid fitted to them
            layer.estimator = self._new_estimator(*around(fit_lo, fit_hi))
        else:
            layer.estimator.reset()
        record = self._apply(layer.module, density, q_hi - q_lo) if layer.dynamic and not coarse else None
        metrics.update(self._layer_metrics(layer, density, record))
        return density

    def _skip(self, layer: _Layer, reason: str, message: str) -> None:
        """Count a skipped update of ``layer``, warn once per reason, start its next window."""
        layer.skips[reason] = layer.skips.get(reason, 0) + 1
        layer.estimator.reset()
        if layer.skips[reason] == 1 and self.rank == 0:  # a week-long run must not flood the log
            warnings.warn(
                f"ActivationOptimizer: layer {layer.name!r} {message}; it is not updated at step "
                f"{self.global_step}. Training continues; later skips for this reason are only "
                f"counted in {tag('skipped', layer.name)}.",
                stacklevel=4,
            )
        return None

    def _apply(self, act: EAFOActivation, density: Density, spread: float) -> dict:
        """Re-place the spline's grid if the data left or hardly fill it, then update it."""
        if act.outside_mass(density) > self.max_outside or spread < _MIN_FILL * (float(act.hi) - float(act.lo)):
            try:
                act.place_grid(density)
            except ValueError as err:
                # float16 overflows past 65504 and bfloat16 rounds neighbouring ends together.
                raise Skip(
                    "grid",
                    f"cannot place its grid around the data (about {density.quantile(_Q_LO):.6g} to "
                    f"{density.quantile(_Q_HI):.6g}) in its {act.lo.dtype} buffers ({err})",
                ) from None
        return act.update(density, mode=self.mode, eta=self.eta)

    def _layer_metrics(self, layer: _Layer, density: Density, record: Optional[dict]) -> dict[str, float]:
        stats = eafo.output_stats(elementwise(layer.module), density)
        out = {tag(name, layer.name): stats[name] for name in LOGGED_STATS}
        out[tag("outside", layer.name)] = (
            layer.module.outside_mass(density) if isinstance(layer.module, EAFOActivation) else density.outside
        )
        eps = getattr(layer.module, "eps", None)
        if isinstance(eps, torch.Tensor) and eps.numel() == 1:
            out[tag("eps", layer.name)] = float(eps.detach())
        if record is not None:
            out[tag("update_size", layer.name)] = float(record["change"])
            out[tag("accepted", layer.name)] = float(bool(record["accepted"]))
        return out

    def _new_estimator(self, lo: float, hi: float) -> Any:
        return ESTIMATORS[self.estimator](lo, hi, self.bins)


# ---------------------------------------------------------------------- helpers
class _SampleHook:
    """The forward pre-hook of one measured layer, calling its plugin's ``_collect``.

    A copy of the model (``copy.deepcopy``, ``pickle``, ``torch.save``) must not carry a live
    copy of the plugin: the copy of this hook is a dead one, which does nothing, removes itself
    at its first call and is removed when a new plugin hooks the module."""

    def __init__(self, owner: Optional["ActivationOptimizer"], layer: Optional[_Layer]) -> None:
        self.owner, self.layer = owner, layer

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.owner is None:
            _drop_dead_hooks(module)
            return None
        return self.owner._collect(self.layer, module, args)

    def __deepcopy__(self, memo: dict) -> "_SampleHook":
        return _SampleHook(None, None)

    def __reduce__(self):
        return (_SampleHook, (None, None))


def _drop_dead_hooks(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, _SampleHook) and hook.owner is None:
            del module._forward_pre_hooks[key]


def _refuse_second_plugin(model: nn.Module) -> None:
    """One plugin per model: two would sample, update and log the same layers twice."""
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, _SampleHook) and hook.owner is not None:
                raise ValueError(
                    f"this model already has a dynact plugin: {hook.owner!r} (it hooks {name or 'the model'!r}). "
                    "Use one plugin per model: call .remove() on the first (EAFOCallback / EAFOTrainerCallback: "
                    "use one callback) before building another."
                )


def _caller() -> str:
    """``file:line`` of the user code that built the plugin (the first frame outside dynact)."""
    frame = sys._getframe(1)
    while frame is not None and ("/dynact/" in frame.f_code.co_filename or "\\dynact\\" in frame.f_code.co_filename):
        frame = frame.f_back
    return "<unknown>" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _unique_activations(model: nn.Module, every_name: bool = False) -> list:
    """The activation modules of ``model`` (:func:`find_activations`), each once under its first
    name; with ``every_name``, ``(name, module, all its names)``. :class:`~dynact.sites.CallSites`
    dispatchers are not activations themselves: their call sites are."""
    firsts: dict[int, tuple[str, nn.Module, list[str]]] = {}
    kinds = tuple(activation_types())
    for name, module in find_activations(model):
        if isinstance(module, kinds):
            firsts.setdefault(id(module), (name, module, []))[2].append(name)
    if every_name:
        return list(firsts.values())
    return [(name, module) for name, module, _ in firsts.values()]


def _present(model: nn.Module) -> str:
    """The activation classes in ``model`` with their counts and the name that converts each."""
    counts: dict[type, int] = {}
    for _, module in _unique_activations(model):
        counts[type(module)] = counts.get(type(module), 0) + 1
    return ", ".join(f"{n} x {cls.__name__} (convert={family_of(cls)!r})" for cls, n in counts.items()) or "none"


def _fit_range(q_lo: float, q_hi: float, neg_min: float, max_: float) -> tuple[float, float]:
    """The quantiles ``[q_lo, q_hi]`` bounded by the extremes seen, ``[-neg_min, max_]``: what a
    grid is fitted around."""
    fit_lo = min(max(q_lo, -neg_min), max_)
    return fit_lo, max(min(q_hi, max_), fit_lo)


def around(q_lo: float, q_hi: float) -> tuple[float, float]:
    """A grid around the central mass ``[q_lo, q_hi]`` with a margin on each side."""
    pad = max(_GRID_MARGIN * (q_hi - q_lo), _MIN_HALF_WIDTH * max(1.0, abs(q_lo), abs(q_hi)))
    return q_lo - pad, q_hi + pad


def _covering(density: Density, ends: Optional[torch.Tensor]) -> tuple[float, float]:
    """A grid covering ``density``'s grid and the extremes ``[-min, max]`` seen (5% margin);
    without extremes, three times as wide."""
    lo, hi = density.lo, density.hi
    if ends is None:
        return lo - (hi - lo), hi + (hi - lo)
    return _cover(lo, hi, float(ends[0]), float(ends[1]))


def _cover(lo: float, hi: float, neg_min: float, max_: float) -> tuple[float, float]:
    """:func:`_covering` of the grid ``[lo, hi]`` and the extremes ``[-neg_min, max_]``."""
    lo, hi = min(lo, -neg_min), max(hi, max_)
    return lo - _SPILL_MARGIN * (hi - lo), hi + _SPILL_MARGIN * (hi - lo)


def _reduce_windows(layers: list[_Layer]) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
    """Every layer's estimator counts summed across processes and its ``[-min, max]`` maxed,
    in one ``all_reduce`` (:func:`dynact.density.sum_states`). Returns the summed states and the
    extremes (CPU; None for layers without a finite value on any process)."""
    if not layers:
        return [], []
    ends = torch.stack([
        torch.full((2,), -math.inf) if layer.extrema is None else layer.extrema.detach().float().cpu()
        for layer in layers
    ])
    states, extremes = sum_states([layer.estimator for layer in layers], ends)
    return states, [row if bool(torch.isfinite(row).all()) else None for row in extremes]


def _split_batch(layers: list[_Layer]) -> tuple[list[_Layer], list[_Layer]]:
    """The layers whose estimators share the first one's kind, size and bandwidths (updated
    together), and the others (updated one at a time)."""
    if not layers:
        return [], []

    def config(layer: _Layer) -> tuple:
        est = layer._estimator
        return type(est), est.bins, getattr(est, "bandwidth", None), est.dp_bandwidth, est.process_group

    first = config(layers[0])
    if first[4] is not None:  # a custom process group: the one-layer path reduces over it
        return [], list(layers)
    batch = [layer for layer in layers if config(layer) == first]
    return batch, [layer for layer in layers if config(layer) != first]


def _update_device(bank: Optional[SampleBank], layers: list[_Layer]) -> torch.device:
    """Where a batched update runs: where the layers' samples are (the first device with any),
    else where the first estimator's counts are."""
    if bank is not None:
        for layer in layers:
            if layer.slot is not None and bank.device_of[layer.slot] is not None:
                return bank.device_of[layer.slot]
    return layers[0]._estimator.device
