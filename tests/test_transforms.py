"""CRReLU and EAFOActivation under PyTorch's own program transforms.

``torch.jit.trace`` (a saveable module that runs without dynact), ``torch.func`` (``vmap``,
``grad``, ``jacrev``, ``jvp``), ``torch.autograd.forward_ad``, and ``torch.library.opcheck`` of
every dynact custom op. Oracles: CRReLU's closed form and derivative; for EAFOActivation the
reference spline ``_spline_ops`` (values) and the reference path's hand-written backward
(derivatives, ``dynact.kernels.dispatch.MODE = "reference"``).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from dynact.activations import CRReLU
from dynact.kernels import dispatch as _kernels
from dynact.kernels.reference import _spline_ops
from dynact.spline import EAFOActivation

EPS = 0.3


def _eafo(base: str) -> EAFOActivation:
    torch.manual_seed(0)
    act = EAFOActivation(base, lo=-4.0, hi=5.0, knots=65, eps=EPS)
    with torch.no_grad():
        act.s[1:-1] = torch.randn(63)
    return act


def _x(n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = 2.5 * torch.randn(n, generator=g)
    x[:3] = torch.tensor([-6.0, 7.0, 0.3])  # beyond both grid ends, and inside
    return x


def _crrelu_closed(x):
    g = torch.exp(-0.5 * x * x)
    return torch.relu(x) + EPS * x * g, (x > 0).to(x.dtype) + EPS * (1 - x * x) * g


def _oracle(act: nn.Module, x: torch.Tensor):
    """(values, derivative) that the transforms must reproduce."""
    if isinstance(act, CRReLU):
        return _crrelu_closed(x)
    y = act.base(x) + EPS * _spline_ops(x, act.s, act.lo, act.hi)
    _kernels.MODE = "reference"  # the hand-written backward of the reference path
    xr = x.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(act(xr).sum(), xr)
    return y, d


def _modules():
    return {"crrelu": CRReLU(EPS), "eafo_relu": _eafo("relu"), "eafo_gelu": _eafo("gelu")}


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("name", ["crrelu", "eafo_relu", "eafo_gelu"])
def test_torch_func_transforms_and_forward_ad(name, mode):
    act = _modules()[name]
    x = _x()
    want_y, want_d = _oracle(act, x)
    _kernels.MODE = mode
    if mode == "auto" and _kernels.available(x):  # eager stays on the fused kernels
        fn = act(x.clone().requires_grad_(True)).grad_fn  # a Python Function or the C++ operator
        assert "Fused" in type(fn).__name__ or "dynact_op::" in fn.name()
    tol = dict(rtol=1e-5, atol=1e-6)
    xb = x.reshape(4, 10)
    torch.testing.assert_close(torch.func.vmap(act)(xb), want_y.reshape(4, 10), **tol)
    torch.testing.assert_close(torch.func.grad(lambda t: act(t).sum())(x), want_d, **tol)
    jac = torch.func.jacrev(act)(x[:12])
    torch.testing.assert_close(jac, torch.diag(want_d[:12]), **tol)  # elementwise: diagonal
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    y, tangent = torch.func.jvp(act, (x,), (v,))
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(tangent, want_d * v, **tol)
    with forward_ad.dual_level():
        out = forward_ad.unpack_dual(act(forward_ad.make_dual(x, v)))
    torch.testing.assert_close(out.primal, want_y, **tol)
    torch.testing.assert_close(out.tangent, want_d * v, **tol)
    # Per-sample gradients of eps (vmap over grad of a functional call), the transforms' main use:
    # d/deps sum(act(x_i)) = sum(x_i exp(-x_i^2/2)) for CRReLU, sum(s(x_i)) for the spline.
    def loss(e, xi):
        return torch.func.functional_call(act, {"eps": e}, (xi,)).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(act.eps.detach(), xb)
    s = xb * torch.exp(-0.5 * xb * xb) if name == "crrelu" else _spline_ops(xb, act.s, act.lo, act.hi)
    torch.testing.assert_close(per_sample.reshape(4), s.sum(1), **tol)


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_traced_model_saves_and_runs_without_dynact(tmp_path, mode):
    # torch.jit.save used to fail: "Could not export Python function call 'FusedCRReLU'".
    _kernels.MODE = mode
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), CRReLU(0.2), nn.Linear(16, 16), _eafo("relu"), nn.Linear(16, 16),
                          _eafo("gelu"))
    x = torch.randn(6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        warnings.simplefilter("error", torch.jit.TracerWarning)  # nothing data-dependent was frozen
        traced = torch.jit.trace(model, x)
        torch.jit.save(traced, tmp_path / "model.pt")
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "prim::PythonOp" not in kinds and all(k.split("::")[0] in ("aten", "prim") for k in kinds), kinds
    x2 = 3 * torch.randn(5, 8)  # other values than the traced ones
    torch.save(x2, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(tmp_path / 'model.pt')!r})\n"
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
        "assert not any(name.startswith('dynact') for name in sys.modules), 'dynact was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _kernels.MODE = "auto"
    with torch.no_grad():
        want = model(x2)  # eager, on the fused path where it is built
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=1e-5, atol=1e-6)


def _op_inputs(dtype, eps_shape):
    act = _eafo("relu")
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    value, slope, a, b, pairs = act._eager_tables(cdt)
    g = torch.Generator().manual_seed(1)
    x = (2.5 * torch.randn(300, generator=g)).to(dtype).requires_grad_(True)
    y0 = F.gelu(x.detach()).requires_grad_(True)
    grad = torch.randn(300, generator=g).to(dtype).requires_grad_(True)
    eps = torch.full(eps_shape, EPS, dtype=cdt, requires_grad=True)
    return x, y0, grad, eps, pairs, a, b


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("eps_shape", [(), (1,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_custom_op_passes_opcheck(dtype, eps_shape, mode):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch agree with the
    # real op, for the kernels ("auto") and for the tensor-ops fallback ("reference"), with
    # inputs that require grad; eps as a 0-d tensor or shape (1,) (what FSDP2 needs).
    _kernels.MODE = mode
    x, y0, grad, eps, pairs, a, b = _op_inputs(dtype, eps_shape)
    ops = torch.ops.dynact
    cases = [
        (ops.spline_forward.default, (x, None, pairs, a, b, eps)),
        (ops.spline_forward.default, (x, y0, pairs, a, b, eps)),
        (ops.spline_backward.default, (grad, x, True, pairs, a, b, eps)),
        (ops.spline_backward.default, (grad, x, False, pairs, a, b, eps)),
        (ops.crrelu_forward.default, (x, eps)),
        (ops.crrelu_backward.default, (grad, x, eps)),
    ]
    # a channels_last input gives a channels_last output, fake tensors included (Inductor
    # checks the real output's strides against the fake's)
    cl = x.detach().reshape(5, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_(True)
    cl_grad = grad.detach().reshape(5, 3, 4, 5).to(memory_format=torch.channels_last)
    cases += [(ops.spline_forward.default, (cl, None, pairs, a, b, eps)),
              (ops.spline_backward.default, (cl_grad, cl.detach(), True, pairs, a, b, eps.detach())),
              (ops.crrelu_forward.default, (cl, eps)),
              (ops.crrelu_backward.default, (cl_grad, cl.detach(), eps.detach()))]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)
    gx, geps = ops.spline_backward(grad, x, True, pairs, a, b, eps)
    assert gx.shape == x.shape and geps.shape == eps.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_cpp_ops_of_compiled_graphs_pass_opcheck(dtype):
    # dynact_op::spline_forward / crrelu_forward carry their autograd in C++ and take the knot
    # values and grid ends (the C++ ops build the tables): schema, autograd registration, fake
    # tensors and AOT dispatch must agree with the real op, as for the Python ops above.
    _kernels.MODE = "auto"
    if _kernels.torch_op(wait=True) is None:
        pytest.skip(f"the C++ operator could not be built: {_kernels._op_failure}")
    act = _eafo("relu").to(dtype)
    x, y0, grad, _, _, _, _ = _op_inputs(dtype, ())
    ops = torch.ops.dynact_op
    for eps_shape in [(), (1,)]:
        eps = torch.full(eps_shape, EPS, dtype=dtype, requires_grad=True)
        cases = [(ops.spline_forward.default, (x, None, act.s, act.lo, act.hi, eps, _kernels.BASE_RELU)),
                 (ops.spline_forward.default, (x, y0, act.s, act.lo, act.hi, eps, _kernels.BASE_GIVEN)),
                 (ops.spline_backward.default, (grad.detach(), x.detach(), _kernels.BASE_RELU, act.s, act.lo, act.hi,
                                                eps.detach())),
                 (ops.crrelu_forward.default, (x, eps))]
        if dtype == torch.float32 and _kernels._op_gelu:
            cases.append((ops.spline_forward.default, (x, None, act.s, act.lo, act.hi, eps, _kernels.BASE_GELU_KERNEL)))
        # channels_last in, channels_last out: the fake tensors' strides must be the real ones'
        cl = x.detach().reshape(5, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_(True)
        cases += [(ops.spline_forward.default, (cl, None, act.s, act.lo, act.hi, eps, _kernels.BASE_RELU)),
                  (ops.spline_backward.default, (cl.detach(), cl.detach(), _kernels.BASE_RELU, act.s, act.lo, act.hi,
                                                 eps.detach())),
                  (ops.crrelu_forward.default, (cl, eps)),
                  (ops.crrelu_backward.default, (cl.detach(), cl.detach(), eps.detach()))]
        for op, args in cases:
            result = torch.library.opcheck(op, args)
            assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_backward_ops_are_differentiable(mode):
    # Second derivatives of compiled CPU graphs go through the backward ops' own autograd
    # formulas; gradcheck compares them with finite differences (float64, off the knots).
    _kernels.MODE = mode
    act = _eafo("gelu").double()
    value, slope, a, b, pairs = act._eager_tables(torch.float64)
    knots = act.knot_positions()
    x = (((knots[:-1] + knots[1:]) / 2)[::4]).clone().requires_grad_(True)
    grad = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    eps = torch.tensor([EPS], dtype=torch.float64, requires_grad=True)
    for relu in (True, False):
        def backward(g, t, e, relu=relu):
            return torch.ops.dynact.spline_backward(g, t, relu, pairs, a, b, e)

        assert torch.autograd.gradcheck(backward, (grad, x, eps))
    assert torch.autograd.gradcheck(lambda g, t, e: torch.ops.dynact.crrelu_backward(g, t, e), (grad, x, eps))
    assert torch.autograd.gradgradcheck(lambda t, e: torch.ops.dynact.crrelu_forward(t, e), (x, eps))
