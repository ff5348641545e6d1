import math

import pytest
import timm
import torch
from torch import nn

from dynact import CRReLU, activation_names, make_activation, swap_activations
from dynact.activations import resolve_activation


def _crrelu_formula(x, eps):
    return torch.relu(x) + eps * x * torch.exp(-(x**2) / 2)


def test_crrelu_matches_published_formula():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    for eps in (0.015625, -0.3125, 0.0):  # exact in float32
        act = CRReLU(eps).double()
        assert torch.allclose(act(x), _crrelu_formula(x, eps), atol=1e-12, rtol=0)


def test_crrelu_has_one_scalar_parameter_or_none():
    act = CRReLU()
    params = list(act.parameters())
    assert len(params) == 1 and params[0].shape == (1,) and params[0].item() == pytest.approx(0.01)
    frozen = CRReLU(0.05, learnable=False)
    assert list(frozen.parameters()) == []
    assert float(frozen.state_dict()["eps"]) == pytest.approx(0.05)


def test_crrelu_gradients_match_autograd_of_the_formula():
    x = torch.randn(257, dtype=torch.float64, requires_grad=True)
    act = CRReLU(0.2).double()
    grad_out = torch.randn_like(x)
    gx, geps = torch.autograd.grad(act(x), (x, act.eps), grad_out)

    x2 = x.detach().clone().requires_grad_(True)
    eps2 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    gx2, geps2 = torch.autograd.grad(_crrelu_formula(x2, eps2), (x2, eps2), grad_out)
    assert torch.allclose(gx, gx2) and torch.allclose(geps, geps2)
    # and the analytic derivative: 1[x>0] + eps (1 - x^2) exp(-x^2/2)
    xd = x.detach()
    analytic = (xd > 0).double() + 0.2 * (1 - xd**2) * torch.exp(-(xd**2) / 2)
    assert torch.allclose(gx, grad_out * analytic)
    # the module's own backward (eager, hand-written) against numerical differences
    xs = x[:20].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, e: _crrelu_module_with_eps(e)(t), (xs, eps2))
    with torch.no_grad():  # inference path (plain ops) agrees with the training path
        assert torch.allclose(act(xd), _crrelu_formula(xd, 0.2))


def _crrelu_module_with_eps(eps):
    # A CRReLU whose eps is the given tensor, so gradcheck can perturb it.
    module = CRReLU().double()
    del module.eps
    module.eps = eps
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_crrelu_runs_in_low_precision(dtype, tol):
    x = torch.linspace(-5, 5, 513)
    act = CRReLU(0.3)
    xl = x.to(dtype).requires_grad_(True)
    y = act(xl)
    assert y.dtype == dtype
    ref = _crrelu_formula(xl.detach().double(), 0.3)
    assert torch.allclose(y.double(), ref, atol=tol * 5, rtol=tol)
    y.sum().backward()
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()
    assert act.eps.grad.dtype == torch.float32 and torch.isfinite(act.eps.grad)


def test_crrelu_compiles_without_graph_breaks():
    act = CRReLU(0.1)
    compiled = torch.compile(act, fullgraph=True)
    x = torch.randn(4, 32, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    ref_act = CRReLU(0.1)
    ref_act(ref_x).square().sum().backward()
    assert torch.allclose(y, ref_act(ref_x))
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-6)
    assert torch.allclose(act.eps.grad, ref_act.eps.grad, atol=1e-5)


def test_registry_builds_every_named_activation():
    expected = {"relu", "gelu", "elu", "prelu", "celu", "silu", "mish", "crrelu", "eafo"}
    assert expected <= set(activation_names())
    x = torch.linspace(-3, 3, 61)
    for name in expected - {"eafo"}:
        act = make_activation(name)
        assert isinstance(act, nn.Module)
        y = act(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.allclose(make_activation("GELU")(x), nn.functional.gelu(x))
    assert make_activation("crrelu", eps=0.2).eps.item() == pytest.approx(0.2)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        make_activation("swishh")
    for name in ("relu", "gelu", "crrelu", "eafo", "mish"):
        assert name in str(err.value)


def test_non_callable_activation_is_rejected():
    with pytest.raises(TypeError):
        resolve_activation(3)
    with pytest.raises(TypeError, match="instance"):
        resolve_activation(nn.ReLU())


def test_swap_replaces_nested_sequential_and_modulelist():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
            self.acts = nn.ModuleList([nn.GELU(), nn.ReLU()])

        def forward(self, x):
            for act in self.acts:
                x = act(x)
            return self.mlp(x)

    model = nn.Sequential(Block(), nn.GELU(), Block())
    replaced = swap_activations(model, nn.GELU, "crrelu", eps=0.02)
    assert sorted(replaced) == sorted(["0.mlp.1", "0.acts.0", "1", "2.mlp.1", "2.acts.0"])
    assert not any(isinstance(m, nn.GELU) for m in model.modules())
    crs = [m for m in model.modules() if isinstance(m, CRReLU)]
    assert len(crs) == 5 and len({id(m.eps) for m in crs}) == 5  # no shared parameters
    assert all(float(m.eps) == pytest.approx(0.02) for m in crs)
    assert isinstance(model[0].acts[1], nn.ReLU)  # other types untouched
    model(torch.randn(2, 4))  # still runs


def test_swap_accepts_names_and_several_types_and_factories():
    model = nn.Sequential(nn.ReLU(), nn.GELU(), nn.SiLU())
    replaced = swap_activations(model, ["relu", nn.GELU], lambda: nn.Tanh())
    assert replaced == ["0", "1"]
    assert isinstance(model[0], nn.Tanh) and isinstance(model[1], nn.Tanh) and isinstance(model[2], nn.SiLU)
    with pytest.raises(ValueError, match="unknown activation"):
        swap_activations(model, nn.SiLU, "nope")


def test_swap_gelu_for_crrelu_in_timm_vit_tiny_adds_twelve_parameters():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4)
    before = sum(p.numel() for p in model.parameters())
    replaced = swap_activations(model, nn.GELU, "crrelu")
    after = sum(p.numel() for p in model.parameters())
    assert len(replaced) == 12 and all(name.endswith("mlp.act") for name in replaced)
    assert after - before == 12
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_crrelu_eps_value_is_validated():
    with pytest.raises(ValueError, match="eps"):
        CRReLU(eps=math.nan)


