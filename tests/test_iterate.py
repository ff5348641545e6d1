"""EAFOActivation.iterate at every resolution, for every registry base, and from folded starts.

Oracles: the objective and the rising parts of the density's cells recomputed from the module's
outputs with scipy's brentq (tests/test_spline.py), the module's own outputs on a fine grid for
folds, and the trust region's definition.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy import stats
from test_spline import _base_slope, _objective
from torch import nn

from dynact import ActivationOptimizer
from dynact.density import KDE, Density
from dynact.spline import EAFOActivation

BASES = ["relu", "gelu", "silu", "mish", "elu", "celu"]
DISTS = {"normal": lambda n: torch.randn(n, dtype=torch.float64),
         "laplace": lambda n: torch.distributions.Laplace(0.0, 1 / math.sqrt(2)).sample((n,)).double()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # iterate works on a few thousand numbers per call: on a loaded machine a second intra-op
    # thread only adds waiting (measured 14x slower per update at a load of 12 on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def densities() -> dict:
    """KDEs of 200,000 samples at 128 to 2048 bins (one sample per distribution), and exact ones."""
    torch.manual_seed(0)
    out = {}
    for name, draw in DISTS.items():
        x = draw(200_000)
        for bins in (128, 256, 512, 1024, 2048):
            kde = KDE(-8.0, 8.0, bins)
            kde.update(x)
            out[name, bins] = kde.compute()
    laplace = stats.laplace(scale=1 / math.sqrt(2)).pdf
    for bins in (256, 512, 1024, 1201, 2048):
        out["exact", bins] = Density.from_pdf(stats.norm.pdf, -8.0, 8.0, bins)
        out["exact-laplace", bins] = Density.from_pdf(laplace, -8.0, 8.0, bins)
    return out


def _folds(act: EAFOActivation, lo: float = -8.0, hi: float = 8.0, n: int = 32001) -> list[float]:
    """Points of a fine grid where the base rises (slope > 1e-8 on both sides) but the module does not."""
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    with torch.no_grad():
        y = copy.deepcopy(act).double()(x)
    up = _base_slope(act.base, x) > 1e-8
    bad = up[:-1] & up[1:] & (torch.diff(y) <= 0)
    return x[:-1][bad].tolist()


def _updates(act: EAFOActivation, d: Density, n: int, **kw) -> list[dict]:
    return [act.update(d, mode="iterate", **kw) for _ in range(n)]


CASES = [(dist, bins) for dist in DISTS for bins in (128, 512, 2048)] + [("exact", 1201)]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("key", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_iterate_accepts_nine_of_ten_steps_at_every_resolution(base, key, densities):
    d = densities[key]
    act = EAFOActivation(base, eps=0.01)  # CRReLU's shape: it folds next to SiLU's and Mish's minimum
    previous, records = math.inf, []
    for _ in range(10):
        rec = act.update(d, mode="iterate")
        records.append(rec)
        assert "non-finite" not in rec["reason"]
        if rec["accepted"]:
            assert rec["change"] <= 0.05 * d.mean_std()[1] + 1e-12  # the trust region holds
            truth = _objective(act, d)  # recomputed from the module's outputs
            assert rec["objective_after"] == pytest.approx(truth, abs=1e-6)
            if rec["feasible_before"]:
                assert rec["objective_before"] <= previous + 1e-12  # never rises across accepted steps
                assert rec["objective_after"] < rec["objective_before"]
            previous = rec["objective_after"]
    assert sum(r["accepted"] for r in records) >= 9, [r["reason"] for r in records]
    assert _folds(act) == []


SPREAD = {"exact": (256, 512, 1024, 2048), "exact-laplace": (256, 512, 1024, 2048),
          "normal": (256, 512, 1024, 2048),
          # At 256 bins the KDE's bandwidth is floored at 2 bins (0.125, against Silverman's 0.057
          # for these samples), which rounds off Laplace's peak: a different density, whose
          # objective is 0.01 lower for ELU. The exact Laplace density above covers 256 bins.
          "laplace": (512, 1024, 2048)}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("source", list(SPREAD))
def test_objective_is_resolution_free(base, source, densities):
    # The first step's objective (at the start, after the projection removes CRReLU's fold near a
    # minimum) at 256 to 2048 bins of the same density.
    values = []
    for bins in SPREAD[source]:
        rec = EAFOActivation(base, eps=0.01).update(densities[source, bins], mode="iterate")
        values.append(rec["objective_restored"])
    assert all(math.isfinite(v) for v in values), values
    assert max(values) - min(values) < 0.01, values


@pytest.mark.parametrize("base", BASES)
def test_iterate_recovers_from_a_folded_start(base, densities):
    d = densities["exact", 1201]
    act = EAFOActivation(base, eps=1.0)
    folded = _folds(act)
    if base in ("elu", "celu", "silu"):
        assert folded  # eps = 1 folds these where the base rises
    records = _updates(act, d, 20)
    assert all(r["accepted"] for r in records), [r["reason"] for r in records if not r["accepted"]]
    assert all(r["change"] <= 0.05 * d.mean_std()[1] + 1e-12 for r in records)
    if folded:
        assert records[0]["reason"].startswith("restor") and "activation not increasing on" in records[0]["reason"]
    assert _folds(act) == []
    feasible = [i for i, r in enumerate(records) if r["feasible_before"]]
    assert feasible and feasible[0] <= 10  # restored within the trust region's pace
    after = [records[i]["objective_before"] for i in feasible] + [records[-1]["objective_after"]]
    assert all(b <= a + 1e-9 for a, b in zip(after, after[1:], strict=False))  # then a descent
    assert records[-1]["objective_after"] == pytest.approx(_objective(act, d), abs=1e-6)


def test_a_step_beyond_the_trust_region_shrinks_instead_of_being_refused(densities):
    d = densities["exact", 1201]
    act = EAFOActivation("gelu", init="zero")
    rec = act.update(d, mode="iterate", max_change=1e-4)
    assert rec["accepted"] and 0 < rec["change"] <= 1e-4
    assert 0 < rec["eta"] < 0.05  # the step size used after shrinking
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    with torch.no_grad():
        moved = (copy.deepcopy(act).double()(x) - copy.deepcopy(act.base).double()(x)).abs().max().item()
    assert moved <= 1e-4 + 1e-9


def test_a_fold_iterate_may_not_touch_is_refused_in_words(densities):
    # ReLU's kink inside a knot cell: the cell keeps its rise so the flat part stays flat, and a
    # correction that folds its rising part cannot be repaired there.
    d = densities["exact", 1201]
    act = EAFOActivation("relu", lo=-6.0, hi=6.02, eps=-1.5)
    assert _folds(act)
    before = act.s.clone()
    rec = act.update(d, mode="iterate")
    assert not rec["accepted"] and torch.equal(act.s, before)
    assert rec["reason"].startswith("activation not increasing on [") and "lower eps or refresh first" in rec["reason"]


def test_activation_optimizer_iterates_a_silu_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 1))
    act_opt = ActivationOptimizer(model, every_n_steps=1, window=1, sample_size=4096, mode="iterate",
                                  convert=(nn.SiLU,), bins=1024)
    assert isinstance(model[1], EAFOActivation)
    accepted = []
    for _ in range(4):
        model(torch.randn(512, 4)).sum().backward()
        accepted.append(act_opt.step()["accepted/1"])
    assert sum(accepted) >= 3


# Starts for the report's chain: folded ones (eps = 1 folds ELU, CELU and SiLU where they rise),
# CRReLU's shape (folds beside SiLU's minimum), a flipped correction and a zero one.
CHAIN_STARTS = [("elu", 1.0, "crrelu"), ("celu", 1.0, "crrelu"), ("silu", 1.0, "crrelu"),
                ("silu", 0.01, "crrelu"), ("gelu", -0.5, "crrelu"), ("relu", 0.01, "zero")]


@pytest.mark.parametrize("start", CHAIN_STARTS, ids=["-".join(map(str, s)) for s in CHAIN_STARTS])
def test_each_step_starts_where_the_previous_one_ended(start, densities):
    # The report of step k+1 begins at the module's state that step k left, on the same density:
    # before the fix a step that restored the bounds reported the projection's objective instead
    # (ELU, eps = 1: step 7 ended at -0.4295 and step 8 said it began at -0.3880).
    base, eps, init = start
    d = densities["exact", 1201]
    act = EAFOActivation(base, eps=eps, init=init)
    records = []
    for _ in range(10):
        truth = _objective(act, d)  # the module's state before the step, from its outputs
        rec = act.update(d, mode="iterate")
        assert rec["objective_before"] == pytest.approx(truth, abs=1e-6, nan_ok=True)
        records.append(rec)
    for prev, rec in zip(records, records[1:], strict=False):
        assert rec["objective_before"] == pytest.approx(prev["objective_after"], abs=1e-12, nan_ok=True)
    # Where the descent starts: the state itself when it meets the bounds.
    assert all(r["objective_restored"] == r["objective_before"] for r in records if r["feasible_before"])
    assert any(not r["feasible_before"] for r in records) or base == "relu"  # restoring steps are covered


def test_a_refused_step_reports_the_state_it_leaves_untouched(densities):
    d = densities["exact", 1201]
    act = EAFOActivation("elu", init="zero")
    truth = _objective(act, d)
    rec = act.update(d, mode="iterate", eta=-0.05)  # ascent: refused
    assert not rec["accepted"]
    assert rec["objective_before"] == rec["objective_after"] == pytest.approx(truth, abs=1e-6)
