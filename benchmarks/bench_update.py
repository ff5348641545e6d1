"""What ActivationOptimizer's sampling and updates cost as a model gets deeper.

The model is ``--blocks`` blocks of ``Linear(width, width)`` + ``GELU``, converted to
``EAFOActivation`` by the plugin (``every_n_steps=10``, defaults otherwise), batch ``--batch``,
one torch thread. Two figures, each from arms interleaved in one run so that a shared machine's
load hits both alike:

- ``sampled_step``: a training step (forward, backward, SGD) with the hooks sampling against the
  same step with them idle, step by step in turns; the difference per layer is what sampling
  costs (median over ``--steps`` pairs);
- ``update``: one update of all layers after a full window (``window`` forwards), median over
  ``--updates`` updates, with the per-layer figure, and every update's time in order
  (``each_update_ms``, the first included): an update that re-fits grids takes the one-layer
  path and shows there.

Prints JSON. Run it against two checkouts (``PYTHONPATH=<checkout> python ...``) to compare them.

    python benchmarks/bench_update.py --blocks 48
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

import dynact
from dynact import ActivationOptimizer
from dynact.kernels import dispatch


def _model(blocks: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(blocks) for m in (nn.Linear(width, width), nn.GELU())])


def _clear(act_opt: ActivationOptimizer) -> None:
    """Forget what the hooks sampled (both the buffered design and the binning-in-the-hook one)."""
    bank = getattr(act_opt, "_bank", None)
    if bank is not None:
        bank.clear()
    for layer in act_opt._layers.values():
        getattr(layer, "_estimator", layer.estimator).reset()
        layer.extrema = None


def sampled_step(act_opt, model, opt, x, steps: int) -> dict:
    def step(sample: bool) -> float:
        act_opt._collecting = sample
        start = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        took = time.perf_counter() - start
        _clear(act_opt)
        return took

    for _ in range(3):
        step(True), step(False)
    pairs = [(step(True), step(False)) for _ in range(steps)]
    on, off = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    diff = statistics.median(p[0] - p[1] for p in pairs)
    return {"sampling_ms": on * 1e3, "idle_ms": off * 1e3, "difference_ms": diff * 1e3,
            "per_layer_us": diff / len(act_opt.layer_names) * 1e6}


def update(act_opt, model, x, updates: int) -> dict:
    times = []
    for k in range(updates + 1):
        _clear(act_opt)
        act_opt._collecting = True
        with torch.no_grad():
            for _ in range(act_opt.window):
                model(x * (1 + 0.01 * k))
        act_opt._collecting = False
        start = time.perf_counter()
        act_opt._update_all()
        times.append(time.perf_counter() - start)
    took = statistics.median(times[1:])  # the first builds caches
    return {"update_ms": took * 1e3, "per_layer_ms": took / len(act_opt.layer_names) * 1e3,
            "each_update_ms": [round(t * 1e3, 1) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--updates", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The C++ operator (the eager spline and the hooks' sampling) from the start, as in a long run.
    op = dispatch.torch_op(wait=True)
    model = _model(args.blocks, args.width)
    act_opt = ActivationOptimizer(model, every_n_steps=10, convert=(nn.GELU,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(1))
    result = {
        "dynact": dynact.__file__, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "blocks": args.blocks, "width": args.width, "batch": args.batch, "window": act_opt.window,
        "sample_size": act_opt.sample_size,
        "eafo_float32_cpu_calls": "dynact_op::spline" if op is not None else "FusedSpline (Python)",
        "sampled_step": sampled_step(act_opt, model, opt, x, args.steps),
        "update": update(act_opt, model, x, args.updates),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
