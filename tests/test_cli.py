"""`dynact` dispatcher and `dynact design`, called as a user would."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from dynact.cli import main
from dynact.density import Density


def _printed(out: str) -> dict:
    """The JSON ``dynact design`` prints before its one-line summary."""
    body, _, summary = out.rstrip("\n").rpartition("\n")
    assert " under " in summary and "one EAFO step" in summary and "WAFBC" in summary, summary
    return json.loads(body)


def _relu_entropy_oracle(delta: float) -> float:
    # Discretised entropy of ReLU(X), X ~ N(0,1), from scipy's CDF: the atom at 0 joins bin 0.
    edges = np.arange(0, 8 + delta, delta)
    P = np.diff(stats.norm.cdf(edges))
    P[0] += 0.5
    P = P[P > 0]
    return float(-(P * np.log(P)).sum() + np.log(delta))


def test_design_writes_plot_and_json_with_entropies(tmp_path, capsys):
    out = tmp_path / "design"
    assert main(["design", "--base", "relu", "--density", "normal", "--eta", "0.05", "--out", str(out)]) == 0
    printed = _printed(capsys.readouterr().out)
    saved = json.loads((out / "design.json").read_text())
    assert printed == saved
    png = (out / "design.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert saved["delta"] == pytest.approx(0.05, rel=1e-6)  # std / 20
    assert saved["entropy_before"] == pytest.approx(_relu_entropy_oracle(saved["delta"]), abs=2e-3)
    assert saved["entropy_after"] < saved["entropy_before"]  # the EAFO step lowers H at this resolution
    assert saved["entropy_in"] == pytest.approx(0.5 * math.log(2 * math.pi * math.e), abs=1e-3)
    # the worst activation with ReLU's end values reaches the ceiling log(upper - lower)
    assert saved["wafbc_bounds"][0] == 0.0
    assert saved["entropy_wafbc"] == pytest.approx(saved["entropy_ceiling"], abs=5e-3)
    assert saved["entropy_wafbc"] > saved["entropy_before"]


@pytest.mark.parametrize("spec", ["laplace", "uniform", "student-t:3"])
def test_design_accepts_every_named_density(tmp_path, spec, capsys):
    assert main(["design", "--base", "elu", "--density", spec, "--out", str(tmp_path)]) == 0
    result = _printed(capsys.readouterr().out)
    assert result["density"] == spec
    assert all(math.isfinite(result[k]) for k in ("entropy_before", "entropy_after", "entropy_wafbc"))
    assert result["entropy_after"] < result["entropy_before"]  # ELU is increasing: the step lowers H


def test_design_reads_a_saved_density_and_g_method(tmp_path, capsys):
    path = tmp_path / "p.pt"
    Density.from_pdf(stats.logistic.pdf, -10, 10, 800).save(path)
    assert main(["design", "--base", "silu", "--density", str(path), "--method", "x",
                 "--out", str(tmp_path / "o")]) == 0
    result = _printed(capsys.readouterr().out)
    assert result["grid"] == {"lo": -10.0, "hi": 10.0, "bins": 800}


@pytest.mark.parametrize("argv,message", [
    (["design", "--density", "cauchyish"], "--density"),
    (["design", "--density", "student-t:x"], "student-t"),
    (["design", "--base", "swish"], "unknown activation"),
    (["design", "--base", "eafo"], "static base"),
    (["design", "--method", "g"], "method='x'"),
    (["design", "--bins", "4"], "bins"),
])
def test_design_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "design.png").exists()


def test_console_script_dispatch(capsys):
    assert main([]) == 0
    listing = capsys.readouterr().out
    for command in ("train", "compare", "design"):
        assert command in listing
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_installed_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "dynact.cli", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("dynact ")


def test_version_lives_in_one_place_and_dynact_version_prints_it(capsys):
    import re
    from pathlib import Path

    import dynact

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.M)
    assert 'version = { attr = "dynact.__version__" }' in pyproject
    assert not re.search(r"^version = \"", pyproject, re.M)  # no second, literal copy in [project]
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", dynact.__version__)
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out == f"dynact {dynact.__version__}\n"


def test_package_metadata_names_the_project():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["description"] and project["requires-python"] == ">=3.10"
    assert {"Homepage", "Documentation", "Source"} <= set(project["urls"])
    assert all(url.startswith("https://") for url in project["urls"].values())
    assert any(c.startswith("Programming Language :: Python :: 3.1") for c in project["classifiers"])
