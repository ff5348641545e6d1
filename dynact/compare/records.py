"""The sweep's folder: what may be in it, the lock, and the per-run records.

``--out`` holds only what a sweep writes (:data:`LAYOUT`); a folder with anything else is
refused before any training, so a typo in ``--out`` never overwrites or deletes a user's files.
While a sweep runs it holds an exclusive lock on ``OUT/.lock``; a second sweep into the same
folder is refused. Every record carries the settings it was made under
(:meth:`~dynact.compare.settings.SweepSettings.identity`), so a record that is damaged, foreign
or made with other settings is recognised and the run redone, never trusted nor a crash.
Every file is written whole (a temporary file, then an atomic rename) and readable by all
(``0666`` less the umask, as ``open`` would make it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional

from dynact.compare.settings import SweepSettings
from dynact.reporting import OutputError, write_text  # noqa: F401 (the sweep's writers: records.write_text)

RECORDS = "runs"
SETTINGS_FILE = "sweep.json"
RESULTS_FILE = "results.json"
TIMING_FILE = "timing.json"
REPORT_FILE = "report.md"
LOCK_FILE = ".lock"
#: TensorBoard run with each arm's mean over seeds, and the custom-scalars layout.
BY_ARM_RUN = "by_arm"
PNG_ACC = "acc_vs_epoch.png"
PNG_DELTA = "paired_differences.png"
PNG_LAYERS = "layer_measures.png"
RECORD_VERSION = 2

#: Paths (relative to ``--out``, ``/``-separated) a sweep may have written.
LAYOUT = [
    re.compile(p)
    for p in (
        rf"{re.escape(SETTINGS_FILE)}|{re.escape(RESULTS_FILE)}|{re.escape(TIMING_FILE)}|{re.escape(REPORT_FILE)}",
        rf"{re.escape(LOCK_FILE)}|[^/]+\.png",
        rf"{RECORDS}/[a-z0-9_]+-seed\d+\.json",
        r"([a-z0-9_]+/seed\d+|" + BY_ARM_RUN + r")/(events\.out\.tfevents\.[^/]+|hparams\.yaml)",
        r"[a-z0-9_]+/seed\d+/checkpoints/[^/]+\.ckpt",  # with --trainer.enable_checkpointing true
        r"(.*/)?\.[^/]+\.tmp",  # a write cut short by a crash
    )
]
_REQUIRED = {"arm": str, "seed": int, "status": str, "settings": dict}
_REQUIRED_OK = {"top1_final": float, "top1_best": float, "nll_final": float, "epochs": list, "steps": int,
                "layers": dict}



def foreign_files(out: Path, limit: int = 6) -> list[str]:
    """Up to ``limit`` files under ``out`` that no sweep writes (relative paths)."""
    found: list[str] = []
    for path in out.rglob("*"):
        if path.is_dir():
            continue
        rel = path.relative_to(out).as_posix()
        if not any(p.fullmatch(rel) for p in LAYOUT):
            found.append(rel)
            if len(found) >= limit:
                break
    return sorted(found)


def check_foreign(out: Path) -> None:
    """Raise ValueError, changing nothing, when ``out`` holds files that a sweep does not write."""
    foreign = foreign_files(out) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (" and more" if len(foreign) > 5 else "")
        raise ValueError(
            f"--out {str(out)!r} holds files that a sweep does not write ({shown}); nothing was changed. "
            "Choose a new or empty folder for --out, or move those files away"
        )


@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.lock`` for the sweep: a second sweep into ``out`` gets a clear error.

    The lock is the operating system's (``flock``), so it is released when the process ends,
    however it ends; the file stays and says who held it last.
    """
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise ValueError(f"--out {str(out)!r} is not a writable folder ({err.strerror or err}); "
                         "choose another --out") from None
    try:
        try:
            _lock(fd)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            raise ValueError(
                f"--out {str(out)!r}: another sweep is running there ({holder}); wait for it to finish, "
                "or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def record_path(out: Path, arm: str, seed: int) -> Path:
    return out / RECORDS / f"{arm}-seed{seed}.json"


def check_record(rec: Any, identity: dict[str, Any], arm: str, seed: int) -> Optional[str]:
    """Why ``rec`` cannot stand for run ``(arm, seed)`` of the sweep ``identity``; None if it can."""
    if not isinstance(rec, dict):
        return f"not a record (a JSON {type(rec).__name__})"
    for key, kind in _REQUIRED.items():
        if not isinstance(rec.get(key), kind):
            return f"{key} is missing or not a {kind.__name__}"
    if (rec["arm"], rec["seed"]) != (arm, seed):
        return f"it is the record of {rec['arm']} seed {rec['seed']}"
    if rec.get("version") != RECORD_VERSION:
        return f"made by another version of dynact compare (record version {rec.get('version')!r})"
    if rec["settings"] != identity:
        differ = sorted(k for k in set(identity) | set(rec["settings"]) if identity.get(k) != rec["settings"].get(k))
        return f"made with other settings ({', '.join(differ)})"
    if rec["status"] != "ok":
        return None
    for key, kind in _REQUIRED_OK.items():
        value = rec.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is float and not math.isfinite(value)):
            return f"{key} is missing or not a finite {kind.__name__}" if kind is float else f"{key} is missing"
    if not 0.0 <= rec["top1_final"] <= 1.0:
        return f"top1_final={rec['top1_final']} is not a fraction"
    return None


