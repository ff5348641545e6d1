"""Overhead of EAFOCallback on a ViT-Tiny training loop, as ratios measured in one run.

ViT-Tiny (``dynact.models.ImageClassifier("vit_tiny", act="eafo")``: 12 dynamic activations)
trains on random CIFAR-shaped batches with Lightning's Trainer and a TensorBoard logger, once
without the callback and once per callback setting (``every_n_steps`` 50 and 10, both
estimators); settings are interleaved round by round so that drift in the machine's load
hits all of them alike. Prints JSON: per setting the mean step time, its ratio to the run
without the callback (the overhead; goal <= 1.03 at every_n_steps=50 on CPU, <= 1.02 on a
GPU), the ratio of medians, the mean time of steps that sample and of steps that update, and
the callback's own clocked work (hook time per sampling step; time per update, the figures'
cost spread over ``curves_every`` updates; the figures' cost; all medians) with the overhead
it implies, ``(window * hook + update) / (N * median step without callback)``, which a busy
shared machine disturbs less than the ratio of step times.

    python benchmarks/bench_callback.py --batch 32 --steps 100
    python benchmarks/bench_callback.py --batch 256 --steps 300 --rounds 3   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from dynact import EAFOCallback
from dynact.models import ImageClassifier

SETTINGS: dict[str, Optional[dict[str, Any]]] = {
    "none": None,
    "n50_kde": {"every_n_steps": 50, "estimator": "kde"},
    "n50_hist": {"every_n_steps": 50, "estimator": "hist"},
    "n10_kde": {"every_n_steps": 10, "estimator": "kde"},
    "n10_hist": {"every_n_steps": 10, "estimator": "hist"},
}


class _StepTimer(Callback):
    """Wall time of each optimizer step: from one batch start to the next (or to the end),
    so the callback's work in ``on_train_batch_end`` is inside the step it follows."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.starts: list[tuple[int, float]] = []
        self.end = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append((trainer.global_step, self._now()))

    def on_train_end(self, trainer, pl_module):
        self.end = self._now()

    def durations(self) -> list[tuple[int, float]]:
        times = [t for _, t in self.starts] + [self.end]
        return [(step, b - a) for (step, a), b in zip(self.starts, times[1:])]


class _TimedEAFO(EAFOCallback):
    """EAFOCallback that also clocks its own work: the sampling hooks and the updates (host
    time; on a GPU the hooks only launch kernels, so their device time is not in it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_s: dict[int, float] = {}  # per optimizer step: time in the sampling hooks
        self.update_s: list[float] = []
        self.figures_s: list[float] = []  # per update: time of the TensorBoard part if it drew figures

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._step = trainer.global_step

    def _collect(self, layer, module, args):
        t = time.perf_counter()
        super()._collect(layer, module, args)
        if self._collecting:
            self.hook_s[self._step] = self.hook_s.get(self._step, 0.0) + time.perf_counter() - t

    def _update(self, trainer):
        t = time.perf_counter()
        self.figures_s.append(0.0)
        super()._update(trainer)
        self.update_s.append(time.perf_counter() - t)

    def _log_tensorboard(self, trainer, measured, step):
        t = time.perf_counter()
        super()._log_tensorboard(trainer, measured, step)
        if (self._num_updates - 1) % self.curves_every == 0:
            self.figures_s[-1] = time.perf_counter() - t


def _run(setting: Optional[dict[str, Any]], args: argparse.Namespace, logdir: str) -> tuple[list[tuple[int, float]], Optional[_TimedEAFO]]:
    pl.seed_everything(0, verbose=False)
    # Four distinct batches, cycled: the data cost nothing, the model and callback do.
    batches = 4
    model = ImageClassifier("vit_tiny", num_classes=10, img_size=32, patch_size=4, act="eafo",
                            warmup_epochs=1, epochs=-(-args.steps // batches))
    g = torch.Generator().manual_seed(0)
    n = batches * args.batch
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    timer = _StepTimer(cuda=args.accelerator != "cpu" and torch.cuda.is_available())
    cb = None if setting is None else _TimedEAFO(**setting)
    callbacks: list[Callback] = [timer] if cb is None else [cb, timer]
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.steps,
        precision=args.precision,
        callbacks=callbacks,
        logger=TensorBoardLogger(logdir, name="bench"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=50,
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True))
    return timer.durations()[args.warmup:], cb


def _summary(
    name: str, steps: list[tuple[int, float]], cbs: list[_TimedEAFO], base_mean: float, base_median: float
) -> dict[str, Any]:
    times = [t for _, t in steps]
    out: dict[str, Any] = {
        "steps": len(times),
        "step_ms_mean": round(1e3 * statistics.fmean(times), 2),
        "step_ms_median": round(1e3 * statistics.median(times), 2),
        "ratio_mean": round(statistics.fmean(times) / base_mean, 4),
        "ratio_median": round(statistics.median(times) / base_median, 4),
    }
    setting = SETTINGS[name]
    if setting is not None:
        n = setting["every_n_steps"]
        window = min(n, 20)
        update = [t for s, t in steps if (s + 1) % n == 0]
        collect = [t for s, t in steps if (s + 1) % n and s % n >= n - window]
        out["update_step_ms_mean"] = round(1e3 * statistics.fmean(update), 2) if update else None
        out["sampling_step_ms_mean"] = round(1e3 * statistics.fmean(collect), 2) if collect else None
        out["window"] = window
        # The callback's own clocked work (medians) and the overhead it implies per N steps,
        # against the median step without it: robust to a shared machine's load spikes.
        # Figures come every curves_every updates: spread their cost over that many updates.
        updates = [u - f + f / cb.curves_every for cb in cbs for u, f in zip(cb.update_s, cb.figures_s)]
        figures = [f for cb in cbs for f in cb.figures_s if f > 0]
        hooks = [h for cb in cbs for h in cb.hook_s.values()]
        hook_ms = 1e3 * statistics.median(hooks) if hooks else 0.0
        update_ms = 1e3 * statistics.median(updates) if updates else 0.0
        out["hook_ms_per_sampling_step_median"] = round(hook_ms, 3)
        out["update_ms_median"] = round(update_ms, 2)
        out["figures_ms_median"] = round(1e3 * statistics.median(figures), 2) if figures else None
        out["overhead_from_costs"] = round((window * hook_ms + update_ms) / (n * 1e3 * base_median), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (>= 50 for an update at N=50)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each run left out")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of all settings")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    names = ["none"] + [s for s in args.settings if s != "none"]

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    cbs: dict[str, list[_TimedEAFO]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as logdir:
        for _ in range(args.rounds):
            for name in names:
                times, cb = _run(SETTINGS[name], args, logdir)
                steps[name] += times
                cbs[name] += [cb] if cb is not None else []

    base = [t for _, t in steps["none"]]
    base_mean, base_median = statistics.fmean(base), statistics.median(base)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.accelerator != "cpu" else platform.processor() or "cpu"
    print(json.dumps({
        "benchmark": "EAFOCallback overhead, ViT-Tiny (12 EAFOActivation layers), random 32x32 batches",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "precision": args.precision,
        "results": {name: _summary(name, steps[name], cbs[name], base_mean, base_median) for name in names},
    }, indent=2))


if __name__ == "__main__":
    main()
