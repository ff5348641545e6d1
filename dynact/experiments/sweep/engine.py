"""The run loop shared by ``dynact compare`` and ``dynact dpo``.

:func:`run_sweep` checks the folder (:mod:`~dynact.experiments.sweep.folder`), holds its lock,
keeps what an earlier attempt finished, hands the cells still to do to the command's
``execute`` and writes each record the moment its run ends, with a progress bar and one line
per run. What it promises on the way:

- a run that raises is recorded as failed (and redone by ``--resume``); the others go on;
- a file that cannot be written stops the sweep with :class:`SweepWriteError`, the finished runs
  kept and a partial report written when possible;
- Ctrl-C writes the partial report and re-raises :class:`KeyboardInterrupt`.

Under ``torchrun`` every process trains; only the main one checks the folder, holds the lock
and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dynact.experiments.reporting import OutputError
from dynact.experiments.sweep import folder
from dynact.experiments.sweep.folder import Key, Layout

OnDone = Callable[[dict[str, Any]], None]

#: A command's exit codes: some runs failed (redo them with ``--resume``); a file could not be
#: written mid-sweep (finished runs kept); Ctrl-C (finished runs kept). Bad input is argparse's 2.
EXIT_FAILED_RUNS = 1
EXIT_WRITE_ERROR = 3
EXIT_INTERRUPTED = 130


class Progress:
    """What a command's ``execute`` may tell the user while it runs: a line above the progress
    bar (:meth:`write`), the bar's status text (:meth:`status`), the cells now running (:meth:`started`)."""

    def __init__(self, bar, label: Callable[[Key], str]) -> None:
        self._bar, self._label = bar, label

    def write(self, line: str) -> None:
        self._bar.write(line)

    def status(self, text: str) -> None:
        self._bar.set_postfix_str(text)

    def started(self, running: list[Key]) -> None:
        self.status("running " + ", ".join(self._label(key) for key in running))


#: ``execute(todo, on_done, progress)``: run every cell of ``todo`` and hand each record to
#: ``on_done`` as it finishes (``on_done`` writes it; if that raises, stop and let it go on).
Execute = Callable[[list[Key], OnDone, Progress], None]


class SweepWriteError(Exception):
    """The sweep stopped: a file could not be written, or a worker process died (what finished is kept)."""


@dataclass
class Sweep:
    """One sweep: where it writes, what it is, and the command's own parts.

    Args:
        out: the output folder.
        layout: what the command writes there.
        identity: the settings every record must carry (what ``--resume`` must match).
        plan: every cell's key, in the order the report lists them.
        line: a finished record -> the line printed for it.
        write_results: ``(ok, failed, elapsed_s)`` -> the results; writes results, report, plots.
        desc: the progress bar's label; ``label``: a cell's name in the status text.
        main_process: False on the other ranks of a multi-process job (they neither check nor write).
    """

    out: Path
    layout: Layout
    identity: dict[str, Any]
    plan: list[Key]
    line: Callable[[dict[str, Any]], str]
    write_results: Callable[[dict, dict, float], Any]
    desc: str = "sweep"
    label: Callable[[Key], str] = lambda key: " ".join(map(str, key))
    main_process: bool = True

    def key(self, rec: dict[str, Any]) -> Key:
        return tuple(rec[f] for f in self.layout.key_fields)


def open_folder(sweep: Sweep, resume: bool) -> tuple[dict[Key, dict], list[str]]:
    """Check the folder (call it holding :func:`folder.sweep_lock`): the finished records and the
    notes on records set aside. A ValueError names what is wrong."""
    try:
        return folder.prepare_out(sweep.out, sweep.identity, resume, sweep.layout)
    except OutputError as err:
        raise ValueError(f"--out {str(sweep.out)!r} is not a writable folder ({err}); choose another --out") from None


def run_sweep(sweep: Sweep, execute: Execute, resume: bool = False, progress: bool = True) -> Any:
    """Run every cell of ``sweep.plan`` not finished yet, then write the results (see the module).

    Raises:
        ValueError: the folder is unusable (see :func:`open_folder`), found before any training.
        SweepWriteError: a file could not be written, or a worker died, mid-sweep.
        KeyboardInterrupt: Ctrl-C; every run finished before it is kept.
    """
    if not sweep.main_process:
        records, _ = folder.load_records(sweep.out, sweep.identity, sweep.layout)
        done = {k: r for k, r in records.items() if r["status"] == "ok"}
        from tqdm.auto import tqdm

        with tqdm(disable=True) as bar:
            execute([k for k in sweep.plan if k not in done], lambda rec: None, Progress(bar, sweep.label))
        return None
    folder.check_foreign(sweep.out, sweep.layout)  # before creating anything in a folder not a sweep's
    folder.ensure_writable(sweep.out)
    with folder.sweep_lock(sweep.out):
        records, notes = open_folder(sweep, resume)
        return _run_locked(sweep, execute, records, notes, progress)


