"""What dynamic EAFO costs a training run, against the model a user would otherwise train.

ViT-Tiny (``dynact.experiments.models.ImageClassifier("vit_tiny")``, 12 MLP activations) trains on random
CIFAR-shaped batches with Lightning's Trainer, AdamW and a TensorBoard logger, in these arms:

==============  =====================================================================
``gelu``        GELU, no callback: the model the user had (the reference of every ratio)
``relu``        ReLU, no callback
``crrelu``      CRReLU (learnable eps), no callback
``eafo_static`` EAFOActivation (ReLU base), no callback: the activation's own cost
``eafo_n50``    ReLU model + ``EAFOCallback(every_n_steps=50, curves_every=0)``: converted to
                dynamic EAFOActivations at setup, sampled and updated by the callback,
                scalars and histograms logged (the activation-curve figures, about 1 s per
                drawing for 12 layers, are off: a short run would draw them at its only update)
``eafo_n10``    the same with ``every_n_steps=10``
==============  =====================================================================

All arms train at the same time in threads that take turns step by step (one step of each arm,
in order, then again), so that a shared machine's load hits every arm alike; ``--rounds``
repeats that with the order rotated. Each run leaves out its first ``--warmup`` steps (by
default 10 of 60: the 50 measured steps are one whole update cycle at every_n_steps=50: 20
sampling steps, one update). Prints JSON: per arm the mean and median step time, the ratio of
means (total training time, the callback's update steps included) and of medians to ``gelu``
and to ``relu``, and the quartiles of the step-by-step ratio to the GELU step that ran just
before (their spread is the noise of the machine); for callback arms also the mean time of
update steps and of sampling steps.

    python benchmarks/bench_callback.py                                   # CPU, fp32, batch 32
    python benchmarks/bench_callback.py --accelerator gpu --precision bf16-mixed --batch 256 --steps 120
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
import warnings
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from dynact import EAFOCallback
from dynact.experiments.models import ImageClassifier
from dynact.kernels import dispatch

#: arm -> (MLP activation, callback arguments or None)
ARMS: dict[str, tuple[str, Optional[dict[str, Any]]]] = {
    "gelu": ("gelu", None),
    "relu": ("relu", None),
    "crrelu": ("crrelu", None),
    "eafo_static": ("eafo", None),
    "eafo_n50": ("relu", {"every_n_steps": 50, "curves_every": 0}),
    "eafo_n10": ("relu", {"every_n_steps": 10, "curves_every": 0}),
}


class _Baton:
    """Round-robin turns between the arms' training threads: one step at a time, in order."""

    def __init__(self, names: list[str]) -> None:
        self.cond = threading.Condition()
        self.order = list(names)
        self.turn = 0

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: not self.order or self.order[self.turn] == name)

    def pass_on(self, name: str, leave: bool = False) -> None:
        with self.cond:
            if name in self.order:
                i = self.order.index(name)
                if leave:
                    self.order.pop(i)
                    self.turn = i % len(self.order) if self.order else 0
                else:
                    self.turn = (i + 1) % len(self.order)
            self.cond.notify_all()


