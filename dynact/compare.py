"""``dynact compare``: does dynamic EAFO beat static CRReLU, and both beat a fixed ReLU, on my task?

One command trains every arm (an activation) with every seed through the same
:class:`~dynact.models.ImageClassifier`, data module and schedule, logs each run's per-layer
output entropy with :class:`~dynact.callbacks.EAFOCallback` (monitor mode for static arms, so
entropy and accuracy sit side by side), and writes into ``--out``:

- ``<arm>/seed<k>/``: one TensorBoard run per arm and seed (``tensorboard --logdir OUT``
  overlays them);
- ``runs/<arm>-seed<k>.json``: each finished run's record, written atomically the moment it
  ends, so an interrupted sweep resumes (``--resume``) without losing a completed run;
- ``results.json``: the settings, the environment, every run, and the per-arm summary;
- ``report.md``: a table shaped like the paper's (arms as columns), paired differences against
  the control arm with 95% Student-t intervals, and the plots ``acc_vs_epoch.png`` and
  ``entropy_vs_step.png``.

Example::

    dynact compare                                    # digits, relu/crrelu/eafo, 3 seeds, CPU
    dynact compare --task cifar10 --model vit_tiny --arms relu,crrelu,eafo,gelu,elu,prelu,celu,silu,mish \\
        --seeds 3 --epochs 100 --every-n-steps 200 --out cifar10_vit_tiny \\
        --data.root data --data.download true --trainer.accelerator gpu --trainer.precision bf16-mixed

Arms: ``relu`` is the control (a fixed ReLU); ``eafo`` is built with ReLU and turned into
dynamic :class:`~dynact.EAFOActivation` modules by ``EAFOCallback(mode="refresh")``; every other
registry name (``crrelu``, ``gelu``, ...) is a static arm, measured with
``EAFOCallback(mode="monitor", convert=())``. Seed ``k`` (``0 .. --seeds - 1``) goes through
``lightning.seed_everything(k)`` before the data module and the model are built, so arm ``a``
and the control share initial weights and data order at each seed, and differences are paired.

Settings come from one place per task: ``digits`` reads ``examples/configs/digits.yaml`` (the
small ViT of ``dynact train``); the paper's tasks use the defaults of ``ImageClassifier`` and
the data modules (the paper's recipe) with the task's image geometry. ``--config`` replaces
them with any ``dynact train`` config. ``--trainer.KEY VALUE``, ``--model.KEY VALUE``,
``--data.KEY VALUE`` and ``--callback.KEY VALUE`` override single arguments of the Trainer,
``ImageClassifier``, the data module and ``EAFOCallback``.

Exit codes: 0 done; 1 some runs failed (recorded, redone by ``--resume``); 2 bad input, found
before any training; 130 interrupted (finished runs kept).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

__all__ = ["SweepSettings", "TASKS", "main", "run_sweep", "summarize", "write_report"]

#: ``task -> defaults``. ``config`` names a file in the repository's ``examples/configs``;
#: otherwise the data module's and ``ImageClassifier``'s own defaults are the paper's recipe and
#: ``model`` adds the task's geometry. ``epochs``: the sweep's default length; ``threads``: torch's
#: intra-op CPU threads (absent: torch's default).
TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "config": "digits.yaml",
        # 3 arms x 3 seeds x 16 epochs: the README's main job within 5 minutes on 2 CPU cores.
        "epochs": 16,
        # The model is tiny: a second intra-op thread gains little on a quiet machine and, on a
        # busy 2-core one, was measured 10x slower than one thread (threads wait for each other).
        "threads": 1,
        "about": "scikit-learn's 8x8 digits: small data and few epochs, a quick check of the "
        "machinery, not the paper's setting",
    },
    "cifar10": {
        "data": "dynact.data.CIFAR10DataModule",
        "model": {"arch": "vit_tiny", "num_classes": 10, "img_size": 32, "patch_size": 4},
        "epochs": 100,
        "about": "CIFAR-10 with the paper's recipe (Appendix E)",
    },
    "cifar100": {
        "data": "dynact.data.CIFAR100DataModule",
        "model": {"arch": "vit_tiny", "num_classes": 100, "img_size": 32, "patch_size": 4},
        "epochs": 100,
        "about": "CIFAR-100 with the paper's recipe (Appendix E)",
    },
    "imagenet": {
        "data": "dynact.data.ImageNetDataModule",
        "model": {"arch": "vit_tiny", "num_classes": 1000, "img_size": 224, "patch_size": 16},
        "epochs": 100,
        "about": "ImageNet-1K with the paper's recipe (Appendix E)",
    },
}

DEFAULT_ARMS = ("relu", "crrelu", "eafo")
#: The arm whose activation is made dynamic by :class:`~dynact.callbacks.EAFOCallback`.
DYNAMIC_ARM = "eafo"

# Trainer settings every arm shares unless overridden: the paper clips gradients at 1.0; a sweep
# keeps its records itself, so per-run checkpoints are opt-in; "warn" keeps runs reproducible
# without stopping a GPU sweep on an op that has no deterministic kernel.
_TRAINER_DEFAULTS: dict[str, Any] = {
    "gradient_clip_val": 1.0,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "deterministic": "warn",
}
# Arguments the sweep itself sets per run; overriding them would break the comparison.
_RESERVED = {
    "trainer": {"max_epochs": "--epochs", "logger": "the sweep (one TensorBoard run per arm and seed)",
                "callbacks": "the sweep", "default_root_dir": "--out"},
    "model": {"arch": "--model", "act": "--arms", "act_kwargs": "--arms (each arm uses its registry defaults)"},
    "data": {},
    "callback": {"mode": "the arm (eafo: refresh, others: monitor)", "convert": "the arm",
                 "every_n_steps": "--every-n-steps"},
}
_CONTROL = "relu"
_RECORDS = "runs"
_SETTINGS_FILE = "sweep.json"
_PNG_ACC = "acc_vs_epoch.png"
_PNG_ENTROPY = "entropy_vs_step.png"
_ENTROPY_PREFIX = "entropy_scale_free/"
_EXIT_INTERRUPTED = 130


# ============================================================================ settings


@dataclass
class SweepSettings:
    """Everything that defines a sweep; two sweeps with equal settings are the same experiment.

    ``arms`` and ``seeds`` may grow when a sweep is resumed; every other field must match.
    """

    task: str
    model: str
    arms: list[str]
    seeds: list[int]
    epochs: int
    out: str
    control: str = _CONTROL
    every_n_steps: int = 10
    callback_kwargs: dict[str, Any] = field(default_factory=dict)
    config: Optional[str] = None
    data_class: str = ""
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    threads: Optional[int] = None
    about: str = ""

    def identity(self) -> dict[str, Any]:
        """The fields that must agree between a sweep and its resumption."""
        free = ("arms", "seeds", "out", "control", "threads", "about")
        return {k: v for k, v in asdict(self).items() if k not in free}


def _repo_configs() -> list[Path]:
    # The configs live in the repository, beside the package (editable install or a clone on the
    # path), or under the working directory (a clone with the package installed elsewhere).
    return [Path(__file__).resolve().parent.parent / "examples" / "configs", Path.cwd() / "examples" / "configs"]


def _find_config(name: str) -> Path:
    for folder in _repo_configs():
        if (folder / name).is_file():
            return folder / name
    raise ValueError(
        f"the task's settings live in examples/configs/{name} of the dynact repository and it was not "
        f"found (looked in {', '.join(str(f) for f in _repo_configs())}); run from a clone of the "
        "repository or pass --config PATH"
    )


def _load_config(path: Path) -> dict[str, Any]:
    """Read a ``dynact train`` (LightningCLI) YAML config into model / data / trainer sections."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--config {str(path)!r}: cannot read it as YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"--config {str(path)!r}: expected a mapping with model, data and trainer sections")
    data = raw.get("data") or {}
    if isinstance(data, dict) and "class_path" in data:
        data_class, data_kwargs = data["class_path"], dict(data.get("init_args") or {})
    else:
        raise ValueError(
            f"--config {str(path)!r}: the data section needs class_path (e.g. dynact.data.DigitsDataModule) "
            "and init_args, as in examples/configs/digits.yaml"
        )
    model = dict(raw.get("model") or {})
    if "class_path" in model:  # a subclass-mode model section
        model = dict(model.get("init_args") or {})
    sections = {"data_kwargs": data_kwargs, "model_kwargs": model, "trainer_kwargs": dict(raw.get("trainer") or {})}
    return {"data_class": data_class, **{k: _numbers_from_yaml(v) for k, v in sections.items()}}


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _numbers_from_yaml(value: Any) -> Any:
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; LightningCLI, which reads the same files, makes
    # it a float, so this does too.
    if isinstance(value, dict):
        return {k: _numbers_from_yaml(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_from_yaml(v) for v in value]
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def _import_class(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"cannot import {path!r} ({err}); give a full class path such as dynact.data.DigitsDataModule"
        ) from err


def _parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false/null, lists), else a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false", "null", "none"):
        return {"true": True, "false": False}.get(lowered)
    try:
        return json.loads(text)
    except ValueError:
        return text


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Take ``--{trainer,model,data,callback}.KEY VALUE`` (or ``=VALUE``) out of ``argv``.

    Dots after the first name nest: ``--model.model_kwargs.depth 2``.
    """
    rest: list[str] = []
    overrides: dict[str, dict[str, Any]] = {"trainer": {}, "model": {}, "data": {}, "callback": {}}
    i = 0
    while i < len(argv):
        token = argv[i]
        group = token[2:].split(".", 1)[0] if token.startswith("--") and "." in token else None
        if group in overrides:
            key, eq, value = token[len(group) + 3:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{token}: missing value (write {token} VALUE or {token}=VALUE)")
                value = argv[i + 1]
                i += 1
            if not key:
                raise ValueError(f"{token}: missing the argument's name after '--{group}.'")
            node = overrides[group]
            *parents, leaf = key.split(".")
            for name in parents:
                node = node.setdefault(name, {})
                if not isinstance(node, dict):
                    raise ValueError(f"{token}: {name} was already given a value")
            node[leaf] = _parse_value(value)
        else:
            rest.append(token)
        i += 1
    return rest, overrides


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_keys(group: str, given: dict[str, Any], target, where: str) -> None:
    params = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in given:
        if key in _RESERVED[group]:
            raise ValueError(f"--{group}.{key}: the sweep sets it itself; use {_RESERVED[group][key]}")
        if key not in params and not takes_any:
            names = [n for n in params if n not in ("self", "args", "kwargs") and n not in _RESERVED[group]]
            raise ValueError(f"--{group}.{key}: {where} has no argument {key!r}; it takes: {', '.join(names)}")


def _arm_list(text: str) -> list[str]:
    from dynact.activations import activation_names, resolve_activation

    arms = [a.strip().lower() for a in text.split(",") if a.strip()]
    if not arms:
        raise ValueError(f"--arms is empty; give a comma-separated list of: {', '.join(activation_names())}")
    for arm in arms:
        try:
            resolve_activation(arm)
        except ValueError:
            raise ValueError(f"--arms: unknown arm {arm!r}; choose from: {', '.join(activation_names())}") from None
    duplicates = sorted({a for a in arms if arms.count(a) > 1})
    if duplicates:
        raise ValueError(f"--arms: {', '.join(duplicates)} given more than once; list each arm once")
    return arms


def _build_parser() -> argparse.ArgumentParser:
    from dynact.activations import activation_names
    from dynact.models import model_names

    p = argparse.ArgumentParser(
        prog="dynact compare",
        description="Train every arm (activation) with every seed through the same model, data and "
        "schedule; write TensorBoard runs, results.json, report.md (a table like the paper's, with "
        "paired differences against the control and 95% confidence intervals) and plots.",
        epilog="Overrides, as in 'dynact train': --trainer.KEY VALUE (any lightning Trainer argument, "
        "e.g. --trainer.accelerator gpu --trainer.precision bf16-mixed --trainer.limit_train_batches 0.1), "
        "--model.KEY VALUE (ImageClassifier, e.g. --model.lr 1e-3 --model.model_kwargs.depth 6), "
        "--data.KEY VALUE (the data module, e.g. --data.root /data --data.batch_size 128) and "
        "--callback.KEY VALUE (EAFOCallback, e.g. --callback.estimator hist --callback.curves_every 0). "
        "Values parse as JSON when they can (numbers, true/false/null, lists), else as strings.",
    )
    p.add_argument("--task", default="digits", choices=list(TASKS), help="data set (default: digits, offline)")
    p.add_argument("--model", default=None, help=f"architecture: {', '.join(model_names())} (default: the task's)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma-separated activations from: {', '.join(activation_names())}; {DYNAMIC_ARM} is the "
                   f"dynamic one, the rest are static (default: {','.join(DEFAULT_ARMS)})")
    p.add_argument("--control", default=_CONTROL, help="arm the others are compared with, paired by seed (default: relu)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm: 0 .. N-1 (default: 3)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default: the task's; digits 20, paper tasks 100)")
    p.add_argument("--every-n-steps", type=int, default=10,
                   help="optimizer steps between EAFOCallback's updates and entropy logs (default: 10; "
                   "a few hundred suits the paper's runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's intra-op CPU threads during the runs (default: 1 for digits, whose model is "
                   "tiny, else torch's default)")
    p.add_argument("--config", default=None, help="a 'dynact train' YAML config replacing the task's settings")
    p.add_argument("--out", default="compare_out", help="output folder (default: compare_out)")
    p.add_argument("--resume", action="store_true", help="continue a sweep in --out, skipping finished runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per finished run)")
    return p


def _settings_from_args(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> SweepSettings:
    """Validate the command line and resolve the sweep's settings; raises ValueError, trains nothing."""
    from dynact.models import ImageClassifier, model_names

    arms = _arm_list(args.arms)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if args.every_n_steps < 1:
        raise ValueError(f"--every-n-steps must be at least 1, got {args.every_n_steps}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    control = args.control.strip().lower()
    if control not in arms:
        raise ValueError(f"--control {control!r} is not among --arms ({', '.join(arms)}); add it or pick one of the arms")
    task = TASKS[args.task]
    if args.config is not None or "config" in task:
        config_path = Path(args.config).expanduser() if args.config else _find_config(task["config"])
        if not config_path.is_file():
            raise ValueError(f"--config {str(config_path)!r} does not exist")
        base = _load_config(config_path)
        config = str(config_path.resolve())
    else:
        base = {"data_class": task["data"], "data_kwargs": {}, "model_kwargs": dict(task["model"]), "trainer_kwargs": {}}
        config = None
    model_kwargs = _merge(base["model_kwargs"], overrides["model"])
    model = (args.model or model_kwargs.get("arch") or "vit_tiny").strip().lower()
    if model not in model_names():
        raise ValueError(f"--model: unknown model {model!r}; choose one of: {', '.join(model_names())}")
    for key in ("arch", "act", "act_kwargs"):  # set per arm by the sweep
        model_kwargs.pop(key, None)
    _check_keys("model", overrides["model"], ImageClassifier.__init__, "ImageClassifier")
    data_class = _import_class(base["data_class"])
    _check_keys("data", overrides["data"], data_class.__init__, data_class.__name__)
    from lightning.pytorch import Trainer

    trainer_kwargs = {k: v for k, v in base["trainer_kwargs"].items() if k not in _RESERVED["trainer"]}
    _check_keys("trainer", overrides["trainer"], Trainer.__init__, "lightning's Trainer")
    from dynact.callbacks import EAFOCallback

    _check_keys("callback", overrides["callback"], EAFOCallback.__init__, "EAFOCallback")
    trainer_kwargs = _merge(_merge(_TRAINER_DEFAULTS, trainer_kwargs), overrides["trainer"])
    return SweepSettings(
        task=args.task,
        model=model,
        arms=arms,
        seeds=list(range(args.seeds)),
        epochs=args.epochs or task["epochs"],
        out=str(Path(args.out).expanduser()),
        control=control,
        every_n_steps=args.every_n_steps,
        callback_kwargs=overrides["callback"],
        config=config,
        data_class=base["data_class"],
        data_kwargs=_merge(base["data_kwargs"], overrides["data"]),
        model_kwargs=model_kwargs,
        trainer_kwargs=trainer_kwargs,
        threads=args.threads or task.get("threads"),
        about=task["about"] if args.config is None else f"{args.task} with the settings of {config}",
    )


# ============================================================================ one run


def _make_datamodule(settings: SweepSettings):
    return _import_class(settings.data_class)(**settings.data_kwargs)


def _make_model(settings: SweepSettings, arm: str):
    from dynact.models import ImageClassifier

    return ImageClassifier(arch=settings.model, act=_arm_activation(arm), **settings.model_kwargs)


def _arm_activation(arm: str) -> str:
    # The dynamic arm starts from ReLU; the callback turns its activations into EAFOActivation.
    return "relu" if arm == DYNAMIC_ARM else arm


def _make_eafo_callback(settings: SweepSettings, arm: str):
    """The callback of one arm: it updates the dynamic arm and only measures the static ones."""
    from torch import nn

    from dynact.callbacks import EAFOCallback

    kwargs: dict[str, Any] = {"every_n_steps": settings.every_n_steps, **settings.callback_kwargs}
    if arm == DYNAMIC_ARM:
        return EAFOCallback(mode="refresh", convert=(nn.ReLU,), **kwargs)
    return EAFOCallback(mode="monitor", convert=(), **kwargs)


def _history_callback():
    from lightning.pytorch.callbacks import Callback

    class History(Callback):
        def __init__(self) -> None:
            self.epochs: list[dict[str, float]] = []

        def on_validation_end(self, trainer, pl_module) -> None:  # metrics are reduced by now
            if trainer.sanity_checking:
                return
            metrics = trainer.callback_metrics
            row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
            for key in ("val/acc1", "val/acc5", "val/loss"):
                if key in metrics:
                    row[key.split("/", 1)[1]] = float(metrics[key])
            self.epochs.append(row)

    return History()


def _progress_kwargs(trainer_kwargs: dict[str, Any], enabled: bool) -> dict[str, Any]:
    """Trainer arguments for the per-run bar: below the sweep's bar, or off with ``--no-progress``."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    if "enable_progress_bar" in trainer_kwargs:
        return {}
    if not enabled:
        return {"enable_progress_bar": False}
    # Lightning's bars go below the sweep's bar (position 0) instead of drawing over it.
    return {"callbacks": [TQDMProgressBar(process_position=1, leave=False)]}


def _data_sizes(datamodule) -> dict[str, int]:
    sizes = {}
    for split in ("train", "val"):
        data = getattr(datamodule, f"{split}_set", None)
        with contextlib.suppress(TypeError):
            sizes[split] = len(data)
    return sizes


def _read_entropy(log_dir: str) -> dict[str, list[list[float]]]:
    """``layer -> [[step, nats], ...]`` from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    series = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith(_ENTROPY_PREFIX):
            series[tag[len(_ENTROPY_PREFIX):]] = [[int(e.step), float(e.value)] for e in acc.Scalars(tag)]
    return series


def _activation_eps(model) -> dict[str, float]:
    """The learned scalar ``eps`` of every activation that has one (CRReLU, EAFOActivation)."""
    import torch

    return {name: float(m.eps.detach().float().mean()) for name, m in model.net.named_modules()
            if isinstance(getattr(m, "eps", None), torch.Tensor) and m.eps.numel() == 1}


def _run_one(settings: SweepSettings, arm: str, seed: int, progress: bool) -> dict[str, Any]:
    """Train one arm with one seed; return its record. Raises ``_Interrupted`` on Ctrl-C."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    seed_everything(seed, workers=True)
    datamodule = _make_datamodule(settings)
    model = _make_model(settings, arm)
    history = _history_callback()
    logger = TensorBoardLogger(settings.out, name=arm, version=f"seed{seed}", default_hp_metric=False)
    bar = _progress_kwargs(settings.trainer_kwargs, progress)
    trainer = Trainer(
        max_epochs=settings.epochs,
        logger=logger,
        callbacks=[_make_eafo_callback(settings, arm), history, *bar.pop("callbacks", [])],
        default_root_dir=settings.out,
        **bar,
        **settings.trainer_kwargs,
    )
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule)
    except SystemExit:
        # Lightning turns Ctrl-C inside fit into a graceful shutdown and sys.exit(1).
        if trainer.interrupted:
            raise _Interrupted() from None
        raise
    wall = time.perf_counter() - start
    if trainer.interrupted:
        raise _Interrupted()
    epochs = history.epochs
    acc = [row["acc1"] for row in epochs if "acc1" in row]
    entropy = _read_entropy(logger.log_dir)
    final_layers = {layer: points[-1][1] for layer, points in entropy.items() if points}
    finite = [v for v in final_layers.values() if math.isfinite(v)]
    return {
        "arm": arm,
        "seed": seed,
        "status": "ok" if acc else "failed",
        "error": None if acc else "no validation epoch finished (check limit_val_batches / check_val_every_n_epoch)",
        "top1_final": acc[-1] if acc else None,
        "top1_best": max(acc) if acc else None,
        "epochs": epochs,
        "entropy_final_mean": sum(finite) / len(finite) if finite else None,
        "entropy_final": final_layers,
        "entropy_series": entropy,
        "eps_final": _activation_eps(model),
        "steps": trainer.global_step,
        "params": sum(p.numel() for p in model.parameters()),
        "data_sizes": _data_sizes(datamodule),
        "wall_time_s": wall,
        "tensorboard": os.path.relpath(logger.log_dir, settings.out),
    }


class _Interrupted(Exception):
    """Ctrl-C during a run."""


# ============================================================================ statistics


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    import numpy as np

    if not values:
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _paired(arm_runs: dict[int, dict], control_runs: dict[int, dict]) -> dict[str, Any]:
    """Mean of ``top1(arm, s) - top1(control, s)`` over shared seeds, with a Student-t 95% CI."""
    import numpy as np
    from scipy import stats

    seeds = sorted(set(arm_runs) & set(control_runs))
    diffs = np.asarray([arm_runs[s]["top1_final"] - control_runs[s]["top1_final"] for s in seeds], dtype=float)
    n = int(diffs.size)
    if n == 0:
        return {"n": 0, "seeds": [], "mean": None, "ci95": None}
    mean = float(diffs.mean())
    if n == 1:
        return {"n": 1, "seeds": seeds, "mean": mean, "ci95": None}
    half = float(stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return {"n": n, "seeds": seeds, "mean": mean, "ci95": [mean - half, mean + half]}


def summarize(records: list[dict[str, Any]], arms: Sequence[str], control: str = _CONTROL) -> dict[str, dict[str, Any]]:
    """Per-arm statistics over the seeds of the finished (``status == "ok"``) runs.

    For each arm: ``n``; ``top1_mean`` / ``top1_std`` (sample std, ``ddof=1``; 0 when ``n == 1``)
    of the final validation top-1; ``top1_best_mean`` / ``top1_best_std``; ``entropy_mean`` /
    ``entropy_std`` of the final output entropy (nats, mean over layers); ``wall_time_mean``; and
    ``delta``: the paired difference against ``control`` over the seeds both finished,
    ``mean = (1/n) sum_s (top1[arm, s] - top1[control, s])`` with the 95% interval
    ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (``None`` for ``n < 2``).
    """
    ok: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for rec in records:
        if rec.get("status") == "ok" and rec["arm"] in ok:
            ok[rec["arm"]][rec["seed"]] = rec
    summary: dict[str, dict[str, Any]] = {}
    for arm in arms:
        runs = [ok[arm][s] for s in sorted(ok[arm])]
        top1_mean, top1_std = _mean_std([r["top1_final"] for r in runs])
        best_mean, best_std = _mean_std([r["top1_best"] for r in runs])
        ent_mean, ent_std = _mean_std([r["entropy_final_mean"] for r in runs if r.get("entropy_final_mean") is not None])
        wall_mean, _ = _mean_std([r["wall_time_s"] for r in runs])
        summary[arm] = {
            "n": len(runs),
            "seeds": sorted(ok[arm]),
            "top1_mean": top1_mean,
            "top1_std": top1_std,
            "top1_best_mean": best_mean,
            "top1_best_std": best_std,
            "entropy_mean": ent_mean,
            "entropy_std": ent_std,
            "wall_time_mean": wall_mean,
            "delta": None if arm == control else _paired(ok[arm], ok.get(control, {})),
        }
    return summary


# ============================================================================ report and plots

_DISPLAY = {"relu": "ReLU", "crrelu": "CRReLU", "eafo": "EAFO (dynamic)", "gelu": "GELU", "elu": "ELU",
            "prelu": "PReLU", "celu": "CELU", "silu": "SiLU", "mish": "Mish"}


def _fmt(value: Optional[float], digits: int = 3, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _table(results: dict[str, Any]) -> list[str]:
    settings, summary = results["settings"], results["summary"]
    arms, control = settings["arms"], settings["control"]
    head = "| | " + " | ".join(_DISPLAY.get(a, a) for a in arms) + " |"
    rows = [head, "|---|" + "---:|" * len(arms)]

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(summary[a], a) for a in arms) + " |"

    rows.append(row("top-1, mean ± std", lambda s, a: f"{_fmt(s['top1_mean'])} ± {_fmt(s['top1_std'])} (n={s['n']})"))
    rows.append(row("best top-1, mean ± std", lambda s, a: f"{_fmt(s['top1_best_mean'])} ± {_fmt(s['top1_best_std'])}"))

    def delta(s, a) -> str:
        if a == control:
            return "control"
        d = s["delta"]
        if not d or d["mean"] is None:
            return "n/a (no paired seeds)"
        ci = "n/a (n=1)" if d["ci95"] is None else f"{_fmt(d['ci95'][0], sign=True)}, {_fmt(d['ci95'][1], sign=True)}"
        return f"{_fmt(d['mean'], sign=True)} [{ci}]"

    rows.append(row(f"Δ top-1 vs {_DISPLAY.get(control, control)} [95% CI]", delta))
    rows.append(row("final output entropy, nats", lambda s, a: f"{_fmt(s['entropy_mean'])} ± {_fmt(s['entropy_std'])}"))
    rows.append(row("wall time per run, s", lambda s, a: _fmt(s["wall_time_mean"], 1)))
    return rows


def _verdicts(results: dict[str, Any]) -> list[str]:
    settings, summary = results["settings"], results["summary"]
    control = _DISPLAY.get(settings["control"], settings["control"])
    lines = []
    for arm in settings["arms"]:
        d = summary[arm]["delta"]
        if arm == settings["control"] or not d or d["mean"] is None:
            continue
        name = _DISPLAY.get(arm, arm)
        if d["ci95"] is None:
            verdict = "one paired seed: no interval, run more seeds"
        elif d["ci95"][0] > 0:
            verdict = f"better than {control} at this n (the interval excludes 0)"
        elif d["ci95"][1] < 0:
            verdict = f"worse than {control} at this n (the interval excludes 0)"
        else:
            verdict = f"not distinguishable from {control} at this n (the interval contains 0)"
        lines.append(f"- {name}: {_fmt(d['mean'], sign=True)} top-1 over {d['n']} paired seeds; {verdict}.")
    return lines


def write_report(out: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write ``report.md`` (table, verdicts, per-run rows, plots) for ``results`` into ``out``."""
    out = Path(out)
    settings, env = results["settings"], results["environment"]
    done = [r for r in results["runs"] if r["status"] == "ok"]
    first = done[0] if done else {}
    sizes = first.get("data_sizes") or {}
    data = f"{sizes['train']:,} training / {sizes['val']:,} validation images" if {"train", "val"} <= set(sizes) else "n/a"
    params = f", {first['params']:,} parameters" if "params" in first else ""
    steps = f" ({first['steps']} optimizer steps)" if "steps" in first else ""
    total = sum(r["wall_time_s"] for r in done)
    trainer = ", ".join(f"{k}={v}" for k, v in settings["trainer_kwargs"].items())
    lines = [
        f"# dynact compare: {settings['task']}, {settings['model']}",
        "",
        f"What this is: {settings['about']}. Data: {data}. Model: {settings['model']}{params}. "
        f"{settings['epochs']} epochs per run{steps}; seeds {', '.join(map(str, settings['seeds']))}; "
        f"arms {', '.join(settings['arms'])}; {len(done)} of {len(settings['arms']) * len(settings['seeds'])} "
        f"runs finished, {total / 60:.1f} min of training in all. Machine: {env['machine']}. "
        f"Trainer: {trainer}. Written {results['written']}.",
        "",
        "Top-1 is the final validation accuracy (fraction, as in the paper's tables); ± is the sample "
        "standard deviation over seeds. Δ is the mean over seeds of (arm − control), paired by seed "
        "(same initialisation and data order), with a Student-t 95% confidence interval. Output "
        "entropy is the discretised entropy H_Δ of each MLP activation's output (eafo-math.md section 1, "
        "at EAFOCallback's resolution delta) at the last measurement, averaged over layers.",
        "",
        *_table(results),
        "",
        *_verdicts(results),
        "",
        f"![validation top-1 vs epoch]({_PNG_ACC})",
        "",
        f"![output entropy per layer vs step]({_PNG_ENTROPY})",
        "",
        "## Runs",
        "",
        "| arm | seed | top-1 | best top-1 | output entropy, nats | steps | wall time, s | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['arm']} | {r['seed']} | {_fmt(r.get('top1_final'))} | {_fmt(r.get('top1_best'))} | "
            f"{_fmt(r.get('entropy_final_mean'))} | {r.get('steps', 'n/a')} | {_fmt(r.get('wall_time_s'), 1)} | "
            f"{_run_status(r)} |"
        )
    lines += [
        "",
        f"TensorBoard: `tensorboard --logdir {settings['out']}`. Per-run records: `{_RECORDS}/`. "
        f"Command: `{results['command']}`.",
        "",
    ]
    path = out / "report.md"
    _atomic_write(path, "\n".join(lines))
    return path


def _run_status(rec: dict[str, Any]) -> str:
    if rec["status"] == "failed":
        return "failed: " + str(rec.get("error"))[:120].replace("|", "/")
    return rec["status"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_accuracy(results: dict[str, Any], path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, arm in enumerate(results["settings"]["arms"]):
        curves = [[row["acc1"] for row in r["epochs"] if "acc1" in row]
                  for r in results["runs"] if r["arm"] == arm and r["status"] == "ok"]
        if not curves:
            continue
        length = min(map(len, curves))
        acc = np.asarray([c[:length] for c in curves])
        x = np.arange(1, length + 1)
        ax.plot(x, acc.mean(0), marker="o", ms=3, color=f"C{i}", label=f"{_DISPLAY.get(arm, arm)} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(x, acc.min(0), acc.max(0), color=f"C{i}", alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1")
    ax.set_title("validation top-1: mean over seeds, band = min to max")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_entropy(results: dict[str, Any], records: dict[tuple[str, int], dict], path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    arms = results["settings"]["arms"]
    cols = min(3, len(arms))
    rows = math.ceil(len(arms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(arms):]:
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis")
    for ax, arm in zip(axes.flat, arms):
        runs = [rec for (a, _), rec in sorted(records.items()) if a == arm and rec["status"] == "ok"]
        layers = sorted({layer for r in runs for layer in r.get("entropy_series", {})}, key=_layer_order)
        for j, layer in enumerate(layers):
            by_step: dict[int, list[float]] = {}
            for r in runs:
                for step, value in r["entropy_series"].get(layer, []):
                    by_step.setdefault(step, []).append(value)
            steps = sorted(by_step)
            ax.plot(steps, [np.mean(by_step[s]) for s in steps], color=cmap(j / max(1, len(layers) - 1)),
                    label=layer.removeprefix("net."), lw=1.2)
        ax.set_title(f"{_DISPLAY.get(arm, arm)} (mean of {len(runs)} seeds)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("output entropy, nats")
        ax.grid(alpha=0.3)
        if layers:
            ax.legend(fontsize=6, title="layer", title_fontsize=7)
        else:
            ax.text(0.5, 0.5, "no entropy logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("output entropy of each MLP activation vs step", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _layer_order(name: str) -> list:
    # "blocks.10.mlp.act" after "blocks.9.mlp.act": compare digit runs as numbers.
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.replace("/", ".").split(".")]


# ============================================================================ files


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is either the old file or the whole new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _record_path(out: Path, arm: str, seed: int) -> Path:
    return out / _RECORDS / f"{arm}-seed{seed}.json"


def _load_records(out: Path) -> dict[tuple[str, int], dict]:
    records = {}
    for path in sorted((out / _RECORDS).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            records[(rec["arm"], int(rec["seed"]))] = rec
        except (OSError, ValueError, KeyError):
            continue  # a foreign or damaged file: that run is redone
    return records


def _prepare_out(settings: SweepSettings, resume: bool) -> dict[tuple[str, int], dict]:
    """Create ``--out``, check it is writable and consistent; return the finished records."""
    out = Path(settings.out)
    try:
        (out / _RECORDS).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(
            f"--out {str(out)!r} is not a writable folder ({err.strerror or err}); choose another --out"
        ) from None
    saved_path = out / _SETTINGS_FILE
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    records = _load_records(out)
    if not resume and (saved is not None or records):
        raise ValueError(
            f"--out {str(out)!r} already holds a sweep ({len(records)} finished runs); pass --resume to "
            "continue it, or choose a new --out"
        )
    if saved is not None:
        current = json.loads(json.dumps(settings.identity()))
        differ = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
        if differ:
            details = "; ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differ)
            raise ValueError(
                f"--resume: the sweep in {str(out)!r} has other settings ({details}); resume it with the same "
                "options (arms and seeds may grow) or choose a new --out"
            )
    else:
        _atomic_write(saved_path, json.dumps(settings.identity(), indent=2))
    return {key: rec for key, rec in records.items() if rec.get("status") == "ok"}


def _environment(settings: SweepSettings) -> dict[str, Any]:
    import lightning
    import torch

    accel = str(settings.trainer_kwargs.get("accelerator", "auto"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda") else None
    cpu = platform.processor() or platform.machine()
    threads = settings.threads or torch.get_num_threads()
    machine = gpu or f"{os.cpu_count()} CPU cores ({cpu}), {threads} torch thread{'s' if threads > 1 else ''} per run"
    return {
        "machine": machine,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }


# ============================================================================ the sweep


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Keep a sweep's output to its own bar: Lightning's per-run notices repeat for every run."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # Benign for in-memory data (digits) and short runs; said once here instead of per run.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _restore_global_state(threads: Optional[int] = None) -> Iterator[None]:
    """Set torch's thread count for the runs, and undo what Trainers change process-wide:
    ``deterministic`` flips torch's flag, and a Ctrl-C inside ``fit`` leaves SIGINT ignored."""
    import torch

    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    sigint = signal.getsignal(signal.SIGINT)
    num_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        signal.signal(signal.SIGINT, sigint)
        torch.set_num_threads(num_threads)


def _summary_line(rec: dict[str, Any]) -> str:
    if rec["status"] != "ok":
        where = f"{_RECORDS}/{rec['arm']}-seed{rec['seed']}.json"
        return f"{rec['arm']} seed {rec['seed']}: FAILED ({rec.get('error')}); traceback in {where}"
    return (f"{rec['arm']} seed {rec['seed']}: top-1 {rec['top1_final']:.3f} (best {rec['top1_best']:.3f}), "
            f"output entropy {_fmt(rec.get('entropy_final_mean'))} nats, {rec['wall_time_s']:.1f} s")


def run_sweep(settings: SweepSettings, resume: bool = False, progress: bool = True, command: str = "") -> dict[str, Any]:
    """Run every (arm, seed) not finished yet, then write ``results.json``, the plots and the report.

    Runs go seed by seed (all arms for seed 0, then seed 1, ...), so an interrupted sweep already
    holds complete pairs. A run that raises is recorded as failed and redone by ``--resume``.
    On Ctrl-C the files are written for the runs finished so far, then the interrupt goes on.

    Returns:
        The results (what ``results.json`` holds).

    Raises:
        ValueError: ``out`` is not writable, or already holds a sweep and ``resume`` is False,
            or holds one with other settings.
        KeyboardInterrupt: Ctrl-C; every run finished before it is kept.
    """
    from tqdm.auto import tqdm

    out = Path(settings.out)
    records = _prepare_out(settings, resume)
    plan = [(arm, seed) for seed in settings.seeds for arm in settings.arms]
    todo = [key for key in plan if key not in records]
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="sweep", unit="run", position=0,
               leave=True, disable=not progress, dynamic_ncols=True)
    try:
        with _quiet_lightning(), _restore_global_state(settings.threads):
            for arm, seed in todo:
                bar.set_postfix_str(f"{arm} seed {seed}")
                # Files of an unfinished earlier attempt would overlay this run in TensorBoard.
                shutil.rmtree(out / arm / f"seed{seed}", ignore_errors=True)
                try:
                    rec = _run_one(settings, arm, seed, progress)
                except _Interrupted:
                    raise KeyboardInterrupt from None
                except Exception as err:  # one bad run must not cost the others
                    rec = {"arm": arm, "seed": seed, "status": "failed", "error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc(limit=-12)}
                _atomic_write(_record_path(out, arm, seed), json.dumps(rec))
                if rec["status"] == "ok":
                    records[(arm, seed)] = rec
                bar.update(1)
                (bar.write if progress else print)(_summary_line(rec))
    except KeyboardInterrupt:
        if records:  # a report of what finished; the rest shows as not run yet
            bar.close()
            _write_results(settings, command, records, _load_records(out))
        raise
    finally:
        bar.close()
    return _write_results(settings, command, records, _load_records(out))


def _write_results(settings: SweepSettings, command: str, ok: dict, all_records: dict) -> dict[str, Any]:
    out = Path(settings.out)
    keys = [(arm, seed) for arm in settings.arms for seed in settings.seeds]
    runs = []
    for key in keys:
        rec = ok.get(key) or all_records.get(key) or {"arm": key[0], "seed": key[1], "status": "not run"}
        runs.append({k: v for k, v in rec.items() if k != "entropy_series"})
    results = {
        "settings": asdict(settings),
        "environment": _environment(settings),
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "summary": summarize(runs, settings.arms, settings.control),
        "runs": runs,
        "report": "report.md",
        "plots": [_PNG_ACC, _PNG_ENTROPY],
    }
    _plot_accuracy(results, out / _PNG_ACC)
    _plot_entropy(results, {k: v for k, v in ok.items() if k in set(keys)}, out / _PNG_ENTROPY)
    _atomic_write(out / "results.json", json.dumps(results, indent=2))
    write_report(out, results)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    """``dynact compare``: validate everything, run the sweep, write the report; return the exit code.

    Bad input exits with code 2 and a message on stderr before any training; Ctrl-C keeps the
    finished runs, says how to resume and returns 130; a sweep with failed runs returns 1.
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    try:
        rest, overrides = _split_overrides(args_in)
    except ValueError as err:
        parser.error(str(err))
    args = parser.parse_args(rest)
    try:
        settings = _settings_from_args(args, overrides)
        _dry_build(settings)
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    command = "dynact compare " + " ".join(args_in)
    try:
        results = run_sweep(settings, resume=args.resume, progress=not args.no_progress, command=command)
    except ValueError as err:  # --out problems, raised before any training
        parser.error(str(err))
    except KeyboardInterrupt:
        done = len(_load_records(Path(settings.out)))
        print(f"\ninterrupted: {done} finished runs are kept in {settings.out}; continue with:\n"
              f"  {command} --resume", file=sys.stderr)
        return _EXIT_INTERRUPTED
    out = Path(settings.out)
    print(f"report: {out / 'report.md'}  results: {out / 'results.json'}")
    failed = [r for r in results["runs"] if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} runs failed; fix the cause and rerun with --resume to redo them", file=sys.stderr)
        return 1
    return 0


def _dry_build(settings: SweepSettings) -> None:
    """Build the data module, every arm's model and callback, and a Trainer: errors surface now."""
    from lightning.pytorch import Trainer

    with _quiet_lightning(), _restore_global_state():
        datamodule = _make_datamodule(settings)
        try:
            datamodule.prepare_data()
            datamodule.setup("fit")
        except FileNotFoundError:
            raise  # the data modules say where the files should be
        except Exception as err:
            raise ValueError(f"data ({settings.data_class}): {err}") from err
        for arm in settings.arms:
            try:
                _make_model(settings, arm)
                _make_eafo_callback(settings, arm)
            except Exception as err:
                extra = settings.model_kwargs.get("model_kwargs")
                hint = (f" (the settings give model_kwargs={extra}; change them with "
                        "--model.model_kwargs.KEY VALUE)") if extra else ""
                raise ValueError(f"arm {arm!r} with model {settings.model!r}: {err}{hint}") from err
        try:
            Trainer(max_epochs=settings.epochs, logger=False, callbacks=[], **settings.trainer_kwargs)
        except Exception as err:
            raise ValueError(f"Trainer options {settings.trainer_kwargs}: {type(err).__name__}: {err}") from err


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
