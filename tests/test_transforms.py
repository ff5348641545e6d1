"""CRReLU and EAFOActivation under PyTorch's own program transforms.

``torch.jit.trace``: a saveable module that runs without dynact, with the eager outputs.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from dynact import _kernels
from dynact.activations import CRReLU
from dynact.spline import EAFOActivation

EPS = 0.3


@pytest.fixture(autouse=True)
def _restore_mode():
    mode = _kernels.MODE
    yield
    _kernels.MODE = mode


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
