"""The runs of ``dynact dpo``: SFT on the preferred responses, then DPO at each beta.

For each seed and arm, one SFT run (TRL's ``SFTTrainer``) fine-tunes the arm's model on the
prompts and their chosen responses; then, for each beta, a copy of that SFT model is trained
with TRL's ``DPOTrainer`` against a frozen copy of the same SFT model as the reference, and
evaluated on held-out pairs (``eval_rewards/margins``, ``eval_rewards/accuracies``,
``eval_loss``, as in the paper's Table 4). Every run carries an
:class:`~dynact.integrations.transformers.EAFOTrainerCallback`: it converts and updates the
``eafo`` arm's activations, and only measures the others (``mode="monitor"``), so all arms
report the same per-layer entropy figures.

Why TRL: its ``DPOTrainer`` is the field's standard implementation of the DPO loss and of the
reward margin and accuracy it logs, and it subclasses transformers' ``Trainer``, so the
Hugging Face front door of dynact is what the ``eafo`` arm exercises, as users will use it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from dynact.experiments.dpo import data as pref_data
from dynact.experiments.dpo.models import (
    DYNAMIC_ARM,
    TINY_MODEL,
    arm_plan,
    build_policy,
    count_parameters,
    frozen_copy,
    gelu_types,
    train_tokenizer,
)
from dynact.experiments.dpo.settings import DPOSettings

__all__ = ["Prepared", "prepare", "run_dpo", "run_sft", "sft_path"]

#: Figures of each measured layer kept in the records (``"<metric>/<layer>"`` keys).
LAYER_METRICS = ("dead", "entropy", "entropy_scale_free", "log_slope", "std", "eps", "accepted")


@dataclass
class Prepared:
    """The data and tokenizer every run of a sweep shares."""

    tokenizer: Any
    sft_train: Any  # datasets.Dataset of prompt/completion
    dpo_train: Any  # datasets.Dataset of prompt/chosen/rejected
    dpo_eval: Any
    sizes: dict[str, int]


def prepare(settings: DPOSettings) -> Prepared:
    """Load and check the data, build the tokenizer, hold prompts to the limit.

    Raises:
        ValueError / FileNotFoundError: bad data (naming the row and column), an unreachable
            data set, a model without GELU modules. Nothing is trained before this returns.
    """
    from datasets import Dataset

    check_batch(settings)
    train, evals = pref_data.load_preferences(settings.data, limit=settings.limit)
    if settings.eval_rows is not None:
        evals = evals[: settings.eval_rows]
    if settings.model == TINY_MODEL:
        tokenizer = train_tokenizer(r[c] for r in train + evals for c in pref_data.COLUMNS)
    else:
        from transformers import AutoConfig, AutoTokenizer

        try:
            AutoConfig.from_pretrained(settings.model)
            tokenizer = AutoTokenizer.from_pretrained(settings.model)
        except OSError as err:
            raise ValueError(
                f"--model {settings.model!r}: could not load it ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "a hub name needs the internet or the Hugging Face cache; offline, use --model tiny"
            ) from None
        if tokenizer.pad_token is None:  # GPT-2 has none; it pads with end-of-text, as the reference does
            tokenizer.pad_token = tokenizer.eos_token
    source = settings.data
    train = pref_data.fit_prompts(train, tokenizer, settings.max_prompt_length, settings.truncate_prompts, source)
    evals = pref_data.fit_prompts(evals, tokenizer, settings.max_prompt_length, settings.truncate_prompts,
                                  f"{source} (evaluation rows)")
    return Prepared(tokenizer, Dataset.from_list(pref_data.sft_rows(train)), Dataset.from_list(train),
                    Dataset.from_list(evals), {"train": len(train), "eval": len(evals)})


def _args(settings: DPOSettings, seed: int, out: Path, steps: Optional[int]) -> dict[str, Any]:
    """TrainingArguments shared by SFT and DPO: the paper's optimiser and schedule."""
    cpu = not torch.cuda.is_available()
    per_device = settings.batch_size // _world_size()
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        optim="rmsprop",
        learning_rate=settings.lr,
        # The reference ramps linearly over warmup_steps, then holds the rate.
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings.warmup_steps,
        max_grad_norm=settings.max_grad_norm,
        max_steps=steps if steps is not None else -1,
        num_train_epochs=1,
        seed=seed,
        data_seed=seed,
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, min(10, steps or 10)),
        use_cpu=cpu,
        bf16=settings.bf16 and not cpu,
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=settings.max_length,
    )


def _world_size() -> int:
    # Set by ``accelerate launch`` / ``torchrun``; the paper's batch of 32 was split over 2 GPUs.
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def check_batch(settings: DPOSettings) -> None:
    """``ValueError`` unless the total batch splits evenly over the processes."""
    world = _world_size()
    if settings.batch_size % world:
        raise ValueError(f"--batch-size {settings.batch_size} does not split over {world} processes")


def _core_options(settings: DPOSettings, arm: str, seed: int, convert: bool) -> dict[str, Any]:
    plan = arm_plan(arm)
    return {"every_n_steps": settings.every_n_steps, "mode": plan["mode"], "seed": seed,
            "convert": gelu_types() if convert and plan["mode"] != "monitor" else ()}


