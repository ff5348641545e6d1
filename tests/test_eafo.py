"""EAFO numerics against independent oracles: analytic formulas, quadrature, sampling, scipy.

Reference values are those of docs/math.md; each is recomputed here from scipy, quadrature or sampling.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats

from dynact import CRReLU, eafo
from dynact.density import Density

SQRT_2PI = math.sqrt(2 * math.pi)


@pytest.fixture(scope="module")
def normal():
    # x in [-8, 8], step 0.005 (a step <= 0.05 keeps the quadrature error small).
    return Density.from_pdf(stats.norm.pdf, -8.0, 8.0, 3200)


def _identity(x):
    return x


def _entropy_by_formula(values: torch.Tensor, density: Density) -> float:
    """H[Y] = H[X] + E[log f'(X)] for a smooth increasing f given on the grid (docs/math.md, "Output entropy"),
    by quadrature of a numerical derivative: independent of the push-forward code."""
    x, y = density.grid.numpy(), values.numpy()
    slope = np.gradient(y, x)
    p = density.p.numpy()
    h_x = -integrate.trapezoid(p * np.log(np.maximum(p, 1e-300)), x)
    return h_x + integrate.trapezoid(p * np.log(slope), x)


def _entropy_by_sampling(f, n: int = 1_000_000, bins: int = 2000, seed: int = 0) -> float:
    """Histogram entropy of f(X) for X ~ N(0,1) samples (the sampling check of docs/math.md's reference table)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = f(x).numpy()
    counts, edges = np.histogram(y, bins=bins)
    width = edges[1] - edges[0]
    prob = counts[counts > 0] / n
    return float(-(prob * np.log(prob)).sum() + np.log(width))


# ---------------------------------------------------------------- the correction of ReLU
def test_relu_correction_is_derivative_of_normal_density(normal):
    c = eafo.correction(F.relu, normal)
    x = normal.grid
    expected = -x * torch.exp(-x**2 / 2) / SQRT_2PI
    inside = x.abs() <= 4
    assert (c - expected)[inside].abs().max() < 1e-4


def test_correction_on_monotone_part_matches_formula(normal):
    # tanh: f''/f' = -2 tanh(x), so c = p' + 2 p tanh(x).
    c = eafo.correction(torch.tanh, normal)
    x, p = normal.grid, normal.p
    expected = -x * p + 2 * p * torch.tanh(x)
    assert (c - expected).abs().max() < 1e-8


def test_correction_works_for_modules_and_leaves_them_untouched(normal):
    act = torch.nn.PReLU(init=0.25)  # float32 parameter; evaluated on a float64 copy
    before = act.weight.detach().clone()
    calls = []
    act.register_forward_pre_hook(lambda m, i: calls.append(1))
    c = eafo.correction(act, normal)
    x, p = normal.grid, normal.p
    assert (c - (-x * p)).abs().max() < 1e-8  # piecewise linear: c = p'
    assert act.weight.dtype == torch.float32 and torch.equal(act.weight.detach(), before)
    assert calls == []  # evaluating an activation never fires its (training) hooks


# ---------------------------------------------------------------- one step lowers the entropy (reference table)
TABLE = [
    # f, H before, eta, H after (x-space), H after (g-space)
    ("softplus", F.softplus, 0.6129, 0.05, 0.5990, 0.5990),
    ("softplus", F.softplus, 0.6129, 0.2, 0.5535, 0.5543),
    ("tanh", torch.tanh, 0.6698, 0.05, 0.6655, 0.6655),
    ("identity", _identity, 1.4189, 0.05, 1.4118, 1.4118),
]


@pytest.mark.parametrize("name,f,h_before,eta,h_x,h_g", TABLE, ids=[f"{r[0]}-{r[3]}" for r in TABLE])
def test_step_lowers_entropy_as_in_table(normal, name, f, h_before, eta, h_x, h_g):
    assert eafo.output_entropy(f, normal) == pytest.approx(h_before, abs=5e-3)
    new_x = eafo.step(f, normal, eta, method="x")
    new_g = eafo.step(f, normal, eta, method="g")
    after_x = eafo.output_entropy(eafo.Tabulated(normal.grid, new_x), normal)
    after_g = eafo.output_entropy(eafo.Tabulated(normal.grid, new_g), normal)
    assert after_x == pytest.approx(h_x, abs=5e-3)
    assert after_g == pytest.approx(h_g, abs=5e-3)
    # independent oracle: H[X] + E log f~'(X) by quadrature
    assert _entropy_by_formula(new_x, normal) == pytest.approx(h_x, abs=5e-3)
    assert after_x < eafo.output_entropy(f, normal)


@pytest.mark.parametrize("name,f,h_before,h_after", [
    ("softplus", F.softplus, 0.6129, 0.5990),
    ("tanh", torch.tanh, 0.6698, 0.6655),
    ("identity", _identity, 1.4189, 1.4118),
])
def test_step_lowers_entropy_measured_by_sampling(normal, name, f, h_before, h_after):
    stepped = eafo.Tabulated(normal.grid, eafo.step(f, normal, 0.05, method="x"))
    before = _entropy_by_sampling(f)
    after = _entropy_by_sampling(stepped)
    assert before == pytest.approx(h_before, abs=5e-3)
    assert after == pytest.approx(h_after, abs=5e-3)
    assert after < before


def test_x_and_g_steps_agree_to_second_order(normal):
    inside = normal.grid.abs() <= 4
    small = (eafo.step(F.softplus, normal, 0.05, "x") - eafo.step(F.softplus, normal, 0.05, "g"))[inside]
    large = (eafo.step(F.softplus, normal, 0.2, "x") - eafo.step(F.softplus, normal, 0.2, "g"))[inside]
    assert small.abs().max() < 5e-4  # table: 0.0002
    assert large.abs().max() < 6e-3  # table: 0.0039
    assert large.abs().max() > 8 * small.abs().max()  # O(eta^2): 4x the step, ~16x the gap


def test_elu_x_step_matches_table_and_g_step_refuses_only_a_slope_jump(normal):
    assert eafo.output_entropy(F.elu, normal) == pytest.approx(1.0200, abs=5e-3)
    after = eafo.output_entropy(eafo.Tabulated(normal.grid, eafo.step(F.elu, normal, 0.05)), normal)
    assert after == pytest.approx(1.0095, abs=5e-3)
    # ELU(alpha=1) is C^1 (only f'' jumps at 0), so method g takes it; alpha=0.5 is a kink.
    after_g = eafo.output_entropy(eafo.Tabulated(normal.grid, eafo.step(F.elu, normal, 0.05, method="g")), normal)
    assert after_g == pytest.approx(1.0095, abs=5e-3)
    with pytest.raises(ValueError, match="method='x'"):
        eafo.step(lambda x: F.elu(x, alpha=0.5), normal, 0.05, method="g")


def test_g_step_refuses_flat_activations(normal):
    with pytest.raises(ValueError, match="strictly increasing"):
        eafo.step(F.relu, normal, 0.05, method="g")


# ---------------------------------------------------------------- entropy
def test_identity_entropy_is_normal_entropy(normal):
    assert eafo.output_entropy(_identity, normal) == pytest.approx(0.5 * math.log(2 * math.pi * math.e), abs=5e-3)
    assert eafo.output_entropy(_identity, normal) == pytest.approx(1.4189, abs=5e-3)


def test_entropy_scales_with_log_of_gain(normal):
    # H[aY] = H[Y] + log a (docs/math.md, "Output entropy").
    base = eafo.output_entropy(torch.tanh, normal, delta=0.001)
    scaled = eafo.output_entropy(lambda x: 3 * torch.tanh(x), normal, delta=0.001)
    assert scaled - base == pytest.approx(math.log(3), abs=2e-3)


def test_relu_entropy_is_finite_and_counts_the_atom(normal):
    delta = 0.01
    h = eafo.output_entropy(F.relu, normal, delta=delta)
    assert math.isfinite(h)
    # Oracle from scipy's normal CDF: bin 0 holds the atom (all negative inputs) plus
    # P(0 <= X < delta); bin j holds P(j delta <= X < (j + 1) delta).
    edges = np.arange(0, 8 + delta, delta)
    P = np.diff(stats.norm.cdf(edges))
    P[0] += 0.5
    expected = float(-(P[P > 0] * np.log(P[P > 0])).sum() + np.log(delta))
    assert h == pytest.approx(expected, abs=1e-3)


def _normal(sigma: float, bins: int = 3200) -> Density:
    return Density.from_pdf(stats.norm(scale=sigma).pdf, -8 * sigma, 8 * sigma, bins)


def test_output_stats_relu_has_half_dead_mass_and_the_mixed_entropy_without_resolution(normal):
    # Oracle: the atom's -0.5 log 0.5 plus the continuous half, 0.5 * H[half-normal]
    # + 0.5 log 2 with H[half-normal] = scipy's halfnorm entropy.
    relu = eafo.output_stats(F.relu, normal)
    expected = -0.5 * math.log(0.5) + 0.5 * float(stats.halfnorm.entropy()) - 0.5 * math.log(0.5)
    assert expected == pytest.approx(1.0561, abs=1e-4)
    assert relu["dead"] == pytest.approx(0.5, abs=1e-3)
    assert relu["entropy"] == pytest.approx(expected, abs=2e-3)
    assert relu["std"] == pytest.approx(math.sqrt(0.5 - 1 / (2 * math.pi)), abs=1e-3)
    assert relu["log_slope"] == pytest.approx(0.0, abs=1e-9)  # slope 1 on all the rising mass
    ident = eafo.output_stats(_identity, normal)
    assert ident["dead"] == 0.0
    assert ident["entropy"] == pytest.approx(float(stats.norm.entropy()), abs=2e-3)
    assert ident["entropy_in"] == pytest.approx(float(stats.norm.entropy()), abs=1e-3)


def test_output_stats_do_not_depend_on_the_grid_resolution():
    # The old discretised entropy moved by 0.5 * log(10) between these resolutions; the mixed
    # entropy is a property of the activation and the density alone.
    coarse, fine = (eafo.output_stats(F.relu, _normal(1.0, bins)) for bins in (800, 6400))
    for key in ("dead", "entropy", "entropy_scale_free", "log_slope", "std"):
        assert coarse[key] == pytest.approx(fine[key], abs=2e-3), key


@pytest.mark.parametrize("name, f", [("relu", F.relu), ("identity", _identity)])
def test_entropy_scale_free_is_invariant_under_input_scale(name, f):
    # X = sigma Z and a positively homogeneous f give Y = sigma f(Z): atoms stay put, the
    # continuous part stretches; entropy moves by (1 - dead) log sigma, the scale-free one not.
    stats_by_sigma = {s: eafo.output_stats(f, _normal(s)) for s in (0.25, 1.0, 4.0)}
    ref = stats_by_sigma[1.0]
    for sigma, st in stats_by_sigma.items():
        assert st["entropy_scale_free"] == pytest.approx(ref["entropy_scale_free"], abs=2e-3), sigma
        live = 1 - ref["dead"]
        assert st["entropy"] == pytest.approx(ref["entropy"] + live * math.log(sigma), abs=2e-3), sigma


def test_decreasing_parts_are_not_dead_but_flat_parts_are(normal):
    # GELU dips below zero for x < -0.75: decreasing, invertible there, so not dead. Hardtanh is
    # flat beyond +-1: two atoms holding 2 * P(X > 1).
    assert eafo.output_stats(F.gelu, normal)["dead"] < 1e-6
    hard = eafo.output_stats(F.hardtanh, normal)
    tail = 2 * float(stats.norm.sf(1.0))
    assert hard["dead"] == pytest.approx(tail, abs=1e-3)
    # two atoms of mass tail/2 each, and the uniform-ish middle: entropy by quadrature
    atoms = -tail * math.log(tail / 2)
    xs = np.linspace(-1, 1, 20001)
    q = stats.norm.pdf(xs)
    assert hard["entropy"] == pytest.approx(atoms - integrate.trapezoid(q * np.log(q), xs), abs=2e-3)


def test_overlapping_branches_add_their_densities(normal):
    # |x| folds N(0,1) onto the half-normal: both branches land on the same outputs, so the
    # entropy is the half-normal's, not the sum of two halves.
    folded = eafo.output_stats(torch.abs, normal)
    assert folded["dead"] == 0.0
    assert folded["entropy"] == pytest.approx(float(stats.halfnorm.entropy()), abs=2e-3)


def test_log_slope_is_the_mean_log_slope_over_the_rising_mass(normal):
    # ELU: slope e^x for x < 0 and 1 after, so E[log f'; rising] = E[X; X < 0] = -phi(0).
    assert eafo.output_stats(F.elu, normal)["log_slope"] == pytest.approx(-stats.norm.pdf(0.0), abs=1e-3)
    assert eafo.output_stats(lambda x: 3 * x, normal)["log_slope"] == pytest.approx(math.log(3), abs=1e-6)


def test_crrelu_turns_the_atom_into_a_narrow_continuous_part(normal):
    # Any eps != 0 gives ReLU's negative half a slope: the atom is gone (dead 0) and its mass
    # becomes a narrow continuous part of very low entropy: a jump at eps = 0, not a small step.
    relu = eafo.output_stats(F.relu, normal)
    for eps in (-0.01, 0.01):
        st = eafo.output_stats(CRReLU(eps), normal)
        assert st["dead"] < 1e-3
        assert st["entropy"] < relu["entropy"] - 1.0


def test_crrelu_sign_decides_the_entropy_direction(normal):
    # Section 3: eps = -eta/sqrt(2 pi) is one EAFO step from ReLU (lower entropy at a resolution
    # coarser than the bump it puts on the negative side); the published +0.01 goes the other way.
    delta = 0.05
    relu = eafo.output_entropy(F.relu, normal, delta)
    assert eafo.output_entropy(CRReLU(-0.01), normal, delta) < relu
    assert eafo.output_entropy(CRReLU(+0.01), normal, delta) > relu
    eta = 0.05
    step = eafo.step(F.relu, normal, eta)
    assert torch.allclose(step, CRReLU(-eta / SQRT_2PI)(normal.grid), atol=1e-9)


# ---------------------------------------------------------------- the WAFBC
def test_wafbc_is_the_scaled_cdf(normal):
    w = eafo.wafbc(normal, -1.0, 3.0)
    expected = -1.0 + 4.0 * torch.as_tensor(stats.norm.cdf(normal.grid.numpy()))
    assert (w - expected).abs().max() < 1e-3


def test_wafbc_has_the_highest_entropy_among_bounded_activations(normal):
    worst = eafo.Tabulated(normal.grid, eafo.wafbc(normal, 0.0, 1.0))
    h_worst = eafo.output_entropy(worst, normal)
    assert h_worst == pytest.approx(0.0, abs=2e-3)  # log(b - a)
    others = {
        "sigmoid(1.702x)": (lambda x: torch.sigmoid(1.702 * x), -0.010),
        "(tanh+1)/2": (lambda x: (torch.tanh(x) + 1) / 2, -0.023),
        "sigmoid": (torch.sigmoid, -0.193),
    }
    for name, (f, expected) in others.items():
        h = eafo.output_entropy(f, normal)
        assert h == pytest.approx(expected, abs=3e-3), name
        assert h < h_worst, name


def test_wafbc_variational_residual_vanishes_for_the_cdf_only(normal):
    # Section 4: p'/f' - p f''/f'^2 = 0 for f = CDF (|x| < 4), but not for tanh.
    x = normal.grid
    inside = x.abs() < 4

    def residual(f):
        _, d1, d2 = eafo.derivatives(f, x)
        return (normal.dp / d1 - normal.p * d2 / d1**2)[inside].abs().max()

    cdf = lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    assert residual(cdf) < 2e-4
    assert residual(lambda t: (torch.tanh(t) + 1) / 2) > 0.3


def test_wafbc_of_uniform_density_is_linear():
    d = Density.from_pdf(lambda x: torch.where(x.abs() <= 1, 0.5, 0.0), -1.0, 1.0, 400)
    w = eafo.wafbc(d, 0.0, 1.0)
    assert (w - (d.grid + 1) / 2).abs().max() < 1e-9


# ---------------------------------------------------------------- bad input
def test_bad_density_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="bins"):
        Density.from_pdf(stats.norm.pdf, -1, 1, 4)
    with pytest.raises(ValueError, match="lo must be below hi"):
        Density.from_pdf(stats.norm.pdf, 1, 1, 64)
    with pytest.raises(ValueError, match="non-finite"):
        Density.from_pdf(lambda x: torch.full_like(x, float("nan")), -1, 1, 64)
    with pytest.raises(ValueError, match="negative"):
        Density.from_pdf(lambda x: -torch.ones_like(x), -1, 1, 64)


def test_bad_activations_raise_clear_errors(normal):
    with pytest.raises(TypeError, match="callable"):
        eafo.correction(3.0, normal)
    with pytest.raises(ValueError, match="callable"):  # the same error is also a ValueError
        eafo.output_entropy("relu", normal)
    with pytest.raises(ValueError, match="elementwise"):
        eafo.output_entropy(lambda x: x.sum(), normal)
    with pytest.raises(ValueError, match="not finite"):
        eafo.output_entropy(torch.log, normal)  # log of negative inputs
    with pytest.raises(ValueError, match="method"):
        eafo.step(torch.tanh, normal, 0.1, method="z")
    with pytest.raises(ValueError, match="delta"):
        eafo.output_entropy(torch.tanh, normal, delta=0)
    with pytest.raises(ValueError, match="lower"):
        eafo.wafbc(normal, 1.0, 0.0)
    with pytest.raises(TypeError, match="Density"):
        eafo.correction(torch.tanh, np.zeros(10))


def test_results_live_on_the_density_device_and_never_nan(normal):
    for f in (F.relu, F.gelu, F.elu, F.silu, F.mish, CRReLU()):
        c = eafo.correction(f, normal)
        assert c.shape == normal.grid.shape and c.dtype == torch.float64
        assert torch.isfinite(c).all()
        assert math.isfinite(eafo.output_entropy(f, normal))


# ---------------------------------------------------------------- method g: which activations and how well
def _first_order_entropy_change(d1, d2, eta: float) -> float:
    """Section 2b's dH = -eta * int f' ((p/f')')^2 dx for p = N(0,1), by scipy quadrature of
    the analytic derivatives: an oracle independent of grids, interpolation and push-forward."""
    def integrand(x):
        p = stats.norm.pdf(x)
        r = -x * p / d1(x) - p * d2(x) / d1(x) ** 2
        return d1(x) * r * r
    return -eta * integrate.quad(integrand, -12, 12, points=[0], limit=200)[0]


def _sig(x):
    return 1 / (1 + np.exp(-x))


G_CASES = [
    # name, f, f' and f'' (numpy), H before (docs/math.md's reference table; sigmoid: its WAFBC
    # section), H after at eta 0.05
    ("softplus", F.softplus, _sig, lambda x: _sig(x) * (1 - _sig(x)), 0.6129, 0.5990),
    ("tanh", torch.tanh, lambda x: np.cosh(x) ** -2, lambda x: -2 * np.tanh(x) * np.cosh(x) ** -2, 0.6698, 0.6655),
    ("identity", _identity, np.ones_like, np.zeros_like, 1.4189, 1.4118),
    ("sigmoid", torch.sigmoid, lambda x: _sig(x) * (1 - _sig(x)),
     lambda x: _sig(x) * (1 - _sig(x)) * (1 - 2 * _sig(x)), -0.193, None),
]


@pytest.mark.parametrize("name,f,d1,d2,h_before,h_after", G_CASES, ids=[c[0] for c in G_CASES])
def test_g_step_lowers_entropy_by_formula_and_by_sampling(normal, name, f, d1, d2, h_before, h_after):
    new = eafo.step(f, normal, 0.05, method="g")
    expected = h_before + _first_order_entropy_change(d1, d2, 0.05)
    if h_after is not None:
        assert expected == pytest.approx(h_after, abs=5e-3)  # the oracle reproduces the table
    assert _entropy_by_formula(new, normal) == pytest.approx(expected, abs=5e-3)
    before = _entropy_by_sampling(f)
    after = _entropy_by_sampling(eafo.Tabulated(normal.grid, new))
    assert before == pytest.approx(h_before, abs=5e-3)
    assert after == pytest.approx(expected, abs=5e-3)
    assert after < before
    assert bool((torch.diff(new) > 0).all())  # still strictly increasing


def _kink_intervals(f, density):
    _, d1, d2 = eafo.derivatives(f, density.grid)
    return torch.nonzero(eafo._kinks(d1, d2, density.step)).flatten().tolist()


@pytest.mark.parametrize("name,f", [
    ("elu", F.elu),
    ("softplus", F.softplus),
    ("tanh", torch.tanh),
    ("sigmoid", torch.sigmoid),
    ("identity", _identity),
    ("celu-0.2", lambda x: F.celu(x, alpha=0.2)),  # CELU's slope is continuous for every alpha
    ("celu-3", lambda x: F.celu(x, alpha=3.0)),
    ("gelu", F.gelu),
    ("silu", F.silu),
])
def test_kink_detector_accepts_continuous_slopes(normal, name, f):
    assert _kink_intervals(f, normal) == []


@pytest.mark.parametrize("name,f", [
    ("relu", F.relu),
    ("leaky-relu", F.leaky_relu),
    ("elu-0.5", lambda x: F.elu(x, alpha=0.5)),
    ("elu-2", lambda x: F.elu(x, alpha=2.0)),
    ("prelu", torch.nn.PReLU(init=0.25)),
    ("crrelu", CRReLU(eps=0.01)),
])
def test_kink_detector_finds_the_slope_jump_at_zero(normal, name, f):
    # each of these has f'(0-) != f'(0+) and a continuous slope everywhere else
    (k,) = _kink_intervals(f, normal)
    assert normal.grid[k] < 0 < normal.grid[k + 1]


@pytest.mark.parametrize("name,f,message", [
    ("relu", F.relu, "strictly increasing"),
    ("gelu", F.gelu, "strictly increasing"),
    ("silu", F.silu, "strictly increasing"),
    ("mish", F.mish, "strictly increasing"),
    ("leaky-relu", F.leaky_relu, "slope jumps"),
    ("elu-0.5", lambda x: F.elu(x, alpha=0.5), "slope jumps"),
    ("prelu", torch.nn.PReLU(init=0.25), "slope jumps"),
])
def test_g_step_refuses_non_monotone_and_kinked_activations_naming_method_x(normal, name, f, message):
    with pytest.raises(ValueError, match=message) as err:
        eafo.step(f, normal, 0.05, method="g")
    assert "method='x'" in str(err.value)


def test_g_step_of_elu_agrees_with_x_step_away_from_the_jump_of_its_curvature(normal):
    # ELU's f'' jumps at 0, so dg jumps by eta p(0) = 0.02 and the moved points fold; away
    # from 0 the exact and first-order steps agree to O(eta^2).
    g = eafo.step(F.elu, normal, 0.05, method="g")
    x = eafo.step(F.elu, normal, 0.05, method="x")
    away = normal.grid.abs() > 0.1
    assert (g - x)[away].abs().max() < 1e-3
    assert (g - x).abs().max() < 0.03  # at 0 both rise steeply by about eta * p(0)
    assert bool((torch.diff(g) > 0).all())
    after = _entropy_by_sampling(eafo.Tabulated(normal.grid, g))
    assert after == pytest.approx(1.0095, abs=5e-3)  # the reference table, x-space column


def test_g_step_on_a_wide_grid_moves_only_the_bulk_of_the_density():
    # tanh saturates in float64 (tanh(20) == 1): strictly increasing only where p has mass.
    wide = Density.from_pdf(stats.norm.pdf, -30.0, 30.0, 6000)
    assert float(torch.tanh(torch.tensor(20.0, dtype=torch.float64))) == 1.0
    for f, h_after in ((torch.tanh, 0.6655), (torch.sigmoid, None), (F.softplus, 0.5990)):
        new = eafo.step(f, wide, 0.05, method="g")
        x = wide.grid
        tails = x.abs() > 6  # beyond the 1e-6 quantiles (|x| = 4.75): the inverse is not moved
        assert torch.equal(new[tails], f(x[tails]))
        if h_after is not None:
            assert _entropy_by_sampling(eafo.Tabulated(x, new)) == pytest.approx(h_after, abs=5e-3)


@pytest.mark.parametrize("f,density", [
    (F.softplus, "normal"),
    (torch.tanh, "student-t"),  # heavy tails: p f''/f'^2 ~ x^-4 e^(2x) grows along the grid
])
def test_g_step_with_too_large_eta_names_the_largest_eta_that_works(normal, f, density):
    import re

    d = normal if density == "normal" else Density.from_pdf(stats.t(df=3).pdf, -8.0, 8.0, 1600)
    with pytest.raises(ValueError, match="too large") as err:
        eafo.step(f, d, 3.0, method="g")
    limit = float(re.search(r"eta below about ([0-9.e+-]+)", str(err.value)).group(1))
    assert bool((torch.diff(eafo.step(f, d, 0.9 * limit, method="g")) > 0).all())
    with pytest.raises(ValueError, match="too large"):
        eafo.step(f, d, 1.1 * limit, method="g")
