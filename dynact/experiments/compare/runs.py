"""One run (an arm at a seed) through Lightning's Trainer, and many of them in parallel processes.

A run seeds everything with its seed before building the data module (whose split is drawn by
the same seed) and the model, so at one seed every arm starts from the same weights and sees
the same split and batch order: the arms' differences are paired. Its record holds the final and
per-epoch validation figures, and the per-layer measures that
:class:`~dynact.callbacks.EAFOCallback` computed at its last update (read in the process from
``EAFOCallback.metrics``, keyed ``<metric>/<layer>``).

Runs are independent, so :func:`execute` trains them in ``settings.workers`` processes (spawned,
each with ``settings.threads`` torch threads, reused for many runs so that importing torch and
Lightning is paid once per process), or in this process when ``workers == 1``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import multiprocessing
import signal
import time
import traceback
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from dynact.callbacks import EAFOCallback
from dynact.experiments.compare.records import RECORD_VERSION, clear_run_files
from dynact.experiments.compare.settings import DYNAMIC_ARM, SweepSettings, import_class
from dynact.experiments.models import ImageClassifier

#: Per-layer measures kept from ``EAFOCallback.metrics`` (``docs/math.md``, "Per-layer measures").
MEASURES = ("dead", "entropy", "entropy_scale_free", "log_slope", "std", "eps", "outside")


class Interrupted(Exception):
    """Ctrl-C during a run."""


def make_datamodule(settings: SweepSettings, seed: int):
    """The data module of run ``seed``: a module that takes a ``seed`` draws its split with it."""
    cls = import_class(settings.data_class)
    kwargs = dict(settings.data_kwargs)
    if "seed" in inspect.signature(cls.__init__).parameters:
        kwargs["seed"] = seed
    return cls(**kwargs)


def make_model(settings: SweepSettings, arm: str):
    # The dynamic arm starts from ReLU; the callback turns its activations into EAFOActivation.
    act = "relu" if arm == DYNAMIC_ARM else arm
    return ImageClassifier(arch=settings.model, act=act, **settings.model_kwargs)


def make_eafo_callback(settings: SweepSettings, arm: str):
    """The callback of one arm: it updates the dynamic arm and only measures the static ones."""
    from torch import nn

    kwargs: dict[str, Any] = {"every_n_steps": settings.every_n_steps, **settings.callback_kwargs}
    if arm == DYNAMIC_ARM:
        return EAFOCallback(mode="refresh", convert=(nn.ReLU,), **kwargs)
    return EAFOCallback(mode="monitor", convert=(), **kwargs)


def layer_measures(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"dead/net.blocks.0.mlp.act": x, ...}`` -> ``{"net.blocks.0.mlp.act": {"dead": x}, ...}``."""
    layers: dict[str, dict[str, float]] = {}
    for tag, value in metrics.items():
        metric, _, layer = tag.partition("/")
        if metric in MEASURES and layer:
            layers.setdefault(layer, {})[metric] = float(value)
    return layers


def history_callback(eafo_callback, on_epoch: Optional[Callable[[int], None]] = None):
    """A callback that keeps each epoch's validation figures and the layers' latest measures."""
    from lightning.pytorch.callbacks import Callback

    class History(Callback):
        def __init__(self) -> None:
            self.epochs: list[dict[str, Any]] = []
            # Each layer's latest value of each measure: a window that only re-places a grid
            # reports ``outside`` alone, and must not drop the layer's other measures.
            self.latest: dict[str, dict[str, float]] = {}

        def _merge(self) -> None:
            for layer, measures in layer_measures(getattr(eafo_callback, "metrics", None) or {}).items():
                self.latest.setdefault(layer, {}).update(measures)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._merge()

        def on_validation_end(self, trainer, pl_module) -> None:  # metrics are reduced by now
            if trainer.sanity_checking:
                return
            metrics = trainer.callback_metrics
            row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
            for key in ("val/acc1", "val/acc5", "val/loss", "val/acc1_macro"):
                if key in metrics:
                    row[key.split("/", 1)[1]] = float(metrics[key])
            self._merge()
            row["layers"] = {layer: dict(measures) for layer, measures in self.latest.items()}
            self.epochs.append(row)
            if on_epoch is not None:
                on_epoch(row["epoch"])

    return History()


def _data_sizes(datamodule) -> dict[str, int]:
    sizes = {}
    for split in ("train", "val"):
        with contextlib.suppress(TypeError):
            sizes[split] = len(getattr(datamodule, f"{split}_set", None))
    return sizes


