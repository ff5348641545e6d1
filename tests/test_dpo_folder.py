"""`dynact dpo`'s output folder has every protection `dynact compare`'s has (the same sweep engine):
each test here mirrors one of tests/test_compare.py, on a tiny real SFT + DPO sweep."""

import errno
import json
import os
import shutil

import pytest

pytest.importorskip("trl")

from dynact.experiments.dpo import runs  # noqa: E402
from dynact.experiments.dpo.command import main  # noqa: E402
from dynact.experiments.sweep import folder as sweep_folder  # noqa: E402
from dynact.experiments.sweep import sweep_lock  # noqa: E402

TINY = ["--sft-steps", "2", "--dpo-steps", "2", "--eval-every", "2", "--every-n-steps", "2", "--eval-rows", "16",
        "--batch-size", "16", "--no-progress", "--betas", "0.5", "--seeds", "1"]
ARMS = ["gelu", "crrelu"]


def _sweep(out, *extra: str) -> int:
    return main([*TINY, "--arms", ",".join(ARMS), "--out", str(out), *extra])


def _numbers(results: dict) -> list:
    keep = ("arm", "beta", "seed", "status", "eval_margin", "eval_accuracy", "eval_loss")
    return [{k: r.get(k) for k in keep} for r in results["runs"]]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_folder") / "out"
    assert _sweep(out) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture
def copy(sweep, tmp_path):
    src, results = sweep
    out = tmp_path / "out"
    shutil.copytree(src, out)
    return out, results


def test_records_carry_the_settings_and_a_version(sweep):
    out, _ = sweep
    saved = json.loads((out / "settings.json").read_text())
    for path in (out / "runs").glob("*.json"):
        rec = json.loads(path.read_text())
        assert rec["settings"] == saved and rec["version"] == 1


def test_out_with_foreign_files_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "gelu" / "beta0.5").mkdir(parents=True)
    (out / "gelu" / "beta0.5" / "notes.txt").write_text("keep me")
    (out / "report.md").write_text("my own report")
    with pytest.raises(SystemExit) as info:
        _sweep(out, "--resume")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "gelu/beta0.5/notes.txt" in err and "nothing was changed" in err
    assert (out / "report.md").read_text() == "my own report"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "gelu", "gelu/beta0.5", "gelu/beta0.5/notes.txt", "report.md"]


def test_a_second_sweep_into_a_locked_out_is_refused(copy, capsys):
    out, _ = copy
    before = (out / "results.json").read_text()
    with sweep_lock(out):  # what a running sweep holds
        with pytest.raises(SystemExit) as info:
            main([*TINY[:-2], "--seeds", "2", "--arms", ",".join(ARMS), "--out", str(out), "--resume"])
    assert info.value.code == 2 and "another sweep is running there" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before and not (out / "runs" / "gelu-beta0.5-seed1.json").exists()


@pytest.mark.parametrize("damage", ["[1, 2]", "missing fields", "null margin", "other settings", "not json"])
def test_a_damaged_or_foreign_record_is_redone(copy, capsys, damage):
    out, results = copy
    path = out / "runs" / "crrelu-beta0.5-seed0.json"
    rec = json.loads(path.read_text())
    path.write_text({
        "[1, 2]": "[1, 2]",
        "missing fields": json.dumps({"arm": "crrelu", "beta": 0.5, "seed": 0}),
        "null margin": json.dumps({**rec, "eval_margin": None}),
        "other settings": json.dumps({**rec, "settings": {**rec["settings"], "lr": 0.5}}),
        "not json": "{\"arm\": ",
    }[damage])
    kept = (out / "runs" / "gelu-beta0.5-seed0.json").stat().st_mtime_ns
    assert _sweep(out, "--resume") == 0
    assert "runs/crrelu-beta0.5-seed0.json" in capsys.readouterr().out  # said, then redone
    redone = json.loads(path.read_text())
    assert redone["status"] == "ok" and redone["eval_loss"] == pytest.approx(rec["eval_loss"], rel=1e-4)
    assert (out / "runs" / "gelu-beta0.5-seed0.json").stat().st_mtime_ns == kept
    again = _numbers(json.loads((out / "results.json").read_text()))
    assert [(r["arm"], r["status"]) for r in again] == [(r["arm"], r["status"]) for r in _numbers(results)]
    assert [r["eval_loss"] for r in again] == pytest.approx([r["eval_loss"] for r in _numbers(results)], rel=1e-4)


