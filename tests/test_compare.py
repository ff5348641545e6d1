"""`dynact compare` end to end: a tiny real sweep (digits, 2 arms x 2 seeds, a few steps)."""

import json
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynact import compare

# A few optimizer steps per run: 4 batches x 2 epochs = 8 steps, the callback acting every 2.
TINY = ["--task", "digits", "--epochs", "2", "--every-n-steps", "2", "--no-progress",
        "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "3", "--model.warmup_epochs", "1"]
ARMS = ["relu", "eafo"]
SEEDS = [0, 1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sweep(out: Path, *extra: str) -> int:
    return compare.main([*TINY, "--arms", ",".join(ARMS), "--seeds", "2", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    assert _sweep(out) == 0
    # the sweep's thread count and Lightning's deterministic flag do not leak into the caller
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    return out, json.loads((out / "results.json").read_text())


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_every_arm_and_seed_is_a_real_tensorboard_run(sweep):
    out, results = sweep
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [(a, s) for a in ARMS for s in SEEDS]
    for run in results["runs"]:
        assert run["status"] == "ok" and run["steps"] == 8
        run_dir = out / run["arm"] / f"seed{run['seed']}"
        assert run["tensorboard"] == f"{run['arm']}/seed{run['seed']}"
        assert list(run_dir.glob("events.out.tfevents.*"))
        acc = _events(run_dir)
        scalars = acc.Tags()["scalars"]
        # validation accuracy from the event file agrees with the record, epoch by epoch
        logged = [e.value for e in acc.Scalars("val/acc1")]
        assert logged == pytest.approx([row["acc1"] for row in run["epochs"]], abs=1e-6)
        assert run["top1_final"] == pytest.approx(logged[-1], abs=1e-6)
        assert run["top1_best"] == pytest.approx(max(logged), abs=1e-6)
        # every arm logs per-layer output entropy (static ones in monitor mode): one per block,
        # at steps 2, 4, 6, 8
        depth = results["settings"]["model_kwargs"]["model_kwargs"]["depth"]
        # (the pre-logits Tanh is measured too: Tanh is a registry activation)
        layers = sorted(t for t in scalars if t.startswith("entropy_scale_free/") and ".mlp." in t)
        assert len(layers) == depth
        assert [e.step for e in acc.Scalars(layers[0])] == [2, 4, 6, 8]
        every = [acc.Scalars(t)[-1].value for t in scalars if t.startswith("entropy_scale_free/")]
        assert run["entropy_final_mean"] == pytest.approx(np.mean(every), rel=1e-6)
        # only the dynamic arm is updated (and carries a learnable eps per layer)
        updated = any(t.startswith("update_size/") for t in scalars)
        assert updated == (run["arm"] == "eafo")
        assert len(run["eps_final"]) == (depth if run["arm"] == "eafo" else 0)
        record = json.loads((out / "runs" / f"{run['arm']}-seed{run['seed']}.json").read_text())
        assert record["top1_final"] == run["top1_final"]
        assert {t.split("/", 1)[1] for t in layers} <= set(record["entropy_series"])


def test_seeds_pair_arms_and_differ_between_seeds(sweep):
    out, results = sweep
    loss = {(r["arm"], r["seed"]): r["epochs"][0]["loss"] for r in results["runs"]}
    # Different seeds give different runs (init and data order); the comparison is paired by seed.
    assert loss[("relu", 0)] != loss[("relu", 1)]


def test_summary_statistics_match_an_independent_computation(sweep):
    _, results = sweep
    by = {(r["arm"], r["seed"]): r for r in results["runs"]}
    for arm in ARMS:
        s = results["summary"][arm]
        top1 = [by[(arm, k)]["top1_final"] for k in SEEDS]
        ent = [by[(arm, k)]["entropy_final_mean"] for k in SEEDS]
        assert s["n"] == 2
        assert s["top1_mean"] == pytest.approx(np.mean(top1))
        assert s["top1_std"] == pytest.approx(np.std(top1, ddof=1))
        assert s["entropy_mean"] == pytest.approx(np.mean(ent))
    eafo = [by[("eafo", k)]["top1_final"] for k in SEEDS]
    relu = [by[("relu", k)]["top1_final"] for k in SEEDS]
    delta = results["summary"]["eafo"]["delta"]
    assert delta["mean"] == pytest.approx(np.mean(eafo) - np.mean(relu))
    if np.ptp(np.subtract(eafo, relu)) > 0:  # scipy's paired t interval as the oracle
        ci = stats.ttest_rel(eafo, relu).confidence_interval(0.95)
        assert delta["ci95"] == pytest.approx([ci.low, ci.high])
    assert results["summary"]["relu"]["delta"] is None


def _table(report: str) -> dict[str, list[str]]:
    lines = [ln for ln in report.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0].startswith("arm"):  # the per-run table starts
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
        assert _numbers(table["top-1, mean ± std"][col]) == pytest.approx([s["top1_mean"], s["top1_std"]], abs=5e-4)
        assert "(n=2)" in table["top-1, mean ± std"][col]
        assert _numbers(table["best top-1, mean ± std"][col]) == pytest.approx(
            [s["top1_best_mean"], s["top1_best_std"]], abs=5e-4)
        assert _numbers(table["final output entropy, nats"][col]) == pytest.approx(
            [s["entropy_mean"], s["entropy_std"]], abs=5e-4)
        assert _numbers(table["wall time per run, s"][col]) == pytest.approx([s["wall_time_mean"]], abs=0.05)
    delta_row = table["Δ top-1 vs ReLU [95% CI]"]
    assert delta_row[0] == "control"
    d = results["summary"]["eafo"]["delta"]
    expected = [d["mean"]] + (d["ci95"] if d["ci95"] else [])
    assert _numbers(delta_row[1]) == pytest.approx(expected, abs=5e-4)
    # the report says what the run is, and embeds both plots, which are real PNG files
    assert "digits" in report and "2 epochs" in report and "seeds 0, 1" in report
    for png in ("acc_vs_epoch.png", "entropy_vs_step.png"):
        assert f"]({png})" in report
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000


def test_rerun_needs_resume_and_resume_skips_finished_runs(sweep, tmp_path, capsys):
    src, _ = sweep
    out = tmp_path / "out"
    shutil.copytree(src, out)
    with pytest.raises(SystemExit) as info:
        _sweep(out)
    assert info.value.code == 2 and "--resume" in capsys.readouterr().err
    records = sorted((out / "runs").glob("*.json"))
    stamps = {p.name: p.stat().st_mtime_ns for p in records}
    # growing the sweep by one seed runs only the two new (arm, seed) pairs
    assert compare.main([*TINY, "--arms", "relu,eafo", "--seeds", "3", "--out", str(out), "--resume"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in records} == stamps
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == sorted(
        [p.name for p in records] + ["eafo-seed2.json", "relu-seed2.json"])
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["relu"]["n"] == 3 and results["summary"]["eafo"]["delta"]["n"] == 3
    # resuming with other settings is refused: the runs would not be comparable
    with pytest.raises(SystemExit) as info:
        compare.main([*TINY[:2], "--epochs", "3", *TINY[4:], "--arms", "relu,eafo", "--out", str(out), "--resume"])
    assert info.value.code == 2 and "epochs" in capsys.readouterr().err


def test_ctrl_c_keeps_finished_runs_and_resume_completes(tmp_path, monkeypatch, capsys):
    from lightning.pytorch.callbacks import Callback

    real = compare._history_callback
    calls = {"n": 0}

    class CtrlC(Callback):
        def on_train_batch_end(self, *args):
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of the second run

    def history():
        calls["n"] += 1
        return real() if calls["n"] != 2 else CtrlC()

    monkeypatch.setattr(compare, "_history_callback", history)
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
    assert "| crrelu | 0 | n/a |" in (out / "report.md").read_text()
    first = (out / "runs" / "relu-seed0.json").stat().st_mtime_ns
    assert compare.main(args + ["--resume"]) == 0
    assert (out / "runs" / "relu-seed0.json").stat().st_mtime_ns == first
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results["runs"]] == ["ok", "ok"]
    assert "| control | " in (out / "report.md").read_text() and "[n/a (n=1)]" in (out / "report.md").read_text()
    # the interrupted attempt's partial TensorBoard files were replaced, not overlaid
    assert len(list((out / "crrelu" / "seed0").glob("events.out.tfevents.*"))) == 1


def test_a_failing_run_is_recorded_and_redone_on_resume(tmp_path, monkeypatch, capsys):
    from lightning.pytorch.callbacks import Callback

    real = compare._history_callback

    class Boom(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("boom at step 2")

    calls: list = []

    def history():  # the first run fails, every later one is normal
        calls.append(1)
        return Boom() if len(calls) == 1 else real()

    monkeypatch.setattr(compare, "_history_callback", history)
    out = tmp_path / "out"
    args = [*TINY, "--arms", "relu,crrelu", "--seeds", "1", "--out", str(out)]
    assert compare.main(args) == 1  # the sweep went on after the failure, then reports it
    assert "1 runs failed" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    failed, done = results["runs"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom at step 2"
    assert done["status"] == "ok"
    assert results["summary"]["relu"]["n"] == 0 and results["summary"]["crrelu"]["delta"]["n"] == 0
    assert "failed: RuntimeError: boom at step 2" in (out / "report.md").read_text()
    stamp = (out / "runs" / "crrelu-seed0.json").stat().st_mtime_ns
    assert compare.main(args + ["--resume"]) == 0
    assert (out / "runs" / "crrelu-seed0.json").stat().st_mtime_ns == stamp
    assert [r["status"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["ok", "ok"]


@pytest.mark.parametrize("argv,message", [
    (["--arms", "relu,swish"], "unknown arm 'swish'"),
    (["--arms", "relu,relu"], "more than once"),
    (["--task", "mnist"], "invalid choice: 'mnist'"),
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--every-n-steps", "0"], "--every-n-steps"),
    (["--arms", "crrelu,eafo"], "--control 'relu' is not among --arms"),
    (["--trainer.max_epochs", "3"], "use --epochs"),
    (["--trainer.no_such_flag", "1"], "lightning's Trainer has no argument 'no_such_flag'"),
    (["--model.act", "gelu"], "use --arms"),
    (["--data.no_such_arg", "1"], "DigitsDataModule has no argument"),
    (["--trainer.accelerator", "tpu"], "Trainer options"),
    (["--callback.mode", "iterate"], "the sweep sets it itself"),
    (["--callback.no_such_arg", "1"], "EAFOCallback has no argument"),
    (["--callback.estimator", "parzen"], "estimator must be one of"),
    (["--model.lr", "-1"], "invalid lr"),
    (["--trainer.limit_train_batches"], "missing value"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--model", "tnt_small"], "--model.model_kwargs.KEY"),
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


def test_dispatcher_runs_compare(tmp_path, capsys):
    from dynact.cli import main

    with pytest.raises(SystemExit) as info:
        main(["compare", "--arms", "nope", "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "unknown arm 'nope'" in capsys.readouterr().err


def test_arms_share_initial_weights_at_each_seed(tmp_path):
    # The pairing behind the Δ column: at one seed every arm starts from the same weights.
    from lightning.pytorch import seed_everything

    args = compare._build_parser().parse_args(["--arms", "relu,crrelu,eafo", "--out", str(tmp_path)])
    settings = compare._settings_from_args(args, compare._split_overrides([])[1])

    def weights(arm: str, seed: int) -> dict:
        seed_everything(seed, verbose=False)
        compare._make_datamodule(settings)
        return {k: v for k, v in compare._make_model(settings, arm).state_dict().items() if not k.endswith(".eps")}

    relu = weights("relu", 0)
    for arm in ("crrelu", "eafo"):
        other = weights(arm, 0)
        assert other.keys() == relu.keys()
        assert all(torch.equal(relu[k], other[k]) for k in relu)
    assert not torch.equal(weights("relu", 1)["net.patch_embed.proj.weight"], relu["net.patch_embed.proj.weight"])
