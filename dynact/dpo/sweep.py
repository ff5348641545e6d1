"""The sweep of ``dynact dpo``: every arm x beta x seed, with records that survive interruption.

Order: seed by seed, arm by arm; one SFT per (arm, seed), then DPO at every beta from it. Each
finished DPO run is written at once, atomically, to ``runs/<arm>-beta<b>-seed<k>.json``; a
finished SFT model is kept in ``sft/<arm>-seed<k>.pt`` until every beta of that arm and seed is
done, so ``--resume`` neither repeats a finished run nor an SFT whose DPO runs are pending.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

from dynact.dpo import report as dpo_report
from dynact.dpo import runs
from dynact.dpo.settings import DPOSettings
from dynact.reporting import write_text

__all__ = ["is_main_process", "load_records", "record_path", "run_sweep"]

_RECORDS = "runs"
_SETTINGS_FILE = "settings.json"


def is_main_process() -> bool:
    """Rank 0 of an ``accelerate launch`` / ``torchrun`` job (or a single process): the one that
    writes records, SFT models and the report; every rank trains."""
    return int(os.environ.get("RANK", "0")) == 0


def record_path(out: Path, arm: str, beta: float, seed: int) -> Path:
    return out / _RECORDS / f"{arm}-beta{beta:g}-seed{seed}.json"


def load_records(out: Path) -> dict[tuple[str, float, int], dict]:
    """Every readable run record in ``out`` by ``(arm, beta, seed)``; damaged files are skipped."""
    records = {}
    for path in sorted((out / _RECORDS).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            records[(rec["arm"], float(rec["beta"]), int(rec["seed"]))] = rec
        except (OSError, ValueError, KeyError):
            continue  # that run is redone
    return records


def prepare_out(settings: DPOSettings, resume: bool) -> dict[tuple[str, float, int], dict]:
    """Create ``--out`` and check it against ``--resume``; return the finished records."""
    out = Path(settings.out)
    if not is_main_process():  # rank 0 checks and writes; the others only read what is done
        return {k: r for k, r in load_records(out).items() if r.get("status") == "ok"}
    try:
        (out / _RECORDS).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"--out {str(out)!r} is not a writable folder ({err.strerror or err}); "
                         "choose another") from None
    saved_path = out / _SETTINGS_FILE
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    records = load_records(out)
    if not resume and (saved is not None or records):
        raise ValueError(f"--out {str(out)!r} already holds a sweep ({len(records)} finished runs); pass --resume "
                         "to continue it, or choose a new --out")
    current = json.loads(json.dumps(settings.identity()))
    if saved is not None:
        differ = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
        if differ:
            details = "; ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differ)
            raise ValueError(f"--resume: the sweep in {str(out)!r} has other settings ({details}); resume it with "
                             "the same options (arms, betas and seeds may grow) or choose a new --out")
    else:
        write_text(saved_path, json.dumps(current, indent=2))
    return {key: rec for key, rec in records.items() if rec.get("status") == "ok"}


def _save(out: Path, rec: dict[str, Any]) -> None:
    if is_main_process():
        write_text(record_path(out, rec["arm"], rec["beta"], rec["seed"]), json.dumps(rec))


def _failed(arm: str, beta: float, seed: int, err: BaseException) -> dict[str, Any]:
    return {"arm": arm, "beta": beta, "seed": seed, "status": "failed", "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=-12)}


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


def run_sweep(settings: DPOSettings, resume: bool = False, progress: bool = True, command: str = "",
              prep: Optional[runs.Prepared] = None) -> dict[str, Any]:
    """Run every (arm, beta, seed) not finished yet; write ``results.json``, plots and report.

    A run that raises is recorded as failed (redone by ``--resume``); Ctrl-C writes the files
    for the runs finished so far and re-raises.
    """
    from tqdm.auto import tqdm

    out = Path(settings.out)
    records = prepare_out(settings, resume)
    plan = [(a, b, s) for s in settings.seeds for a in settings.arms for b in settings.betas]
    todo = [key for key in plan if key not in records]
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="dpo sweep", unit="run", disable=not progress,
               dynamic_ncols=True)
    say = bar.write if progress else print
    sft_records: dict[tuple[str, int], dict] = {}
    try:
        with runs.quiet(settings.threads):
            if todo and prep is None:
                prep = runs.prepare(settings)
            for seed in settings.seeds:
                for arm in settings.arms:
                    pending = [b for b in settings.betas if (arm, b, seed) in todo]
                    if not pending:
                        continue
                    bar.set_postfix_str(f"{arm} seed {seed}: SFT")
                    try:
                        model, sft = _sft_model(settings, prep, arm, seed, say)
                        sft_records[(arm, seed)] = sft
                    except Exception as err:
                        for beta in pending:
                            rec = _failed(arm, beta, seed, err)
                            _save(out, rec)
                            bar.update(1)
                        say(_line(rec))
                        continue
                    for beta in pending:
                        bar.set_postfix_str(f"{arm} beta={beta:g} seed {seed}")
                        if is_main_process():  # an unfinished attempt's events would overlay this run
                            shutil.rmtree(out / arm / f"beta{beta:g}" / f"seed{seed}", ignore_errors=True)
                        try:
                            rec = runs.run_dpo(settings, prep, model, arm, beta, seed)
                            rec["sft"] = sft
                        except Exception as err:  # one bad run must not cost the others
                            rec = _failed(arm, beta, seed, err)
                        _save(out, rec)
                        if rec["status"] == "ok":
                            records[(arm, beta, seed)] = rec
                        bar.update(1)
                        say(_line(rec))
                    if is_main_process() and all((arm, b, seed) in records for b in settings.betas):
                        runs.sft_path(out, arm, seed).unlink(missing_ok=True)
    except KeyboardInterrupt:
        bar.close()
        if records and is_main_process():
            dpo_report.write_results(settings, command, records, load_records(out))
        raise
    finally:
        bar.close()
    if not is_main_process():
        return {}
    for empty in ("sft", "work"):  # left only when runs are pending
        with contextlib.suppress(OSError):
            (out / empty).rmdir()
    return dpo_report.write_results(settings, command, records, load_records(out), prep.sizes if prep else None)