class _StepTimer(Callback):
    """Wall time of each optimizer step, from one batch start to the next (or to the end), so
    the callback's work in ``on_train_batch_end`` is inside the step it follows. Between two
    steps the arm hands the turn to the next arm and waits for its own."""

    def __init__(self, name: str, baton: _Baton, cuda: bool) -> None:
        self.name, self.baton, self.cuda = name, baton, cuda
        self.steps: list[tuple[int, float]] = []
        self.last: Optional[tuple[int, float]] = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _close(self) -> None:
        if self.last is not None:
            step, start = self.last
            self.steps.append((step, self._now() - start))
            self.last = None

    def on_train_start(self, trainer, pl_module):
        self.baton.wait(self.name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.last is not None:
            self._close()
            self.baton.pass_on(self.name)
            self.baton.wait(self.name)
        self.last = (trainer.global_step, self._now())

    def on_train_end(self, trainer, pl_module):
        self._close()


class _Gate(Callback):
    """First callback of an arm: its setup waits for the arm's turn, so that an EAFOCallback's
    setup (whose call-site count traces the model with torch.fx, which patches
    ``nn.Module.__call__`` for the whole process while it runs) never overlaps another arm's
    forward; the turn is held through the first step."""

    def __init__(self, name: str, baton: _Baton) -> None:
        self.name, self.baton = name, baton

    def setup(self, trainer, pl_module, stage):
        self.baton.wait(self.name)


def _build(arm: str, args: argparse.Namespace, logdir: str, baton: _Baton):
    act, setting = ARMS[arm]
    pl.seed_everything(0, verbose=False)
    batches = 4  # four distinct batches, cycled: the data cost nothing, the model and callback do
    model = ImageClassifier("vit_tiny", num_classes=10, img_size=32, patch_size=4, act=act,
                            warmup_epochs=1, epochs=-(-args.steps // batches))
    g = torch.Generator().manual_seed(0)
    n = batches * args.batch
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    timer = _StepTimer(arm, baton, cuda=args.accelerator not in ("cpu",) and torch.cuda.is_available())
    callbacks: list[Callback] = [timer]  # last: it times the other callbacks' work too
    if setting is not None:
        callbacks.insert(0, EAFOCallback(estimator=args.estimator, **setting))
    callbacks.insert(0, _Gate(arm, baton))
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.steps,
        precision=args.precision,
        callbacks=callbacks,
        logger=TensorBoardLogger(logdir, name=arm),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=50,
    )
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True)
    return trainer, model, loader, timer


def _round(arms: list[str], args: argparse.Namespace, logdir: str) -> dict[str, list[tuple[int, float]]]:
    """All arms train at once, one step each in turn; returns each arm's measured steps."""
    baton = _Baton(arms)
    built = {arm: _build(arm, args, logdir, baton) for arm in arms}
    errors: list[BaseException] = []

    def fit(arm: str) -> None:
        trainer, model, loader, _ = built[arm]
        try:
            trainer.fit(model, loader)
        except BaseException as err:  # reported after the round; the other arms go on
            errors.append(err)
        finally:
            baton.pass_on(arm, leave=True)

    threads = [threading.Thread(target=fit, args=(arm,), name=f"arm-{arm}") for arm in arms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {arm: [(s, t) for s, t in built[arm][3].steps if s >= args.warmup] for arm in arms}


def _summary(arm: str, runs: list[list[tuple[int, float]]], ref: dict[str, list[list[tuple[int, float]]]]) -> dict:
    times = [t for run in runs for _, t in run]
    out: dict[str, Any] = {
        "steps": len(times),
        "step_ms_mean": round(1e3 * statistics.fmean(times), 2),
        "step_ms_median": round(1e3 * statistics.median(times), 2),
    }
    for base in ("gelu", "relu"):
        base_times = [t for run in ref[base] for _, t in run]
        out[f"ratio_to_{base}_mean"] = round(statistics.fmean(times) / statistics.fmean(base_times), 4)
        out[f"ratio_to_{base}_median"] = round(statistics.median(times) / statistics.median(base_times), 4)
    # Step i of this arm ran right after step i of the GELU arm: the spread of these paired
    # ratios is the noise of the machine.
    paired = [t / dict(base)[s] for run, base in zip(runs, ref["gelu"], strict=True) for s, t in run if s in dict(base)]
    q = statistics.quantiles(paired, n=4)
    out["paired_ratio_to_gelu_quartiles"] = [round(q[0], 4), round(q[1], 4), round(q[2], 4)]
    setting = ARMS[arm][1]
    if setting is not None:
        every = setting["every_n_steps"]
        window = min(every, 20)
        update = [t for run in runs for s, t in run if (s + 1) % every == 0]
        sampling = [t for run in runs for s, t in run if (s + 1) % every and s % every >= every - window]
        out["updates"] = len(update)
        out["update_step_ms_mean"] = round(1e3 * statistics.fmean(update), 2) if update else None
        out["sampling_step_ms_mean"] = round(1e3 * statistics.fmean(sampling), 2) if sampling else None
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (>= 50 for an update at N=50)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="first steps of each run left out (default: 60 - 10 = one 50-step update cycle)")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions of the interleaved run of all arms")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true", help="e.g. 32-true, bf16-mixed (GPU)")
    parser.add_argument("--estimator", default="kde", choices=["kde", "hist"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args(argv)
    arms = ["gelu", "relu"] + [a for a in args.arms if a not in ("gelu", "relu")]

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accelerator == "cpu" or not torch.cuda.is_available():
        # The EAFOActivation calls go through the C++ operator once it is built: build it first, so
        # that every step of every arm runs the same path.
        dispatch.torch_op(wait=True)
    runs: dict[str, list[list[tuple[int, float]]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(args.rounds):
            shift = r % len(arms)
            for arm, steps in _round(arms[shift:] + arms[:shift], args, logdir).items():
                runs[arm].append(steps)

    cuda = torch.cuda.is_available() and args.accelerator != "cpu"
    report = {
        "benchmark": "ViT-Tiny training step time per arm, random 32x32 batches, AdamW; ratios to the GELU model",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps_per_run": args.steps,
        "warmup_steps_left_out": args.warmup,
        "rounds": args.rounds,
        "precision": args.precision,
        "estimator": args.estimator,
        "results": {arm: _summary(arm, runs[arm], runs) for arm in arms},
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
