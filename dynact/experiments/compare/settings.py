"""What a sweep is: the tasks' defaults, the command line, and :class:`SweepSettings`.

Everything here validates and resolves; nothing trains. Two sweeps with equal
:meth:`SweepSettings.identity` are the same experiment, and every run's record carries that
identity, so a record made under other settings is recognised as foreign.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from lightning.pytorch import Trainer

from dynact.activations import activation_names, resolve_activation
from dynact.callbacks import EAFOCallback
from dynact.experiments import configs
from dynact.experiments.models import ImageClassifier, model_names

if TYPE_CHECKING:  # importlib.resources.abc from Python 3.11, importlib.abc before
    from importlib.resources.abc import Traversable

#: ``task -> defaults``. ``config`` names a config shipped in the package (:mod:`dynact.experiments.configs`);
#: otherwise the data module's and ``ImageClassifier``'s own defaults are the paper's recipe and
#: ``model`` adds the task's geometry. ``epochs`` and ``seeds``: the sweep's default size;
#: ``threads``: torch's intra-op CPU threads per run (absent: torch's default); ``workers``: runs
#: in parallel processes (``"cpus"``: one per CPU core this process may use, divided by
#: ``threads``; absent: 1, in this process); ``callback``: EAFOCallback defaults of the task.
TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "config": "digits_sweep.yaml",
        # The report checks every run's top-1 over its last 5 epochs against a stated bound
        # (stats.PLATEAU_BOUND) and names the runs over it.
        "epochs": 20,
        # Half the images held out (899): a seed's paired top-1 difference varies by about 0.7-1.0
        # points between seeds (0.75-1.1 with 360 held out; 0.73-0.84 on one machine, 0.85-0.97
        # with DYNACT_KERNELS=reference on seeds 0-39), so 50 seeds keep each simultaneous
        # half-width at or under 0.35 points for the three comparisons at the larger spread (README).
        # A run is 280 optimizer steps, 7 to 25 s of one core depending on the machine.
        "seeds": 50,
        # The model is tiny: one thread per run and one run per core; on a busy CPU the threads
        # of one small run wait on each other (see the shipped config digits.yaml).
        "threads": 1,
        "workers": "cpus",
        # Figures and histograms cost more than the training step of this small model.
        "callback": {"curves_every": 0, "log_histograms": False},
        # 14 steps per epoch: the dynamic arm is refreshed 14 times in a run.
        "every_n_steps": 20,
        "about": "scikit-learn's 8x8 digits (small data); a check on a small task, not the paper's setting",
    },
    "cifar10": {
        "data": "dynact.experiments.data.CIFAR10DataModule",
        "model": {"arch": "vit_tiny", "num_classes": 10, "img_size": 32, "patch_size": 4},
        "epochs": 100,
        "about": "CIFAR-10 with the paper's recipe (Appendix E)",
    },
    "cifar100": {
        "data": "dynact.experiments.data.CIFAR100DataModule",
        "model": {"arch": "vit_tiny", "num_classes": 100, "img_size": 32, "patch_size": 4},
        "epochs": 100,
        "about": "CIFAR-100 with the paper's recipe (Appendix E)",
    },
    "imagenet": {
        "data": "dynact.experiments.data.ImageNetDataModule",
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
    "data": {"seed": "--seeds (each seed draws its own split of the data)"},
    "callback": {"mode": "the arm (eafo: refresh, others: monitor)", "convert": "the arm",
                 "every_n_steps": "--every-n-steps"},
}
CONTROL = "relu"
#: The family-wise confidence of the simultaneous intervals.
FAMILY_CONFIDENCE = 0.95
#: The static arm the dynamic one is compared with, besides the control, when both run.
STATIC_PARTNER = "crrelu"


def comparison_pairs(arms: Sequence[str], control: str = CONTROL) -> list[tuple[str, str]]:
    """``(arm, against)`` for every comparison the sweep makes: each arm against ``control``,
    then the dynamic arm against its static partner (CRReLU) when both run and neither is the control."""
    pairs = [(arm, control) for arm in arms if arm != control]
    if DYNAMIC_ARM in arms and STATIC_PARTNER in arms and control not in (DYNAMIC_ARM, STATIC_PARTNER):
        pairs.append((DYNAMIC_ARM, STATIC_PARTNER))
    return pairs


def family_confidence(k: int) -> float:
    """Bonferroni: each of ``k`` intervals at ``1 - (1 - FAMILY_CONFIDENCE) / k`` holds for all ``k`` together."""
    return 1.0 - (1.0 - FAMILY_CONFIDENCE) / max(1, k)


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
    control: str = CONTROL
    every_n_steps: int = 10
    callback_kwargs: dict[str, Any] = field(default_factory=dict)
    config: Optional[str] = None
    data_class: str = ""
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    threads: Optional[int] = None
    workers: int = 1
    about: str = ""

    def identity(self) -> dict[str, Any]:
        """The fields that must agree between a sweep and its resumption (JSON-normalised, so it
        compares equal to what a record or ``sweep.json`` read back holds)."""
        free = ("arms", "seeds", "out", "control", "threads", "workers", "about")
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k not in free}))


def load_config(path: Path | Traversable) -> dict[str, Any]:
    """Read a ``dynact train`` (LightningCLI) YAML config into model / data / trainer sections."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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
            "and init_args, as in the shipped config digits.yaml"
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


