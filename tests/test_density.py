"""Tests for the streaming density estimators (dynact.density.Histogram / KDE).

Oracles: analytic densities and derivatives, numpy.histogram, a direct O(N B) kernel sum,
numpy's std/percentiles, and a single-process estimate for the two-process gloo run.
"""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynact.density import KDE, Density, Histogram, sum_states

SQRT_2PI = math.sqrt(2 * math.pi)


def normal_pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / SQRT_2PI


def normal_dpdf(x: torch.Tensor) -> torch.Tensor:
    return -x * normal_pdf(x)


def ise(d: Density, pdf) -> float:
    return float(((d.p - pdf(d.grid)) ** 2).sum() * d.step)


def randn(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_same_density(a: Density, b: Density) -> None:
    assert torch.equal(a.grid, b.grid)
    assert torch.equal(a.p, b.p)
    assert torch.equal(a.dp, b.dp)
    assert (a.count, a.outside, a.nonfinite) == (b.count, b.outside, b.nonfinite)


ESTIMATORS = [Histogram, KDE]


# ------------------------------------------------------------------ accuracy of p and p'
def test_kde_integrated_squared_error_on_1e5_normal_below_1e4():
    kde = KDE(-6.0, 6.0, 512)
    kde.update(randn(100_000, seed=0))
    assert ise(kde.compute(), normal_pdf) < 1e-4


def test_histogram_256_bins_integrated_squared_error_on_1e6_normal_below_1e3():
    est = Histogram(-6.0, 6.0, 256)
    est.update(randn(1_000_000, seed=1))
    assert ise(est.compute(), normal_pdf) < 1e-3


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_dp_on_1e6_normal_within_0015_of_true_derivative(cls):
    est = cls(-6.0, 6.0, 512)
    est.update(randn(1_000_000, seed=2))
    d = est.compute()
    inner = d.grid.abs() <= 4
    err = (d.dp - normal_dpdf(d.grid))[inner].abs().max()
    assert float(err) < 0.015
    # The derivative got its own, wider smoothing (docs/math.md, "Densities").
    assert est.last_bandwidths[1] > est.last_bandwidths[0]


def test_histogram_counts_equal_numpy_histogram():
    x = randn(200_000, seed=3, dtype=torch.float64) * 2
    est = Histogram(-5.0, 5.0, 64)
    est.update(x)
    d = est.compute()
    counts = torch.round(d.p * d.count * d.step).to(torch.int64).numpy()
    ref, _ = np.histogram(x.numpy(), bins=64, range=(-5.0, 5.0))
    np.testing.assert_array_equal(counts, ref)
    assert d.outside == pytest.approx(float((x.abs() > 5).double().mean()), abs=1e-12)
    assert float(d.p.sum() * d.step) == pytest.approx(1 - d.outside, abs=1e-12)


def test_kde_equals_direct_kernel_sums():
    """Binned KDE against the O(N B) sums it approximates (Gaussian for p, the
    derivative of the fourth-order Gaussian (3 - z^2)/2 phi(z) for dp)."""
    x = randn(3_000, seed=4, dtype=torch.float64) * 1.5 + 0.3
    bw, dp_bw = 0.25, 0.4
    kde = KDE(-8.0, 8.0, 1024, bandwidth=bw, dp_bandwidth=dp_bw)
    kde.update(x)
    d = kde.compute()
    z = (d.grid[:, None] - x[None, :]).numpy()
    p_ref = (np.exp(-0.5 * (z / bw) ** 2) / (bw * SQRT_2PI)).mean(1)
    u = z / dp_bw
    dp_ref = (-u * (5 - u * u) / 2 * np.exp(-0.5 * u * u) / (dp_bw**2 * SQRT_2PI)).mean(1)
    assert kde.last_bandwidths == (bw, dp_bw)
    # Linear binning error is O((h / bw)^2) of the peak; here h / bw = 0.06.
    np.testing.assert_allclose(d.p.numpy(), p_ref, atol=2e-3 * p_ref.max())
    np.testing.assert_allclose(d.dp.numpy(), dp_ref, atol=2e-3 * np.abs(dp_ref).max())


@pytest.mark.parametrize("rule", ["silverman", "scott"])
def test_bandwidth_rules_match_their_formulas(rule):
    skew = torch.rand(50_000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = randn(50_000, seed=5, dtype=torch.float64) * 0.7 + skew
    kde = KDE(-6.0, 6.0, 512, bandwidth=rule, dp_bandwidth=rule)
    kde.update(x)
    kde.compute()
    xn = x.numpy()
    std = xn.std()
    iqr = np.subtract(*np.percentile(xn, [75, 25]))
    n = xn.size
    expected = 0.9 * min(std, iqr / 1.34) * n**-0.2 if rule == "silverman" else 1.0592 * std * n**-0.2
    dp_expected = 1.0308 * (min(std, iqr / 1.34) if rule == "silverman" else std) * n ** (-1 / 11)
    bw, dp_bw = kde.last_bandwidths
    assert bw == pytest.approx(expected, rel=5e-3)
    assert dp_bw == pytest.approx(dp_expected, rel=5e-3)


def test_plug_in_dp_width_follows_the_data_shape():
    """On normal data the plug-in width for dp agrees with the normal-reference rule; on a
    bimodal mixture it narrows, and dp gets far closer to the analytic derivative."""
    n = 400_000
    normal = randn(n, seed=15)
    plug, rule = KDE(-6.0, 6.0, 512), KDE(-6.0, 6.0, 512, dp_bandwidth="silverman")
    for est in (plug, rule):
        est.update(normal)
        est.compute()
    assert plug.last_bandwidths[1] == pytest.approx(rule.last_bandwidths[1], rel=0.15)

    gen = torch.Generator().manual_seed(16)
    first = torch.rand(n, generator=gen) < 0.6
    mix = torch.where(first, -1.5 + 0.5 * torch.randn(n, generator=gen), 1.5 + torch.randn(n, generator=gen))

    def mix_dpdf(t):
        return 0.6 * normal_dpdf((t + 1.5) / 0.5) / 0.25 + 0.4 * normal_dpdf(t - 1.5)

    errors = {}
    for name, dp_bw in (("plug", None), ("rule", "silverman")):
        est = Histogram(-6.0, 6.0, 512, dp_bandwidth=dp_bw)
        est.update(mix)
        d = est.compute()
        errors[name] = (float((d.dp - mix_dpdf(d.grid)).abs().max()), est.last_bandwidths[1])
    assert errors["plug"][1] < 0.7 * errors["rule"][1]
    assert errors["plug"][0] < 0.05 < errors["rule"][0]  # peak |p'| is 0.58


# ------------------------------------------------------------------ streaming and exactness
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_many_updates_equal_one_update_bit_for_bit(cls):
    x = randn(600_000, seed=7) * 1.7  # > one internal CPU chunk, some values outside
    one = cls(-5.0, 5.0, 128)
    one.update(x)
    many = cls(-5.0, 5.0, 128)
    sizes = [1, 999, 70_000, 262_144, 5]
    start = 0
    for size in sizes:
        many.update(x[start : start + size].reshape(-1, 1) if size > 1 else x[start : start + size])
        start += size
    many.update(x[start:].reshape(2, -1, 7) if (x.numel() - start) % 14 == 0 else x[start:])
    assert torch.equal(one.state_dict()["state"], many.state_dict()["state"])
    assert_same_density(one.compute(), many.compute())


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_any_float_dtype_is_binned_like_its_float32_values(cls):
    x = randn(20_000, seed=8).reshape(10, 20, 100)
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        a, b = cls(-6.0, 6.0, 64), cls(-6.0, 6.0, 64)
        a.update(low)
        b.update(low.float())
        assert_same_density(a.compute(), b.compute())
    a, b = cls(-6.0, 6.0, 64), cls(-6.0, 6.0, 64)
    a.update(x.double())
    b.update(x)
    da, db = a.compute(), b.compute()
    assert torch.allclose(da.p, db.p, rtol=1e-4, atol=1e-6)
    assert (da.count, da.outside) == (db.count, db.outside)


def test_state_sums_exactly_like_processes_do():
    """The packed state is additive: summing two estimators' states equals one estimator
    on both halves, bit for bit (what the cross-process all_reduce relies on)."""
    x = randn(100_000, seed=9)
    for cls in ESTIMATORS:
        a, b, both = cls(-4.0, 4.0, 96), cls(-4.0, 4.0, 96), cls(-4.0, 4.0, 96)
        a.update(x[:33_333])
        b.update(x[33_333:])
        both.update(x)
        assert torch.equal(a.state_dict()["state"] + b.state_dict()["state"], both.state_dict()["state"])


# ------------------------------------------------------------------ robustness
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_nonfinite_values_are_counted_and_excluded(cls):
    x = randn(10_000, seed=10)
    dirty = x.clone()
    dirty[::100] = float("nan")
    dirty[1::250] = float("inf")
    dirty[2::500] = float("-inf")
    bad = ~torch.isfinite(dirty)
    a, b = cls(-6.0, 6.0, 64), cls(-6.0, 6.0, 64)
    a.update(dirty)
    b.update(dirty[~bad])
    da, db = a.compute(), b.compute()
    assert da.nonfinite == int(bad.sum()) == a.nonfinite
    assert da.count == float((~bad).sum())
    assert torch.equal(da.p, db.p) and torch.equal(da.dp, db.dp)
    assert bool(torch.isfinite(da.p).all() and torch.isfinite(da.dp).all())


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_values_outside_the_grid_go_to_outside(cls):
    inside = torch.linspace(-1.0, 1.0, 7_000)
    edges = torch.tensor([-1.0, 1.0] * 500)  # exactly lo and hi: inside [lo, hi]
    far = torch.tensor([-1.0001, 1.0001, -3.0, 50.0, -1e30, 3e38] * 500)
    est = cls(-1.0, 1.0, 16)
    est.update(torch.cat([inside, edges, far]))
    d = est.compute()
    assert d.count == 11_000.0 and d.nonfinite == 0
    mass = float(d.p.sum() * d.step)
    assert mass + d.outside == pytest.approx(1.0, abs=1e-12)  # the masses always add up
    if cls is Histogram:
        assert d.outside == pytest.approx(3000 / 11_000, abs=1e-15)
    else:  # the kernel spills some mass of the edge values beyond the grid: it is outside too
        assert 3000 / 11_000 < d.outside < 0.4


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_constant_input_gets_a_bandwidth_floor_not_nan(cls):
    est = cls(-2.0, 2.0, 64)
    est.update(torch.full((5_000,), 0.3))
    d = est.compute()
    h = d.step
    assert bool(torch.isfinite(d.p).all() and torch.isfinite(d.dp).all())
    assert est.last_bandwidths[1] == pytest.approx(2 * h)
    if cls is KDE:
        assert est.last_bandwidths[0] == pytest.approx(2 * h)
        assert float(d.grid[d.p.argmax()]) == pytest.approx(0.3, abs=h)
        assert float(d.p.sum() * h) == pytest.approx(1.0, abs=1e-9)
    # dp changes sign at the spike: rising on its left, falling on its right.
    assert float(d.dp[d.grid < 0.3 - 2 * h].max()) > 0 > float(d.dp[d.grid > 0.3 + 2 * h].min())


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_compute_without_data_raises_a_clear_error(cls):
    est = cls(-1.0, 1.0, 8)
    with pytest.raises(RuntimeError, match="no data"):
        est.compute()
    est.update(torch.full((10,), float("nan")))
    with pytest.raises(RuntimeError, match="10 NaN/Inf"):
        est.compute()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bins": 7}, "bins"),
        ({"bins": 16.0}, "bins"),
        ({"lo": 1.0, "hi": 1.0}, "lo"),
        ({"lo": 2.0, "hi": -2.0}, "lo"),
        ({"bandwidth": -0.1}, "bandwidth"),
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"bandwidth": "normal"}, "bandwidth"),
        ({"bandwidth": float("nan")}, "bandwidth"),
        ({"dp_bandwidth": -1.0}, "dp_bandwidth"),
        ({"dp_bandwidth": "iqr"}, "dp_bandwidth"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"lo": -1.0, "hi": 1.0, "bins": 16, **kwargs}
    with pytest.raises(ValueError, match=name):
        KDE(**args)
    if "bandwidth" not in kwargs:
        with pytest.raises(ValueError, match=name):
            Histogram(**{k: v for k, v in args.items()})


