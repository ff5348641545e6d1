"""Bad input to the public constructors and functions gets a TypeError or ValueError that names the
argument, the value and what is accepted (issue 28, point 9), never a raw error of ``float()`` or
of a tensor operation; and ``Density.from_pdf`` refuses a pdf whose mass on the grid no
normalised pdf could have."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from dynact import eafo
from dynact.activations import CRReLU
from dynact.density import KDE, Density, Histogram
from dynact.spline import EAFOActivation


@pytest.fixture(scope="module")
def normal() -> Density:
    return Density.from_pdf(stats.norm.pdf, -8.0, 8.0, 256)


def _check(err: pytest.ExceptionInfo, *names: str) -> None:
    """The message names every one of ``names`` (the argument, ``arg=value``, the range)."""
    text = str(err.value)
    for name in names:
        assert name in text, (name, text)


# ---------------------------------------------------------------- EAFOActivation
@pytest.mark.parametrize("knots", [1, 7, 2.5, "x", None, True, 2**24 + 1])
def test_eafo_knots_is_named_with_its_range(knots):
    with pytest.raises(ValueError) as err:
        EAFOActivation(knots=knots)
    _check(err, f"knots={knots!r}", "[8, 16777216]")
    assert "bins" not in str(err.value)


def test_eafo_knots_too_fine_for_the_grid_speaks_of_knots():
    with pytest.raises(ValueError) as err:
        EAFOActivation(lo=1.0, hi=1.0 + 1e-13, knots=257)
    _check(err, "knots=257", "EAFOActivation")
    assert "bins" not in str(err.value)


NOT_A_NUMBER = ["abc", [0.1, 0.2], None, True, torch.ones(2), {"eps": 0.1}, 1 + 2j]


@pytest.mark.parametrize("eps", NOT_A_NUMBER, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("cls", [EAFOActivation, CRReLU])
def test_eps_that_is_not_one_real_number_is_a_type_error(cls, eps):
    with pytest.raises(TypeError) as err:
        cls(eps=eps)
    _check(err, cls.__name__, "eps must be a finite number", f"eps={eps!r}"[:40], type(eps).__name__)


@pytest.mark.parametrize("eps", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("cls", [EAFOActivation, CRReLU])
def test_eps_that_is_not_finite_is_a_value_error(cls, eps):
    with pytest.raises(ValueError) as err:
        cls(eps=eps)
    _check(err, cls.__name__, f"eps={eps!r}", "finite")


@pytest.mark.parametrize("eps", [0.02, 2, np.float32(0.02), np.array([0.02]), torch.tensor(0.02), torch.tensor([0.02])],
                         ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("cls", [EAFOActivation, CRReLU])
def test_eps_of_any_real_scalar_type_is_taken(cls, eps):
    assert float(cls(eps=eps).eps.detach()) == pytest.approx(float(np.asarray(eps).reshape(-1)[0]), rel=1e-7)


@pytest.mark.parametrize("cls, name", [(EAFOActivation, "learn_eps"), (CRReLU, "learnable")])
@pytest.mark.parametrize("value", ["no", None, 1, 0.0])
def test_the_learnable_switch_must_be_a_bool(cls, name, value):
    with pytest.raises(TypeError) as err:
        cls(**{name: value})
    _check(err, cls.__name__, f"{name}={value!r}", "True or False")


@pytest.mark.parametrize("cls, name", [(EAFOActivation, "learn_eps"), (CRReLU, "learnable")])
def test_numpy_bools_switch_learning(cls, name):
    assert isinstance(cls(**{name: np.bool_(True)}).eps, torch.nn.Parameter)
    assert not isinstance(cls(**{name: np.bool_(False)}).eps, torch.nn.Parameter)


@pytest.mark.parametrize(
    "kwargs, error, names",
    [
        (dict(base=3), TypeError, ["base=3", "registry name"]),
        (dict(base=None), TypeError, ["base=None", "registry name"]),
        (dict(base="nope"), ValueError, ["base='nope'", "relu", "gelu"]),
        (dict(lo="a"), ValueError, ["lo='a'", "numbers"]),
        (dict(lo=2.0, hi=1.0), ValueError, ["lo=2.0", "hi=1.0", "below"]),
        (dict(init=None), ValueError, ["init=None", "'crrelu', 'zero'"]),
    ],
)
def test_other_eafo_arguments_are_named(kwargs, error, names):
    with pytest.raises(error) as err:
        EAFOActivation(**kwargs)
    _check(err, "EAFOActivation", *names)


# ---------------------------------------------------------------- Density.from_pdf
def test_an_unnormalised_pdf_is_refused_with_its_mass():
    # The case: 25 times a normal pdf. A refresh from it was 25 times too large.
    with pytest.raises(ValueError) as err:
        Density.from_pdf(lambda x: 25 * stats.norm.pdf(x), -8.0, 8.0, 1201)
    _check(err, "Density.from_pdf", "mass 25 ", "normalise the pdf", "more bins")


@pytest.mark.parametrize("bins", [64, 256, 1201])
def test_a_pdf_missing_its_constant_is_refused(bins):
    # exp(-x**2/2) without 1/sqrt(2 pi): mass 2.5066.
    with pytest.raises(ValueError, match=r"mass 2\.506"):
        Density.from_pdf(lambda x: np.exp(-0.5 * np.asarray(x) ** 2), -8.0, 8.0, bins)


PDFS = {
    "normal": stats.norm.pdf,
    "laplace": stats.laplace(scale=1 / math.sqrt(2)).pdf,  # a kink on a bin centre at odd bins
    "uniform": stats.uniform(loc=-math.sqrt(3), scale=2 * math.sqrt(3)).pdf,  # jumps inside bins
    "exponential": stats.expon.pdf,  # a jump from 0 to its maximum
    "narrow": stats.norm(scale=0.1).pdf,  # a peak far narrower than a coarse bin
    "two peaks": lambda x: 0.5 * stats.norm(-2, 0.3).pdf(x) + 0.5 * stats.norm(2, 0.3).pdf(x),
}


@pytest.mark.parametrize("name", list(PDFS))
@pytest.mark.parametrize("bins", [8, 9, 17, 33, 65, 257, 1201])
def test_normalised_pdfs_are_taken_at_every_resolution(name, bins):
    # The midpoint sum of a normalised pdf overshoots 1 by up to 6.1 (the narrow peak on a bin
    # centre at 9 bins): each is within the quadrature bound the check allows.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coarse grids may miss most of a narrow pdf: warned below
        d = Density.from_pdf(PDFS[name], -8.0, 8.0, bins)
    assert 0.0 <= d.outside <= 1.0
    assert float(d.p.sum()) * d.step + d.outside >= 1.0 - 1e-12


def test_mass_beyond_the_grid_is_outside_and_most_of_it_is_warned():
    d = Density.from_pdf(stats.norm.pdf, -1.0, 1.0, 400)  # 68% on the grid: a truncation, no warning
    assert d.outside == pytest.approx(1 - (stats.norm.cdf(1) - stats.norm.cdf(-1)), abs=1e-5)
    with pytest.warns(UserWarning, match=r"mass 0\.04 .*96% of it is taken to lie beyond the grid"):
        d = Density.from_pdf(lambda x: stats.norm.pdf(x) / 25, -8.0, 8.0, 1201)
    assert d.outside == pytest.approx(0.96, abs=1e-9)


@pytest.mark.parametrize(
    "kwargs, error, names",
    [
        (dict(pdf=3), TypeError, ["pdf=3", "callable"]),
        (dict(pdf=stats.norm.pdf, dpdf="x"), TypeError, ["dpdf='x'", "callable"]),
        (dict(pdf=lambda x: 0.1), ValueError, ["pdf must return one value per point", "(64,)", "()"]),
        (dict(pdf=lambda x: "a"), ValueError, ["pdf must return real numbers"]),
        (dict(pdf=lambda x: -np.ones_like(x)), ValueError, ["negative"]),
    ],
)
def test_bad_pdfs_are_named(kwargs, error, names):
    with pytest.raises(error) as err:
        Density.from_pdf(lo=-1.0, hi=1.0, bins=64, **kwargs)
    _check(err, *names)


# ---------------------------------------------------------------- estimators
@pytest.mark.parametrize("cls", [Histogram, KDE])
def test_estimator_device_is_named(cls):
    with pytest.raises(ValueError) as err:
        cls(-1.0, 1.0, 64, device="nodev")
    _check(err, cls.__name__, "device='nodev'", "'cpu'")


@pytest.mark.parametrize("cls", [Histogram, KDE])
@pytest.mark.parametrize("kwargs, names", [(dict(bins=1), ["bins=1", "[8, 16777216]"]),
                                           (dict(lo="a"), ["lo='a'"])])
def test_estimator_grid_is_named(cls, kwargs, names):
    args = dict(lo=-1.0, hi=1.0, bins=64) | kwargs
    with pytest.raises(ValueError) as err:
        cls(**args)
    _check(err, *names)


# ---------------------------------------------------------------- dynact.eafo
@pytest.mark.parametrize(
    "call, error, names",
    [
        (lambda d: eafo.correction(torch.relu, d, taper="a"), TypeError, ["eafo.correction", "taper='a'"]),
        (lambda d: eafo.correction(torch.relu, d, taper=-1), ValueError, ["taper=-1", ">= 0"]),
        (lambda d: eafo.correction(torch.relu, d, flat_tol=None), TypeError, ["flat_tol=None"]),
        (lambda d: eafo.step(torch.relu, d, eta="a"), TypeError, ["eafo.step", "eta='a'"]),
        (lambda d: eafo.step(torch.relu, d, eta=math.nan), ValueError, ["eta=nan", "finite"]),
        (lambda d: eafo.step(torch.relu, d, eta=0.1, flat_tol="a"), TypeError, ["flat_tol='a'"]),
        (lambda d: eafo.output_entropy(torch.relu, d, delta="a"), TypeError, ["delta='a'", "positive"]),
        (lambda d: eafo.output_entropy(torch.relu, d, delta=0), ValueError, ["delta=0", "positive"]),
        (lambda d: eafo.output_stats(torch.relu, d, flat_tol="a"), TypeError, ["eafo.output_stats", "flat_tol='a'"]),
        (lambda d: eafo.wafbc(d, lower="a"), TypeError, ["eafo.wafbc", "lower='a'"]),
        (lambda d: eafo.wafbc(d, lower=2.0, upper=1.0), ValueError, ["lower=2.0", "upper=1.0"]),
        (lambda d: eafo.derivatives(torch.relu, [1.0, 2.0]), TypeError, ["eafo.derivatives", "x=[1.0, 2.0]"]),
    ],
)
def test_eafo_arguments_are_named(normal, call, error, names):
    with pytest.raises(error) as err:
        call(normal)
    _check(err, *names)
