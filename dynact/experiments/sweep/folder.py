"""A sweep's output folder, shared by ``dynact compare`` and ``dynact dpo``.

A sweep writes into ``--out`` only the paths its :class:`Layout` names; a folder with anything
else is refused before any training, so a typo in ``--out`` never overwrites or deletes a
user's files. While a sweep runs it holds an exclusive lock on ``OUT/.lock``, so a second sweep
into the same folder is refused. Every record carries the settings it was made under (the
sweep's *identity*) and a record version, so a record that is damaged, foreign or made with
other settings is recognised and its run redone, never trusted nor a crash; a damaged settings
file is an error that names the file and the fix. Every file is written whole (a temporary
file, then an atomic rename; :func:`~dynact.experiments.reporting.write_text`).

What a *cell* is (compare: arm x seed; dpo: arm x beta x seed) is the layout's business: it
names a record file from a cell's key and reads the key back from a file name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from dynact.experiments.reporting import OutputError, write_text  # noqa: F401 (OutputError: what write_text raises)

RECORDS = "runs"
LOCK_FILE = ".lock"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
TIMING_FILE = "timing.json"

Key = tuple  # a cell's key, e.g. ("relu", 0) or ("gelu", 0.5, 0)


@dataclass(frozen=True)
class Layout:
    """What one kind of sweep writes into its folder, and what its records must hold.

    Args:
        command: the command's name for messages (``"dynact compare"``).
        settings_file: the file holding the sweep's identity (``sweep.json``).
        record_name: a cell's key -> its record's file name (under ``runs/``).
        parse_name: a record file's stem -> the cell's key, or None if it names no cell.
        key_fields: the record fields that make up the key, in order (``("arm", "seed")``).
        version: the record version this code writes and accepts.
        record_pattern: a regular expression of the record files' names (under ``runs/``).
        paths: regular expressions of the other paths (relative, ``/``-separated) it writes.
        required: ``field: type`` every record has; ``required_ok``: those of a finished run.
        check_ok: further checks of a finished run's record (a reason, or None).
        grows: what may differ between a sweep and its ``--resume`` (for messages).
    """

    command: str
    settings_file: str
    record_name: Callable[[Key], str]
    parse_name: Callable[[str], Optional[Key]]
    key_fields: tuple[str, ...]
    version: int
    record_pattern: str
    paths: tuple[str, ...] = ()
    required: dict[str, type] = field(default_factory=dict)
    required_ok: dict[str, type] = field(default_factory=dict)
    check_ok: Optional[Callable[[dict], Optional[str]]] = None
    grows: str = "arms and seeds may grow"

    def patterns(self) -> list[re.Pattern]:
        files = (self.settings_file, RESULTS_FILE, TIMING_FILE, REPORT_FILE, LOCK_FILE)
        fixed = "|".join(re.escape(f) for f in files)
        records = rf"{RECORDS}/({self.record_pattern})"
        return [re.compile(p) for p in (fixed, r"[^/]+\.png", records, r"(.*/)?\.[^/]+\.tmp", *self.paths)]

    def record_path(self, out: Path, key: Key) -> Path:
        return Path(out) / RECORDS / self.record_name(key)


def foreign_files(out: Path, layout: Layout, limit: int = 6) -> list[str]:
    """Up to ``limit`` files under ``out`` that no sweep of ``layout`` writes (relative paths)."""
    patterns, found = layout.patterns(), []
    for path in Path(out).rglob("*"):
        if path.is_dir():
            continue
        rel = path.relative_to(out).as_posix()
        if not any(p.fullmatch(rel) for p in patterns):
            found.append(rel)
            if len(found) >= limit:
                break
    return sorted(found)


def check_foreign(out: Path, layout: Layout) -> None:
    """Raise ValueError, changing nothing, when ``out`` holds files that a sweep does not write."""
    foreign = foreign_files(out, layout) if Path(out).is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (" and more" if len(foreign) > 5 else "")
        raise ValueError(
            f"--out {str(out)!r} holds files that a sweep does not write ({shown}); nothing was changed. "
            "Choose a new or empty folder for --out, or move those files away"
        )


def ensure_writable(out: Path) -> None:
    """Create ``out`` (and ``runs/``); a ValueError naming the folder if it cannot be written."""
    try:
        (Path(out) / RECORDS).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {str(out)!r} is not a writable folder ({err.strerror or err}); "
                         "choose another --out") from None


@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.lock`` for the sweep: a second sweep into ``out`` gets a clear error.

    The lock is the operating system's (``flock``), so it is released when the process ends,
    however it ends; the file stays and says who held it last.
    """
    path = Path(out) / LOCK_FILE
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