def test_complex_input_is_rejected():
    with pytest.raises(ValueError, match="real"):
        KDE(-1.0, 1.0, 8).update(torch.zeros(3, dtype=torch.complex64))


# ------------------------------------------------------------------ modes, devices, persistence
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_works_under_deterministic_algorithms(cls):
    x = randn(50_000, seed=11)
    ref = cls(-6.0, 6.0, 128)
    ref.update(x)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        est = cls(-6.0, 6.0, 128)
        est.update(x)
        d = est.compute()
    finally:
        torch.use_deterministic_algorithms(old)
    assert_same_density(d, ref.compute())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_cuda_deterministic_mode_matches_cpu(cls):
    x = randn(300_000, seed=12)
    cpu = cls(-6.0, 6.0, 256)
    cpu.update(x)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        gpu = cls(-6.0, 6.0, 256)
        gpu.update(x.cuda())
        d = gpu.compute()
    finally:
        torch.use_deterministic_algorithms(old)
    assert gpu.device.type == "cuda" and d.p.device.type == "cuda"
    ref = cpu.compute()
    assert torch.allclose(d.p.cpu(), ref.p, rtol=1e-6, atol=1e-9)
    assert torch.allclose(d.dp.cpu(), ref.dp, rtol=1e-6, atol=1e-8)
    assert d.count == ref.count


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_state_dict_round_trip_and_reset(cls, tmp_path):
    est = cls(-3.0, 3.0, 32)
    est.update(randn(5_000, seed=13))
    torch.save(est.state_dict(), tmp_path / "est.pt")
    restored = cls(-3.0, 3.0, 32)
    restored.load_state_dict(torch.load(tmp_path / "est.pt", weights_only=True))
    assert_same_density(restored.compute(), est.compute())
    with pytest.raises(ValueError, match="lo"):
        cls(-3.0, 4.0, 32).load_state_dict(est.state_dict())
    other = Histogram if cls is KDE else KDE
    with pytest.raises(ValueError, match="kind"):
        other(-3.0, 3.0, 32).load_state_dict(est.state_dict())
    est.reset()
    assert est.count == 0
    with pytest.raises(RuntimeError, match="no data"):
        est.compute()


