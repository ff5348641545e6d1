"""The sweep of ``dynact dpo``: every arm x beta x seed, with records that survive interruption.

Order: seed by seed, arm by arm; one SFT per (arm, seed), then DPO at every beta from it. Each
finished DPO run is written at once, atomically, to ``runs/<arm>-beta<b>-seed<k>.json``; a
finished SFT model is kept in ``sft/<arm>-seed<k>.pt`` until every beta of that arm and seed is
done, so ``--resume`` neither repeats a finished run nor an SFT whose DPO runs are pending.

The folder's safety (only the sweep's files, the lock, records checked against the settings, a
damaged ``settings.json`` named with its fix), the progress bar and what happens on a failed
run, a write error or Ctrl-C are the sweep engine's (:mod:`dynact.experiments.sweep`), as for
``dynact compare``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from dynact.experiments.dpo import report as dpo_report
from dynact.experiments.dpo import runs
from dynact.experiments.dpo.settings import DPOSettings
from dynact.experiments.sweep import Layout, Sweep, failed_record
from dynact.experiments.sweep import folder as sweep_folder
from dynact.experiments.sweep import run_sweep as engine_run
from dynact.experiments.sweep.engine import Progress

__all__ = ["LAYOUT", "is_main_process", "load_records", "record_path", "run_sweep", "sweep_of"]

_RECORDS = sweep_folder.RECORDS
SETTINGS_FILE = "settings.json"
RECORD_VERSION = 1
_NAME = re.compile(r"([a-z0-9_]+)-beta([^-/]+)-seed(\d+)")


def _parse(stem: str) -> Optional[tuple[str, float, int]]:
    match = _NAME.fullmatch(stem)
    if not match:
        return None
    try:
        return match[1], float(match[2]), int(match[3])
    except ValueError:
        return None


#: What ``dynact dpo`` writes into ``--out``: besides the engine's files, the TensorBoard runs of
#: SFT and DPO, the SFT models kept for pending betas, and the trainers' working folders.
LAYOUT = Layout(
    command="dynact dpo",
    settings_file=SETTINGS_FILE,
    record_name=lambda key: f"{key[0]}-beta{key[1]:g}-seed{key[2]}.json",
    parse_name=_parse,
    key_fields=("arm", "beta", "seed"),
    version=RECORD_VERSION,
    record_pattern=r"[a-z0-9_]+-beta[^-/]+-seed\d+\.json",
    paths=(
        r"[a-z0-9_]+/(beta[^/]+|sft)/seed\d+/events\.out\.tfevents\.[^/]+",
        r"sft/[a-z0-9_]+-seed\d+\.(pt|tmp)",
        r"work/.+",  # a trainer's output folder, left by a run cut short
    ),
    required={"arm": str, "beta": float, "seed": int},
    required_ok={"eval_margin": float, "eval_accuracy": float, "eval_loss": float, "eval_curve": list,
                 "layers": dict, "steps": int},
    grows="arms, betas and seeds may grow",
)


def is_main_process() -> bool:
    """Rank 0 of an ``accelerate launch`` / ``torchrun`` job (or a single process): the one that
    writes records, SFT models and the report; every rank trains."""
    return int(os.environ.get("RANK", "0")) == 0


def record_path(out: Path, arm: str, beta: float, seed: int) -> Path:
    return LAYOUT.record_path(out, (arm, beta, seed))


def load_records(settings: DPOSettings) -> dict[tuple[str, float, int], dict]:
    """Every usable record of ``settings``' sweep in its folder by ``(arm, beta, seed)``."""
    return sweep_folder.load_records(Path(settings.out), settings.identity(), LAYOUT)[0]


def _line(rec: dict[str, Any]) -> str:
    head = f"{rec['arm']} beta={rec['beta']:g} seed {rec['seed']}"
    if rec["status"] != "ok":
        return f"{head}: FAILED ({rec.get('error')}); traceback in {_RECORDS}/"
    return (f"{head}: eval margin {rec['eval_margin']:+.3f}, accuracy {rec['eval_accuracy']:.3f}, "
            f"loss {rec['eval_loss']:.3f} ({rec['wall_time_s']:.1f} s)")


