"""``dynact compare``: check everything, run the sweep, write the results and the report."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from dynact.experiments.compare import plots, runs, stats
from dynact.experiments.compare import records as rec_files
from dynact.experiments.compare.records import RESULTS_FILE, TIMING_FILE, write_text
from dynact.experiments.compare.report import fmt, pct, write_report
from dynact.experiments.compare.settings import SweepSettings, build_parser, settings_from_args, split_overrides
from dynact.experiments.sweep import run_sweep as engine_run
from dynact.experiments.sweep.engine import Progress, Sweep, run_command
from dynact.kernels import dispatch as kernel_dispatch

EXIT_BAD_INPUT = 2


def _summary_line(rec: dict[str, Any]) -> str:
    where = f"{rec['arm']} seed {rec['seed']}"
    if rec["status"] != "ok":
        return (f"{where}: FAILED ({rec.get('error')}); "
                f"traceback in {rec_files.RECORDS}/{rec['arm']}-seed{rec['seed']}.json")
    return (f"{where}: top-1 {pct(rec['top1_final'])}%, NLL {fmt(rec['nll_final'])}, "
            f"{rec['steps']} steps, {rec['wall_time_s']:.1f} s ({rec.get('cpu_time_s', 0.0):.1f} s CPU)")


def sweep_of(settings: SweepSettings, command: str = "") -> Sweep:
    """The sweep engine's view of a compare sweep: every (arm, seed), seed by seed (every arm of
    seed 0, then seed 1, ...), so an interrupted sweep already holds complete pairs."""
    return Sweep(
        out=Path(settings.out), layout=rec_files.LAYOUT, identity=settings.identity(),
        plan=[(arm, seed) for seed in settings.seeds for arm in settings.arms], line=_summary_line,
        write_results=lambda ok, failed, elapsed: write_results(settings, command, ok, failed, elapsed),
        label=lambda key: f"{key[0]} seed {key[1]}",
    )


def run_sweep(
    settings: SweepSettings, resume: bool = False, progress: bool = True, command: str = ""
) -> dict[str, Any]:
    """Run every (arm, seed) not finished yet, then write ``results.json``, the plots and the report.

    A run that raises is recorded as failed and redone by ``--resume``. On Ctrl-C or a write
    error the files are written for the runs finished so far (:func:`dynact.experiments.sweep.run_sweep`).

    Returns:
        The results (what ``results.json`` holds).

    Raises:
        ValueError: ``out`` is unusable (not writable, foreign files, locked by another sweep,
            a sweep already there without ``resume``, other settings, a damaged ``sweep.json``).
        SweepWriteError: a file could not be written, or a worker process died, mid-sweep.
        KeyboardInterrupt: Ctrl-C; every run finished before it is kept.
    """

    def execute(todo: list, on_done, progress_: Progress) -> None:
        if todo and settings.workers > 1:
            progress_.write(f"{len(todo)} runs in {settings.workers} processes, {settings.threads or 'default'} "
                            "torch thread(s) each")

        def epoch(arm: str, seed: int, k: int) -> None:
            progress_.status(f"{arm} seed {seed}: epoch {k}/{settings.epochs}")

        runs.execute(settings, todo, on_done, progress_.started, epoch)

    return engine_run(sweep_of(settings, command), execute, resume=resume, progress=progress)


def cpu_model() -> str:
    """The CPU's name as the operating system gives it (``model name`` of ``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() in ("model name", "Model", "Hardware"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(settings: SweepSettings) -> dict[str, Any]:
    """The machine the numbers came from: CPU model and threads, GPU, versions, dynact's kernel mode."""
    import lightning
    import torch

    accel = str(settings.trainer_kwargs.get("accelerator", "auto"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda") else None
    threads = settings.threads or torch.get_num_threads()
    cpu = cpu_model()
    machine = gpu or (f"{cpu}, {os.cpu_count()} hardware threads; {settings.workers} run(s) at once with {threads} "
                      f"torch thread{'s' if threads > 1 else ''} each")
    return {"machine": machine, "cpu": cpu, "cpu_threads": os.cpu_count(), "gpu": gpu,
            "workers": settings.workers, "torch_threads": threads, "kernels": kernel_dispatch.MODE,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "lightning": lightning.__version__}


def _process_cpu_s() -> float:
    """CPU time of this process and of its finished children (the worker processes, once shut down)."""
    try:
        import resource
    except ImportError:  # Windows: this process only
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _attempts(out: Path, elapsed: float) -> dict[str, Any]:
    """``sweep_s`` and ``command_cpu_s`` summed over every attempt that wrote this folder (a
    ``--resume`` adds its own to what the earlier ones spent, so a resume that trains nothing
    keeps the sweep's time), and ``attempts``, each attempt's own figures."""
    try:
        before = json.loads((out / TIMING_FILE).read_text())
        attempts = before.get("attempts") or [{k: before[k] for k in ("written", "sweep_s", "command_cpu_s")}]
        numbers = ("sweep_s", "command_cpu_s")
        attempts = [a for a in attempts if all(isinstance(a.get(k), (int, float)) for k in numbers)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        attempts = []  # a first attempt, or a damaged file: this attempt's figures alone
    attempts.append({"written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "sweep_s": elapsed,
                     # this process since it started (imports included) and its worker processes once finished
                     "command_cpu_s": _process_cpu_s()})
    return {"sweep_s": sum(a["sweep_s"] for a in attempts), "command_cpu_s": sum(a["command_cpu_s"] for a in attempts),
            "attempts": attempts}


def write_results(settings: SweepSettings, command: str, ok: dict, failed: dict, elapsed: float) -> dict[str, Any]:
    """``results.json`` (every number of the experiment, and only those: the same command gives
    the same file), ``timing.json`` (wall times), the plots, the TensorBoard overlay and the report."""
    out = Path(settings.out)
    keys = [(arm, seed) for arm in settings.arms for seed in settings.seeds]
    run_rows, walls, cpus = [], {}, {}
    for key in keys:
        rec = ok.get(key) or failed.get(key) or {"arm": key[0], "seed": key[1], "status": "not run"}
        if "wall_time_s" in rec:
            walls[f"{key[0]}-seed{key[1]}"] = rec["wall_time_s"]
        if "cpu_time_s" in rec:
            cpus[f"{key[0]}-seed{key[1]}"] = rec["cpu_time_s"]
        timings = ("wall_time_s", "cpu_time_s")
        run_rows.append({k: v for k, v in rec.items() if k not in (*timings, "settings", "traceback")})
    env = environment(settings)
    results = {
        "settings": asdict(settings),
        "environment": env,
        "command": command,
        "summary": stats.summarize(run_rows, settings.arms, settings.control),
        "comparisons": stats.comparisons(run_rows, settings.arms, settings.control),
        "plateau": stats.plateau_check(run_rows),
        "runs": run_rows,
        "report": rec_files.REPORT_FILE,
        "plots": [rec_files.PNG_DELTA, rec_files.PNG_ACC, rec_files.PNG_LAYERS],
    }

    def per_arm(values: dict[str, float]) -> dict[str, Optional[float]]:
        return {arm: stats.mean_std([v for k, v in values.items() if k.rpartition("-seed")[0] == arm])[0]
                for arm in settings.arms}

    timing = {
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": env["machine"],
        "cpu": env["cpu"],
        "cpu_threads": env["cpu_threads"],
        "torch": env["torch"],
        "kernels": env["kernels"],
        **_attempts(out, elapsed),
        "wall_time_mean": per_arm(walls),
        "cpu_time_mean": per_arm(cpus),
        "runs": walls,
        "runs_cpu": cpus,
    }
    plots.write_all(results, out)
    write_text(out / RESULTS_FILE, json.dumps(results, indent=2))
    write_text(out / TIMING_FILE, json.dumps(timing, indent=2))
    write_report(out, results, timing)
    return results


def dry_build(settings: SweepSettings) -> None:
    """Build the data module, every arm's model and callback, and a Trainer: errors surface now."""
    from lightning.pytorch import Trainer

    with runs.quiet_lightning(), runs.restore_global_state():
        datamodule = runs.make_datamodule(settings, settings.seeds[0])
        try:
            datamodule.prepare_data()
            datamodule.setup("fit")
        except FileNotFoundError:
            raise  # the data modules say where the files should be
        except Exception as err:
            raise ValueError(f"data ({settings.data_class}): {err}") from err
        for arm in settings.arms:
            try:
                runs.make_model(settings, arm)
                runs.make_eafo_callback(settings, arm)
            except Exception as err:
                extra = settings.model_kwargs.get("model_kwargs")
                hint = (f" (the settings give model_kwargs={extra}; change them with "
                        "--model.model_kwargs.KEY VALUE)") if extra else ""
                raise ValueError(f"arm {arm!r} with model {settings.model!r}: {err}{hint}") from err
        try:
            Trainer(max_epochs=settings.epochs, logger=False, callbacks=[], **settings.trainer_kwargs)
        except Exception as err:
            raise ValueError(f"Trainer options {settings.trainer_kwargs}: {type(err).__name__}: {err}") from err


def main(argv: Optional[list[str]] = None) -> int:
    """``dynact compare``: validate everything, run the sweep, write the report; return the exit code.

    Bad input or an unusable ``--out`` exits with code 2 before any training; a failed write
    or a worker process that died mid-sweep stops it with code 3 (finished runs kept, a partial report
    written when possible);
    Ctrl-C keeps the finished runs and returns 130; a sweep with failed runs returns 1.
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        rest, overrides = split_overrides(args_in)
    except ValueError as err:
        parser.error(str(err))
    args = parser.parse_args(rest)
    try:
        settings = settings_from_args(args, overrides)
        dry_build(settings)
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    command = "dynact compare " + " ".join(args_in)
    out = Path(settings.out)
    results, code = run_command(
        "dynact compare", parser, command, out,
        run=lambda: run_sweep(settings, resume=args.resume, progress=not args.no_progress, command=command),
        done=lambda: len(rec_files.load_records(out, settings)[0]))
    if results is not None:
        print(f"report: {out / rec_files.REPORT_FILE}  results: {out / RESULTS_FILE}")
    return code
