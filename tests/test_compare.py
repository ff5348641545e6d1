"""`dynact compare` end to end: tiny real sweeps (digits, 2 arms x 2 seeds, a few steps)."""

import errno
import json
import os
import re
import shutil
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynact.experiments import compare
from dynact.experiments.compare import records, runs
from dynact.experiments.sweep import folder as sweep_folder

# A few optimizer steps per run: 4 batches x 2 epochs = 8 steps, the callback acting every 2.
TINY = ["--task", "digits", "--epochs", "2", "--every-n-steps", "2", "--no-progress", "--workers", "1",
        "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "3", "--model.warmup_epochs", "1"]
ARMS = ["relu", "eafo"]
SEEDS = [0, 1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNGS = ("paired_differences.png", "acc_vs_epoch.png", "layer_measures.png")


def _sweep(out: Path, *extra: str) -> int:
    return compare.main([*TINY, "--arms", ",".join(ARMS), "--seeds", "2", "--out", str(out), *extra])


def _numbers_of(results: dict) -> dict:
    """Everything in results.json that the experiment computed (not where it was written)."""
    return {"summary": results["summary"], "runs": results["runs"]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    umask = os.umask(0o022)
    try:
        assert _sweep(out) == 0
    finally:
        os.umask(umask)
    # the sweep's thread count and Lightning's deterministic flag do not leak into the caller
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    return out, json.loads((out / "results.json").read_text())


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _has_metrics() -> bool:
    from dynact.callbacks import EAFOCallback

    return hasattr(EAFOCallback(), "metrics")


def test_every_arm_and_seed_is_a_real_tensorboard_run_and_record(sweep):
    out, results = sweep
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [(a, s) for a in ARMS for s in SEEDS]
    depth = results["settings"]["model_kwargs"]["model_kwargs"]["depth"]
    for run in results["runs"]:
        assert run["status"] == "ok" and run["steps"] == 8
        acc = _events(out / run["arm"] / f"seed{run['seed']}")
        # validation top-1 and NLL from the event file agree with the record, epoch by epoch
        assert [e.value for e in acc.Scalars("val/acc1")] == pytest.approx([r["acc1"] for r in run["epochs"]], abs=1e-6)
        assert run["top1_final"] == pytest.approx(acc.Scalars("val/acc1")[-1].value, abs=1e-6)
        assert run["nll_final"] == pytest.approx(acc.Scalars("val/loss")[-1].value, abs=1e-6)
        assert run["top5_final"] == pytest.approx(acc.Scalars("val/acc5")[-1].value, abs=1e-6)
        # top-1 is a whole number of the validation images seen (3 batches)
        seen = min(run["data_sizes"]["val"], 3 * results["settings"]["data_kwargs"]["batch_size"])
        assert run["top1_final"] * seen == pytest.approx(round(run["top1_final"] * seen), abs=1e-4)
        # only the dynamic arm is updated; its layers and the static CRReLU-free ReLU arm's are
        # keyed by the same module names as the callback's tags
        scalars = acc.Tags()["scalars"]
        assert any(t.startswith("update_size/") for t in scalars) == (run["arm"] == "eafo")
        eps_layers = sorted(n for n, m in run["layers"].items() if "eps" in m)
        assert len(eps_layers) == (depth if run["arm"] == "eafo" else 0)
        assert all(f"eps/{n}" in scalars for n in eps_layers)
        record = json.loads((out / "runs" / f"{run['arm']}-seed{run['seed']}.json").read_text())
        assert record["top1_final"] == run["top1_final"]
        assert record["settings"] == json.loads((out / "sweep.json").read_text())
        assert "vit_tiny (3 blocks" in record["model"]


@pytest.mark.skipif(not _has_metrics(), reason="needs EAFOCallback.metrics (the per-layer measures of issue #10)")
def test_records_hold_each_layers_final_measures_from_the_callback(sweep):
    out, results = sweep
    for run in results["runs"]:
        acc = _events(out / run["arm"] / f"seed{run['seed']}")
        for layer, measures in run["layers"].items():
            for metric in ("dead", "entropy_scale_free"):
                # the record holds the last logged value of the layer, read in the process
                assert measures[metric] == pytest.approx(acc.Scalars(f"{metric}/{layer}")[-1].value, rel=1e-5)


def test_by_arm_tensorboard_run_overlays_the_arms_with_a_custom_scalars_layout(sweep):
    out, results = sweep
    acc = EventAccumulator(str(out / "by_arm"), size_guidance={"scalars": 0})
    acc.Reload()
    for arm in ARMS:  # the mean over seeds per epoch, named by arm
        runs_ = [r for r in results["runs"] if r["arm"] == arm]
        mean = np.mean([[row["acc1"] for row in r["epochs"]] for r in runs_], axis=0)
        assert [e.value for e in acc.Scalars(f"top1/{arm}")] == pytest.approx(mean, abs=1e-6)
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    events = next((out / "by_arm").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    layouts = [v for e in EventFileLoader(str(events)).Load() if e.HasField("summary")
               for v in e.summary.value if v.tag == metadata.CONFIG_SUMMARY_TAG]
    assert layouts
    layout = layout_pb2.Layout()
    layout.ParseFromString(layouts[0].tensor.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["validation top-1"] == [r"^top1/"]


def _table(report: str) -> dict[str, list[str]]:
    lines = [ln for ln in report.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0].startswith("layer") or cells[0].startswith("arm"):  # the next tables start
            break
        rows[cells[0]] = cells[1:]
    return {"header": header[1:], **rows}


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", cell)]


def test_report_table_matches_results_json(sweep):
    out, results = sweep
    report = (out / "report.md").read_text()
    table = _table(report)
    assert table["header"] == ["ReLU", "EAFO (dynamic)"]  # arms as columns, as in the paper
    for col, arm in enumerate(ARMS):
        s = results["summary"][arm]
        assert _numbers(table["top-1 %, mean ± std"][col]) == pytest.approx([100 * v for v in s["top1"]], abs=5e-3)
        assert "(n=2)" in table["top-1 %, mean ± std"][col]
        assert _numbers(table["top-5 %, mean ± std"][col]) == pytest.approx([100 * v for v in s["top5"]], abs=5e-3)
        assert _numbers(table["validation NLL, nats/image"][col]) == pytest.approx(s["nll"], abs=5e-4)
    d = results["summary"]["eafo"]["delta_top1"]
    row = table["Δ top-1 vs ReLU, points [95% CI] (± half-width)"]
    assert row[0] == "control"
    assert _numbers(row[1]) == pytest.approx([100 * d["mean"], 100 * d["ci95"][0], 100 * d["ci95"][1],
                                              100 * d["half_width"]], abs=5e-3)
    # one plain sentence per arm with its interval
    verdict = next(ln for ln in report.splitlines() if ln.startswith("- **EAFO (dynamic)**"))
    word = "better" if d["ci95"][0] > 0 else "worse" if d["ci95"][1] < 0 else "not distinguishable"
    assert word in verdict and f"{100 * d['ci95'][0]:+.2f}" in verdict
    # the model as it is, the data, and the plots, real PNG files
    assert "vit_tiny (3 blocks, width 64, 4 heads, 4x4 patches)" in report
    assert "2 epochs" in report and "seeds 0-1" in report
    for png in PNGS:
        assert f"]({png})" in report
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000


def test_summary_statistics_match_scipy(sweep):
    _, results = sweep
    by = {(r["arm"], r["seed"]): r for r in results["runs"]}
    for arm in ARMS:
        s = results["summary"][arm]
        top1 = [by[(arm, k)]["top1_final"] for k in SEEDS]
        assert s["n"] == 2 and s["top1"] == pytest.approx([np.mean(top1), np.std(top1, ddof=1)])
    eafo = [by[("eafo", k)]["nll_final"] for k in SEEDS]
    relu = [by[("relu", k)]["nll_final"] for k in SEEDS]
    delta = results["summary"]["eafo"]["delta_nll"]
    ci = stats.ttest_rel(eafo, relu).confidence_interval(0.95)
    assert delta["mean"] == pytest.approx(np.mean(eafo) - np.mean(relu))
    assert delta["ci95"] == pytest.approx([ci.low, ci.high])
    assert delta["diffs"] == pytest.approx(np.subtract(eafo, relu))
    assert results["summary"]["relu"]["delta_top1"] is None


def test_every_output_is_readable_by_all(sweep):
    out, _ = sweep
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    assert {p.relative_to(out).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        p.relative_to(out).as_posix(): "0o644" for p in files}


def test_two_identical_sweeps_give_identical_numbers_in_one_or_two_processes(sweep, tmp_path):
    out, results = sweep
    assert _sweep(tmp_path / "again", "--workers", "2") == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert _numbers_of(again) == _numbers_of(results)
    # the seeds differ from each other (init, split, order): the pairing is by seed
    loss = {(r["arm"], r["seed"]): r["epochs"][0]["loss"] for r in results["runs"]}
    assert loss[("relu", 0)] != loss[("relu", 1)]


# ----------------------------------------------------------------------------- the folder


def test_out_with_foreign_files_is_refused_and_left_untouched(sweep, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "relu" / "seed0").mkdir(parents=True)
    (out / "relu" / "seed0" / "important.txt").write_text("keep me")
    (out / "report.md").write_text("my own report")
    with pytest.raises(SystemExit) as info:
        _sweep(out, "--resume")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "relu/seed0/important.txt" in err and "nothing was changed" in err
    assert (out / "relu" / "seed0" / "important.txt").read_text() == "keep me"
    assert (out / "report.md").read_text() == "my own report"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "relu", "relu/seed0", "relu/seed0/important.txt", "report.md"]


def test_a_second_sweep_into_a_locked_out_is_refused(sweep, tmp_path, capsys):
    src, _ = sweep
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = (out / "results.json").read_text()
    with records.sweep_lock(out):  # what a running sweep holds
        with pytest.raises(SystemExit) as info:
            _sweep(out, "--resume", "--seeds", "3")
    assert info.value.code == 2 and "another sweep is running there" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before and not (out / "runs" / "relu-seed2.json").exists()


@pytest.mark.parametrize("damage", ["[1, 2]", "missing fields", "null top-1", "other settings", "not json"])
def test_a_damaged_or_foreign_record_is_redone(sweep, tmp_path, capsys, damage):
    src, results = sweep
    out = tmp_path / "out"
    shutil.copytree(src, out)
    path = out / "runs" / "eafo-seed1.json"
    rec = json.loads(path.read_text())
    text = {
        "[1, 2]": "[1, 2]",
        "missing fields": json.dumps({"arm": "eafo", "seed": 1}),
        "null top-1": json.dumps({**rec, "top1_final": None}),
        "other settings": json.dumps({**rec, "settings": {**rec["settings"], "epochs": 7}}),
        "not json": "{\"arm\": ",
    }[damage]
    path.write_text(text)
    kept = (out / "runs" / "relu-seed1.json").stat().st_mtime_ns
    assert _sweep(out, "--resume") == 0
    assert "runs/eafo-seed1.json" in capsys.readouterr().out  # said, then redone
    redone = json.loads(path.read_text())
    assert redone["status"] == "ok" and redone["top1_final"] == rec["top1_final"]  # the same run, again
    assert (out / "runs" / "relu-seed1.json").stat().st_mtime_ns == kept
    assert _numbers_of(json.loads((out / "results.json").read_text())) == _numbers_of(results)


def test_missing_sweep_json_resume_with_other_settings_is_refused(sweep, tmp_path, capsys):
    src, _ = sweep
    out = tmp_path / "out"
    shutil.copytree(src, out)
    (out / "sweep.json").unlink()
    with pytest.raises(SystemExit) as info:
        compare.main([*TINY[:2], "--epochs", "1", *TINY[4:], "--arms", "relu,eafo", "--seeds", "2",
                      "--out", str(out), "--resume"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "epochs: 2 there, 1 now" in err
    assert all(json.loads(p.read_text())["settings"]["epochs"] == 2 for p in (out / "runs").glob("*.json"))


def test_damaged_sweep_json_is_an_error_naming_the_file_and_the_fix(sweep, tmp_path, capsys):
    src, _ = sweep
    out = tmp_path / "out"
    shutil.copytree(src, out)
    for text in ("{\"task\": ", "[1, 2]"):
        (out / "sweep.json").write_text(text)
        with pytest.raises(SystemExit) as info:
            _sweep(out, "--resume")
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"{out / 'sweep.json'} is damaged" in err and "delete it and rerun" in err


def test_a_write_error_mid_sweep_stops_with_a_message_and_a_partial_report(tmp_path, monkeypatch, capsys):
    real = sweep_folder.write_text

    def full_disk(path, text):  # the disk fills up when the second run's record is written
        if path.name == "crrelu-seed0.json":
            raise sweep_folder.OutputError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        real(path, text)

    monkeypatch.setattr(sweep_folder, "write_text", full_disk)
    out = tmp_path / "out"
    args = [*TINY, "--arms", "relu,crrelu", "--seeds", "1", "--out", str(out)]
    assert compare.main(args) == 3
    err = capsys.readouterr().err
    assert "No space left on device" in err and "crrelu-seed0.json" in err and "--resume" in err
    partial = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in partial["runs"]] == ["ok", "not run"]
    assert "| crrelu | 0 | n/a |" in (out / "report.md").read_text()
    monkeypatch.setattr(sweep_folder, "write_text", real)
    assert compare.main(args + ["--resume"]) == 0


# ----------------------------------------------------------------------------- resume, failures


def test_rerun_needs_resume_and_resume_skips_finished_runs(sweep, tmp_path, capsys):
    src, _ = sweep
    out = tmp_path / "out"
    shutil.copytree(src, out)
    with pytest.raises(SystemExit) as info:
        _sweep(out)
    assert info.value.code == 2 and "--resume" in capsys.readouterr().err
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    # growing the sweep by one seed runs only the two new (arm, seed) pairs
    assert compare.main([*TINY, "--arms", "relu,eafo", "--seeds", "3", "--out", str(out), "--resume"]) == 0
    assert {n: (out / "runs" / n).stat().st_mtime_ns for n in stamps} == stamps
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == sorted(
        [*stamps, "eafo-seed2.json", "relu-seed2.json"])
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["relu"]["n"] == 3 and results["summary"]["eafo"]["delta_top1"]["n"] == 3
    # resuming with other settings is refused: the runs would not be comparable
    with pytest.raises(SystemExit) as info:
        compare.main([*TINY[:2], "--epochs", "3", *TINY[4:], "--arms", "relu,eafo", "--out", str(out), "--resume"])
    assert info.value.code == 2 and "epochs" in capsys.readouterr().err


def test_ctrl_c_keeps_finished_runs_and_resume_completes(tmp_path, monkeypatch, capsys):
    from lightning.pytorch.callbacks import Callback

    real = runs.history_callback
    calls = {"n": 0}

    class CtrlC(Callback):
        def on_train_batch_end(self, *args):
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of the second run

    def history(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs) if calls["n"] != 2 else CtrlC()

    monkeypatch.setattr(runs, "history_callback", history)
    out = tmp_path / "out"
    args = [*TINY, "--arms", "relu,crrelu", "--seeds", "1", "--out", str(out)]
    handler = signal.getsignal(signal.SIGINT)
    assert compare.main(args) == 130
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning's SIG_IGN is undone
    err = capsys.readouterr().err
    assert "--resume" in err and "1 finished runs" in err
    assert [p.name for p in (out / "runs").glob("*.json")] == ["relu-seed0.json"]
    partial = json.loads((out / "results.json").read_text())  # a report of what finished
    assert [r["status"] for r in partial["runs"]] == ["ok", "not run"]
    first = (out / "runs" / "relu-seed0.json").stat().st_mtime_ns
    assert compare.main(args + ["--resume"]) == 0
    assert (out / "runs" / "relu-seed0.json").stat().st_mtime_ns == first
    assert [r["status"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["ok", "ok"]
    # the interrupted attempt's partial TensorBoard files were replaced, not overlaid
    assert len(list((out / "crrelu" / "seed0").glob("events.out.tfevents.*"))) == 1


def test_a_failing_run_is_recorded_and_redone_on_resume(tmp_path, monkeypatch, capsys):
    from lightning.pytorch.callbacks import Callback

    real = runs.history_callback

    class Boom(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("boom at step 2")

    calls: list = []

    def history(*args, **kwargs):  # the first run fails, every later one is normal
        calls.append(1)
        return Boom() if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(runs, "history_callback", history)
    out = tmp_path / "out"
    args = [*TINY, "--arms", "relu,crrelu", "--seeds", "1", "--out", str(out)]
    assert compare.main(args) == 1  # the sweep went on after the failure, then reports it
    assert "1 runs failed" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    failed, done = results["runs"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom at step 2"
    assert done["status"] == "ok" and results["summary"]["relu"]["n"] == 0
    assert "failed: RuntimeError: boom at step 2" in (out / "report.md").read_text()
    stamp = (out / "runs" / "crrelu-seed0.json").stat().st_mtime_ns
    assert compare.main(args + ["--resume"]) == 0
    assert (out / "runs" / "crrelu-seed0.json").stat().st_mtime_ns == stamp
    assert [r["status"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["ok", "ok"]


# ----------------------------------------------------------------------------- input


@pytest.mark.parametrize("argv,message", [
    (["--arms", "relu,swish"], "unknown arm 'swish'"),
    (["--arms", "relu,relu"], "more than once"),
    (["--task", "mnist"], "invalid choice: 'mnist'"),
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--seeds", "16:8"], "a range A:B needs 0 <= A < B"),
    (["--seeds", "3,5,3"], "3 given more than once"),
    (["--seeds", "eight"], "is not a seed count, range or list"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--every-n-steps", "0"], "--every-n-steps"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--arms", "crrelu,eafo"], "--control 'relu' is not among --arms"),
    (["--trainer.max_epochs", "3"], "use --epochs"),
    (["--trainer.no_such_flag", "1"], "lightning's Trainer has no argument 'no_such_flag'"),
    (["--model.act", "gelu"], "use --arms"),
    (["--data.seed", "3"], "each seed draws its own split"),
    (["--data.no_such_arg", "1"], "DigitsDataModule has no argument"),
    (["--trainer.accelerator", "tpu"], "Trainer options"),
    (["--callback.mode", "iterate"], "the sweep sets it itself"),
    (["--callback.no_such_arg", "1"], "EAFOCallback has no argument"),
    (["--callback.estimator", "parzen"], "estimator must be one of"),
    (["--model.lr", "-1"], "invalid lr"),
    (["--trainer.limit_train_batches"], "missing value"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--model", "tnt_small"], "--model.model_kwargs.KEY"),
    (["--config", "digits_swep"], "'digits_swep' is neither a file nor a config shipped with dynact"),
])
def test_bad_input_is_a_clear_error_before_training(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        compare.main(["--out", str(out), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        compare.main([*TINY, "--arms", "relu", "--seeds", "1", "--out", str(blocker / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(blocker / "out") in err and "not a writable folder" in err


def test_dispatcher_runs_compare_and_help_states_the_defaults(tmp_path, capsys):
    from dynact.cli import main

    with pytest.raises(SystemExit) as info:
        main(["compare", "--arms", "nope", "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "unknown arm 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    digits = compare.TASKS["digits"]
    assert f"digits {digits['epochs']}, paper tasks 100" in text and f"digits {digits['seeds']}, paper" in text


def test_help_states_the_intervals_used_every_comparison_and_the_time_per_run(capsys):
    from dynact.experiments.compare import stats
    from dynact.experiments.compare.settings import DEFAULT_ARMS

    with pytest.raises(SystemExit):
        compare.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    # the default arms make three comparisons, EAFO against CRReLU among them ...
    assert stats.comparison_pairs(DEFAULT_ARMS) == [("crrelu", "relu"), ("eafo", "relu"), ("eafo", "crrelu")]
    assert "crrelu - relu, eafo - relu, eafo - crrelu" in text
    # ... each with the Bonferroni-adjusted level the report uses: 1 - 0.05 / 3
    assert stats.family_confidence(3) == pytest.approx(1 - 0.05 / 3)
    assert "Bonferroni" in text and "98.33% for the default 3" in text and "95% confidence" in text
    assert "95% confidence intervals" not in text  # the old, wrong claim
    # the rough time: per digits run, and for the default sweep on 2 cores
    digits = compare.TASKS["digits"]
    runs = 3 * digits["seeds"]
    assert "about 7 to 25 s of one CPU core" in text
    assert f"the default {runs} runs (3 arms x {digits['seeds']} seeds) take about " \
           f"{round(runs * 7 / 120)} to {round(runs * 25 / 120)} minutes on 2 cores" in text


def test_arms_share_initial_weights_and_split_at_each_seed(tmp_path):
    # The pairing behind the Δ column: at one seed every arm starts from the same weights and
    # sees the same split; another seed draws other weights and another split.
    from lightning.pytorch import seed_everything

    from dynact.experiments.compare.settings import build_parser, settings_from_args, split_overrides

    args = build_parser().parse_args(["--arms", "relu,crrelu,eafo", "--out", str(tmp_path)])
    settings = settings_from_args(args, split_overrides([])[1])

    def build(arm: str, seed: int):
        seed_everything(seed, verbose=False)
        data = runs.make_datamodule(settings, seed)
        data.setup("fit")
        state = {k: v for k, v in runs.make_model(settings, arm).state_dict().items() if not k.endswith(".eps")}
        return state, data.val_set.tensors[1]

    relu, split = build("relu", 0)
    for arm in ("crrelu", "eafo"):
        other, other_split = build(arm, 0)
        assert other.keys() == relu.keys() and all(torch.equal(relu[k], other[k]) for k in relu)
        assert torch.equal(other_split, split)
    relu1, split1 = build("relu", 1)
    assert not torch.equal(relu1["net.patch_embed.proj.weight"], relu["net.patch_embed.proj.weight"])
    assert not torch.equal(split1, split)


# ----------------------------------------------------------------------------- every pair, seeds


def test_configs_are_found_by_name_from_any_folder_and_a_path_still_works(tmp_path, monkeypatch):
    from dynact.experiments.compare.settings import build_parser, settings_from_args, split_overrides

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # an empty folder, far from the repository's examples/configs

    def settings(*argv):
        return settings_from_args(build_parser().parse_args(["--out", "o", *argv]), split_overrides([])[1])

    default = settings()  # digits reads the shipped digits_sweep.yaml
    assert default.config == "dynact:digits_sweep.yaml"
    assert (default.data_kwargs["val_fraction"], default.data_kwargs["batch_size"], default.model_kwargs["lr"]) == (
        0.5, 64, 4e-3)
    assert settings("--config", "digits").config == settings("--config", "digits.yaml").config == "dynact:digits.yaml"
    copy = repo / "examples" / "configs" / "digits.yaml"
    by_path = settings("--config", str(copy))
    assert by_path.config == str(copy) and by_path.data_kwargs == settings("--config", "digits").data_kwargs
    # the identity names the shipped file, not where the package happens to be installed
    assert str(repo) not in json.dumps(default.identity())


def test_seeds_take_a_count_a_range_or_a_list():
    from dynact.experiments.compare.settings import parse_seeds

    assert parse_seeds("8") == list(range(8))
    assert parse_seeds("8:16") == list(range(8, 16))
    assert parse_seeds("3,5,9") == [3, 5, 9]
    assert parse_seeds(" 4 , 2 ") == [4, 2]
    for bad in ("0", "5:5", "-1:3", "-2,3", "1.5", "", ","):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_plateau_is_claimed_only_when_every_run_is_under_the_bound():
    from dynact.experiments.compare.stats import PLATEAU_BOUND, plateau_check

    def run(arm, seed, curve):
        return {"arm": arm, "seed": seed, "status": "ok", "epochs": [{"acc1": a} for a in curve]}

    flat = [0.5, 0.95, 0.95, 0.951, 0.952, 0.953, 0.953]  # +0.3 points over the last 5 epochs
    moving = [0.5, 0.93, 0.94, 0.95, 0.96, 0.95, 0.9411]  # +1.11 points: 0.9411 - 0.93
    ok = plateau_check([run("relu", 0, flat), run("crrelu", 0, flat)])
    assert ok["on_plateau"] and ok["checked"] == 2 and ok["over"] == []
    assert ok["largest"][:2] == ["relu", 0] and ok["largest"][2] == pytest.approx(0.003)
    failed = {"arm": "eafo", "seed": 1, "status": "failed"}
    bad = plateau_check([run("relu", 0, flat), run("crrelu", 3, moving), failed])
    assert not bad["on_plateau"] and bad["largest"][:2] == ["crrelu", 3]
    assert bad["largest"][2] == pytest.approx(0.0111) and [o[:2] for o in bad["over"]] == [["crrelu", 3]]
    assert PLATEAU_BOUND == bad["bound"] == 0.01
    short = plateau_check([run("relu", 0, flat), run("eafo", 0, flat[:4])])  # one run too short to check
    assert not short["on_plateau"] and short["short"] == 1


def test_every_pair_is_reported_with_bonferroni_intervals_and_seed_ranges_resume(tmp_path, capsys):
    # relu, crrelu and eafo on seeds 3 and 5, then resumed as the range 3:6: seed 4 is the only new seed.
    out = tmp_path / "out"
    tiny = [*TINY[:2], "--epochs", "6", *TINY[4:], "--arms", "relu,crrelu,eafo", "--out", str(out)]
    assert compare.main([*tiny, "--seeds", "3,5"]) == 0
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == sorted(
        f"{a}-seed{s}.json" for a in ("relu", "crrelu", "eafo") for s in (3, 5))
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    capsys.readouterr()
    assert compare.main([*tiny, "--seeds", "3:6", "--resume"]) == 0
    assert {n: (out / "runs" / n).stat().st_mtime_ns for n in stamps} == stamps  # reused, not retrained
    assert capsys.readouterr().out.count("seed 4: top-1") == 3  # only seed 4 was trained
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["seeds"] == [3, 4, 5]
    assert all(json.loads((out / "runs" / f"{a}-seed{s}.json").read_text())["seed"] == s
               for a in ("relu", "crrelu", "eafo") for s in (3, 4, 5))
    comps = results["comparisons"]
    assert comps["count"] == 3 and comps["method"] == "Bonferroni"
    assert comps["confidence"] == pytest.approx(1 - 0.05 / 3)
    assert [(p["arm"], p["against"]) for p in comps["pairs"]] == [("crrelu", "relu"), ("eafo", "relu"),
                                                                   ("eafo", "crrelu")]
    by = {(r["arm"], r["seed"]): r["top1_final"] for r in results["runs"]}
    report = (out / "report.md").read_text()
    for pair in comps["pairs"]:
        a = [by[(pair["arm"], s)] for s in (3, 4, 5)]
        b = [by[(pair["against"], s)] for s in (3, 4, 5)]
        d = pair["top1"]
        assert d["seeds"] == [3, 4, 5] and d["diffs"] == pytest.approx(np.subtract(a, b))
        if np.ptp(np.subtract(a, b)) > 0:  # scipy's paired t interval at the adjusted level
            ci = stats.ttest_rel(a, b).confidence_interval(1 - 0.05 / 3)
            assert d["ci"] == pytest.approx([ci.low, ci.high])
            ci95 = stats.ttest_rel(a, b).confidence_interval(0.95)
            assert d["ci95"] == pytest.approx([ci95.low, ci95.high])
            assert d["ci"][0] < d["ci95"][0] and d["half_width"] == pytest.approx((ci.high - ci.low) / 2)
        low, high = d["ci"]
        word = "better" if low > 0 else "worse" if high < 0 else "not distinguishable"
        names = {"relu": "ReLU", "crrelu": "CRReLU", "eafo": "EAFO (dynamic)"}
        row = f"| {names[pair['arm']]} − {names[pair['against']]} | 3 | {100 * d['mean']:+.2f} [{100 * low:+.2f}, "
        assert row in report
        verdict = next(ln for ln in report.splitlines()
                       if ln.startswith(f"- **{names[pair['arm']]}**") and names[pair["against"]] in ln)
        assert word in verdict and "98.33% interval" in verdict
        assert 0.0 <= d["repeat"] <= 1.0 and f"would say so again with probability about {d['repeat']:.2f}" in verdict
    assert "makes 3 comparisons" in report and "Bonferroni" in report and "seeds 3-5" in report
    # the plateau sentence names the run that moved most, recomputed here from the records
    moved = {(r["arm"], r["seed"]): r["epochs"][-1]["acc1"] - r["epochs"][-6]["acc1"] for r in results["runs"]}
    arm, seed = max(moved, key=lambda k: abs(moved[k]))
    assert results["plateau"]["largest"][:2] == [arm, seed]
    assert f"the run that moved most is {names[arm]} seed {seed}" in report
    assert ("Every run trained to its plateau" in report) == all(abs(v) < 0.01 for v in moved.values())
    # the machine: the CPU model as /proc/cpuinfo names it, threads, torch, the kernel mode
    timing = json.loads((out / "timing.json").read_text())
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        model = next(ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                     if ln.startswith("model name"))
        assert timing["cpu"] == model and model in report
    assert timing["cpu_threads"] == os.cpu_count() and timing["torch"] == torch.__version__
    from dynact.kernels import dispatch as _kernels

    assert timing["kernels"] == _kernels.MODE and f"dynact kernels {_kernels.MODE}" in report
    assert set(timing["runs_cpu"]) == {f"{a}-seed{s}" for a in ("relu", "crrelu", "eafo") for s in (3, 4, 5)}
    assert all(v > 0 for v in timing["runs_cpu"].values()) and timing["command_cpu_s"] > 0
    # the resume added its own time to the first attempt's: the folder's total, not the last call's
    first, second = timing["attempts"]
    assert timing["sweep_s"] == pytest.approx(first["sweep_s"] + second["sweep_s"]) and first["sweep_s"] > 0
    assert "over 2 attempts (--resume)" in report
    data = (out / "paired_differences.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000