def _sft_model(settings: DPOSettings, prep, arm: str, seed: int, say) -> tuple[Optional[torch.nn.Module], dict]:
    """The SFT model of ``arm`` and ``seed``: from ``sft/`` if a run left it, else trained now."""
    path = runs.sft_path(Path(settings.out), arm, seed)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
            return saved["model"], saved["record"]
        except Exception:  # a damaged file: train again
            path.unlink(missing_ok=True)
    model, record = runs.run_sft(settings, prep, arm, seed)
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model, "record": record}, tmp)
        os.replace(tmp, path)
    say(f"{arm} seed {seed}: SFT {record['steps']} steps, loss {record['loss_final']:.3f} "
        f"({record['wall_time_s']:.1f} s)")
    return model, record


def sweep_of(settings: DPOSettings, command: str = "", sizes=lambda: None) -> Sweep:
    """The sweep engine's view of a dpo sweep: every (arm, beta, seed), seed by seed; ``sizes()``
    gives the data sizes for the results (None when nothing was prepared)."""

    def write_results(ok: dict, failed: dict, elapsed: float) -> dict[str, Any]:
        return dpo_report.write_results(settings, command, ok, failed, sizes())

    return Sweep(
        out=Path(settings.out), layout=LAYOUT, identity=settings.identity(),
        plan=[(a, b, s) for s in settings.seeds for a in settings.arms for b in settings.betas],
        line=_line, write_results=write_results, desc="dpo sweep", main_process=is_main_process(),
        label=lambda key: f"{key[0]} beta={key[1]:g} seed {key[2]}",
    )


def _execute(settings: DPOSettings, prep_of, todo: list, on_done, progress: Progress) -> None:
    """One SFT per (arm, seed) with a pending beta, then DPO at each pending beta from it."""
    out, identity = Path(settings.out), settings.identity()
    for seed in settings.seeds:
        for arm in settings.arms:
            pending = [b for b in settings.betas if (arm, b, seed) in todo]
            if not pending:
                continue
            progress.status(f"{arm} seed {seed}: SFT")
            try:
                model, sft = _sft_model(settings, prep_of(), arm, seed, progress.write)
            except Exception as err:
                for beta in pending:
                    on_done(failed_record(LAYOUT, (arm, beta, seed), identity, err))
                continue
            ok = [_dpo(settings, prep_of(), model, sft, (arm, beta, seed), on_done, progress) for beta in pending]
            if is_main_process() and all(ok):  # no beta of this arm and seed is left to do
                runs.sft_path(out, arm, seed).unlink(missing_ok=True)


def _dpo(settings: DPOSettings, prep, model, sft: dict, key: tuple, on_done, progress: Progress) -> bool:
    arm, beta, seed = key
    progress.started([key])
    if is_main_process():  # an unfinished attempt's events would overlay this run
        shutil.rmtree(Path(settings.out) / arm / f"beta{beta:g}" / f"seed{seed}", ignore_errors=True)
    try:
        rec = {"version": RECORD_VERSION, "settings": settings.identity(),
               **runs.run_dpo(settings, prep, model, arm, beta, seed), "sft": sft}
    except Exception as err:  # one bad run must not cost the others
        rec = failed_record(LAYOUT, key, settings.identity(), err)
    on_done(rec)
    return rec["status"] == "ok"


def run_sweep(settings: DPOSettings, resume: bool = False, progress: bool = True, command: str = "",
              prep: Optional[runs.Prepared] = None) -> dict[str, Any]:
    """Run every (arm, beta, seed) not finished yet; write ``results.json``, plots and report.

    The folder's safety, resume, the progress bar, failed runs, write errors and Ctrl-C are the
    sweep engine's (:func:`dynact.experiments.sweep.run_sweep`); returns ``{}`` on other ranks.
    """
    shared = {"prep": prep}

    def prep_of() -> runs.Prepared:
        if shared["prep"] is None:
            shared["prep"] = runs.prepare(settings)
        return shared["prep"]

    sweep = sweep_of(settings, command, lambda: shared["prep"].sizes if shared["prep"] else None)
    with runs.quiet(settings.threads):
        results = engine_run(sweep, lambda todo, on_done, p: _execute(settings, prep_of, todo, on_done, p),
                             resume=resume, progress=progress)
    if not is_main_process():
        return {}
    for empty in ("sft", "work"):  # left only when runs are pending
        with contextlib.suppress(OSError):
            (Path(settings.out) / empty).rmdir()
    return results