def test_sync_true_without_process_group_raises():
    est = KDE(-1.0, 1.0, 8)
    est.update(torch.zeros(4))
    with pytest.raises(RuntimeError, match="torch.distributed"):
        est.compute(sync=True)


# ------------------------------------------------------------------ two processes (gloo)
def _rank_main(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x = torch.load(os.path.join(tmp, "data.pt"), weights_only=True)
        half = x.chunk(world)[rank]
        for name, cls in (("hist", Histogram), ("kde", KDE)):
            est = cls(-4.0, 4.0, 96)
            for part in half.split(7_000 + 3_000 * rank):  # different batching per rank
                est.update(part)
            first = est.compute()  # sync=None: syncs because the world has 2 processes
            again = est.compute()  # must not double-count
            local = est.compute(sync=False)
            first.save(os.path.join(tmp, f"{name}_{rank}.pt"))
            again.save(os.path.join(tmp, f"{name}_{rank}_again.pt"))
            local.save(os.path.join(tmp, f"{name}_{rank}_local.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_get_identical_densities_equal_to_one_process(tmp_path):
    x = randn(60_000, seed=14) * 1.3
    x[::997] = float("nan")
    torch.save(x, tmp_path / "data.pt")
    mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    for name, cls in (("hist", Histogram), ("kde", KDE)):
        single = cls(-4.0, 4.0, 96)
        single.update(x)
        ref = single.compute()
        r0, r1 = (Density.load(tmp_path / f"{name}_{r}.pt") for r in (0, 1))
        assert_same_density(r0, r1)
        assert_same_density(r0, ref)
        assert_same_density(Density.load(tmp_path / f"{name}_0_again.pt"), ref)
        local0 = Density.load(tmp_path / f"{name}_0_local.pt")
        assert local0.count == float(torch.isfinite(x.chunk(2)[0]).sum())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer_values(rank: int, k: int) -> torch.Tensor:
    return (k + 1) * randn(3000, seed=100 * k + rank) + rank


_PACKED = (KDE, Histogram, KDE)
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "all_to_all",
                "reduce_scatter", "barrier")


def _packed_rank(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        calls: list[str] = []
        for name in _COLLECTIVES:  # count every collective torch.distributed offers
            original = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kw):
                calls.append(_name)
                return _original(*args, **kw)

            setattr(dist, name, counted)
        estimators, ends = [], []
        for k, cls in enumerate(_PACKED):
            est = cls(-8.0, 8.0, 64)
            x = _layer_values(rank, k)
            est.update(x)
            estimators.append(est)
            ends.append(torch.stack([-x.min(), x.max()]))
        ends.append(torch.full((2,), -math.inf))  # a row no process has values for
        states, maxima = sum_states(estimators, torch.stack(ends))
        densities = [est.compute_from(state) for est, state in zip(estimators, states, strict=False)]
        torch.save({"calls": calls, "maxima": maxima, "densities": [(d.p, d.dp, d.count) for d in densities]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sum_states_reduces_many_estimators_and_their_maxima_in_one_collective(tmp_path):
    # What EAFOCallback does at each update for all its layers together.
    mp.spawn(_packed_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for res in results:
        assert res["calls"] == ["all_reduce"]  # one collective for three estimators and the maxima
        assert torch.isinf(res["maxima"][-1]).all()
    for k, cls in enumerate(_PACKED):
        both = torch.cat([_layer_values(r, k) for r in range(2)])
        single = cls(-8.0, 8.0, 64)
        single.update(both)
        ref = single.compute()
        for res in results:
            p, dp, count = res["densities"][k]
            assert count == ref.count and torch.equal(p, ref.p) and torch.equal(dp, ref.dp)
            assert torch.equal(res["maxima"][k], torch.stack([-both.min(), both.max()]).double())


def test_sum_states_without_a_process_group_is_the_local_state():
    est = KDE(-4.0, 4.0, 32)
    est.update(randn(500, seed=1))
    (state,), maxima = sum_states([est], torch.tensor([[1.0, -math.inf]]))
    assert torch.equal(state, est.additive_state) and torch.equal(
        maxima, torch.tensor([[1.0, -math.inf]], dtype=torch.float64))


def test_density_quantiles_match_scipy():
    from scipy import stats as _stats

    d = Density.from_pdf(_stats.norm.pdf, -8.0, 8.0, 1600)
    for q in (5e-4, 0.1, 0.5, 0.9, 1 - 5e-4):
        assert d.quantile(q) == pytest.approx(_stats.norm.ppf(q), abs=2e-3)
    with pytest.raises(ValueError, match="q must be"):
        d.quantile(1.5)