def test_swap_and_find_leave_the_inside_of_activations_alone():
    from dynact import EAFOActivation
    from dynact.activations import find_activations

    model = nn.Sequential(nn.Linear(4, 4), EAFOActivation(base="relu"), nn.ReLU())
    assert [name for name, _ in find_activations(model)] == ["1", "2"]  # not "1.base"
    replaced = swap_activations(model, nn.ReLU, "eafo")
    assert replaced == ["2"]
    assert isinstance(model[1].base, nn.ReLU)  # no EAFOActivation nested in another
    assert isinstance(model[2], EAFOActivation)


def test_to_eafo_keeps_the_module_and_loads_state_saved_before_or_after_conversion():
    from dynact import EAFOActivation
    from dynact.conversion import convert_like_state_dict, to_eafo

    relu = nn.ReLU(inplace=True)
    act = to_eafo(relu, eps=0.02)
    assert act.base is relu and relu.inplace is False  # the spline reads the input after the base
    with pytest.raises(ValueError, match="already an EAFOActivation"):
        to_eafo(act)

    def net(prelu_weight):
        prelu = nn.PReLU()
        nn.init.constant_(prelu.weight, prelu_weight)
        return nn.Sequential(nn.Linear(2, 2), prelu)

    plain = net(0.7).state_dict()
    converted = net(0.25)
    converted[1] = to_eafo(converted[1])
    converted.load_state_dict(plain)  # saved before conversion: the base takes the weight
    assert float(converted[1].base.weight.detach()) == pytest.approx(0.7)
    with torch.no_grad():
        converted[1].s.mul_(2.0)
    fresh = net(0.25)
    assert convert_like_state_dict(fresh, converted.state_dict()) == ["1"]
    fresh.load_state_dict(converted.state_dict())  # saved after conversion
    assert isinstance(fresh[1], EAFOActivation) and torch.equal(fresh[1].s, converted[1].s)
    assert float(fresh[1].base.weight.detach()) == pytest.approx(0.7)


def test_swap_to_eafo_wraps_the_module_it_replaces():
    # The dynamic activation starts as the activation it replaces plus the initial correction:
    # a GELU(tanh) stays a GELU(tanh) underneath, an in-place SiLU becomes out of place.
    from dynact.spline import EAFOActivation

    net = nn.Sequential(nn.Linear(4, 4), nn.GELU(approximate="tanh"), nn.Linear(4, 4), nn.SiLU(inplace=True))
    assert swap_activations(net, (nn.GELU, nn.SiLU), "eafo", eps=0.0) == ["1", "3"]
    assert isinstance(net[1], EAFOActivation) and net[1].base.approximate == "tanh"
    assert isinstance(net[3].base, nn.SiLU) and net[3].base.inplace is False
    x = torch.randn(64, 4)
    with torch.no_grad():
        assert torch.equal(net[1](x), nn.functional.gelu(x, approximate="tanh"))  # eps = 0
    other = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    swap_activations(other, nn.GELU, "eafo", base="relu")  # an explicit base wins
    assert isinstance(other[1].base, nn.ReLU)


def test_transformers_names_work_before_transformers_is_loaded():
    # A fresh interpreter: nothing has imported transformers.activations yet (a new user's script).
    import subprocess
    import sys

    code = (
        "import sys, dynact\n"
        "assert 'transformers.activations' not in sys.modules\n"
        "act = dynact.EAFOActivation('gelu_new')\n"
        "print(type(act.base).__name__, 'silu_hf' in dynact.activation_names())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["NewGELUActivation", "True"]
