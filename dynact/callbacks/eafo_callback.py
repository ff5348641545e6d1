"""EAFOCallback: the Lightning front door of :class:`dynact.ActivationOptimizer`.

It builds the optimizer when ``fit`` starts (before Lightning builds the weight optimizer, so
converted activations' ``eps`` are trained), calls its ``step`` once per optimizer step, and
writes what it returns through every Lightning logger (histograms and figures through
TensorBoard's). The work itself (hooks, sampling, estimation, updates) is in
:mod:`dynact.core`.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from dynact import eafo
from dynact.callbacks._logging import _curve_figure, _log_histogram, _log_scalars, _tensorboard_writers
from dynact.conversion import convert_like_state_dict
from dynact.core import ActivationOptimizer, around, tag
from dynact.options import validate_options
from dynact.spline import EAFOActivation

__all__ = ["EAFOCallback"]

# Quantiles bounding the data in the activation-curve figures.
_Q_LO, _Q_HI = 1e-3, 1.0 - 1e-3


class EAFOCallback(Callback):
    r"""Measure every activation's input density during training, log its entropy, and apply
    EAFO updates to dynamic activations.

    The Lightning front door of :class:`dynact.ActivationOptimizer`, which does the work: this
    class builds it when ``fit`` starts, calls it once per optimizer step and logs what it
    returns. At the start of ``fit`` the callback converts the model's activation modules of the ``convert`` types
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
    ``skipped/<layer>``                 running count of the layer's skipped updates
    ``preact/<layer>``                  TensorBoard histogram of the input
    ``curve/<layer>``                   TensorBoard figure: activation over its input density
    ==================================  ==========================================================

    The latest update's scalars are also in :attr:`metrics` (a dict keyed by the same tags).

    Scalars go to every Lightning logger with the trainer's ``global_step``; histograms and
    figures only to ``TensorBoardLogger`` (none is needed: ``CSVLogger`` and ``logger=False``
    work).

    Skips: a layer whose update cannot be made sensibly is skipped for that update: its
    window held NaN/Inf values (``nonfinite/<layer>`` counts them), its input was constant
    (spanning less than ``3e-4 * max(1, |x|)``), its own parameters (``eps``) are not finite,
    its grid cannot be stored in the activation's dtype (float16 beyond 65504, bfloat16's
    coarse steps), the updated activation would overflow the input's dtype for a finite input,
    or the update's numerics raised. Nothing of that layer changes (its
    activation is restored if the update got half-way), one warning per layer and reason names
    it, ``skipped/<layer>`` logs the running count and :attr:`skips` holds the counts by
    reason; training and every other layer proceed.

    Conversion happens in ``fit`` only (``validate``, ``test`` and ``predict`` neither change
    nor measure the model) and keeps each module as the new activation's base, settings and
    parameters included (:func:`dynact.conversion.to_eafo`); an in-place module
    (``inplace=True``) is switched to out of place. Such a model's checkpoint loads back into a
    fresh model with ``dynact.conversion.convert_like_state_dict`` (``ImageClassifier`` does it
    by itself), and a checkpoint saved without conversion resumes with it (the corrections
    start afresh, the optimizer state is matched).

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

    Spawned processes (``strategy="ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``): training
    runs in child processes and Lightning sends rank 0's weights back to the model in the calling
    process, which still has its plain activations. The callback converts that model's layers
    like rank 0's before the weights are loaded, so after ``fit`` the model in the calling
    process holds the trained activations (``eps``, ``s`` and the grid), as with ``"ddp"``.

    Args:
        every_n_steps: optimizer steps between updates.
        estimator: ``"kde"`` (binned Gaussian KDE) or ``"hist"`` (histogram).
        mode: ``"refresh"`` (``s`` = the EAFO correction of the base under the measured
            density), ``"iterate"`` (constrained descent steps on the scale-free entropy,
            size ``eta``) or ``"monitor"`` (measure and log only, never change the model).
        eta: step size of ``"iterate"`` (ignored by the other modes).
        bins: bins of each estimator's grid.
        sample_size: values sampled per layer per forward pass.
        window: optimizer steps before each update during which the hooks sample
            (``1 <= window <= every_n_steps``); default ``min(every_n_steps, 20)``.
        convert: activation module types (or registry names) to replace by
            an ``EAFOActivation`` with the module itself as base, when fit starts; ``()`` leaves the
            model as it is.
        log_histograms: write TensorBoard histograms of the pre-activations at each update.
        curves_every: write the activation-curve figures at the first update and every this
            many updates after it (a figure costs ~0.1 s); ``0`` turns them off.
        init_range: ``(lo, hi)`` of the estimators' first grid.
        max_outside: mass beyond a grid that triggers re-fitting it.
        collect_eval: also sample forward passes made in evaluation mode (e.g. validation)
            while a window is open.
        seed: seed of the callback's own sampling generator (offset by the process rank).
        sites: ``"call"`` (default): a module called at k places per forward is k activations
            (:func:`dynact.sites.split_call_sites`); ``"module"``: one activation per module.

    Valid ranges: ``8 <= bins <= 65536``, ``1 <= sample_size <= 2**20``,
    ``0 <= seed <= 2**62``, ``init_range`` within ``[-1e100, 1e100]``.

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
        sites: Literal["call", "module"] = "call",
    ) -> None:
        super().__init__()
        # Checked here, so a bad value fails when the callback is built, not when fit starts.
        self.options = validate_options(
            every_n_steps=every_n_steps, estimator=estimator, mode=mode, eta=eta, bins=bins,
            sample_size=sample_size, window=window, convert=convert, init_range=init_range,
            max_outside=max_outside, collect_eval=collect_eval, seed=seed, sites=sites,
        )
        for key, value in self.options.items():
            setattr(self, key, value)
        if isinstance(curves_every, bool) or not isinstance(curves_every, int) or curves_every < 0:
            raise ValueError(f"curves_every must be an int >= 0 (0: no figures), got curves_every={curves_every!r}")
        self.log_histograms = bool(log_histograms)
        self.curves_every = curves_every
        #: The framework-free optimizer doing the work (built when fit starts).
        self.core: Optional[ActivationOptimizer] = None
        #: The scalars of the latest update, keyed by tag (``"dead/net.0"``); empty before it.
        self.metrics: dict[str, float] = {}
        self._pending = False
        self._restored: Optional[dict[str, Any]] = None
        # Parameters that conversion added and a resumed checkpoint does not know (see
        # on_load_checkpoint), and that checkpoint, whose optimizer states must be matched.
        self._new_params: list[nn.Parameter] = []
        self._resumed: Optional[dict[str, Any]] = None
        self._no_figure: set[str] = set()
        _return_activations_from_spawned_processes()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, mode=self.mode, estimator=self.estimator)

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the hooked activation modules (known once fit has started)."""
        return [] if self.core is None else self.core.layer_names

    @property
    def skips(self) -> dict[str, dict[str, int]]:
        """Skipped updates per layer, by reason (``{"net.1": {"nonfinite": 2}}``)."""
        return {} if self.core is None else self.core.skips

    def _converted_layers(self) -> list[tuple[str, EAFOActivation]]:
        return [(n, m) for n, m in (self.core.layers.items() if self.core else ()) if isinstance(m, EAFOActivation)]

    # ------------------------------------------------------------------ set-up and tear-down
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # Only fit converts and hooks: validate/test/predict never change the model. Hooks go
        # on here, before the strategy wraps or compiles the model (hooks added to an already
        # compiled model never fire).
        if stage != "fit":
            return
        if self.core is None or self.core.model is not pl_module:  # a new model starts afresh
            if self.core is not None:
                self.core.remove()
            self.core = ActivationOptimizer(pl_module, **self.options, rank=trainer.global_rank)
            if self.core.converted:
                rank_zero_info(
                    f"EAFOCallback: converted {len(self.core.converted)} activation module(s) to "
                    f"EAFOActivation with their type as base: {', '.join(self.core.converted)}"
                )
        else:
            self.core.attach()
        if self._restored is not None:
            self.core.load_state_dict(self._restored)
            self._restored = None

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.core is not None:
            self.core.set_step(trainer.global_step)  # after a resume the trainer's count rules

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self.core is not None:
            self.core.remove()
        self._pending = False

    # ------------------------------------------------------------------ schedule
    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        # Fires once per optimizer step (never per micro-batch under gradient accumulation).
        self._pending = True

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending or self.core is None:
            return
        # After optimizer.step(), so a change never lands inside a half-made step.
        self._pending = False
        updated = self.core.step(trainer.global_step)
        if not updated:
            return
        self.metrics = updated
        trainer.callback_metrics.update(
            {name: torch.tensor(value) for name, value in updated.items()}
        )
        step = trainer.global_step
        _log_scalars(trainer, updated, step)
        self._log_tensorboard(trainer, step)

    def _log_tensorboard(self, trainer: "pl.Trainer", step: int) -> None:
        writers = _tensorboard_writers(trainer)
        if not writers or not self.core.densities:
            return
        curves = self.curves_every > 0 and (self.core.num_updates - 1) % self.curves_every == 0
        layers = self.core.layers
        for name, density in self.core.densities.items():
            module, figure = layers[name], None
            if curves:
                # Zoom on the data: the correction is small next to the base's full range.
                x = torch.linspace(*around(density.quantile(_Q_LO), density.quantile(_Q_HI)), 400, dtype=torch.float64)
                try:
                    y = eafo.derivatives(module, x)[0]
                    base = eafo.derivatives(module.base, x)[0] if isinstance(module, EAFOActivation) else None
                    figure = _curve_figure(f"{name} (step {step})", x, y, density, base)
                except (ArithmeticError, ValueError, RuntimeError, TypeError) as err:
                    if name not in self._no_figure:  # once per layer
                        self._no_figure.add(name)
                        rank_zero_warn(f"EAFOCallback: no curve figure for layer {name!r} at step {step}: {err}")
            for writer in writers:
                if self.log_histograms:
                    _log_histogram(writer, tag("preact", name), density, step)
                if figure is not None:
                    writer.add_figure(tag("curve", name), figure, global_step=step, close=False)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self.core is None else self.core.state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint saved before conversion: the converted layers loaded its base weights (see
        # dynact.conversion.to_eafo) and keep their initial corrections, but their eps
        # parameters are new to its optimizer states. Match those in on_fit_start, once the
        # optimizers exist and before Lightning restores them.
        if trainer.state.fn != TrainerFn.FITTING:
            return
        saved = checkpoint.get("state_dict", {})
        fresh = [(name, act) for name, act in self._converted_layers() if f"{name}.s" not in saved]
        if not fresh:
            return
        rank_zero_info(
            f"EAFOCallback: the checkpoint was saved before its activations were converted; "
            f"{len(fresh)} converted layer(s) took its weights and start with a fresh correction: "
            f"{', '.join(name for name, _ in fresh)}"
        )
        self._new_params = [act.eps for _, act in fresh if isinstance(act.eps, nn.Parameter)]
        if self._new_params and checkpoint.get("optimizer_states"):
            self._resumed = checkpoint

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._resumed is None:
            return
        states = self._resumed["optimizer_states"]
        for i, (optimizer, saved) in enumerate(zip(trainer.optimizers, states, strict=False)):
            states[i] = _insert_new_params(optimizer, saved, self._new_params)
        self._resumed, self._new_params = None, []

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after setup; before it (a manual call), keep the state
        # until setup has built the optimizer.
        if not state_dict:
            return
        if self.core is None:
            self._restored = state_dict
        else:
            self.core.load_state_dict(state_dict)


def _insert_new_params(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], new: list[nn.Parameter]
) -> dict[str, Any]:
    """An optimizer state saved without the parameters ``new``, re-indexed for ``optimizer``,
    which has them (with no state, as fresh parameters have). Left as it is when its groups do
    not match ``optimizer``'s without ``new`` (then the optimizer's own error says so)."""
    new_ids = {id(p) for p in new}
    groups = optimizer.param_groups
    if len(groups) != len(saved.get("param_groups", [])):
        return saved
    state: dict[int, Any] = {}
    out_groups = []
    index = 0
    for group, saved_group in zip(groups, saved["param_groups"], strict=False):
        if sum(id(p) not in new_ids for p in group["params"]) != len(saved_group["params"]):
            return saved
        old = iter(saved_group["params"])
        params = []
        for p in group["params"]:
            if id(p) not in new_ids:
                key = next(old)
                if key in saved["state"]:
                    state[index] = saved["state"][key]
            params.append(index)
            index += 1
        out_groups.append({**saved_group, "params": params})
    return {**saved, "state": state, "param_groups": out_groups}


# ----------------------------------------------------------------------------- spawned processes
def _return_activations_from_spawned_processes() -> None:
    """Make Lightning's spawning launcher bring converted activations back to the calling process.

    The launcher (``_MultiProcessingLauncher``) saves rank 0's ``state_dict`` and, in the
    calling process, loads it into the original model with ``strict=False``: the keys of
    converted layers (``<layer>.s``, ``.eps``, ...) find plain activations there and are dropped
    without a word. No callback hook runs in the calling process, so this wraps the launcher's
    step that recovers the results (once per process): when the trainer has an
    :class:`EAFOCallback`, the model's layers are converted like the saved state first
    (:func:`dynact.conversion.convert_like_state_dict`), and the launcher's own loading then
    fills them in.
    """
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    original = getattr(_MultiProcessingLauncher, "_recover_results_in_main_process", None)
    if original is None or getattr(original, "_dynact", False):
        return

    def recover(self, worker_output, trainer):
        path = getattr(worker_output, "weights_path", None)
        if path is not None and any(isinstance(cb, EAFOCallback) for cb in trainer.callbacks):
            convert_like_state_dict(trainer.lightning_module, self._strategy.checkpoint_io.load_checkpoint(path))
        return original(self, worker_output, trainer)

    recover._dynact = True
    recover.__doc__ = original.__doc__
    _MultiProcessingLauncher._recover_results_in_main_process = recover