def _quiet_printer(trainer) -> None:
    # With tqdm off the Trainer prints every log dict; the sweep prints one line per run instead.
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _tensorboard(log_dir: Path) -> list:
    """A TensorBoard callback writing to ``log_dir`` (on rank 0; none elsewhere). It goes after
    the EAFO callback, which adds the per-layer figures to the logs it passes on."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    if int(os.environ.get("RANK", "0")) != 0:
        return []
    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))]


def _layers(history: list[dict]) -> dict[str, dict[str, float]]:
    """Each layer's latest figures of :data:`LAYER_METRICS` in a run's log history, as
    ``{layer: {"dead": v, ...}}``. The latest per layer, not the last update's: an update that
    re-fits a layer's grid measures nothing for it that time."""
    out: dict[str, dict[str, float]] = {}
    for row in history:
        for key, value in row.items():
            name, _, layer = key.partition("/")
            if name in LAYER_METRICS and layer and isinstance(value, (int, float)):
                out.setdefault(layer, {})[name] = float(value)
    return out


def _updates(history: list[dict]) -> int:
    """How many (layer, update) pairs were accepted over a run, from the logged ``accepted/`` figures."""
    return int(sum(v for row in history for k, v in row.items() if k.startswith("accepted/")))


def sft_path(out: Path, arm: str, seed: int) -> Path:
    return out / "sft" / f"{arm}-seed{seed}.pt"


def run_sft(settings: DPOSettings, prep: Prepared, arm: str, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """SFT of ``arm``'s model on the chosen responses; returns the model and its record."""
    from trl import SFTConfig, SFTTrainer

    from dynact.integrations.transformers import EAFOTrainerCallback  # optional dependency: transformers

    out = Path(settings.out)
    model = build_policy(settings.model, arm, prep.tokenizer, seed=seed, n_positions=settings.max_length)
    # The DPO reference trains without dropout in SFT as in DPO (TRL's DPOTrainer turns it off too).
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    eafo = EAFOTrainerCallback(model, **_core_options(settings, arm, seed, convert=True))
    work = out / "work" / f"sft-{arm}-seed{seed}"
    config = SFTConfig(**_args(settings, seed, work, settings.sft_steps))
    trainer = SFTTrainer(model=model, args=config, train_dataset=prep.sft_train, processing_class=prep.tokenizer,
                         callbacks=[eafo, *_tensorboard(out / arm / "sft" / f"seed{seed}")])
    _quiet_printer(trainer)
    start = time.perf_counter()
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    record = {
        "steps": trainer.state.global_step,
        "loss_final": losses[-1] if losses else None,
        "layers": _layers(trainer.state.log_history),
        "accepted_updates": _updates(trainer.state.log_history),
        "params": count_parameters(model),
        "wall_time_s": time.perf_counter() - start,
    }
    shutil.rmtree(work, ignore_errors=True)
    return model, record


def run_dpo(settings: DPOSettings, prep: Prepared, sft_model: torch.nn.Module, arm: str, beta: float,
            seed: int) -> dict[str, Any]:
    """DPO of a copy of ``sft_model`` at ``beta`` against a frozen copy; returns the run's record."""
    from trl import DPOConfig, DPOTrainer

    from dynact.integrations.transformers import EAFOTrainerCallback  # optional dependency: transformers

    out = Path(settings.out)
    policy = copy.deepcopy(sft_model)
    policy.train()
    reference = frozen_copy(sft_model)
    eafo = EAFOTrainerCallback(policy, **_core_options(settings, arm, seed, convert=False))
    work = out / "work" / f"dpo-{arm}-beta{beta:g}-seed{seed}"
    args = _args(settings, seed, work, settings.dpo_steps)
    config = DPOConfig(**args, beta=beta, eval_strategy="steps", eval_steps=settings.eval_every,
                       precompute_ref_log_probs=False)
    tb_dir = out / arm / f"beta{beta:g}" / f"seed{seed}"
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=prep.dpo_train,
                         eval_dataset=prep.dpo_eval, processing_class=prep.tokenizer,
                         callbacks=[eafo, *_tensorboard(tb_dir)])
    _quiet_printer(trainer)
    start = time.perf_counter()
    trainer.train()
    final = trainer.evaluate()
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    by_step = {row["step"]: {"step": row["step"], "margin": row["eval_rewards/margins"],
                             "accuracy": row["eval_rewards/accuracies"], "loss": row["eval_loss"]}
               for row in history if "eval_rewards/margins" in row}
    curve = [by_step[k] for k in sorted(by_step)]
    values = {"eval_margin": final.get("eval_rewards/margins"), "eval_accuracy": final.get("eval_rewards/accuracies"),
              "eval_loss": final.get("eval_loss")}
    finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values())
    shutil.rmtree(work, ignore_errors=True)
    return {
        "arm": arm,
        "beta": beta,
        "seed": seed,
        "status": "ok" if finite else "failed",
        "error": None if finite else f"non-finite evaluation figures: {values}",
        **values,
        "eval_curve": curve,
        "train_loss_final": next((row["loss"] for row in reversed(history) if "loss" in row), None),
        "layers": _layers(history),
        "accepted_updates": _updates(history),
        "dynamic": arm == DYNAMIC_ARM,
        "steps": trainer.state.global_step,
        "params": count_parameters(policy),
        "wall_time_s": wall,
        "tensorboard": os.path.relpath(tb_dir, out),
    }


@contextlib.contextmanager
def quiet(threads: Optional[int] = None) -> Iterator[None]:
    """One line per run: silence the libraries' per-run notices and progress bars; set torch's
    CPU threads for the runs (a tiny model on a busy 2-core machine runs best on one)."""
    import datasets
    import transformers

    names = ("transformers", "trl", "datasets", "accelerate")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    num_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        transformers.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
        torch.set_num_threads(num_threads)