def import_class(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"cannot import {path!r} ({err}); give a full class path such as dynact.experiments.data.DigitsDataModule"
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


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
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


#: Seconds of one CPU core per digits run, over the machines measured (README); the time line of --help.
DIGITS_RUN_SECONDS = (7, 25)


def _description() -> str:
    """``dynact compare --help``'s opening: what it writes, every comparison with the intervals
    actually used, and roughly how long it takes (the numbers come from the defaults)."""
    pairs = comparison_pairs(DEFAULT_ARMS, CONTROL)
    k, digits = len(pairs), TASKS["digits"]
    runs = len(DEFAULT_ARMS) * digits["seeds"]
    low, high = (round(runs * s / 2 / 60) for s in DIGITS_RUN_SECONDS)
    return (
        "Train every arm (activation) with every seed through the same model, data and schedule; write "
        "TensorBoard runs, results.json, report.md (a table like the paper's) and plots. "
        f"Comparisons, paired by seed: each arm against the control (--control, default {CONTROL}), and dynamic "
        f"{DYNAMIC_ARM} against static {STATIC_PARTNER} when both run and neither is the control; with the default "
        f"arms that is {', '.join(f'{a} - {b}' for a, b in pairs)}. Intervals: Student-t, Bonferroni-adjusted so "
        f"that all k comparisons hold together with {FAMILY_CONFIDENCE:.0%} confidence, each at "
        f"1 - {1 - FAMILY_CONFIDENCE:.2g}/k ({100 * family_confidence(k):.2f}% for the default {k}); the report "
        "states the level used. "
        f"Time: a digits run is {digits['epochs']} epochs of 14 steps, about {DIGITS_RUN_SECONDS[0]} to "
        f"{DIGITS_RUN_SECONDS[1]} s of one CPU core depending on the machine, so the default {runs} runs "
        f"({len(DEFAULT_ARMS)} arms x {digits['seeds']} seeds) take about {low} to {high} minutes on 2 cores "
        "(plus a minute or two of start-up and report); a paper task's run is 100 epochs of a ViT on a GPU, "
        "hours each (days for ImageNet-1K)."
    )


_EPILOG = (
    "Overrides, as in 'dynact train': --trainer.KEY VALUE (any lightning Trainer argument, "
    "e.g. --trainer.accelerator gpu --trainer.precision bf16-mixed --trainer.limit_train_batches 0.1), "
    "--model.KEY VALUE (ImageClassifier, e.g. --model.lr 1e-3 --model.model_kwargs.depth 6), "
    "--data.KEY VALUE (the data module, e.g. --data.root /data --data.batch_size 128) and "
    "--callback.KEY VALUE (EAFOCallback, e.g. --callback.estimator hist --callback.curves_every 0). "
    "Values parse as JSON when they can (numbers, true/false/null, lists), else as strings."
)


def build_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(prog="dynact compare", description=_description(), epilog=_EPILOG)
    p.add_argument("--task", default="digits", choices=list(TASKS), help="data set (default: digits, offline)")
    p.add_argument("--model", default=None, help=f"architecture: {', '.join(model_names())} (default: the task's)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma-separated activations from: {', '.join(activation_names())}; {DYNAMIC_ARM} is the "
                   f"dynamic one, the rest are static (default: {','.join(DEFAULT_ARMS)})")
    p.add_argument("--control", default=CONTROL,
                   help="arm the others are compared with, paired by seed (default: relu)")
    p.add_argument("--seeds", default=None,
                   help="the seeds of every arm: a count N (seeds 0 .. N-1), a range A:B (seeds A .. B-1, e.g. 8:16) "
                   "or a list (3,5,9); at each seed every arm shares initial weights, data order and "
                   f"split (default: the task's; digits {TASKS['digits']['seeds']}, paper tasks 3)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per run (default: the task's; digits {TASKS['digits']['epochs']}, paper tasks 100)")
    p.add_argument("--every-n-steps", type=int, default=None,
                   help="optimizer steps between EAFOCallback's updates and measurements (default: the task's; "
                   f"digits {TASKS['digits']['every_n_steps']}, paper tasks 200)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's intra-op CPU threads per run (default: 1 for digits, whose model is "
                   "tiny, else torch's default)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs trained at once, each in its own process (default: digits one per CPU core "
                   "divided by --threads; else 1, in this process, e.g. one GPU)")
    p.add_argument("--config", default=None,
                   help="a 'dynact train' YAML config replacing the task's settings: a path, or the name of a "
                   f"shipped config (digits uses {TASKS['digits']['config']})")
    p.add_argument("--out", default="compare_out", help="output folder (default: compare_out)")
    p.add_argument("--resume", action="store_true", help="continue a sweep in --out, skipping finished runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per finished run)")
    return p


def _check_flags(args: argparse.Namespace, arms: list[str]) -> str:
    """The counts are at least 1 and the control is an arm; returns the control."""
    for flag in ("epochs", "every_n_steps", "threads", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    control = args.control.strip().lower()
    if control not in arms:
        raise ValueError(f"--control {control!r} is not among --arms ({', '.join(arms)}); "
                         "add it or pick one of the arms")
    return control


def _base(args: argparse.Namespace, task: dict[str, Any]) -> tuple[dict[str, Any], Optional[str]]:
    """The task's or ``--config``'s data, model and trainer settings, and where they came from:
    a file's absolute path, or ``dynact:NAME.yaml`` for a shipped config (the same wherever the
    package is installed, so a sweep resumes after a reinstall)."""
    if args.config is None and "config" not in task:
        return {"data_class": task["data"], "data_kwargs": {}, "model_kwargs": dict(task["model"]),
                "trainer_kwargs": {}}, None
    spec = args.config if args.config is not None else task["config"]
    path = Path(spec).expanduser()
    if path.is_file():
        return load_config(path), str(path.resolve())
    shipped = configs.lookup(spec)
    if shipped is None:
        raise ValueError(f"--config {configs.not_found_message(spec)}")
    return load_config(shipped), f"dynact:{shipped.name}"


def settings_from_args(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> SweepSettings:
    """Validate the command line and resolve the sweep's settings; raises ValueError, trains nothing."""
    arms = _arm_list(args.arms)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    control = _check_flags(args, arms)
    task = TASKS[args.task]
    base, config = _base(args, task)
    model_kwargs = _merge(base["model_kwargs"], overrides["model"])
    model = (args.model or model_kwargs.get("arch") or "vit_tiny").strip().lower()
    if model not in model_names():
        raise ValueError(f"--model: unknown model {model!r}; choose one of: {', '.join(model_names())}")
    for key in ("arch", "act", "act_kwargs"):  # set per arm by the sweep
        model_kwargs.pop(key, None)
    _check_keys("model", overrides["model"], ImageClassifier.__init__, "ImageClassifier")
    data_class = import_class(base["data_class"])
    _check_keys("data", overrides["data"], data_class.__init__, data_class.__name__)
    trainer_kwargs = {k: v for k, v in base["trainer_kwargs"].items() if k not in _RESERVED["trainer"]}
    # The config's split seed gives way to the run's seed (each seed draws its own split).
    data_kwargs = {k: v for k, v in base["data_kwargs"].items() if k not in _RESERVED["data"]}
    _check_keys("trainer", overrides["trainer"], Trainer.__init__, "lightning's Trainer")
    _check_keys("callback", overrides["callback"], EAFOCallback.__init__, "EAFOCallback")
    threads = args.threads or task.get("threads")
    seeds = seeds or list(range(task.get("seeds", 3)))
    return SweepSettings(
        task=args.task, model=model, arms=arms, seeds=seeds, epochs=args.epochs or task["epochs"],
        out=str(Path(args.out).expanduser()), control=control,
        every_n_steps=args.every_n_steps or task.get("every_n_steps", 200),
        callback_kwargs=_merge(task.get("callback", {}), overrides["callback"]),
        config=config, data_class=base["data_class"], data_kwargs=_merge(data_kwargs, overrides["data"]),
        model_kwargs=model_kwargs,
        trainer_kwargs=_merge(_merge(_TRAINER_DEFAULTS, trainer_kwargs), overrides["trainer"]),
        threads=threads, workers=min(args.workers or _default_workers(task, threads), len(arms) * len(seeds)),
        about=task["about"] if args.config is None else f"{args.task} with the settings of {config}",
    )


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: ``"8"`` -> 0..7; ``"8:16"`` -> 8..15; ``"3,5,9"`` -> [3, 5, 9] (raises ValueError)."""
    text = str(text).strip()
    hint = "give a count (8: seeds 0-7), a range (8:16: seeds 8-15) or a list (3,5,9)"
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            low, high = int(start), int(stop)
            if low < 0 or high <= low:
                raise ValueError(f"--seeds {text!r}: a range A:B needs 0 <= A < B (B itself is not included); {hint}")
            return list(range(low, high))
        if "," in text:
            seeds = [int(part) for part in text.split(",") if part.strip()]
            if not seeds or min(seeds) < 0:
                raise ValueError(f"--seeds {text!r}: seeds are whole numbers from 0; {hint}")
            duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
            if duplicates:
                raise ValueError(f"--seeds {text!r}: {', '.join(map(str, duplicates))} given more than once; "
                                 "list each seed once")
            return seeds
        count = int(text)
    except ValueError as err:
        if str(err).startswith("--seeds"):
            raise
        raise ValueError(f"--seeds {text!r} is not a seed count, range or list; {hint}") from None
    if count < 1:
        raise ValueError(f"--seeds must be at least 1, got {count}; {hint}")
    return list(range(count))


def _default_workers(task: dict[str, Any], threads: Optional[int]) -> int:
    if task.get("workers") != "cpus":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // (threads or 1))

