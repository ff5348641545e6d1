"""`dynact design`: the README's examples, method g per base, the WAFBC's bounds and the figure.

Oracles: scipy's normal quantiles and analytic activations, the reference table of docs/math.md.
"""

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import optimize, stats

from dynact.cli import main
from dynact.density import Density
from dynact.experiments import design as design_mod

README = Path(__file__).resolve().parents[1] / "README.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _printed(out: str) -> dict:
    """The JSON ``dynact design`` prints before its one-line summary."""
    body, _, summary = out.rstrip("\n").rpartition("\n")
    assert " under " in summary and "one EAFO step" in summary and "WAFBC" in summary, summary
    return json.loads(body)


def _readme_design_commands() -> list[list[str]]:
    argvs = []
    for line in README.read_text().splitlines():
        if line.strip().startswith("dynact design"):
            argvs.append(shlex.split(line, comments=True)[1:])  # drop the console script's name
    return argvs


def test_readme_has_design_examples_for_both_methods():
    argvs = _readme_design_commands()
    assert len(argvs) >= 3
    assert any(a[a.index("--method") + 1] == "g" for a in argvs if "--method" in a)


@pytest.mark.parametrize("argv", _readme_design_commands(), ids=lambda a: " ".join(a[1:5]))
def test_every_readme_design_example_runs(tmp_path, capsys, argv):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 0  # the last --out wins: write under tmp_path
    printed = _printed(capsys.readouterr().out)
    saved = json.loads((out / "design.json").read_text())
    assert printed == saved
    png = (out / "design.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 20_000
    for key in ("entropy_in", "entropy_before", "entropy_after", "entropy_wafbc", "entropy_ceiling", "max_abs_change"):
        assert math.isfinite(saved[key]), key
    assert saved["entropy_after"] < saved["entropy_before"]  # one EAFO step lowers the entropy
    assert 0 < saved["max_abs_change"] < 0.2  # a visible but small change
    lower, upper = saved["wafbc_bounds"]
    assert saved["entropy_ceiling"] == pytest.approx(math.log(upper - lower))
    assert saved["entropy_wafbc"] == pytest.approx(saved["entropy_ceiling"], abs=0.02)


# ---------------------------------------------------------------- method g through the command
@pytest.mark.parametrize("base,h_before,h_after", [
    ("softplus", 0.6129, 0.5990),  # the reference table of docs/math.md, N(0,1), eta 0.05
    ("tanh", 0.6698, 0.6655),
])
def test_design_method_g_reproduces_the_table(tmp_path, capsys, base, h_before, h_after):
    argv = ["design", "--base", base, "--method", "g", "--eta", "0.05", "--bins", "3200", "--delta", "0.005"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    result = _printed(capsys.readouterr().out)
    assert result["entropy_before"] == pytest.approx(h_before, abs=5e-3)
    assert result["entropy_after"] == pytest.approx(h_after, abs=5e-3)


@pytest.mark.parametrize("base", ["elu", "celu", "sigmoid"])
def test_design_method_g_takes_increasing_bases_with_a_continuous_slope(tmp_path, capsys, base):
    assert main(["design", "--base", base, "--method", "g", "--out", str(tmp_path)]) == 0
    result = _printed(capsys.readouterr().out)
    assert result["method"] == "g" and result["entropy_after"] < result["entropy_before"]


@pytest.mark.parametrize("base,reason", [
    ("relu", "strictly increasing"),
    ("gelu", "strictly increasing"),
    ("silu", "strictly increasing"),
    ("mish", "strictly increasing"),
    ("crrelu", "strictly increasing"),
    ("prelu", "slope jumps"),
])
def test_design_method_g_refuses_other_bases_with_a_clear_error(tmp_path, capsys, base, reason):
    with pytest.raises(SystemExit) as exit_info:
        main(["design", "--base", base, "--method", "g", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--base {base} --method g" in err and reason in err and "method='x'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "design.png").exists()


# ---------------------------------------------------------------- WAFBC bounds
@pytest.fixture(scope="module")
def normal():
    return Density.from_pdf(stats.norm.pdf, -8.0, 8.0, 1600)


def _gelu_minimum() -> float:
    res = optimize.minimize_scalar(lambda x: x * stats.norm.cdf(x), bounds=(-3, 0), method="bounded",
                                   options={"xatol": 1e-10})
    return float(res.fun)


@pytest.mark.parametrize("base,bounds", [
    ("relu", lambda a, b: (0.0, b)),
    ("tanh", lambda a, b: (math.tanh(a), math.tanh(b))),
    ("elu", lambda a, b: (math.expm1(a), b)),
    ("gelu", lambda a, b: (_gelu_minimum(), b * stats.norm.cdf(b))),  # its minimum lies inside the bulk
])
def test_wafbc_bounds_are_the_base_range_over_the_bulk(normal, base, bounds):
    result = design_mod.design(base, normal, 0.05, delta=0.005)
    a, b = stats.norm.ppf(design_mod.BULK[0]), stats.norm.ppf(design_mod.BULK[1])
    assert result["bulk"]["quantiles"] == list(design_mod.BULK)
    assert result["bulk"]["x"] == pytest.approx([a, b], abs=2e-3)
    lower, upper = bounds(a, b)
    assert result["wafbc_bounds"] == pytest.approx([lower, upper], abs=2e-3)
    # the WAFBC spans exactly that range, and its output is uniform there: H = log(upper - lower)
    worst = result["_curves"]["wafbc"]
    assert float(worst.min()) >= lower - 1e-9 and float(worst.max()) <= upper + 1e-9
    assert result["entropy_wafbc"] == pytest.approx(math.log(upper - lower), abs=5e-3)


# ---------------------------------------------------------------- the WAFBC against its ceiling
def _binned_uniform_oracle(lower: float, upper: float, delta: float) -> float:
    # H_delta of a uniform output on [lower, upper], bins at multiples of delta, from scipy's CDF.
    edges = np.arange(math.floor(lower / delta), math.ceil(upper / delta) + 1) * delta
    P = np.diff(stats.uniform(lower, upper - lower).cdf(edges))
    P = P[P > 0]
    return float(-(P * np.log(P)).sum() + math.log(delta))


@pytest.mark.parametrize("spec,base", [("normal", "relu"), ("laplace", "tanh"), ("student-t:3", "gelu"),
                                       ("uniform", "elu")])
def test_wafbc_exceeds_the_ceiling_by_no_more_than_the_binning_bound_at_fine_resolution(spec, base):
    # The WAFBC maximises the continuous entropy at log(L), L = upper - lower. Binned at delta, the
    # two bins cut by the bounds each add p log(delta / (L p)) <= delta / (e L): the excess lies in
    # [0, 2 delta / (e L)], and the WAFBC's H_delta is a uniform output's on the same bins.
    delta = 0.001
    result = design_mod.design(base, design_mod._density_spec(spec, -8.0, 8.0, 16000), 0.05, delta=delta)
    lower, upper = result["wafbc_bounds"]
    bound = 2 * delta / (math.e * (upper - lower))
    excess = result["entropy_wafbc"] - math.log(upper - lower)
    assert -1e-4 <= excess <= bound
    assert result["ceiling_excess_bound"] == pytest.approx(bound)
    oracle = _binned_uniform_oracle(lower, upper, delta)
    assert result["entropy_ceiling_binned"] == pytest.approx(oracle, abs=1e-9)
    assert result["entropy_wafbc"] == pytest.approx(oracle, abs=1e-4)


def test_the_binning_excess_shrinks_with_delta_and_the_default_run_states_it(tmp_path, capsys):
    coarse = design_mod.design("relu", design_mod._density_spec("normal", -8.0, 8.0, 1600), 0.05)
    fine = design_mod.design("relu", design_mod._density_spec("normal", -8.0, 8.0, 1600), 0.05, delta=0.005)
    excess = [r["entropy_wafbc"] - r["entropy_ceiling"] for r in (coarse, fine)]
    assert 0 < excess[1] < excess[0] <= coarse["ceiling_excess_bound"]  # the 1.131 vs 1.128 of the issue
    assert main(["design", "--out", str(tmp_path)]) == 0
    summary = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert f"WAFBC {coarse['entropy_wafbc']:.4f} vs ceiling log(" in summary
    assert f"({excess[0]:+.4f} from binning at delta 0.05, at most {coarse['ceiling_excess_bound']:.4f})" in summary


def test_design_help_shows_every_default(capsys):
    parser = design_mod._parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        shown = f"{action.default:g}" if isinstance(action.default, float) else action.default
        expected = f"default: the input's std / {design_mod._DELTA_PER_STD}" if action.default is None else \
            f"default: {shown}"
        assert expected in action.help, action.dest
    with pytest.raises(SystemExit):
        main(["design", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: relu)", "(default: normal)", "(default: -8;", "(default: 8;", "(default: 1600;",
                    "(default: 0.05)", "(default: x)", "ceiling_excess_bound"):
        assert default in text, default


def test_design_ends_with_a_one_line_summary_of_its_json(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["design", "--base", "tanh", "--density", "laplace", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    saved = json.loads((out / "design.json").read_text())
    assert json.loads("\n".join(lines[:-1])) == saved
    summary = lines[-1]
    assert summary.startswith("tanh under laplace, one EAFO step (method x, eta 0.05): output entropy ")
    assert f"{saved['entropy_before']:.4f} -> {saved['entropy_after']:.4f} nats ({saved['entropy_change']:+.4f})" \
        in summary
    assert summary.endswith(f"wrote {out / 'design.png'}, {out / 'design.json'}")


# ---------------------------------------------------------------- the figure
def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_figure_shows_the_base_over_the_step_and_the_change_on_its_own_axis(normal):
    result = design_mod.design("softplus", normal, 0.05, method="g")
    fig = design_mod._figure(result, "softplus under normal")
    top, bottom = fig.axes[0], fig.axes[1]
    top_lines, bottom_lines = _lines(top), _lines(bottom)
    base = next(v for k, v in top_lines.items() if k.startswith("base"))
    stepped = next(v for k, v in top_lines.items() if "EAFO step" in k)
    worst = next(v for k, v in top_lines.items() if k.startswith("WAFBC"))
    change = next(v for k, v in bottom_lines.items() if k.startswith("change"))

    x = np.asarray(base.get_xdata())
    # the base stays visible: dashed, in another colour, drawn over the thicker stepped curve
    assert base.get_linestyle() == "--" and base.get_color() != stepped.get_color()
    assert base.get_zorder() >= stepped.get_zorder() and top.get_lines().index(base) > top.get_lines().index(stepped)
    np.testing.assert_allclose(base.get_ydata(), F.softplus(torch.as_tensor(x)).numpy(), atol=1e-12)
    # the change f~ - f has its own axis, and its scale is the change's, not the activation's
    np.testing.assert_allclose(change.get_ydata(), np.asarray(stepped.get_ydata()) - np.asarray(base.get_ydata()),
                               atol=1e-12)
    lo, hi = bottom.get_ylim()
    assert hi - lo < 0.1 < float(np.ptp(base.get_ydata()))
    assert float(np.abs(change.get_ydata()).max()) == pytest.approx(result["max_abs_change"], rel=1e-6)
    # the plot covers the density's bulk with a margin, not the grid's ends at +-8
    a, b = result["bulk"]["x"]
    assert x.min() < a and x.max() > b and x.max() < 6
    # the WAFBC stays within the bounds shown
    assert np.all(np.asarray(worst.get_ydata()) <= result["wafbc_bounds"][1] + 1e-9)
    import matplotlib.pyplot as plt

    plt.close(fig)
