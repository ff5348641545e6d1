"""dynact as users install it: the wheel is built, installed into a fresh virtual environment away
from the repository, and its ``dynact`` command runs the main job and a shipped config from an
empty folder.

The environment sees the installed dependencies (``--system-site-packages``) and gets nothing
but the wheel (``--no-deps --no-index``); ``PYTHONPATH`` is cleared, so the only dynact it can
import is the wheel's. The limits keep each command to a few optimizer steps: what is proved is
that an installed wheel carries what its commands need, not what they compute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from (copied, so that the build writes nothing into the checkout).
SOURCES = ("dynact", "pyproject.toml", "README.md", "LICENSE")
TINY = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONNOUSERSITE": "1"}


def _run(argv: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # --no-build-isolation builds with this environment's setuptools (no download); it must be
    # one pyproject.toml accepts. The skip names the fix rather than failing on a missing tool.
    setuptools = pytest.importorskip("setuptools", reason="building the wheel needs setuptools>=68 installed")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"building the wheel needs setuptools>=68, found {setuptools.__version__}")
    if int(setuptools.__version__.split(".")[0]) < 71:  # older setuptools take bdist_wheel from wheel
        pytest.importorskip("wheel", reason="setuptools<71 builds wheels with the wheel package")
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        elif path.is_file():
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", base / "dist", src], cwd=base)
    [built] = (base / "dist").glob("dynact-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh environment holding the wheel; pip and the dependencies come from the system's."""
    home = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", home], cwd=home.parent)
    python = home / ("Scripts" if os.name == "nt" else "bin") / "python"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=home.parent)
    return home


def _script(venv: Path, name: str = "dynact") -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


@pytest.fixture()
def empty(tmp_path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_the_wheel_carries_every_shipped_config_and_the_metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [meta_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(archive.read(meta_name).decode())
    shipped = {p.name for p in (REPO / "dynact" / "experiments" / "configs").glob("*.yaml")}
    assert len(shipped) == 59  # the 3 digits configs and the paper's 56 cells
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("dynact/experiments/configs/")} >= shipped
    import dynact

    assert meta["Version"] == dynact.__version__ and meta["Requires-Python"] == ">=3.10"
    assert meta["Summary"].startswith("Activation functions")
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Source"} <= set(urls)
    assert any(c.startswith("Programming Language :: Python :: 3") for c in meta.get_all("Classifier"))
    assert "Requires-Dist" in meta and "entry_points.txt" in " ".join(names)


def test_installed_dynact_is_the_wheels_and_says_its_version(venv, empty):
    # find_spec locates the package without running it (no torch import: this stays cheap)
    probe = ("import importlib.util, importlib.metadata as m, json; "
             "s = importlib.util.find_spec('dynact'); "
             "print(json.dumps([s.origin, m.version('dynact'), m.metadata('dynact')['Home-page'] or "
             "m.metadata('dynact').get_all('Project-URL')[0]]))")
    origin, version, home = json.loads(_run([_script(venv, "python"), "-c", probe], cwd=empty).stdout)
    site = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    assert Path(origin).is_relative_to(site) and not Path(origin).is_relative_to(REPO)
    import dynact

    assert version == dynact.__version__ and "https://" in home


def test_installed_compare_runs_the_main_job_from_an_empty_folder(venv, empty):
    done = _run([_script(venv), "compare", "--seeds", "1", "--epochs", "1", "--workers", "1", "--no-progress",
                 "--out", "x", *TINY], cwd=empty)
    assert "report: x/report.md" in done.stdout
    results = json.loads((empty / "x" / "results.json").read_text())
    assert results["settings"]["config"] == "dynact:digits_sweep.yaml"  # the wheel's own recipe
    assert [(r["arm"], r["status"]) for r in results["runs"]] == [("relu", "ok"), ("crrelu", "ok"), ("eafo", "ok")]
    report = (empty / "x" / "report.md").read_text()
    assert "crrelu" in report and "eafo" in report
    assert sorted(p.name for p in empty.iterdir()) == ["x"]  # nothing written outside --out


def test_installed_train_runs_a_shipped_config_by_name_from_an_empty_folder(venv, empty):
    done = _run([_script(venv), "train", "--config", "digits_eafo", "--trainer.max_steps", "2",
                 "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"], cwd=empty)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("result: ") and "runs/digits_eafo/lightning_logs/version_0" in last
    [saved] = (empty / "runs" / "digits_eafo" / "lightning_logs").glob("version_0/config.yaml")
    assert "dynact.callbacks.EAFOCallback" in saved.read_text()
