"""dynact.bake: trained dynamic activations as plain PyTorch, for export and deployment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynact
from dynact import CRReLU, EAFOActivation
from dynact.bake import BakedCRReLU, BakedSpline
from dynact.density import Density

ort = pytest.importorskip("onnxruntime")


def _refreshed(base: str) -> EAFOActivation:
    """An EAFOActivation after a refresh on a skewed two-bump density (not CRReLU's shape)."""
    from scipy.stats import norm

    act = EAFOActivation(base, lo=-5.0, hi=4.0, knots=129, eps=0.3)
    act.update(Density.from_pdf(lambda x: 0.7 * norm.pdf(x, -0.5, 0.8) + 0.3 * norm.pdf(x, 1.5, 0.5), -8, 8, 800),
               mode="refresh")
    return act


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    crrelu = CRReLU(eps=0.01)
    with torch.no_grad():
        crrelu.eps.fill_(-0.35)
    return nn.Sequential(nn.Linear(6, 16), _refreshed("gelu"), nn.Linear(16, 16), _refreshed("relu"),
                         nn.Linear(16, 16), crrelu, nn.Linear(16, 3)).eval()


def _x(n=257, d=6, scale=3.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(3)) * scale


def _close(got, want, tol):
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max()) <= tol * max(1.0, float(want.abs().max()))


def test_baked_modules_compute_the_live_ones_with_standard_ops_only():
    for act in (_refreshed("gelu"), _refreshed("relu"), _refreshed("crrelu")):
        # inside, at the knots, between them and beyond both ends of the grid
        x = torch.cat([torch.linspace(-9, 9, 4001), act.knot_positions(torch.float32), torch.tensor([-1e30, 1e30])])
        with torch.no_grad():
            want = act(x)
            baked = dynact.bake(act)
            assert isinstance(baked, BakedSpline)
            assert isinstance(baked.base, BakedCRReLU) if isinstance(act.base, CRReLU) else baked.base is act.base
            assert _close(baked(x), want, 1e-5)
            # an independent oracle: the knot table interpolated by numpy
            import numpy as np

            s = np.interp(x.double().numpy(), act.knot_positions().numpy(), act.s.double().numpy(), left=0, right=0)
            oracle = act.base(x).double() + float(act.eps) * torch.from_numpy(s)
            assert _close(baked(x).double(), oracle, 1e-5)
    crrelu = CRReLU(eps=-0.2)
    x = torch.linspace(-6, 6, 1001)
    closed = torch.relu(x) - 0.2 * x * torch.exp(-x * x / 2)
    with torch.no_grad():
        assert _close(dynact.bake(crrelu)(x), closed, 1e-6)


def test_bake_replaces_in_place_keeps_the_base_and_holds_buffers():
    net = _mlp()
    gelu = net[1].base
    x = _x()
    with torch.no_grad():
        want = net(x)
    assert dynact.bake(net) is net
    assert [type(m) for m in net[1::2]] == [BakedSpline, BakedSpline, BakedCRReLU]
    assert net[1].base is gelu  # the base module as it was
    assert not any(isinstance(m, (EAFOActivation, CRReLU)) for m in net.modules())
    assert {"1.value", "1.slope", "1.a", "1.b", "1.eps", "3.value", "5.eps"} <= set(net.state_dict())
    assert not [n for n, p in net.named_parameters() if n.startswith(("1.", "3.", "5."))]  # numbers are buffers
    with torch.no_grad():
        assert _close(net(x), want, 1e-5)
    # eps of shape (1,) (newer checkpoints) bakes the same as a 0-d one
    act = _refreshed("relu")
    act.eps = nn.Parameter(act.eps.detach().reshape(1))
    with torch.no_grad():
        assert dynact.bake(act)(torch.tensor(0.7)).shape == torch.Size([])


def _no_dynact_ops(graph_module) -> list[str]:
    return [str(n.target) for n in graph_module.graph.nodes if "dynact" in str(n.target)]


def test_baked_model_exports_with_torch_export_and_jit(tmp_path):
    net = dynact.bake(_mlp())
    x = _x()
    with torch.no_grad():
        want = net(x)
    program = torch.export.export(net, (x,))
    assert _no_dynact_ops(program.graph_module) == []
    assert _close(program.module()(x), want, 1e-6)
    traced = torch.jit.trace(net, (x,))
    torch.jit.save(traced, tmp_path / "net.pt")
    loaded = torch.jit.load(tmp_path / "net.pt")
    assert _close(loaded(_x(n=31)), net(_x(n=31)), 1e-6)  # other batch sizes too
    kinds = {n.kind() for n in loaded.inlined_graph.nodes()}
    assert "prim::PythonOp" not in kinds and not [k for k in kinds if "dynact" in k]  # no Python callback, no custom op


def _onnx_run(model, x, path):
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    import onnx

    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}  # standard ONNX operators only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session


def test_baked_mlp_runs_in_onnxruntime(tmp_path):
    net = dynact.bake(_mlp())
    session = _onnx_run(net, _x(n=8), tmp_path / "mlp.onnx")
    for n in (8, 100):
        x = _x(n=n)
        with torch.no_grad():
            want = net(x)
        (got,) = session.run(None, {"x": x.numpy()})
        assert _close(torch.from_numpy(got), want, 1e-4)


def test_baked_tiny_gpt2_exports_to_onnx_and_torch_export(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
                     use_cache=False)
    model = GPT2LMHeadModel(cfg).eval()
    dynact.swap_activations(model, "gelu_new", "eafo")
    model.transformer.h[1].mlp.act = CRReLU(eps=-0.3)
    with torch.no_grad():
        model.transformer.h[0].mlp.act.s.mul_(-4.0)
        model.transformer.h[0].mlp.act.eps.fill_(0.5)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits

    class Logits(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits

    wrapped = Logits(dynact.bake(model)).eval()
    assert type(model.transformer.h[0].mlp.act.base).__name__ == "NewGELUActivation"
    assert not hasattr(model.config, "dynact")  # a saved config no longer claims dynamic layers
    with torch.no_grad():
        assert _close(wrapped(ids), want, 1e-5)
    program = torch.export.export(wrapped, (ids,))
    assert _no_dynact_ops(program.graph_module) == []
    with torch.no_grad():
        assert _close(program.module()(ids), want, 1e-5)
        torch.onnx.export(wrapped, (ids,), str(tmp_path / "gpt2.onnx"), input_names=["input_ids"], dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "gpt2.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids.numpy()})
    assert _close(torch.from_numpy(got), want, 1e-4)
