"""ActivationOptimizer, the framework-free core, in a hand-written PyTorch loop.

Oracles: the schedule written out by hand, the analytic measures of ReLU on N(0, 1) data, and
an uninterrupted run against a run resumed from state dicts.
"""

from __future__ import annotations

import copy
import math
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

from dynact import ActivationOptimizer, EAFOActivation
from dynact.core import LOGGED_STATS, tag

ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)


def _train(model, opt, act_opt, steps: range) -> list[dict[str, float]]:
    updates = []
    for step in steps:
        x, y = _batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        updates.append(act_opt.step())
    return updates


def test_plain_loop_converts_updates_on_schedule_and_reports_finite_per_layer_metrics():
    model = _model()
    act_opt = ActivationOptimizer(model, every_n_steps=4, window=2, sample_size=256)
    assert act_opt.converted == ["1"] and isinstance(model[1], EAFOActivation)  # ReLU only
    assert act_opt.layer_names == ["1", "3"]  # the GELU is measured, not converted
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert any(p is model[1].eps for p in opt.param_groups[0]["params"])
    s0 = model[1].s.clone()
    updates = _train(model, opt, act_opt, range(12))
    assert [i + 1 for i, u in enumerate(updates) if u] == [4, 8, 12]
    assert updates[-1] == act_opt.metrics()
    for layer in ("1", "3"):
        for metric in LOGGED_STATS + ("outside", "nonfinite"):
            assert math.isfinite(act_opt.metrics()[tag(metric, layer)]), (metric, layer)
    assert act_opt.metrics()["accepted/1"] == 1.0 and "accepted/3" not in act_opt.metrics()
    assert not torch.equal(model[1].s, s0)  # refreshed from the measured density
    assert float(model[1].eps.detach()) != pytest.approx(0.01)  # eps trained by SGD


def test_samples_only_in_the_window_and_only_training_forwards():
    model = _model()
    act_opt = ActivationOptimizer(model, every_n_steps=5, window=2, sample_size=16, mode="monitor", convert=())
    counts = []
    for step in range(5):
        model.eval()
        model(_batch(step)[0])  # evaluation forwards are never sampled by default
        model.train()
        model(_batch(step)[0])
        counts.append(act_opt._layers["1"].estimator.count)
        act_opt.step()
    assert counts == [0, 0, 0, 16, 32]  # steps 4 and 5 of 5 are the window
    assert act_opt.metrics()["dead/1"] == pytest.approx(0.5, abs=0.15)


def test_measures_of_relu_on_normal_inputs_are_the_analytic_ones():
    layer = nn.Sequential(nn.ReLU())
    act_opt = ActivationOptimizer(layer, every_n_steps=1, window=1, sample_size=100_000, mode="monitor", convert=())
    layer(torch.randn(100_000, generator=torch.Generator().manual_seed(0)))
    got = act_opt.step()
    h_half = 0.5 * math.log(math.pi * math.e / 2)
    assert got["dead/0"] == pytest.approx(0.5, abs=0.01)
    assert got["entropy/0"] == pytest.approx(math.log(2) + 0.5 * h_half, abs=0.02)
    assert got["std/0"] == pytest.approx(math.sqrt(0.5 - 1 / (2 * math.pi)), abs=0.01)


def test_state_dict_round_trip_continues_identically():
    def fresh():
        model = _model()
        act_opt = ActivationOptimizer(model, every_n_steps=3, window=2, sample_size=128)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2), act_opt

    model, opt, act_opt = fresh()
    _train(model, opt, act_opt, range(7))  # stop inside a window (steps 7-8 sample for 9)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), act_opt.state_dict()))
    straight = _train(model, opt, act_opt, range(7, 13))

    model2, opt2, act_opt2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    act_opt2.load_state_dict(saved[2])
    resumed = _train(model2, opt2, act_opt2, range(7, 13))
    assert resumed == straight  # the same figures at the same steps, bit for bit
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=False):
        assert torch.equal(a, b), name


def test_remove_detaches_hooks_and_attach_restores_them():
    model = _model()
    act_opt = ActivationOptimizer(model, every_n_steps=1, mode="monitor", convert=())
    act_opt.remove()
    assert not model[1]._forward_pre_hooks
    act_opt.attach()
    act_opt.attach()  # idempotent
    assert len(model[1]._forward_pre_hooks) == 1


@pytest.mark.parametrize("kwargs, name", [({"every_n_steps": 0}, "every_n_steps"), ({"mode": "x"}, "mode"),
                                          ({"convert": (nn.Linear,)}, "convert"), ({"window": 500}, "window")])
def test_bad_options_fail_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ActivationOptimizer(_model(), **kwargs)


def test_plain_pytorch_example_runs():
    metrics = runpy.run_path(str(ROOT / "examples" / "plain_pytorch.py"))["main"](steps=100)
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    assert {k.split("/")[1] for k in metrics} == {"1", "3"}
