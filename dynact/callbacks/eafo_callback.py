"""EAFOCallback: measure each activation's input while training, log its entropy, and apply
EAFO updates to the dynamic activations (:class:`~dynact.EAFOActivation`).

Data flow (see ``shared/design/architecture.md``)::

    forward pre-hook -> random subsample (float32) -> streaming estimator (per layer)
    every N optimizer steps: estimators summed across ranks -> Density
        -> EAFOActivation.update (dynamic layers) -> dynact.eafo.output_stats -> loggers

The math lives in :mod:`dynact.eafo`, :mod:`dynact.density` and :mod:`dynact.spline`; this
module only schedules it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Literal, Optional, Union

import torch
import torch.distributed as dist
import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from dynact import activations, eafo
from dynact.activations import activation_types, find_activations
from dynact.callbacks._logging import (
    _curve_figure,
    _layer_tag,
    _log_histogram,
    _log_scalars,
    _tag,
    _tensorboard_writers,
)
from dynact.density import KDE, Density, Histogram, _single_thread, check_grid
from dynact.spline import EAFOActivation

__all__ = ["EAFOCallback"]

_ESTIMATORS = {"kde": KDE, "hist": Histogram}
_MODES = ("refresh", "iterate", "monitor")
#: Figures of :func:`dynact.eafo.output_stats` logged per layer at each update.
_LOGGED_STATS = ("entropy_in", "dead", "entropy", "entropy_scale_free", "log_slope", "std")
# Quantiles that bound "the data" when a grid is fitted; the grid adds a margin around them.
_Q_LO, _Q_HI = 1e-3, 1.0 - 1e-3
# A grid is too coarse when the central 99.8% of the data covers fewer than 1/8 of its bins.
_MIN_FILL = 1.0 / 8.0


@dataclass
class _Layer:
    """One hooked activation module and what the callback keeps about it."""

    name: str
    tag: str
    module: nn.Module
    dynamic: bool
    estimator: Any
    handle: Optional[RemovableHandle] = None
    # [-min, max] of the finite values sampled this window, on the module's device; reduced
    # with MAX across ranks when the grid has to grow to the data.
    extrema: Optional[torch.Tensor] = None
    skipped: int = 0  # updates skipped because of non-finite inputs


class EAFOCallback(Callback):
    r"""Measure every activation's input density during training, log its entropy, and apply
    EAFO updates to dynamic activations.

    At ``setup`` the callback converts the model's activation modules of the ``convert`` types
    to :class:`~dynact.EAFOActivation` (with that type as its base) and hooks every activation
    module: instances of the classes in dynact's activation registry (ReLU, GELU, ELU, PReLU,
    CELU, SiLU, Mish, CRReLU) and :class:`~dynact.EAFOActivation`. Activations called as
    functions (``F.relu(x)``, ``torch.nn.functional.gelu``) cannot be hooked and are not seen:
    use modules.

    During the ``window`` optimizer steps before each update, a forward pre-hook takes
    ``sample_size`` random values of each layer's input (on the model's device, float32) and
    feeds them to the layer's streaming density estimator; no activation tensor is kept and
    the training RNG is not touched (the callback has its own generator). Hooks do nothing
    in evaluation mode unless ``collect_eval=True``.

    Every ``every_n_steps`` optimizer steps (counted once per step, so gradient accumulation
    and several dataloaders are handled), each layer's estimator is summed across processes
    and turned into a :class:`~dynact.density.Density`; every process then applies the same
    update, so dynamic activations stay identical on all ranks. Per layer it logs (tags group
    by metric, then layer):

    ==================================  ==========================================================
    ``entropy_in/<layer>``              differential entropy of the input (nats)
    ``dead/<layer>``                    output mass on an atom: where the activation is flat
    ``entropy/<layer>``                 mixed entropy of the output (atoms + continuous part;
                                        resolution-free, nats; ``docs/math.md``)
    ``entropy_scale_free/<layer>``      ``entropy - (1 - dead) log std``: unchanged by rescaling
                                        the output; read it beside ``dead``
    ``log_slope/<layer>``               ``E[log f'(X)]`` over the rising mass: the part of the
                                        entropy an EAFO step acts on
    ``std/<layer>``                     standard deviation of the output
    ``eps/<layer>``                     the correction's scale (CRReLU, EAFOActivation)
    ``outside/<layer>``                 mass beyond the grid (the spline's, for dynamic layers)
    ``update_size/<layer>``             largest change of the activation (dynamic layers)
    ``accepted/<layer>``                1 if the update was applied, else 0 (dynamic layers)
    ``nonfinite/<layer>``               NaN/Inf values sampled in the window
    ``preact/<layer>``                  TensorBoard histogram of the input
    ``curve/<layer>``                   TensorBoard figure: activation over its input density
    ==================================  ==========================================================

    The latest update's scalars are also in :attr:`metrics` (a dict keyed by the same tags).

    Scalars go to every Lightning logger with the trainer's ``global_step``; histograms and
    figures only to ``TensorBoardLogger`` (none is needed: ``CSVLogger`` and ``logger=False``
    work). A layer whose window held NaN/Inf values is not updated that time (a warning says
    so and ``nonfinite/<layer>`` counts them); everything else proceeds.

    Grids: each estimator starts on ``init_range`` with ``bins`` bins. When a window's data
    spill beyond it (more than ``max_outside`` of the mass) or fill less than 1/8 of it, the
    estimator's grid is re-fitted (the 0.1% and 99.9% quantiles plus a 25% margin, or the
    observed extremes when the data spilled) and that layer's update waits for the next
    window. A dynamic layer's spline grid is re-placed (:meth:`EAFOActivation.place_grid`)
    under the same two conditions, just before its update.

    Checkpoints: the callback's own state (estimators with their grids, counters, sampling
    generators) is in its ``state_dict``; the spline buffers are in the model's. Resuming
    gives the run it would have been. A checkpoint holds rank 0's state only: after a
    resume under DDP the window in progress keeps rank 0's partial counts, not the others'.
    Hooks are removed at ``teardown``.

    Args:
        every_n_steps: optimizer steps between updates.
        estimator: ``"kde"`` (binned Gaussian KDE) or ``"hist"`` (histogram).
        mode: ``"refresh"`` (``s`` = the EAFO correction of the base under the measured
            density), ``"iterate"`` (guarded EAFO steps of the current activation, size
            ``eta``) or ``"monitor"`` (measure and log only, never change the model).
        eta: step size of ``"iterate"`` (ignored by the other modes).
        bins: bins of each estimator's grid.
        sample_size: values sampled per layer per forward pass.
        window: optimizer steps before each update during which the hooks sample
            (``1 <= window <= every_n_steps``); default ``min(every_n_steps, 20)``.
        convert: activation module types (or registry names) to replace by
            ``EAFOActivation(base=<their name>)`` at setup; ``()`` leaves the model as it is.
        log_histograms: write TensorBoard histograms of the pre-activations at each update.
        curves_every: write the activation-curve figures at the first update and every this
            many updates after it (a figure costs ~0.1 s); ``0`` turns them off.
        init_range: ``(lo, hi)`` of the estimators' first grid.
        max_outside: mass beyond a grid that triggers re-fitting it.
        collect_eval: also sample forward passes made in evaluation mode (e.g. validation)
            while a window is open.
        seed: seed of the callback's own sampling generator (offset by the process rank).

    Raises:
        ValueError: an argument is out of range; the message names it and the accepted values.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> from dynact import EAFOCallback
        >>> trainer = Trainer(callbacks=[EAFOCallback(every_n_steps=100)],
        ...                   logger=TensorBoardLogger("runs"))  # doctest: +SKIP

    A static model (GELU, CRReLU) is only measured: ``EAFOCallback(mode="monitor", convert=())``.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        estimator: Literal["kde", "hist"] = "kde",
        mode: Literal["refresh", "iterate", "monitor"] = "refresh",
        eta: float = 0.05,
        bins: int = 256,
        sample_size: int = 4096,
        window: Optional[int] = None,
        convert: Iterable[Union[type, str]] = (nn.ReLU,),
        log_histograms: bool = True,
        curves_every: int = 10,
        init_range: tuple[float, float] = (-8.0, 8.0),
        max_outside: float = 0.01,
        collect_eval: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.every_n_steps = _positive_int("every_n_steps", every_n_steps)
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {tuple(_ESTIMATORS)}, got estimator={estimator!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got mode={mode!r}")
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a finite number > 0 (the iterate step size), got eta={eta!r}")
        try:
            lo, hi, bins = check_grid(*tuple(init_range), bins)
        except (TypeError, ValueError) as err:
            raise ValueError(f"init_range and bins: {err} (got init_range={init_range!r}, bins={bins!r})") from None
        self.sample_size = _positive_int("sample_size", sample_size)
        window = min(self.every_n_steps, 20) if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= self.every_n_steps:
            raise ValueError(
                f"window must be an int in [1, every_n_steps={self.every_n_steps}] (or None for "
                f"min(every_n_steps, 20)), got window={window!r}"
            )
        if isinstance(curves_every, bool) or not isinstance(curves_every, int) or curves_every < 0:
            raise ValueError(f"curves_every must be an int >= 0 (0: no figures), got curves_every={curves_every!r}")
        if not (isinstance(max_outside, (int, float)) and 0 < max_outside < 1):
            raise ValueError(f"max_outside must be a fraction in (0, 1), got max_outside={max_outside!r}")
        self.estimator = estimator
        self.mode = mode
        self.eta = float(eta)
        self.bins = bins
        self.init_range = (lo, hi)
        self.window = window
        self.convert = _convert_types(convert)
        self.log_histograms = bool(log_histograms)
        self.curves_every = curves_every
        self.max_outside = float(max_outside)
        self.collect_eval = bool(collect_eval)
        self.seed = int(seed)

        self._layers: dict[str, _Layer] = {}
        self._model: Optional[nn.Module] = None
        self._collecting = False
        self._pending = False
        self._num_updates = 0
        self._rank = 0
        self._generators: dict[str, torch.Generator] = {}
        self._restored: Optional[dict[str, Any]] = None
        #: The scalars of the latest update, keyed by tag (``"dead/net.0"``); empty before it.
        self.metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, mode=self.mode, estimator=self.estimator)

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the hooked activation modules (known after ``setup``)."""
        return list(self._layers)

    # ------------------------------------------------------------------ set-up and tear-down
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._rank = trainer.global_rank
        if self._model is not pl_module:  # a new model starts from scratch
            self._model = pl_module
            self._layers = {}
            self._generators = {}
            self._num_updates = 0
            self._convert(pl_module)
            for name, module in find_activations(pl_module):
                dynamic = isinstance(module, EAFOActivation) and self.mode != "monitor"
                self._layers[name] = _Layer(name, _layer_tag(name), module, dynamic, self._new_estimator(*self.init_range))
            if not self._layers:
                rank_zero_warn(
                    "EAFOCallback found no activation modules to measure; it hooks modules of the "
                    f"activation registry ({', '.join(activations.activation_names())}), not functions "
                    "such as F.relu. Use nn.ReLU() etc. in the model."
                )
            elif self.mode != "monitor" and not any(layer.dynamic for layer in self._layers.values()):
                rank_zero_warn(
                    f"EAFOCallback: none of the {len(self._layers)} activation modules is an "
                    "EAFOActivation, so it only measures and logs. To enable updates, convert "
                    "some, e.g. EAFOCallback(convert=(torch.nn.GELU,)), or build the model with "
                    "act='eafo'."
                )
        # Hooks go on in setup, before the strategy wraps or compiles the model: hooks added
        # to an already compiled model never fire. They stay cheap when idle (one flag check).
        for layer in self._layers.values():
            if layer.handle is None:
                layer.handle = layer.module.register_forward_pre_hook(partial(self._collect, layer))
        if self._restored is not None:
            self._apply_state(self._restored)

    def _convert(self, pl_module: nn.Module) -> None:
        converted: list[str] = []
        # Outermost activations only: an EAFOActivation's own base is never converted.
        for name, module in find_activations(pl_module):
            kind = next((k for k in self.convert if isinstance(module, k)), None)
            if kind is None:
                continue
            base = activation_types()[kind]
            pl_module.set_submodule(name, EAFOActivation(base=base).to(pl_module.device))
            converted.append(f"{name} ({base})")
        if converted:
            rank_zero_info(
                f"EAFOCallback: converted {len(converted)} activation module(s) to EAFOActivation "
                f"with their type as base: {', '.join(converted)}"
            )

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        for layer in self._layers.values():
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
        self._collecting = False
        self._pending = False

    # ------------------------------------------------------------------ collection
    def _in_window(self, step: int) -> bool:
        # Updates happen after optimizer steps k*N; samples come from steps [k*N - window, k*N).
        return step % self.every_n_steps >= self.every_n_steps - self.window

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        self._collecting = self._in_window(trainer.global_step)

    @override
    def on_validation_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._collecting = self.collect_eval and trainer.state.fn == TrainerFn.FITTING and self._in_window(trainer.global_step)

    @override
    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collecting = False

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + 7919 * self._rank)
            self._generators[key] = gen
        return gen

    def _collect(self, layer: _Layer, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: feed ``sample_size`` random input values to the layer's estimator."""
        if not self._collecting or not (module.training or self.collect_eval):
            return
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        # Work on a few thousand values: extra intra-op threads only add wake-up latency (ms
        # per op on a busy host), so on CPU it runs on one.
        with torch.no_grad(), _single_thread(x.device):
            x = x.detach()
            idx = torch.randint(x.numel(), (self.sample_size,), device=x.device, generator=self._generator(x.device))
            # Index without flattening: a non-contiguous input would be copied whole.
            sample = (x.reshape(-1)[idx] if x.is_contiguous() else x[torch.unravel_index(idx, x.shape)]).float()
            layer.estimator.update(sample)
            # Track the extremes of the finite values (for growing the grid) without a host sync.
            ends = torch.stack([-sample, sample]).nan_to_num_(nan=-math.inf, posinf=-math.inf).amax(dim=1)
            prev = layer.extrema
            layer.extrema = ends if prev is None else torch.maximum(prev.to(ends.device), ends)

    # ------------------------------------------------------------------ schedule
    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer) -> None:
        # Fires once per optimizer step (never per micro-batch under gradient accumulation);
        # global_step counts completed steps, so this step will be number global_step + 1.
        if (trainer.global_step + 1) % self.every_n_steps == 0:
            self._pending = True

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._collecting = False
        if self._pending:
            # Applied after optimizer.step(), so a change never lands inside a half-made step.
            self._pending = False
            self._update(trainer)

    # ------------------------------------------------------------------ update
    def _update(self, trainer: "pl.Trainer") -> None:
        with _single_thread(torch.device("cpu")):  # O(bins) grid work, as in _collect
            self._update_all(trainer)

    def _update_all(self, trainer: "pl.Trainer") -> None:
        step = trainer.global_step
        self._num_updates += 1
        layers = list(self._layers.values())
        # Collectives first, in the same order on every rank. Layers for which no process saw
        # a finite value (no extremes) have no density to compute.
        extrema = _all_reduce_max([layer.extrema for layer in layers])
        sync = _distributed()
        densities = [None if ends is None else layer.estimator.compute(sync=sync) for layer, ends in zip(layers, extrema)]
        metrics: dict[str, float] = {}
        measured: list[tuple[_Layer, Density]] = []
        for layer, density, ends in zip(layers, densities, extrema):
            used = self._update_layer(layer, density, ends, step, metrics)
            if used is not None:
                measured.append((layer, used))
            layer.extrema = None
        self.metrics = metrics
        _log_scalars(trainer, metrics, step)
        self._log_tensorboard(trainer, measured, step)

    def _update_layer(
        self, layer: _Layer, density: Optional[Density], ends: Optional[torch.Tensor], step: int,
        metrics: dict[str, float],
    ) -> Optional[Density]:
        """Update one layer from its summed density, add its figures to ``metrics`` and start its
        next window; returns the density its figures describe (None if it was not measured)."""
        # compute() summed the counters over all processes, so every rank decides alike.
        nonfinite = layer.estimator.nonfinite if density is None else density.nonfinite
        metrics[_tag("nonfinite", layer.tag)] = float(nonfinite)
        if nonfinite > 0:
            layer.skipped += 1
            if layer.skipped == 1:  # once per layer: a week-long run must not flood the log
                rank_zero_warn(
                    f"EAFOCallback: layer {layer.name!r} saw {nonfinite} NaN/Inf pre-activation "
                    f"value(s) in the window before step {step}; it is not updated then. Training "
                    f"continues; later occurrences are only counted in nonfinite/{layer.tag}."
                )
            layer.estimator.reset()
            return None
        if density is None:  # the layer did not run during the window
            return None
        # What follows is O(bins) work on a small grid: the host beats kernel launches.
        density = density.to("cpu")
        if density.outside > self.max_outside:
            # The data reach beyond the grid: re-measure on a grid that covers them first.
            metrics[_tag("outside", layer.tag)] = density.outside
            layer.estimator = self._new_estimator(*_covering(density, ends))
            return None
        q_lo, q_hi = density.quantile(_Q_LO), density.quantile(_Q_HI)
        coarse = q_hi - q_lo < _MIN_FILL * (density.hi - density.lo)
        record = self._apply(layer.module, density, q_hi - q_lo) if layer.dynamic and not coarse else None
        metrics.update(self._layer_metrics(layer, density, record))
        if coarse:  # too few bins on the data: re-measure on a grid fitted to them
            layer.estimator = self._new_estimator(*_around(q_lo, q_hi))
        else:
            layer.estimator.reset()
        return density

    def _apply(self, act: EAFOActivation, density: Density, spread: float) -> dict:
        """Re-place the spline's grid if the data left or hardly fill it, then update it."""
        if act.outside_mass(density) > self.max_outside or spread < _MIN_FILL * (float(act.hi) - float(act.lo)):
            act.place_grid(density)
        return act.update(density, mode=self.mode, eta=self.eta)

    def _layer_metrics(self, layer: _Layer, density: Density, record: Optional[dict]) -> dict[str, float]:
        stats = eafo.output_stats(layer.module, density)
        out = {_tag(name, layer.tag): stats[name] for name in _LOGGED_STATS}
        out[_tag("outside", layer.tag)] = (
            layer.module.outside_mass(density) if isinstance(layer.module, EAFOActivation) else density.outside
        )
        eps = getattr(layer.module, "eps", None)
        if isinstance(eps, torch.Tensor) and eps.numel() == 1:
            out[_tag("eps", layer.tag)] = float(eps.detach())
        if record is not None:
            out[_tag("update_size", layer.tag)] = float(record["change"])
            out[_tag("accepted", layer.tag)] = float(bool(record["accepted"]))
        return out

    def _log_tensorboard(self, trainer: "pl.Trainer", measured: list[tuple[_Layer, Density]], step: int) -> None:
        writers = _tensorboard_writers(trainer)
        if not writers or not measured:
            return
        curves = self.curves_every > 0 and (self._num_updates - 1) % self.curves_every == 0
        for layer, density in measured:
            figure = None
            if curves:
                # Zoom on the data: the correction is small next to the base's full range.
                x = torch.linspace(*_around(density.quantile(_Q_LO), density.quantile(_Q_HI)), 400, dtype=torch.float64)
                y = eafo.derivatives(layer.module, x)[0]
                base = eafo.derivatives(layer.module.base, x)[0] if isinstance(layer.module, EAFOActivation) else None
                figure = _curve_figure(f"{layer.name} (step {step})", x, y, density, base)
            for writer in writers:
                if self.log_histograms:
                    _log_histogram(writer, _tag("preact", layer.tag), density, step)
                if figure is not None:
                    writer.add_figure(_tag("curve", layer.tag), figure, global_step=step, close=False)

    # ------------------------------------------------------------------ estimators
    def _new_estimator(self, lo: float, hi: float) -> Any:
        return _ESTIMATORS[self.estimator](lo, hi, self.bins)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_updates": self._num_updates,
            "generators": {key: gen.get_state() for key, gen in self._generators.items()},
            "layers": {
                name: {
                    "range": (layer.estimator.lo, layer.estimator.hi),
                    "estimator": layer.estimator.state_dict(),
                    "extrema": None if layer.extrema is None else layer.extrema.detach().cpu(),
                    "skipped": layer.skipped,
                }
                for name, layer in self._layers.items()
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after setup; before it (a manual call), keep the state
        # until setup has found the layers.
        self._restored = state_dict
        if self._layers:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        self._restored = None
        self._num_updates = int(state["num_updates"])
        saved = state["layers"]
        unknown = sorted(set(saved) - set(self._layers))
        if unknown:
            rank_zero_warn(f"EAFOCallback: the checkpoint has state for layers this model lacks: {unknown}")
        # A checkpoint holds rank 0's state. Every rank restores the grids; only rank 0 keeps
        # its partial window counts, so the sum across ranks never counts them twice (other
        # ranks' partial counts of that window are dropped), and other ranks keep their own
        # generators.
        own = self._rank == 0
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
            layer.skipped = int(layer_state.get("skipped", 0))
            if own:
                layer.estimator.load_state_dict(layer_state["estimator"])
                layer.extrema = layer_state["extrema"]


# ---------------------------------------------------------------------- helpers
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return value


def _convert_types(convert: Iterable[Union[type, str]]) -> tuple[type, ...]:
    if isinstance(convert, (str, type)):
        convert = (convert,)
    registry = activation_types()
    types: list[type] = []
    for item in convert:
        kind = activations.resolve_activation(item) if isinstance(item, str) else item
        if not (isinstance(kind, type) and kind in registry) or issubclass(kind, EAFOActivation):
            raise ValueError(
                f"convert must hold activation module types of the registry (or their names): "
                f"{', '.join(f'{n} ({t.__module__}.{t.__name__})' for t, n in registry.items())}; "
                f"got {item!r}. Use convert=() to leave the model's activations as they are."
            )
        types.append(kind)
    return tuple(types)


def _around(q_lo: float, q_hi: float) -> tuple[float, float]:
    """A grid around the central mass ``[q_lo, q_hi]`` with a 25% margin on each side."""
    pad = max(0.25 * (q_hi - q_lo), 1e-3 * max(1.0, abs(q_lo), abs(q_hi)))  # a constant input too
    return q_lo - pad, q_hi + pad


def _covering(density: Density, ends: Optional[torch.Tensor]) -> tuple[float, float]:
    """A grid covering ``density``'s grid and the extremes ``[-min, max]`` seen (5% margin);
    without extremes, three times as wide."""
    lo, hi = density.lo, density.hi
    if ends is None:
        return lo - (hi - lo), hi + (hi - lo)
    lo, hi = min(lo, -float(ends[0])), max(hi, float(ends[1]))
    return lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_max(values: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    """Element-wise MAX of each layer's ``[-min, max]`` across processes, in one collective;
    ``None`` for layers without a finite value on any process."""
    if not values:
        return []
    distributed = _distributed()
    nccl = distributed and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    empty = torch.full((2,), -math.inf, dtype=torch.float32, device=device)
    stacked = torch.stack([empty if v is None else v.to(device=device, dtype=torch.float32) for v in values])
    if distributed:
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return [row.cpu() if bool(torch.isfinite(row).all()) else None for row in stacked]