def _run_locked(sweep: Sweep, execute: Execute, records: dict, notes: list[str], progress: bool) -> Any:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    todo = [key for key in sweep.plan if key not in records]
    failed: dict[Key, dict] = {}
    bar = tqdm(total=len(sweep.plan), initial=len(sweep.plan) - len(todo), desc=sweep.desc, unit="run",
               disable=True if not progress else None, dynamic_ncols=True)
    for note in notes:
        bar.write(note)

    def done(rec: dict[str, Any]) -> None:
        key = sweep.key(rec)
        folder.write_text(sweep.layout.record_path(sweep.out, key), json.dumps(rec))
        (records if rec["status"] == "ok" else failed)[key] = rec
        bar.update(1)
        bar.write(sweep.line(rec))

    try:
        execute(todo, done, Progress(bar, sweep.label))
    except (OutputError, BrokenProcessPool) as err:
        bar.close()
        partial = _try_partial(sweep, records, failed, start)
        cause = (f"{err}" if isinstance(err, OutputError) else
                 f"a worker process died ({err}; often out of memory: try fewer --workers)")
        fix = "free space or make the folder writable, then continue" if isinstance(err, OutputError) else "continue"
        raise SweepWriteError(f"{cause}. The sweep stopped; {len(records)} finished runs are kept in {sweep.out}"
                              f"{partial}; {fix} with the same command and --resume") from err
    except KeyboardInterrupt:
        bar.close()
        if records:
            _try_partial(sweep, records, failed, start)
        raise
    finally:
        bar.close()
    try:
        return sweep.write_results(records, failed, time.perf_counter() - start)
    except OutputError as err:
        raise SweepWriteError(f"{err}. Every run finished and its record is kept in {sweep.out}/{folder.RECORDS}; "
                              "free space or fix the folder, then rerun with --resume to write the report") from err


def _try_partial(sweep: Sweep, records: dict, failed: dict, start: float) -> str:
    try:
        sweep.write_results(records, failed, time.perf_counter() - start)
    except OutputError as err:
        return f"; the partial report could not be written either ({err})"
    return " and report.md / results.json show them"


def finished(sweep: Sweep) -> int:
    """How many runs of ``sweep`` are finished in its folder (for the message after Ctrl-C)."""
    records, _ = folder.load_records(sweep.out, sweep.identity, sweep.layout)
    return sum(1 for rec in records.values() if rec["status"] == "ok")


def failed_record(layout: Layout, key: Key, identity: dict[str, Any], err: BaseException,
                  **extra: Any) -> dict[str, Any]:
    """The record of a run that raised ``err`` (call it inside the ``except``: it keeps the traceback)."""
    import traceback

    return {"version": layout.version, **dict(zip(layout.key_fields, key, strict=True)), "settings": identity,
            "status": "failed", "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=-12), **extra}




def run_command(name: str, parser: argparse.ArgumentParser, command: str, out: Path,
                run: Callable[[], Any], done: Callable[[], int]) -> tuple[Any, int]:
    """A command's sweep, with the outcome a user sees: ``(results, exit code)``.

    ``run`` runs the sweep; ``done`` counts the finished runs kept in ``out`` (for the Ctrl-C
    message). A ``ValueError`` (a bad ``--out``, raised before any training) is the parser's error
    (exit 2); :class:`SweepWriteError` prints its message and gives :data:`EXIT_WRITE_ERROR`; Ctrl-C
    names the finished runs and the ``--resume`` command and gives :data:`EXIT_INTERRUPTED`; a
    finished sweep with failed runs gives :data:`EXIT_FAILED_RUNS`, otherwise 0.
    """
    try:
        results = run()
    except ValueError as err:
        parser.error(str(err))
    except SweepWriteError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return None, EXIT_WRITE_ERROR
    except KeyboardInterrupt:
        print(f"\ninterrupted: {done()} finished runs are kept in {out}; continue with:\n  {command} --resume",
              file=sys.stderr)
        return None, EXIT_INTERRUPTED
    failed = sum(1 for r in (results or {}).get("runs", []) if r["status"] == "failed")
    if failed:
        print(f"{failed} runs failed; fix the cause and rerun with --resume to redo them", file=sys.stderr)
        return results, EXIT_FAILED_RUNS
    return results, 0


__all__ = ["EXIT_FAILED_RUNS", "EXIT_INTERRUPTED", "EXIT_WRITE_ERROR", "Execute", "Progress", "Sweep",
           "SweepWriteError", "failed_record", "finished", "open_folder", "run_command", "run_sweep"]
