"""EAFOTrainerCallback: dynact's activation optimiser inside Hugging Face's ``Trainer`` and TRL.

A thin adapter over :class:`dynact.ActivationOptimizer` (the framework-free core): the core
converts, hooks, samples, estimates and updates; this module only tells it when, and carries
its numbers and its state through the ``Trainer``'s logs and checkpoints.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dynact.activations import register_transformers_activations
from dynact.core import ActivationOptimizer
from dynact.integrations._pretrained import from_pretrained, write_record

__all__ = ["EAFOTrainerCallback", "STATE_FILE", "from_pretrained"]

#: File the callback writes into each ``checkpoint-<step>`` folder of the ``Trainer``.
STATE_FILE = "dynact_activation_optimizer.pt"


class EAFOTrainerCallback(TrainerCallback):
    r"""Measure every activation's input while a Hugging Face ``Trainer`` trains, log the
    per-layer entropy figures, and apply EAFO updates to dynamic activations.

    Works with ``transformers.Trainer`` and every trainer that subclasses it (TRL's
    ``SFTTrainer``, ``DPOTrainer``, ``RewardTrainer``, ...). transformers' own activation
    classes (GPT-2's ``NewGELUActivation`` and the other GELU variants, Llama's, Mistral's and
    Qwen's ``SiLUActivation`` as ``"silu_hf"``) are in dynact's registry, so they are measured
    and can be converted.

    What happens when:

    - construction with ``model`` (recommended), or ``on_init_end`` (the end of the
      ``Trainer``'s ``__init__``) otherwise: builds ``ActivationOptimizer(model, **options)``,
      which converts the activation types in ``convert`` to :class:`~dynact.EAFOActivation`.
      Both come before the ``Trainer`` builds its optimizer (in ``train()``), so the new
      ``eps`` parameters are trained. With ``optimizers=(opt, sched)`` given to the
      ``Trainer``, build the callback with the model *before* building ``opt``.
    - ``on_step_end`` (once per optimizer step, after gradient accumulation): ``step()``.
    - ``on_log``: the numbers of updates made since the last log are added to the log
      (``"<metric>/<layer>"``: ``dead``, ``entropy``, ``entropy_scale_free``, ``log_slope``,
      ``std``, ``eps``, ``accepted``, ...), both to ``state.log_history`` and to the ``logs``
      the callbacks after this one receive. So that every logger gets them, at
      ``on_init_end`` and again at ``on_train_begin`` the callback moves itself, in the
      ``Trainer``'s callback list, before the first callback that reads logs (one that overrides
      ``on_log``: ``report_to``'s TensorBoard, W&B, MLflow, ... callbacks, which the ``Trainer``
      registers before the user's, the progress printer and the user's own loggers), so
      ``callbacks=[eafo]`` is all it takes.
    - ``on_init_end`` also makes the converted layers' ``eps`` trainable again if PEFT froze them
      (TRL's ``peft_config=`` wraps the model inside the ``Trainer``'s ``__init__``).
    - ``on_save``: the core's state (estimators, counters, generators, and a copy of the
      dynamic activations, which a PEFT adapter checkpoint leaves out) goes to
      ``checkpoint-<step>/`` :data:`STATE_FILE`; the spline buffers are in the model's
      weights. ``on_train_begin`` of a resumed run (``train(resume_from_checkpoint=...)``)
      loads it back from the checkpoint of the step the ``Trainer`` resumed at.
    - ``on_train_end``: the hooks are removed (a later ``train()`` puts them back).

    Args:
        model: the model the ``Trainer`` will train (``None``: taken at ``on_init_end``).
        **options: keywords of :class:`dynact.ActivationOptimizer` (``every_n_steps``,
            ``estimator``, ``mode`` = ``"refresh" | "iterate" | "monitor"``, ``eta``, ``bins``,
            ``sample_size``, ``window``, ``convert``, ``seed``, ...).

    Example::

        >>> from transformers import GPT2LMHeadModel
        >>> from trl import DPOTrainer
        >>> from dynact.integrations.transformers import EAFOTrainerCallback
        >>> model = GPT2LMHeadModel.from_pretrained("gpt2")                  # doctest: +SKIP
        >>> eafo = EAFOTrainerCallback(model, every_n_steps=100, convert=("gelu_new",))  # doctest: +SKIP
        >>> trainer = DPOTrainer(model=model, args=..., train_dataset=..., callbacks=[eafo])  # doctest: +SKIP

    A model that stays as it is, only measured: ``EAFOTrainerCallback(model, mode="monitor", convert=())``.
    """

    def __init__(self, model: Optional[nn.Module] = None, **options: Any) -> None:
        super().__init__()
        register_transformers_activations()
        self.options = dict(options)
        self.optimizer = None  # the ActivationOptimizer, once attached
        self._model: Optional[nn.Module] = None
        self._pending: dict[str, float] = {}
        self._removed = False
        self._warned_order = False
        if model is not None:
            self.attach(model)

    # ------------------------------------------------------------------ the core
    def attach(self, model: nn.Module) -> None:
        """Build the core on ``model`` (converting its activations); once per model."""
        if self.optimizer is not None:
            if self._model is model:
                return
            raise ValueError("EAFOTrainerCallback is attached to another model; use one callback per model")
        self.optimizer = ActivationOptimizer(model, **self.options)
        self._model = model

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the measured activation modules (empty before attaching)."""
        return list(self.optimizer.layer_names) if self.optimizer is not None else []

    def metrics(self) -> dict[str, float]:
        """The latest per-layer numbers (``"<metric>/<layer>"``); empty before the first update."""
        return dict(self.optimizer.metrics()) if self.optimizer is not None else {}

    def _move_before_loggers(self) -> None:
        """Stand before every callback that reads logs in the list of the ``CallbackHandler`` calling us.

        A callback is given no handle on the ``Trainer``, but the caller of its events is the
        ``CallbackHandler`` (``call_event``), whatever ``Trainer`` subclass built it. Moving an item
        to an earlier index keeps the later ones in place, so the event loop in progress calls each
        callback once.
        """
        import sys
        import warnings

        from transformers.trainer_callback import CallbackHandler

        frame, callbacks = sys._getframe(2), None
        for _ in range(4):  # call_event -> on_<event>: the handler is a frame or two up
            if frame is None:
                break
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler) and any(cb is self for cb in handler.callbacks):
                callbacks = handler.callbacks
                break
            frame = frame.f_back
        if callbacks is None:
            if not self._warned_order:
                self._warned_order = True
                warnings.warn("EAFOTrainerCallback was not called by a transformers CallbackHandler, so it could "
                              "not put itself before the loggers; those registered before it will not receive its "
                              "figures (reorder trainer.callback_handler.callbacks to fix)", stacklevel=3)
            return
        readers = [i for i, cb in enumerate(callbacks)
                   if cb is not self and type(cb).on_log is not TrainerCallback.on_log]
        here = next(i for i, cb in enumerate(callbacks) if cb is self)
        if readers and readers[0] < here:
            callbacks.insert(readers[0], callbacks.pop(here))

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Optional[nn.Module] = None, **kwargs):
        self._move_before_loggers()
        if self.optimizer is None:
            if model is None:
                raise ValueError("EAFOTrainerCallback: the Trainer has no model yet; pass it to the callback")
            self.attach(_unwrap(model))
        # A Trainer given a peft_config (TRL) has frozen every non-adapter parameter by now; the
        # optimizer is built later, in train(), so eps can still be made trainable.
        self.optimizer.train_eps()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Optional[nn.Module] = None, **kwargs):
        self._move_before_loggers()  # again: callbacks may have been added since __init__
        if self.optimizer is None:
            self.attach(_unwrap(model))
        self.optimizer.attach()  # hooks again if an earlier train() ended
        self._removed = False
        if state.global_step > 0:  # resumed: the Trainer restored its state from this checkpoint
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if os.path.isfile(path):
                self.optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        self.optimizer.set_step(state.global_step)  # counts as the Trainer does, resumed or restarted

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The Trainer counted this optimizer step already: global_step is the number done.
        new = self.optimizer.step(state.global_step) if self.optimizer is not None and not self._removed else {}
        if new:
            self._pending.update(new)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Optional[dict] = None, **kwargs):
        if not self._pending:
            return
        if logs is not None:
            logs.update(self._pending)
        # The Trainer appended a copy of ``logs`` to the history just before calling back.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        else:
            state.log_history.append({**self._pending, "step": state.global_step})
        self._pending = {}

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.optimizer is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.optimizer.state_dict(), os.path.join(folder, STATE_FILE))
            write_record(self._model, folder)  # config.json says which activations to rebuild

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._pending:  # updates after the last log still reach the history
            state.log_history.append({**self._pending, "step": state.global_step})
            self._pending = {}
        if self.optimizer is not None and not self._removed:
            self.optimizer.remove()
            self._removed = True


def _unwrap(model: Optional[nn.Module]) -> nn.Module:
    if model is None:
        raise ValueError("EAFOTrainerCallback: no model to attach to")
    # DDP / compiled wrappers keep the real model in ``module`` / ``_orig_mod``.
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            model = inner
    return model