def _fits(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def check_record(rec: Any, identity: dict[str, Any], key: Key, layout: Layout) -> Optional[str]:
    """Why ``rec`` cannot stand for cell ``key`` of the sweep ``identity``; None if it can."""
    if not isinstance(rec, dict):
        return f"not a record (a JSON {type(rec).__name__})"
    required = {"status": str, "settings": dict, **layout.required}
    for name, kind in required.items():
        if not _fits(rec.get(name), kind):
            return f"{name} is missing or not a {kind.__name__}"
    found = tuple(rec.get(f) for f in layout.key_fields)
    if found != tuple(key):
        return f"it is the record of {' '.join(f'{f} {v}' for f, v in zip(layout.key_fields, found, strict=True))}"
    if rec.get("version") != layout.version:
        return f"made by another version of {layout.command} (record version {rec.get('version')!r})"
    if rec["settings"] != identity:
        differ = sorted(k for k in set(identity) | set(rec["settings"]) if identity.get(k) != rec["settings"].get(k))
        return f"made with other settings ({', '.join(differ)})"
    if rec["status"] != "ok":
        return None
    for name, kind in layout.required_ok.items():
        if not _fits(rec.get(name), kind):
            return f"{name} is missing or not a finite {kind.__name__}" if kind is float else f"{name} is missing"
    return layout.check_ok(rec) if layout.check_ok else None


def as_json(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` as it reads back from a JSON file (tuples become lists), to compare with one."""
    return json.loads(json.dumps(identity))


def load_records(out: Path, identity: dict[str, Any], layout: Layout) -> tuple[dict[Key, dict], list[str]]:
    """The usable records in ``out`` of the sweep ``identity``, and one note per record set aside."""
    records, notes, identity = {}, [], as_json(identity)
    for path in sorted((Path(out) / RECORDS).glob("*.json")):
        key = layout.parse_name(path.stem)
        if key is None:
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            notes.append(f"{RECORDS}/{path.name}: unreadable ({type(err).__name__}: {err}); the run is redone")
            continue
        problem = check_record(rec, identity, key, layout)
        if problem:
            notes.append(f"{RECORDS}/{path.name}: {problem}; the run is redone")
        else:
            records[key] = rec
    return records, notes


def read_settings(out: Path, layout: Layout) -> Optional[dict[str, Any]]:
    """The identity saved in ``out`` (None if there is none); a ValueError if the file is damaged."""
    path = Path(out) / layout.settings_file
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


def _kept_identities(out: Path) -> Iterator[Any]:
    for path in sorted((Path(out) / RECORDS).glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads(path.read_text())
            if isinstance(rec, dict):
                yield rec.get("settings")


def prepare_out(out: Path, identity: dict[str, Any], resume: bool, layout: Layout) -> tuple[dict[Key, dict], list[str]]:
    """Check ``out`` (call it holding :func:`sweep_lock`); return the finished records and notes.

    Raises:
        ValueError: the folder holds files that are not a sweep's, holds a sweep and ``resume``
            is False, holds one with other settings, or its settings file is damaged.
        OutputError: the settings file cannot be written.
    """
    out, identity = Path(out), as_json(identity)
    check_foreign(out, layout)
    saved = read_settings(out, layout)
    records, notes = load_records(out, identity, layout)
    if not resume and (saved is not None or any((out / RECORDS).glob("*.json"))):
        raise ValueError(
            f"--out {str(out)!r} already holds a sweep ({len(records)} finished runs with these settings); "
            "pass --resume to continue it, or choose a new --out"
        )
    if saved is None:  # the settings file lost: the records still say what sweep this was
        saved = next((s for s in _kept_identities(out) if isinstance(s, dict) and s != identity), None)
    if saved is not None and saved != identity:
        differ = sorted(k for k in set(identity) | set(saved) if identity.get(k) != saved.get(k))
        details = "; ".join(f"{k}: {saved.get(k)!r} there, {identity.get(k)!r} now" for k in differ)
        raise ValueError(
            f"--resume: the sweep in {str(out)!r} has other settings ({details}); resume it with the same "
            f"options ({layout.grows}) or choose a new --out"
        )
    write_text(out / layout.settings_file, json.dumps(identity, indent=2))
    return {key: rec for key, rec in records.items() if rec["status"] == "ok"}, notes