def test_missing_settings_json_resume_with_other_settings_is_refused(copy, capsys):
    out, _ = copy
    (out / "settings.json").unlink()
    with pytest.raises(SystemExit) as info:
        main([*TINY, "--lr", "0.5", "--arms", ",".join(ARMS), "--out", str(out), "--resume"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "lr: " in err and "0.5 now" in err
    assert all(json.loads(p.read_text())["settings"]["lr"] != 0.5 for p in (out / "runs").glob("*.json"))


def test_damaged_settings_json_is_an_error_naming_the_file_and_the_fix(copy, capsys):
    out, _ = copy
    for text in ("{\"data\": ", "[1, 2]"):
        (out / "settings.json").write_text(text)
        with pytest.raises(SystemExit) as info:
            _sweep(out, "--resume")
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"{out / 'settings.json'} is damaged" in err and "delete it and rerun" in err


def test_a_write_error_mid_sweep_stops_with_a_message_and_a_partial_report(tmp_path, monkeypatch, capsys):
    real = sweep_folder.write_text

    def full_disk(path, text):  # the disk fills up when the second run's record is written
        if path.name == "crrelu-beta0.5-seed0.json":
            raise sweep_folder.OutputError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        real(path, text)

    monkeypatch.setattr(sweep_folder, "write_text", full_disk)
    out = tmp_path / "out"
    assert _sweep(out) == 3
    err = capsys.readouterr().err
    assert "No space left on device" in err and "crrelu-beta0.5-seed0.json" in err and "--resume" in err
    partial = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in partial["runs"]] == ["ok", "not run"]
    monkeypatch.setattr(sweep_folder, "write_text", real)
    assert _sweep(out, "--resume") == 0
    assert [r["status"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["ok", "ok"]


def test_rerun_needs_resume(copy, capsys):
    out, _ = copy
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    with pytest.raises(SystemExit) as info:
        _sweep(out)
    assert info.value.code == 2 and "--resume" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps


def test_ctrl_c_keeps_finished_runs_and_resume_completes(tmp_path, monkeypatch, capsys):
    real, calls = runs.run_dpo, []

    def run_dpo(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of the second run
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "run_dpo", run_dpo)
    out = tmp_path / "out"
    assert _sweep(out) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "1 finished runs" in err
    assert [p.name for p in (out / "runs").glob("*.json")] == ["gelu-beta0.5-seed0.json"]
    partial = json.loads((out / "results.json").read_text())  # a report of what finished
    assert [r["status"] for r in partial["runs"]] == ["ok", "not run"]
    first = (out / "runs" / "gelu-beta0.5-seed0.json").stat().st_mtime_ns
    assert _sweep(out, "--resume") == 0
    assert (out / "runs" / "gelu-beta0.5-seed0.json").stat().st_mtime_ns == first
    assert [r["status"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["ok", "ok"]


def test_a_failing_run_is_recorded_and_redone_on_resume(tmp_path, monkeypatch, capsys):
    real, calls = runs.run_dpo, []

    def run_dpo(*args, **kwargs):  # the first run fails, every later one is normal
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom in DPO")
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "run_dpo", run_dpo)
    out = tmp_path / "out"
    assert _sweep(out) == 1  # the sweep went on after the failure, then reports it
    assert "1 runs failed" in capsys.readouterr().err
    failed, done = json.loads((out / "results.json").read_text())["runs"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom in DPO"
    assert done["status"] == "ok"
    stamp = (out / "runs" / "crrelu-beta0.5-seed0.json").stat().st_mtime_ns
    assert _sweep(out, "--resume") == 0
    assert (out / "runs" / "crrelu-beta0.5-seed0.json").stat().st_mtime_ns == stamp
    assert [r["status"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["ok", "ok"]


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        _sweep(blocker / "out")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(blocker / "out") in err and "not a writable folder" in err