def load_records(out: Path, settings: SweepSettings) -> tuple[dict[tuple[str, int], dict], list[str]]:
    """The usable records of ``settings``' runs in ``out``, and one note per record set aside."""
    identity = settings.identity()
    records, notes = {}, []
    for path in sorted((out / RECORDS).glob("*-seed*.json")):
        arm, _, seed = path.stem.rpartition("-seed")
        if not seed.isdigit():
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            notes.append(f"{RECORDS}/{path.name}: unreadable ({type(err).__name__}: {err}); the run is redone")
            continue
        problem = check_record(rec, identity, arm, int(seed))
        if problem:
            notes.append(f"{RECORDS}/{path.name}: {problem}; the run is redone")
        else:
            records[(arm, int(seed))] = rec
    return records, notes


def prepare_out(settings: SweepSettings, resume: bool) -> tuple[dict[tuple[str, int], dict], list[str]]:
    """Check ``--out`` (call it holding :func:`sweep_lock`); return the finished records and notes.

    Raises:
        ValueError: the folder holds files that are not a sweep's, holds a sweep and ``resume``
            is False, holds one with other settings, or its ``sweep.json`` is damaged.
        OutputError: ``sweep.json`` cannot be written.
    """
    out = Path(settings.out)
    check_foreign(out)
    saved = _read_settings(out)
    records, notes = load_records(out, settings)
    if not resume and (saved is not None or any((out / RECORDS).glob("*.json"))):
        raise ValueError(
            f"--out {str(out)!r} already holds a sweep ({len(records)} finished runs with these settings); "
            "pass --resume to continue it, or choose a new --out"
        )
    current = settings.identity()
    if saved is None:
        # sweep.json lost: the records still say what sweep this was.
        kept = [json.loads(p.read_text()).get("settings") for p in _readable(out)]
        saved = next((s for s in kept if isinstance(s, dict) and s != current), None)
    if saved is not None and saved != current:
        differ = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
        details = "; ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differ)
        raise ValueError(
            f"--resume: the sweep in {str(out)!r} has other settings ({details}); resume it with the same "
            "options (arms and seeds may grow) or choose a new --out"
        )
    write_text(out / SETTINGS_FILE, json.dumps(current, indent=2))
    ok = {key: rec for key, rec in records.items() if rec["status"] == "ok"}
    return ok, notes


def _read_settings(out: Path) -> Optional[dict[str, Any]]:
    path = out / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not the settings object")
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path} is damaged ({err}); it records the sweep's settings. Restore it, or delete it and "
            "rerun the same command with --resume (each finished run keeps its own copy of the settings), "
            "or choose a new --out"
        ) from None
    return saved


def _readable(out: Path) -> Iterator[Path]:
    for path in sorted((out / RECORDS).glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            if isinstance(json.loads(path.read_text()), dict):
                yield path


def clear_run_files(out: Path, arm: str, seed: int) -> None:
    """Delete the TensorBoard files of an earlier attempt at a run (they would overlay the new
    one); files the sweep did not write are never there (see :func:`prepare_out`)."""
    folder = out / arm / f"seed{seed}"
    for path in (*folder.glob("events.out.tfevents.*"), folder / "hparams.yaml"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
