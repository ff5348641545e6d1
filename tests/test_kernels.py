"""The fused kernels of CRReLU and EAFOActivation against their reference paths.

Oracle: the reference path of each module (``dynact.kernels.dispatch.MODE = "reference"``: autograd
functions over tensor ops, tested against closed forms, numpy and gradcheck in
test_spline.py / test_activations.py), evaluated in float32 for half-precision inputs.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dynact.activations import CRReLU
from dynact.kernels import dispatch as _kernels
from dynact.kernels.reference import _spline_ops
from dynact.spline import EAFOActivation

CPU_FUSED = _kernels._compiler() is not None
needs_compiler = pytest.mark.skipif(not CPU_FUSED, reason="no C++ compiler: the fused CPU kernels cannot be built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# More than four chunks of the C++ kernels (16384 elements), so several threads share the work.
N = 70_001


def _inputs(n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(n, generator=g)
    x[:7] = torch.tensor([-7.0, -6.0, 0.0, 6.0, 9.0, 1e-8, -1e-8])  # beyond, on and inside the grid ends
    return x


def _modules() -> dict[str, nn.Module]:
    """A CRReLU, a ReLU-based spline (ReLU inside the kernel) and a GELU-based one (base outside)."""
    torch.manual_seed(0)
    relu = EAFOActivation("relu", eps=0.3)
    gelu = EAFOActivation("gelu", lo=-4.0, hi=5.0, knots=65, eps=-0.7)
    with torch.no_grad():
        relu.s.mul_(3.0)
        gelu.s[1:-1] = torch.randn(63)
    return {"crrelu": CRReLU(0.3), "eafo_relu": relu, "eafo_gelu": gelu}


def _fused(fn) -> bool:
    """Whether an autograd node is a fused kernel's: a Python Function of dispatch or the C++
    operator ``dynact_op::spline`` (which serves float32 CPU calls once its background build is done)."""
    return "Fused" in type(fn).__name__ or "dynact_op::" in fn.name()


def _run(act: nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str):
    _kernels.MODE = mode
    act.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = act(x)
    y.backward(grad)
    eps = getattr(act, "eps", None)
    return y.detach(), x.grad, None if eps is None else eps.grad.clone(), y.grad_fn


@needs_compiler
@pytest.mark.parametrize("name", ["crrelu", "eafo_relu", "eafo_gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_reference_in_values_and_gradients(name, dtype):
    act = _modules()[name].to(dtype)
    x = _inputs().to(dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y, gx, geps, fn = _run(act, x, grad, "auto")
    assert _fused(fn)  # the fused path ran
    y_ref, gx_ref, geps_ref, fn_ref = _run(act, x, grad, "reference")
    assert "Fused" not in type(fn_ref).__name__
    # The spline kernels repeat the reference's arithmetic (bit for bit where the compiler fuses
    # multiply-adds as ATen does); CRReLU's exp differs from ATen's by an ulp or two.
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, gx_ref, rtol=tol, atol=tol)
    # The eps gradient is a sum of N terms: the kernel sums in double, the reference in the
    # input's dtype (CRReLU's in float32).
    torch.testing.assert_close(geps, geps_ref, rtol=1e-5, atol=1e-6)
    assert gx.dtype == dtype and geps.dtype == act.eps.dtype


@needs_compiler
@pytest.mark.parametrize("name", ["crrelu", "eafo_relu", "eafo_gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision_matches_reference(name, dtype):
    act = _modules()[name]
    x = _inputs().to(dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y, gx, geps, _ = _run(act, x, grad, "auto")
    assert y.dtype == gx.dtype == dtype and geps.dtype == torch.float32
    # The kernels compute in float32 and round once. The spline's reference path does the same
    # for the values and rounds grad_x twice (spline part, then plus ReLU's); CRReLU's rounds
    # after every op, so it is compared in float32 on the same (rounded) inputs.
    ref_dtype = torch.float32 if name == "crrelu" else dtype
    y_ref, gx_ref, geps_ref, _ = _run(act, x.to(ref_dtype), grad.to(ref_dtype), "reference")
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=ulp, atol=1e-6)
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=ulp, atol=1e-6)
    torch.testing.assert_close(geps, geps_ref, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_second_derivatives_through_the_fused_crrelu_are_the_analytic_ones():
    # dynact.eafo differentiates activations twice (create_graph); the fused backward must then
    # build a graph: d2/dx2 [eps x exp(-x^2/2)] = eps (x^3 - 3x) exp(-x^2/2) away from 0.
    assert _kernels.available(torch.zeros(1, dtype=torch.float64))
    act = CRReLU(0.3).double()
    x = torch.linspace(-3, 3, 61, dtype=torch.float64).add(0.01).requires_grad_()
    (d1,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    want = 0.3 * (x**3 - 3 * x) * torch.exp(-0.5 * x * x)
    assert torch.allclose(d2, want.detach(), atol=1e-9)
    assert torch.autograd.gradgradcheck(lambda t: act(t), (x.detach()[:8].clone().requires_grad_(),))


def _off_knots(act: EAFOActivation) -> torch.Tensor:
    """float64 points midway between knots (finite differences never cross a kink), and beyond the grid."""
    knots = act.knot_positions()
    mid = ((knots[:-1] + knots[1:]) / 2)[::5]
    return torch.cat([mid, torch.tensor([float(act.lo) - 1.5, float(act.hi) + 2.0], dtype=torch.float64)])


def _gelu_second(x: torch.Tensor) -> torch.Tensor:
    # gelu(x) = x Phi(x): gelu'' = 2 phi(x) + x phi'(x) = (2 - x^2) phi(x)
    return (2 - x * x) * torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5


@needs_compiler
@pytest.mark.parametrize("name", ["eafo_relu", "eafo_gelu"])
def test_second_derivatives_through_the_fused_spline(name):
    # The fused backward used to be once_differentiable: under create_graph=True its gradient
    # had no graph, so the spline's x-eps cross derivative and the base's curvature were dropped.
    act = _modules()[name].double()
    x0 = _off_knots(act)

    def second_order(mode):
        _kernels.MODE = mode
        x = x0.clone().requires_grad_(True)
        y = act(x)
        gx, geps = torch.autograd.grad(y.sum(), (x, act.eps), create_graph=True)
        assert gx.grad_fn is not None and geps.grad_fn is not None
        # d2y/dx2 (diagonal; with a ReLU base nothing in grad_x depends on x differentiably)
        d2 = torch.autograd.grad(gx.sum(), x, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
        cross = torch.autograd.grad(geps, x, retain_graph=True)[0]  # d/dx of dy/deps = s'(x)
        eps_x = torch.autograd.grad(gx.sum(), act.eps)[0]  # d/deps of sum(dy/dx) = sum(s'(x))
        return type(y.grad_fn).__name__, d2, cross, eps_x

    fn, d2, cross, eps_x = second_order("auto")
    assert fn == "FusedSplineBackward"
    ref = second_order("reference")
    for got, want in zip((d2, cross, eps_x), ref[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Independent oracles: central differences of the reference spline for s'(x); the base's
    # own second derivative for d2 (the spline is piecewise linear: 0 between knots).
    h = 1e-6
    s = lambda t: _spline_ops(t, act.s, act.lo, act.hi)  # noqa: E731
    fd = (s(x0 + h) - s(x0 - h)) / (2 * h)
    torch.testing.assert_close(cross, fd, rtol=1e-6, atol=1e-6)
    assert cross.abs().max() > 0.5 and cross[-2:].abs().max() == 0  # a real slope inside, flat beyond
    torch.testing.assert_close(eps_x, fd.sum().reshape(eps_x.shape), rtol=1e-6, atol=1e-6)
    want_d2 = _gelu_second(x0) if name == "eafo_gelu" else torch.zeros_like(x0)
    torch.testing.assert_close(d2, want_d2, rtol=1e-9, atol=1e-9)
    # gradgradcheck: every second derivative (x, eps and the incoming gradient) against
    # finite differences, through the fused path.
    _kernels.MODE = "auto"
    f = lambda t, e: torch.func.functional_call(act, {"eps": e}, (t,))  # noqa: E731
    xs, e = x0[:12].clone().requires_grad_(True), act.eps.detach().clone().requires_grad_(True)
    assert type(f(xs, e).grad_fn).__name__ == "FusedSplineBackward"
    assert torch.autograd.gradgradcheck(f, (xs, e))


@pytest.mark.parametrize("mode", ["reference", "auto", "ops"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_crrelu_gradients_stay_finite_where_x_squared_overflows(mode, dtype):
    # x*x overflows from |x| = 256 in float16 and 1.8e19 in bfloat16; the Gaussian factor is 0
    # there, so the slope is ReLU's: 1 or 0, never (1 - inf) * 0 = NaN (the reference path's
    # old answer). Oracle: the closed forms in float64, which do not overflow at these values.
    big = [256.0, -256.0, 300.0, -1000.0, 6e4] if dtype == torch.float16 else [2e19, -2e19, 1e30, -3e38, 3e38]
    x = torch.tensor(big + [-3.0, -0.7, 0.4, 1.3, 5.0], dtype=dtype)
    xd = x.double()
    g = torch.exp(-0.5 * xd * xd)
    want_y = torch.relu(xd) + 0.3 * xd * g
    want_slope = (xd > 0).double() + 0.3 * (1 - xd * xd) * g
    want_curv = 0.3 * (xd**3 - 3 * xd) * g
    want_eps = (xd * g).sum()
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    act = CRReLU(0.3)
    _kernels.MODE = mode
    xg = x.clone().requires_grad_(True)
    y = act(xg)
    y.sum().backward()  # first order: the kernels where fused, the hand-written backward in "reference"
    torch.testing.assert_close(y.double(), want_y, rtol=2 * ulp, atol=0)
    torch.testing.assert_close(xg.grad.double(), want_slope, rtol=2 * ulp, atol=ulp)
    torch.testing.assert_close(act.eps.grad.double(), want_eps.reshape(act.eps.shape), rtol=4 * ulp, atol=ulp)
    assert xg.grad[:5].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    # Second order (create_graph=True): the differentiable formulas.
    xg = x.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(act(xg).sum(), xg, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), xg)
    torch.testing.assert_close(d1.double(), want_slope, rtol=2 * ulp, atol=ulp)
    torch.testing.assert_close(d2.double(), want_curv, rtol=8 * ulp, atol=4 * ulp)


@pytest.mark.parametrize("name", ["crrelu", "eafo_relu"])
def test_nan_inf_and_noncontiguous_inputs(name):
    act = _modules()[name]
    x = _inputs(4096).reshape(64, 64).t()  # a transposed view
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    grad = torch.randn(64, 64).t()
    y, gx, geps, _ = _run(act, x, grad, "auto")
    y_ref, gx_ref, geps_ref, _ = _run(act, x, grad, "reference")
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=2e-6, atol=2e-6)
    assert y[0, 0].isnan()
    if name == "eafo_relu":  # (CRReLU's inf * exp(-inf) is NaN, in the reference too)
        assert y[0, 1] == float("inf") and y[0, 2] == 0
    finite = torch.isfinite(x)
    torch.testing.assert_close(gx[finite], gx_ref[finite], rtol=2e-6, atol=2e-6)
    assert geps.isnan() and geps_ref.isnan()  # NaN in, NaN out, as the reference


@needs_compiler
@pytest.mark.parametrize("name", ["crrelu", "eafo_relu", "eafo_gelu"])
def test_only_the_gradients_asked_for(name):
    act = _modules()[name]
    x = _inputs(1000)
    _kernels.MODE = "auto"
    # eps frozen: only grad_x
    act.eps.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    act(xg).sum().backward()
    _kernels.MODE = "reference"
    xr = x.clone().requires_grad_(True)
    act(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=2e-6, atol=2e-6)
    # input without grad (a first layer): only grad_eps
    act.eps.requires_grad_(True)
    _kernels.MODE = "auto"
    act(x).sum().backward()
    fused = act.eps.grad.clone()
    act.eps.grad = None
    _kernels.MODE = "reference"
    act(x).sum().backward()
    torch.testing.assert_close(fused, act.eps.grad, rtol=1e-5, atol=1e-6)
    # inference: forward only, same values
    with torch.no_grad():
        _kernels.MODE = "auto"
        y = act(x)
        _kernels.MODE = "reference"
        torch.testing.assert_close(y, act(x), rtol=2e-6, atol=2e-6)
    _kernels.MODE = "auto"
    assert act(x[:0]).shape == (0,)


@needs_compiler
@pytest.mark.parametrize("name", ["crrelu", "eafo_relu"])
def test_eps_gradient_is_deterministic_across_threads(name):
    act = _modules()[name]
    x = _inputs(300_000)
    grad = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        with _deterministic():
            for n in (1, 2, 1, 3):
                torch.set_num_threads(n)
                results.append(_run(act, x, grad, "auto")[2])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


def _documented_order_sum(g: np.ndarray) -> np.float32:
    """The float32 kernels' sum of ``g`` as dispatch documents it: per run of 512 elements, eight
    float32 lanes taking eight elements at a time, the run's last (< 8) elements added one by one
    to the first lane, then the lanes added in order; runs and chunks of 16384 added in float64."""
    total = 0.0
    for c in range(0, len(g), 16384):
        chunk = g[c:c + 16384]
        acc = 0.0
        for r in range(0, len(chunk), 512):
            run = chunk[r:r + 512]
            full = len(run) // 8 * 8
            lanes = np.zeros(8, np.float32)
            for k in range(0, full, 8):
                lanes = lanes + run[k:k + 8]
            for t in run[full:]:
                lanes[0] = lanes[0] + t
            s = np.float32(0.0)
            for lane in lanes:
                s = np.float32(s + lane)
            acc += float(s)
        total += acc
    return np.float32(total)


@needs_compiler
@pytest.mark.parametrize("name", ["eafo_relu", "eafo_gelu"])
@pytest.mark.parametrize("n", [3, 13, 33_285, 70_001])
def test_the_eps_gradient_is_summed_in_the_documented_order(name, n):
    # With the spline 1 around x = 0, grad_eps is the plain sum of the incoming gradient; its
    # values span nine decades, so another order of the float32 additions gives other bits.
    _kernels._load()
    if not _kernels._gelu_in_kernel():
        pytest.skip("the eight-lane kernels need AVX2 and FMA")
    act = _modules()[name]
    with torch.no_grad():
        act.s.fill_(1.0)
    g = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=g) * 10.0 ** (9 * torch.rand(n, generator=g) - 3)
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            geps = _run(act, torch.zeros(n), grad, "auto")[2]
        finally:
            torch.set_num_threads(before)
        assert geps.item() == _documented_order_sum(grad.numpy())
    if n > 512:  # the order matters at these values
        assert geps.item() != np.float32(grad.double().sum().item())


class _deterministic:
    def __enter__(self):
        self.before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.before)


@needs_compiler
def test_forward_pre_hooks_still_see_and_change_the_input():
    # EAFOCallback samples the input of every EAFOActivation with a forward pre-hook.
    act = _modules()["eafo_relu"]
    seen = []
    handle = act.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x = _inputs(100)
    act(x)
    assert len(seen) == 1 and torch.equal(seen[0], x)
    handle.remove()
    act.register_forward_pre_hook(lambda module, args: (args[0] * 0 + 2.0,))
    assert torch.allclose(act(x), act.base(torch.full_like(x, 2.0)) + act.eps * _spline_at(act, 2.0))


@needs_compiler
def test_a_hook_on_the_relu_base_still_runs():
    # A ReLU base is computed inside the kernel, unless someone hooked it.
    act = _modules()["eafo_relu"]
    calls = []
    act.base.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    x = _inputs(100)
    y, gx, geps, _ = _run(act, x, torch.ones_like(x), "auto")
    y_ref, gx_ref, geps_ref, _ = _run(act, x, torch.ones_like(x), "reference")
    assert len(calls) == 2
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)


def _spline_at(act: EAFOActivation, value: float) -> torch.Tensor:
    _kernels.MODE = "reference"
    with torch.no_grad():
        out = act(torch.tensor([value])) - act.base(torch.tensor([value]))
    _kernels.MODE = "auto"
    return out / act.eps.detach()


@needs_compiler
def test_user_torch_compile_traces_without_graph_breaks():
    model = nn.Sequential(nn.Linear(8, 16), EAFOActivation("relu", eps=0.2), nn.Linear(16, 16), CRReLU(0.1))
    x = torch.randn(32, 8)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@needs_compiler
def test_compiled_cpu_graph_calls_the_kernels_as_single_ops():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    model = nn.Sequential(nn.Linear(8, 16), EAFOActivation("gelu", eps=0.2), CRReLU(0.1))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(4, 8)
    compiled(x)
    # The C++ ops (dynact_op::) where the operator library could be built, else the Python ones.
    ns = "dynact_op" if _kernels._compiled_ops_in_cpp() else "dynact"
    assert f"{ns}.spline_forward" in graphs[0] and f"{ns}.crrelu_forward" in graphs[0]
    assert "gelu" in graphs[0]  # a base other than ReLU stays in the graph, for the compiler


# --------------------------------------------------------------------------- building and fallback
@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and a forgotten library; restored afterwards. The C++ operator's
    background build (never reset) is finished first, so that it neither builds into this cache
    nor runs a compiler while a test counts the compiler's runs."""
    _kernels.torch_op(wait=True)
    monkeypatch.setattr(_kernels, "_op", None)  # and hidden: it holds a copy of the kernels
    monkeypatch.setenv("DYNACT_CACHE", str(tmp_path))
    _kernels._reset()
    yield tmp_path
    monkeypatch.undo()
    _kernels._reset()


