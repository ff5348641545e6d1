"""The report's repeat chance of a verdict, checked against simulated repeats of a sweep."""

import numpy as np
import pytest

from dynact.experiments.reporting import paired_interval, repeat_chance

CONFIDENCE = 1 - 0.05 / 3  # the main job's Bonferroni level for 3 comparisons


def _verdict(d: dict) -> str:
    low, high = d["ci"]
    return "better" if low > 0 else "worse" if high < 0 else "not distinguishable"


def test_predicted_repeat_chance_matches_simulated_repeats():
    # Sweeps of 40 paired seeds whose true difference is drawn over a range wide against one
    # standard error (sd 0.9 / sqrt(40) = 0.14), each followed by an independent repeat. Among the
    # sweeps whose verdict was given some chance of repeating, that fraction of repeats must agree.
    rng = np.random.default_rng(7)
    n, sd, sims = 40, 0.9, 3000
    predicted, agreed = [], []
    for mu in rng.uniform(-1.2, 1.2, sims):
        first = paired_interval(rng.normal(mu, sd, n), CONFIDENCE)
        again = paired_interval(rng.normal(mu, sd, n), CONFIDENCE)
        predicted.append(first["repeat"])
        agreed.append(_verdict(first) == _verdict(again))
    predicted, agreed = np.array(predicted), np.array(agreed)
    assert predicted.mean() == pytest.approx(agreed.mean(), abs=0.02)
    for low, high in ((0.3, 0.7), (0.7, 0.9), (0.9, 1.0)):
        sel = (predicted >= low) & (predicted < high)
        assert sel.sum() > 100, (low, high)
        assert agreed[sel].mean() == pytest.approx(predicted[sel].mean(), abs=0.06), (low, high)


def test_a_verdict_at_the_edge_repeats_about_half_the_time_and_a_clear_one_nearly_always():
    # an interval ending at 0 ("not distinguishable" by a hair, or "better" by a hair)
    for mean in (0.35, -0.35, 0.3501, -0.3501):
        assert repeat_chance(mean, 0.35, 40, CONFIDENCE) == pytest.approx(0.5, abs=1e-3)
    assert repeat_chance(1.5, 0.35, 40, CONFIDENCE) > 0.999
    # "not distinguishable" at a mean of 0 repeats unless the repeat lands beyond t * se on either
    # side: with se' = sqrt(2) se that is 2 * P(Z > t / sqrt(2))
    from scipy import stats

    t = stats.t.ppf(0.5 + CONFIDENCE / 2, 39)
    assert repeat_chance(0.0, 0.35, 40, CONFIDENCE) == pytest.approx(1 - 2 * stats.norm.sf(t / np.sqrt(2)))
    assert repeat_chance(0.2, 0.0, 40, CONFIDENCE) == 1.0  # every seed gave the same difference