def _final_layers(model, latest: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each layer's latest measures (``History.latest``), plus each activation's final learned
    ``eps``, keyed by the module's name in the LightningModule (the callback's layer names)."""
    import torch

    layers = {layer: dict(measures) for layer, measures in latest.items()}
    for name, module in model.named_modules():
        eps = getattr(module, "eps", None)
        if isinstance(eps, torch.Tensor) and eps.numel() == 1:
            layers.setdefault(name, {})["eps"] = float(eps.detach().float())
    return layers


def describe_model(model, settings: SweepSettings) -> str:
    """The model as it is, e.g. ``vit_tiny (3 blocks, width 64, 4 heads, 4x4 patches), 151,498 parameters``."""
    net = model.net
    parts = []
    blocks = getattr(net, "blocks", None)
    if blocks is not None:
        parts.append(f"{len(blocks)} blocks")
    if getattr(net, "embed_dim", None):
        parts.append(f"width {net.embed_dim}")
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks is not None and len(blocks) else None
    if heads:
        parts.append(f"{heads} heads")
    patch = settings.model_kwargs.get("patch_size")
    if patch:
        parts.append(f"{patch}x{patch} patches")
    shape = f" ({', '.join(parts)})" if parts else ""
    return f"{settings.model}{shape}, {sum(p.numel() for p in model.parameters()):,} parameters"


def run_one(settings: SweepSettings, arm: str, seed: int,
            on_epoch: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Train one arm with one seed; return its record. Raises :class:`Interrupted` on Ctrl-C."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    clear_run_files(Path(settings.out), arm, seed)
    seed_everything(seed, workers=True, verbose=False)
    datamodule = make_datamodule(settings, seed)
    model = make_model(settings, arm)
    eafo_callback = make_eafo_callback(settings, arm)
    history = history_callback(eafo_callback, on_epoch)
    logger = TensorBoardLogger(settings.out, name=arm, version=f"seed{seed}", default_hp_metric=False)
    trainer_kwargs = {"enable_progress_bar": False, **settings.trainer_kwargs}
    trainer = Trainer(max_epochs=settings.epochs, logger=logger, callbacks=[eafo_callback, history],
                      default_root_dir=settings.out, **trainer_kwargs)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        trainer.fit(model, datamodule=datamodule)
    except SystemExit:
        # Lightning turns Ctrl-C inside fit into a graceful shutdown and sys.exit(1).
        if trainer.interrupted:
            raise Interrupted() from None
        raise
    # CPU time of this process (all its threads): on a shared machine wall time also counts waiting.
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if trainer.interrupted:
        raise Interrupted()
    epochs = [row for row in history.epochs if "acc1" in row]
    record: dict[str, Any] = {"version": RECORD_VERSION, "arm": arm, "seed": seed, "settings": settings.identity()}
    if not epochs:
        return {**record, "status": "failed", "wall_time_s": wall, "cpu_time_s": cpu,
                "error": "no validation epoch finished (check limit_val_batches / check_val_every_n_epoch)"}
    last = epochs[-1]
    return {
        **record,
        "status": "ok",
        "top1_final": last["acc1"],
        "top1_best": max(row["acc1"] for row in epochs),
        "top5_final": last.get("acc5"),
        "nll_final": last.get("loss"),
        "top1_macro_final": last.get("acc1_macro"),
        "epochs": epochs,
        "layers": _final_layers(model, history.latest),
        "steps": trainer.global_step,
        "model": describe_model(model, settings),
        "data_sizes": _data_sizes(datamodule),
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "tensorboard": f"{arm}/seed{seed}",
    }


def guarded_run(settings: SweepSettings, arm: str, seed: int,
                on_epoch: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """:func:`run_one`, with an exception turned into a failed record (one bad run must not cost
    the others); :class:`Interrupted` goes through."""
    start = time.perf_counter()
    try:
        return run_one(settings, arm, seed, on_epoch)
    except Interrupted:
        raise
    except Exception as err:
        return {"version": RECORD_VERSION, "arm": arm, "seed": seed, "settings": settings.identity(),
                "status": "failed", "error": f"{type(err).__name__}: {err}", "wall_time_s": time.perf_counter() - start,
                "traceback": traceback.format_exc(limit=-12)}


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep a sweep's output to its own lines: Lightning's per-run notices repeat for every run."""
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
def restore_global_state(threads: Optional[int] = None) -> Iterator[None]:
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


# ---------------------------------------------------------------------------- parallel runs


def _worker_init(threads: Optional[int]) -> None:
    # The parent handles Ctrl-C and stops the workers; a worker never sees it half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import lightning.pytorch  # noqa: F401  (its loggers are set up on import; quiet them after)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)


def _worker_run(settings: SweepSettings, arm: str, seed: int) -> dict[str, Any]:
    with quiet_lightning():
        return guarded_run(settings, arm, seed)


def execute(settings: SweepSettings, todo: list[tuple[str, int]], on_done: Callable[[dict[str, Any]], None],
            on_start: Callable[[list[tuple[str, int]]], None] = lambda running: None,
            on_epoch: Optional[Callable[[str, int, int], None]] = None) -> None:
    """Train every ``(arm, seed)`` of ``todo`` and hand each record to ``on_done`` as it finishes.

    ``on_done`` runs in this process, one record at a time; if it raises (a write error), the
    runs still going are stopped and the error goes on. On Ctrl-C the workers are stopped and
    :class:`KeyboardInterrupt` goes on; the records already handed over are kept by the caller.
    """
    if settings.workers <= 1 or len(todo) <= 1:
        with quiet_lightning(), restore_global_state(settings.threads):
            for arm, seed in todo:
                on_start([(arm, seed)])
                step = (lambda epoch, a=arm, s=seed: on_epoch(a, s, epoch)) if on_epoch else None
                try:
                    rec = guarded_run(settings, arm, seed, step)
                except Interrupted:
                    raise KeyboardInterrupt from None
                on_done(rec)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch's threads started is unsafe
    pool = ProcessPoolExecutor(settings.workers, mp_context=context, initializer=_worker_init,
                               initargs=(settings.threads,))
    try:
        # Seed-major order: an interrupted sweep already holds complete pairs.
        pending = {pool.submit(_worker_run, settings, arm, seed): (arm, seed) for arm, seed in todo}
        order = list(pending.values())
        while pending:
            running = [key for key in order if key in pending.values()][: settings.workers]
            on_start(running)
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: order.index(pending[f])):
                del pending[future]
                on_done(future.result())
    except BaseException:
        _stop(pool)
        raise
    else:
        pool.shutdown(wait=True)


def _stop(pool: ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=5)


__all__ = ["MEASURES", "Interrupted", "execute", "guarded_run", "make_datamodule", "make_eafo_callback",
           "make_model", "run_one", "describe_model", "layer_measures"]