def _fallback_equals_reference():
    act = _modules()["eafo_relu"]
    x = _inputs(5000)
    grad = torch.randn_like(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, gx, geps, fn = _run(act, x, grad, "auto")
        _run(_modules()["crrelu"], x, grad, "auto")  # a second module: no second warning
    y_ref, gx_ref, geps_ref, _ = _run(act, x, grad, "reference")
    assert "Fused" not in type(fn).__name__
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref) and torch.equal(geps, geps_ref)
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_no_compiler_falls_back_with_one_warning(fresh_build, monkeypatch):
    monkeypatch.setattr(_kernels, "_compiler", lambda: None)
    messages = _fallback_equals_reference()
    assert len(messages) == 1 and "could not be built" in messages[0] and "no C++ compiler" in messages[0]
    assert not list(fresh_build.iterdir())


def test_compiled_graph_without_the_library_computes_the_same(fresh_build, monkeypatch):
    monkeypatch.setattr(_kernels, "_compiler", lambda: None)
    torch._dynamo.reset()
    model = nn.Sequential(EAFOActivation("relu", eps=0.3), CRReLU(0.2))
    x = _inputs(2000)
    grad = torch.randn_like(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, gx, _, _ = _run(torch.compile(model, fullgraph=True), x, grad, "auto")
    grads = [p.grad.clone() for p in model.parameters()]
    y_ref, gx_ref, _, _ = _run(model, x, grad, "reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sum("could not be built" in str(w.message) for w in caught) == 1
    torch._dynamo.reset()


@needs_compiler
def test_build_error_falls_back_with_one_warning(fresh_build, monkeypatch):
    from dynact.kernels import cpu as _kernels_cpu

    monkeypatch.setattr(_kernels_cpu, "SOURCE", "this is not C++")
    messages = _fallback_equals_reference()
    assert len(messages) == 1 and "could not be built" in messages[0]


@needs_compiler
def test_library_is_built_once_then_loaded_from_the_cache(fresh_build, monkeypatch):
    x = torch.zeros(1)
    assert _kernels.available(x)
    built = list(fresh_build.glob("dynact_kernels_*.so"))
    assert len(built) == 1
    calls, compiled = [], []
    run, compile_ = _kernels.subprocess.run, _kernels._compile
    monkeypatch.setattr(_kernels.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or run(cmd, **kw))
    monkeypatch.setattr(_kernels, "_compile", lambda cmd: compiled.append(cmd) or compile_(cmd))
    _kernels._reset()
    assert _kernels.available(x)
    assert calls and all("--version" in cmd for cmd in calls) and not compiled  # nothing compiled
    assert list(fresh_build.glob("dynact_kernels_*.so")) == built


def test_reference_mode_turns_the_kernels_off():
    _kernels.MODE = "reference"
    assert not _kernels.available(torch.zeros(3))
    act = EAFOActivation("relu")
    x = torch.randn(10, requires_grad=True)
    assert type(act(x).grad_fn).__name__ == "_SplineTermBackward"


# --------------------------------------------------------------------------- CUDA
_TRITON_ON_CPU = r"""
import contextlib, torch
from dynact.kernels import cuda as _triton
from dynact.kernels import dispatch as _kernels
from dynact.spline import EAFOActivation
torch.cuda.device = lambda device: contextlib.nullcontext()  # the interpreter runs on CPU tensors
torch.manual_seed(0)
act = EAFOActivation("relu", eps=0.3)
with torch.no_grad():
    act.s.mul_(3.0)
value, slope, a, b, pairs = act._eager_tables(torch.float32)
eps = act.eps.detach()
assert _kernels._load() is not None
for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)):
    x = (3 * torch.randn(3000)).to(dtype)
    x[:4] = torch.tensor([7.0, 6.0, -7.0, -6.0])
    if dtype != torch.float16:  # x*x overflows float32: CRReLU's slope must stay finite (ReLU's)
        x[4:6] = torch.tensor([2e19, -3e19])
    g = torch.randn(3000).to(dtype)
    y0 = torch.nn.functional.gelu(x)
    pairs_of_results = [
        (_triton.eafo_forward(x, None, pairs, a, b, eps), _kernels.eafo_forward(x, None, pairs, a, b, eps)),
        (_triton.eafo_forward(x, y0, pairs, a, b, eps), _kernels.eafo_forward(x, y0, pairs, a, b, eps)),
        (_triton.crrelu_forward(x, eps), _kernels.crrelu_forward(x, eps)),
    ]
    # At a knot the slope is one-sided: whether u = a x + b lands just below or on it depends on
    # a fused multiply-add, which the interpreter does not reproduce; compare grad_x off the knots.
    u = (x.double() + 6.0) / act.knot_step
    off = (u - u.round()).abs() > 1e-3
    for relu in (True, False):
        t = _triton.eafo_backward(g, x, relu, pairs, a, b, eps, True, True)
        k = _kernels.eafo_backward(g, x, relu, pairs, a, b, eps, True, True)
        pairs_of_results += [(t[0][off], k[0][off]), (t[1], k[1])]
    t, k = _triton.crrelu_backward(g, x, eps, True, True), _kernels.crrelu_backward(g, x, eps, True, True)
    assert bool(torch.isfinite(t[0]).all()) and bool(torch.isfinite(k[0]).all())
    pairs_of_results += [(t[0], k[0]), (t[1], k[1])]
    for got, want in pairs_of_results:
        # (0-d results are eps gradients: float32 block sums of 3000 terms against double sums)
        atol = 1e-4 if got.dim() == 0 else 1e-5
        torch.testing.assert_close(got.double(), want.double(), rtol=max(tol, 1e-5), atol=atol)
print("triton kernels ok")
"""


@needs_compiler
def test_triton_kernels_agree_with_the_cpu_kernels_in_triton_interpreter():
    # No GPU needed: Triton's interpreter runs the CUDA kernels' code on CPU tensors.
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_ON_CPU], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "triton kernels ok" in proc.stdout, proc.stderr[-3000:]



@needs_cuda
@pytest.mark.parametrize("name", ["crrelu", "eafo_relu", "eafo_gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_fused_equals_reference(name, dtype):
    act = _modules()[name].cuda()
    x = _inputs().to("cuda", dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    y, gx, geps, fn = _run(act, x, grad, "auto")
    assert "Fused" in type(fn).__name__, "Triton kernels unavailable on a CUDA machine"
    y_ref, gx_ref, geps_ref, _ = _run(copy.deepcopy(act), x.float(), grad.float(), "reference")
    rtol = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(y.float(), y_ref, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(gx.float(), gx_ref, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(geps.float(), geps_ref.float(), rtol=1e-4, atol=1e-4)


@needs_cuda
def test_cuda_eps_gradient_is_deterministic():
    act = _modules()["eafo_relu"].cuda()
    x = _inputs(1_000_003).cuda()
    grad = torch.randn_like(x)
    with _deterministic():
        first = _run(act, x, grad, "auto")[2]
        assert all(torch.equal(_run(act, x, grad, "auto")[2], first) for _ in range(3))


@needs_cuda
def test_cuda_autocast_bf16_and_compile():
    model = nn.Sequential(nn.Linear(64, 256), EAFOActivation("relu", eps=0.2), nn.Linear(256, 64), CRReLU(0.1)).cuda()
    x = torch.randn(128, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)
    eager.float().sum().backward()
    assert torch.isfinite(model[1].eps.grad) and torch.isfinite(model[3].eps.grad)


# --------------------------------------------------------------------------- memory layout and table cache
@needs_compiler
@pytest.mark.parametrize("name", ["crrelu", "eafo_relu", "eafo_gelu"])
def test_channels_last_input_keeps_its_layout_and_values(name):
    # The kernels are elementwise and run over the input's memory as it lies: a channels_last
    # input gives a channels_last output and gradient, with the values of the contiguous run
    # (bit for bit: the same arithmetic on the same numbers; ATen's GELU is not, as its last
    # few elements in memory take a scalar path), whatever layout the gradient has.
    act = _modules()[name]
    x = _inputs(4 * 6 * 5 * 7).reshape(4, 6, 5, 7)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    nhwc = x.contiguous(memory_format=torch.channels_last)
    y, gx, geps, fn = _run(act, nhwc, grad, "auto")
    assert _fused(fn)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert gx.is_contiguous(memory_format=torch.channels_last)
    y_c, gx_c, geps_c, _ = _run(act, x, grad, "auto")
    assert y_c.is_contiguous()
    tol = 1e-6 if name == "eafo_gelu" else 0.0
    torch.testing.assert_close(y, y_c, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, gx_c, rtol=tol, atol=tol)
    torch.testing.assert_close(geps, geps_c, rtol=1e-6, atol=1e-7)  # the sum runs in another order
    y_ref, gx_ref, _, _ = _run(act, nhwc, grad, "reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)


@needs_compiler
def test_a_gelu_base_runs_inside_the_fused_node_unless_hooked():
    act = _modules()["eafo_gelu"]
    x = _inputs(1000)
    assert act._base_code(x) == _kernels.BASE_GELU
    with torch.no_grad():
        act.s.zero_()  # a zero spline: exactly nn.GELU, values and gradient (ATen's GELU runs inside)
    for dtype in (torch.float32, torch.bfloat16):
        xd, xg = (x.to(dtype).clone().requires_grad_(True) for _ in range(2))
        y = act.to(dtype)(xd)
        assert type(y.grad_fn).__name__ == "FusedSplineBackward"
        y.backward(torch.ones_like(y))
        want = nn.GELU()(xg)
        want.backward(torch.ones_like(y))
        assert torch.equal(y, want) and torch.equal(xd.grad, xg.grad)
    act = _modules()["eafo_gelu"].float()
    calls = []
    act.base.register_forward_hook(lambda module, args, out: calls.append(1))
    assert act._base_code(x) == _kernels.BASE_GIVEN
    y, gx, _, _ = _run(act, x, torch.ones_like(x), "auto")
    y_ref, gx_ref, _, _ = _run(act, x, torch.ones_like(x), "reference")
    assert len(calls) == 2
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)


_GELU_IN_KERNEL = CPU_FUSED and bool(_kernels._load() and _kernels._gelu_in_kernel())


@pytest.mark.skipif(not _GELU_IN_KERNEL, reason="GELU inside the kernel needs the C++ library with AVX2")
def test_gelu_inside_the_kernel_is_x_phi_to_float32_rounding():
    # The in-kernel GELU alone (a zero spline passed straight to the kernel) against x Phi(x) and
    # Phi(x) + x phi(x) in float64 (scipy), over the whole range where float32 GELU is not 0 or x,
    # with every lane position and tail length of the vector loop.
    from scipy import stats

    x = torch.cat([torch.linspace(-14.0, 14.0, 400_003), torch.tensor([-0.0, 0.0, 1e-30, -1e-30, 1e-3])])
    zero = _kernels._tables_of(torch.zeros(66, 2), torch.tensor(65 / 9.0), torch.tensor(4 * 65 / 9.0))
    eps = torch.tensor([0.5])
    y = _kernels._spline_fwd(x, None, zero, _kernels.BASE_GELU_KERNEL, eps)
    gx, _ = _kernels._spline_bwd(torch.ones_like(x), x, zero, _kernels.BASE_GELU_KERNEL, eps, True, False)
    xd = x.double().numpy()
    cdf, pdf = stats.norm.cdf(xd), stats.norm.pdf(xd)
    value, slope = torch.from_numpy(xd * cdf), torch.from_numpy(cdf + xd * pdf)
    # relative: 8 float32 ulp down to x = -13 (|x Phi(x)| > 1e-37; below, exp(-x^2/2) is flushed
    # to 0), except where the slope is small and cancels (|Phi(x) + x phi(x)| < 0.4 for x > -2);
    # absolute: 4e-7 everywhere (nn.GELU: 3.8e-7)
    for got, want, away in ((y, value, value != 0), (gx, slope, (slope.abs() > 0.4) | (x < -2.0))):
        err = (got.double() - want).abs()
        assert err.max() <= 4e-7
        away = away & (x >= -13.0)
        assert (err[away] / want[away].abs()).max() <= 8 * 2.0**-24
    # nn.GELU is within its own error of the same numbers
    torch.testing.assert_close(y, nn.GELU()(x), rtol=1e-6, atol=4e-7)
    for n in range(1, 20):  # every tail length: the same numbers as inside a long run
        torch.testing.assert_close(_kernels._spline_fwd(x[:n], None, zero, _kernels.BASE_GELU_KERNEL, eps), y[:n],
                                   rtol=0, atol=0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 50.0, -50.0])
    want = nn.GELU()(special)
    got = _kernels._spline_fwd(special, None, zero, _kernels.BASE_GELU_KERNEL, eps)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


@pytest.mark.skipif(not _GELU_IN_KERNEL, reason="GELU inside the kernel needs the C++ library with AVX2")
def test_gelu_base_runs_in_the_kernel_only_where_the_correction_is_not_zero():
    act = _modules()["eafo_gelu"]
    x = _inputs(5000)
    tables = act._kernel_tables(x.dtype)
    assert _kernels.gelu_base(x, tables, act.eps) == _kernels.BASE_GELU_KERNEL
    assert _kernels.gelu_base(x.double(), act._kernel_tables(torch.float64), act.eps) == _kernels.BASE_GELU
    # In the kernel: the fused path against the reference path (ATen's GELU plus the spline).
    y, gx, geps, _ = _run(act, x, torch.ones_like(x), "auto")
    y_ref, gx_ref, geps_ref, _ = _run(act, x, torch.ones_like(x), "reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(geps, geps_ref, rtol=1e-5, atol=1e-6)
    # eps == 0 with a non-zero spline: ATen's GELU, so values and input gradient are nn.GELU's
    # bit for bit, and eps still gets its gradient sum(grad * s).
    with torch.no_grad():
        act.eps.zero_()
    assert _kernels.gelu_base(x, tables, act.eps) == _kernels.BASE_GELU
    y, gx, geps, fn = _run(act, x, torch.ones_like(x), "auto")
    assert _fused(fn)
    xg = x.clone().requires_grad_(True)
    want = nn.GELU()(xg)
    want.backward(torch.ones_like(x))
    assert torch.equal(y, want.detach()) and torch.equal(gx, xg.grad)
    _, _, geps_ref, _ = _run(act, x, torch.ones_like(x), "reference")
    torch.testing.assert_close(geps, geps_ref, rtol=1e-5, atol=1e-6)
    _kernels.MODE = "auto"


@needs_compiler
def test_kernel_tables_follow_every_change_of_the_spline():
    # The tables are built once and reused; in-place changes (updates, load_state_dict) and
    # replaced buffers (.to()) must reach the next call. Oracle: the reference path.
    act = _modules()["eafo_relu"]
    x = _inputs(2000)

    def agrees():
        _kernels.MODE = "auto"
        with torch.no_grad():
            y = act(x)
            _kernels.MODE = "reference"
            y_ref = act(x)
        _kernels.MODE = "auto"
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        return y

    first = agrees()
    assert act._kernel_tables(torch.float32) is act._kernel_tables(torch.float32)  # cached
    with torch.no_grad():
        act.s.mul_(-2.0)
    assert not torch.allclose(agrees(), first)
    with torch.no_grad():
        act.lo.fill_(-5.0)
        act.hi.fill_(4.0)
    agrees()
    other = EAFOActivation("relu", eps=0.3, init="zero")
    act.load_state_dict(other.state_dict())
    torch.testing.assert_close(agrees(), torch.relu(x))  # a zero spline: the base alone
    act.double()  # replaced buffers
    x = x.double()
    agrees()
    x = x.float()
    act.float()
    act.s.data[1:-1] = 1.0  # through .data: no version change, so the cache needs telling
    act.clear_cache()
    agrees()


# --------------------------------------------------------------------------- the C++ operator
@pytest.fixture
def needs_op():
    """The C++ operator, waiting for its background build (started by the suite's first float32
    CPU call; skipped where it cannot be built, e.g. PyTorch without its headers)."""
    _kernels.MODE = "auto"
    if not CPU_FUSED or _kernels.torch_op(wait=True) is None:
        pytest.skip(f"the C++ operator could not be built: {_kernels._op_failure}")


def _both_paths(act: nn.Module, x: torch.Tensor, grad: torch.Tensor, **kw):
    """``_run`` through the C++ operator, then with it hidden (the Python Function FusedSpline)."""
    op = _kernels._op
    try:
        got = _run(act, x, grad, "auto", **kw)
        _kernels._op = None
        want = _run(act, x, grad, "auto", **kw)
    finally:
        _kernels._op = op
    return got, want


@pytest.mark.parametrize("name", ["eafo_relu", "eafo_gelu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "grad_transposed"])
def test_the_operator_gives_the_python_functions_numbers_bit_for_bit(needs_op, name, layout):
    # Same kernels, same arguments: values, input gradient and eps gradient equal bit for bit,
    # whatever the layout of the input and of the incoming gradient; only the node differs.
    act = _modules()[name]
    x = _inputs(4 * 6 * 10 * 14).reshape(4, 6, 10, 14)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # not dense: run on a contiguous copy
        x = _inputs(4 * 6 * 10 * 28).reshape(4, 6, 10, 28)[..., ::2]
    elif layout == "grad_transposed":
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    (y, gx, geps, fn), (y_py, gx_py, geps_py, fn_py) = _both_paths(act, x, grad)
    assert fn.name() == "torch::autograd::CppNode<dynact_op::Spline>" and type(fn_py).__name__ == "FusedSplineBackward"
    assert torch.equal(y, y_py) and torch.equal(gx, gx_py) and torch.equal(geps, geps_py)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    y_ref, gx_ref, geps_ref, _ = _run(act, x, grad, "reference")  # and the oracle of this file
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(geps, geps_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["eafo_relu", "eafo_gelu"])
def test_the_operator_computes_only_the_gradients_asked_for(needs_op, name):
    act = _modules()[name]
    x = _inputs(3000)
    op = _kernels._op
    results = []
    for use in (op, None):
        _kernels._op = use
        try:
            act.eps.requires_grad_(False)  # eps frozen: grad_x only
            xg = x.clone().requires_grad_(True)
            act(xg).sum().backward()
            act.eps.requires_grad_(True)  # an input without grad (a first layer): grad_eps only
            act.eps.grad = None
            y = act(x)
            y.sum().backward()
            results.append((xg.grad, act.eps.grad.clone(), y.grad_fn.name()))
        finally:
            _kernels._op = op
    (gx, geps, node), (gx_py, geps_py, node_py) = results
    assert "dynact_op" in node and "FusedSpline" in node_py
    assert torch.equal(gx, gx_py) and torch.equal(geps, geps_py)


@pytest.mark.parametrize("name", ["eafo_relu", "eafo_gelu"])
@pytest.mark.parametrize("strided", [False, True])
def test_the_operators_second_derivatives_are_the_python_paths(needs_op, name, strided):
    # create_graph=True: the operator's backward runs the differentiable dynact::spline_backward
    # (and ATen's GELU backward), so d/dx and d/deps of the gradients exist and agree with the
    # Python Function's (whose backward then runs the plain-op formulas); also for an input that
    # is a strided view (the kernels run on a dense copy, the derivatives reach the view's base).
    act = _modules()[name]
    x0 = _inputs(4000 if strided else 2000)
    op = _kernels._op

    def second(use):
        _kernels._op = use
        try:
            leaf = x0.clone().requires_grad_(True)
            x = leaf[::2] if strided else leaf
            y = act(x)
            gx, geps = torch.autograd.grad((y * y).sum(), (leaf, act.eps), create_graph=True)
            d_x = torch.autograd.grad(gx.sum(), leaf, retain_graph=True)[0]
            d_eps = torch.autograd.grad(gx.sum() + geps.sum(), act.eps)[0]
            return y.grad_fn.name(), gx, geps, d_x, d_eps
        finally:
            _kernels._op = op

    got, want = second(op), second(None)
    assert "dynact_op" in got[0] and "FusedSpline" in want[0]
    for a, b in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got[3].abs().max() > 0  # the second derivative is there, not dropped


def test_the_operator_sees_an_input_changed_in_place_before_the_backward(needs_op):
    act = _modules()["eafo_relu"]
    x = _inputs(100).requires_grad_(True).clone()
    y = act(x)
    assert "dynact_op" in y.grad_fn.name()
    x.add_(1.0)  # the saved input is stale: autograd refuses, as for any op that saved it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("n", [1, 7, 3000])
def test_the_operators_sample_draws_and_gathers_what_randint_and_index_select_do(needs_op, n):
    # dynact_op::sample: the same positions from the same generator, the same values, the
    # generator left in the same state; blocks of 256 draws, so counts around 256 and 0; strided
    # inputs at logical positions.
    sample = _kernels.sampler()
    x = torch.randn(n, 3)
    for m in (0, 1, 255, 256, 257, 4096):
        ours, theirs = torch.Generator().manual_seed(m), torch.Generator().manual_seed(m)
        got, want = torch.full((2, m + 5), math.nan), torch.full((2, m + 5), math.nan)
        for row in range(2):  # written at an offset into a larger buffer, the rest untouched
            sample(x, got, row * (m + 5) + 3, m, ours)
            idx = torch.randint(x.numel(), (m,), generator=theirs)
            torch.index_select(x.view(-1), 0, idx, out=want[row, 3:3 + m])
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])
        assert got[:, 3:3 + m].isfinite().all() and got[:, :3].isnan().all() and got[:, 3 + m:].isnan().all()
        assert torch.equal(ours.get_state(), theirs.get_state())
    torch.manual_seed(5)  # no generator: the default one, as randint's
    got = torch.empty(300)
    sample(x, got, 0, 300, None)
    torch.manual_seed(5)
    assert torch.equal(got, x.view(-1)[torch.randint(x.numel(), (300,))])
    with pytest.raises(RuntimeError, match="float32 CPU input"):
        sample(x.double(), got, 0, 300, None)
    # strided inputs are read at logical positions, as the torch path's x[unravel_index(...)]
    base = torch.randn(3, 5, 4, 6)
    for strided in (base.to(memory_format=torch.channels_last), base.transpose(1, 3), base[:, 1:4, ::2], base[1]):
        ours, theirs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        sample(strided, got, 0, 300, ours)
        idx = torch.randint(strided.numel(), (300,), generator=theirs)
        assert torch.equal(got, strided[torch.unravel_index(idx, strided.shape)])
    # below 2^28 positions the operator runs the engine on a copy of the generator's state and
    # takes remainders by multiplication; a single position (every remainder 0) and a range of
    # 2^28 or more (two draws per position, the generator's own path) give randint's too
    wides = (torch.randn(1), torch.randn(1000).expand(2**18 + 8000, 1000), torch.randn(7).expand(2**28 - 1, 7)[:, 0])
    for wide in wides:
        ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        sample(wide, got, 0, 300, ours)
        idx = torch.randint(wide.numel(), (300,), generator=theirs)
        assert torch.equal(got, wide[torch.unravel_index(idx, wide.shape)])
        assert torch.equal(ours.get_state(), theirs.get_state())
    with pytest.raises(RuntimeError, match="not inside the destination"):
        sample(x, got, 1, 300, None)


def test_the_plugin_samples_the_same_values_with_and_without_the_operator(needs_op, monkeypatch):
    from dynact import ActivationOptimizer

    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU())
        act_opt = ActivationOptimizer(model, every_n_steps=3, window=2, convert=(nn.GELU,), sample_size=100)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        buffers = []
        for step in range(6):
            loss = model(torch.randn(16, 8, generator=torch.Generator().manual_seed(step))).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if act_opt._bank is not None and any(act_opt._bank.pending):
                buffers.append(act_opt._bank.values[torch.device("cpu")].clone())
            act_opt.step()
        return buffers, [p.detach().clone() for p in model.parameters()]

    calls = []
    real = _kernels._sample
    monkeypatch.setattr(_kernels, "_sample", lambda *args: calls.append(1) or real(*args))
    with_op = run()
    assert len(calls) == 2 * 2 * 2  # two sites, two sampled steps per window, two windows
    monkeypatch.setattr(_kernels, "_sample", None)
    without = run()
    assert len(with_op[0]) == 4
    for a, b in zip(with_op[0] + with_op[1], without[0] + without[1], strict=True):
        assert torch.equal(a, b)


def test_a_compiler_started_while_another_thread_sets_environment_variables_starts():
    # The operator builds in a background thread while the program runs on and may set
    # environment variables (Lightning does). A child that inherited the environment read an
    # `environ` array the other thread had just reallocated: OSError: [Errno 14] Bad address,
    # for about half of the starts here, and the operator was lost for the process.
    import os
    import shutil
    import threading

    true = shutil.which("true")
    if true is None:
        pytest.skip("no `true` program")
    failures, done = [], threading.Event()

    def start_compilers():
        try:
            for _ in range(60):
                try:
                    _kernels._compile([true])
                except OSError as err:
                    failures.append(err)
        except Exception as err:  # anything else fails the test too, and must not leave it waiting
            failures.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=start_compilers)
    thread.start()
    i = 0
    while not done.is_set():
        os.environ[f"DYNACT_TEST_RACE_{i % 500}"] = "x" * (i % 40)
        if i % 500 == 499:
            for name in [k for k in os.environ if k.startswith("DYNACT_TEST_RACE_")]:
                del os.environ[name]
        i += 1
    thread.join()
    for name in [k for k in os.environ if k.startswith("DYNACT_TEST_RACE_")]:
        del os.environ[name]
    assert not failures, failures[:3]


@needs_compiler
def test_an_operator_that_cannot_be_built_leaves_the_python_function_serving(monkeypatch):
    # E.g. a PyTorch installed without its C++ headers: the build fails in the background, the
    # reason is kept, nothing is raised or warned, and every call runs the Python Function.
    def no_headers():
        raise FileNotFoundError("torch/include")

    for name in ("_op", "_op_thread", "_op_failure", "_sample"):
        monkeypatch.setattr(_kernels, name, None)
    monkeypatch.setattr(_kernels, "_op_build_flags", no_headers)
    act = _modules()["eafo_relu"]
    x = _inputs(3000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _kernels.torch_op(wait=True) is None
        y, gx, geps, fn = _run(act, x, torch.ones_like(x), "auto")
    assert "torch/include" in _kernels._op_failure
    assert type(fn).__name__ == "FusedSplineBackward"
    y_ref, gx_ref, _, _ = _run(act, x, torch.ones_like(x), "reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_compiled_graphs_call_the_cpp_ops_with_the_python_ops_numbers(needs_op, monkeypatch, dtype):
    # A CPU graph calls dynact_op::spline_forward / crrelu_forward (C++), which run the kernels
    # the Python custom ops run, with the same arguments: values, input and parameter gradients
    # (every eps included) equal bit for bit, except where float32 GELU runs in the kernel.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), _modules()["eafo_relu"], nn.Linear(40, 40), _modules()["eafo_gelu"],
                          CRReLU(0.2)).to(dtype)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2)).to(dtype)

    def run(in_cpp: bool):
        monkeypatch.setattr(_kernels, "_compiled_ops_in_cpp", lambda: in_cpp)
        torch._dynamo.reset()
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(str(gm.graph))
            return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

        compiled = torch.compile(model, backend=backend, fullgraph=True)
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        y = compiled(xg)
        y.square().sum().backward()
        return y.detach(), xg.grad, [p.grad.clone() for p in model.parameters()], graphs[0]

    y, gx, grads, graph = run(True)
    y_py, gx_py, grads_py, graph_py = run(False)
    assert "dynact_op.spline_forward" in graph and "dynact_op.crrelu_forward" in graph
    assert "dynact.spline_forward" in graph_py and "dynact_op" not in graph_py
    if dtype == torch.float32 and _kernels._op_gelu:
        # float32: the GELU base runs inside the C++ op's kernel (one pass, base code 3, no y0),
        # the Python path runs the compiler's GELU and the spline on top: the same function to
        # float32 rounding.
        assert re.search(r"spline_forward\.default\]\(args = \(%\w+, None, .*, 3\)", graph)
        for got, want in zip([y, gx, *grads], [y_py, gx_py, *grads_py], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    else:
        assert torch.equal(y, y_py) and torch.equal(gx, gx_py)
        for got, want in zip(grads, grads_py, strict=True):
            assert torch.equal(got, want)
    assert all(g.abs().sum() > 0 for g in grads)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_graphs_cpp_ops_build_the_eager_paths_tables_bit_for_bit(needs_op, dtype):
    # dynact_op::spline_forward / spline_backward take the knot values and grid ends and build
    # the kernels' tables themselves; they must be dynact.kernels.reference._tables' (the eager
    # path's) to the last bit, or a compiled model would compute another function. Grids whose
    # ends and step do not round evenly (at 100 knots on the second, (K - 1) / (hi - lo) and
    # reciprocal(hi - lo) * (K - 1), Python's int / tensor, differ in float32 and float64),
    # inputs on and next to knots and beyond both ends.
    ops = torch.ops.dynact_op
    for knots, lo, hi in ((257, -6.0, 6.0), (100, -3.232551097869873, 4.147407054901123), (9, -1e-3, 2.9),
                           (8, -0.3, 0.7)):
        act = EAFOActivation("relu", lo=lo, hi=hi, knots=knots).to(dtype)
        act.s.uniform_(-1, 1, generator=torch.Generator().manual_seed(knots))
        t = act._kernel_tables(dtype)
        grid = act.knot_positions(dtype)
        x = torch.cat([grid, grid + 1e-4, grid - 1e-4, torch.linspace(lo - 2, hi + 2, 500, dtype=dtype)])
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        eps = act.eps.detach()
        for base, y0 in ((_kernels.BASE_RELU, None), (_kernels.BASE_GIVEN, torch.tanh(x))):
            want = _kernels.eafo_forward(x, y0, t.pairs, t.a, t.b, eps)
            got = ops.spline_forward(x, y0, act.s, act.lo, act.hi, eps, base)
            assert torch.equal(got, want), (knots, base)
            gx_want, geps_want = _kernels.eafo_backward(grad, x, base == _kernels.BASE_RELU, t.pairs, t.a, t.b, eps,
                                                        True, True)
            gx, geps = ops.spline_backward(grad, x, base, act.s, act.lo, act.hi, eps)
            assert torch.equal(gx, gx_want) and torch.equal(geps.reshape(-1), geps_want.reshape(-1)), (knots, base)
    with pytest.raises(RuntimeError, match="at least 3 knots"):
        ops.spline_forward(x, None, act.s[:2], act.lo, act.hi, eps, _kernels.BASE_RELU)


@needs_compiler
def test_the_operator_loads_from_the_cache_at_once_and_builds_only_after_enough_calls(needs_op, monkeypatch, tmp_path):
    act = _modules()["eafo_relu"]
    x = _inputs(64)
    fresh = {"_op": None, "_op_thread": None, "_op_failure": None, "_op_calls": 0, "_op_wanted": False}
    # A cached operator (this process's cache has it): the first call's thread loads it, no build.
    for name, value in fresh.items():
        monkeypatch.setattr(_kernels, name, value)
    compiled = []
    monkeypatch.setattr(_kernels, "_compile", lambda cmd: compiled.append(cmd) or (1, "not now"))
    act(x)
    _kernels._op_thread.join(timeout=60)
    assert _kernels._op is not None and not compiled and _kernels._op_calls == 1
    # Nothing cached: the Python Function serves the first OP_BUILD_AFTER_CALLS calls and nothing
    # is compiled until then (a short script never pays for a build); then the build starts.
    for name, value in fresh.items():
        monkeypatch.setattr(_kernels, name, value)
    monkeypatch.setenv("DYNACT_CACHE", str(tmp_path))
    monkeypatch.setattr(_kernels, "OP_BUILD_AFTER_CALLS", 5)
    for _ in range(4):
        assert type(act(x.clone().requires_grad_(True)).grad_fn).__name__ == "FusedSplineBackward"
    _kernels._op_thread.join(timeout=1.0)
    assert _kernels._op_thread.is_alive() and not compiled  # waiting, not compiling
    act(x)
    _kernels._op_thread.join(timeout=60)
    assert compiled and _kernels._op is None and "not now" in _kernels._op_failure
