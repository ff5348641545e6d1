"""What dynact costs a deep, narrow model, where a fixed cost per layer weighs most.

The model: ``depth`` blocks of ``Linear(256, 256)`` + ``GELU``, batch 128, SGD, random data,
trained in these arms:

===============  ==========================================================================
``gelu``         the GELU model, no dynact (the reference of every ratio)
``eafo_static``  converted to ``EAFOActivation`` by ``ActivationOptimizer``, which is then
                 removed: the converted activation's own cost
``plugin_n100``  ``ActivationOptimizer(every_n_steps=100, convert=(nn.GELU,))``, defaults otherwise
``plugin_n10``   ``ActivationOptimizer(every_n_steps=10, convert=(nn.GELU,))``, defaults otherwise
===============  ==========================================================================

For each depth (default 12 and 48) all arms are built, then trained one step each in turn
(the order rotating every step), so a shared machine's load falls on every arm alike; the first
``--warmup`` steps are left out. Each step is timed by the wall clock and by the thread's CPU
time (with one torch thread the step runs on the calling thread, so the CPU time is the step's
work without the time other processes held the core). Ratios are of mean step times (updates
included) to the GELU arm's. A per-call micro-benchmark at ``128 x 256`` (forward, and forward
plus backward, GELU against ``EAFOActivation(base=GELU)``, ``EAFOActivation(base=ReLU)`` and
``CRReLU``, interleaved likewise) comes first, then forward plus backward on an NCHW input
against the same input in channels_last. Prints JSON.

    python benchmarks/bench_depth.py                          # CPU, float32, one thread
    python benchmarks/bench_depth.py --depths 48 --steps 310  # three updates at every_n_steps=100
    python benchmarks/bench_depth.py --device cuda --dtype bfloat16
    python benchmarks/bench_depth.py --depths 12 --compile --no-per-call --steps 230 --warmup 30
    python benchmarks/bench_depth.py --device cuda --dtype bfloat16 --sync-check   # GPU: see below

``--sync-check`` (CUDA) trains the ``plugin_n10`` arm under
``torch.cuda.set_sync_debug_mode("error")`` on every step without an update, and reports the
steps that synchronised with the host (none is the goal) and the first error's message.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, run from anywhere

from bench_activation import _keep_freed_memory, _quartiles, _sync  # noqa: E402

from dynact import ActivationOptimizer, CRReLU, EAFOActivation  # noqa: E402
from dynact.kernels import dispatch  # noqa: E402

WIDTH, BATCH = 256, 128
#: arm -> every_n_steps of its ActivationOptimizer (None: no dynact; 0: converted, then removed)
ARMS: dict[str, Optional[int]] = {"gelu": None, "eafo_static": 0, "plugin_n100": 100, "plugin_n10": 10}


def _model(depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
    return nn.Sequential(*layers)


class _Arm:
    """One arm's model, optimizer and plugin; :meth:`step` is one training step."""

    def __init__(self, name: str, depth: int, device: torch.device, dtype: torch.dtype, compile: bool = False) -> None:
        self.name = name
        self.model = _model(depth).to(device=device, dtype=dtype)
        every = ARMS[name]
        self.plugin = None
        if every is not None:
            # convert=GELU: the default converts only ReLU, and would leave this model measured
            # but unchanged.
            plugin = ActivationOptimizer(self.model, every_n_steps=max(every, 1), convert=(nn.GELU,))
            if every == 0:
                plugin.remove()
            else:
                self.plugin = plugin
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)  # after the plugin: its eps reach SGD
        self.run = torch.compile(self.model) if compile else self.model  # after the conversion
        g = torch.Generator().manual_seed(1)
        self.batches = [torch.randn(BATCH, WIDTH, generator=g).to(device=device, dtype=dtype) for _ in range(4)]
        self.target = torch.randn(BATCH, WIDTH, generator=g).to(device=device, dtype=dtype)
        self.count = 0
        kinds = {type(m).__name__ for m in self.model}
        assert (every is None) == ("EAFOActivation" not in kinds), f"{name}: {kinds}"

    def step(self) -> None:
        x = self.batches[self.count % len(self.batches)]
        self.count += 1
        self.opt.zero_grad(set_to_none=True)
        loss = (self.run(x) - self.target).pow(2).mean()
        loss.backward()
        self.opt.step()
        if self.plugin is not None:
            self.plugin.step()

    def updates_at(self, step: int) -> bool:
        """Whether training step ``step`` (0-based) ends with the plugin's update."""
        return self.plugin is not None and (step + 1) % self.plugin.every_n_steps == 0


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.thread_time() - cpu


def _summary(times: dict[str, list[tuple[float, float]]], ref: str) -> dict:
    out = {}
    for name, samples in times.items():
        wall, cpu = [w for w, _ in samples], [c for _, c in samples]
        ref_wall, ref_cpu = [w for w, _ in times[ref]], [c for _, c in times[ref]]
        out[name] = {
            "ms_wall_mean": round(1e3 * statistics.fmean(wall), 3),
            "ms_cpu_mean": round(1e3 * statistics.fmean(cpu), 3),
            "ms_cpu_median": round(1e3 * statistics.median(cpu), 3),
            "ratio_wall": round(statistics.fmean(wall) / statistics.fmean(ref_wall), 4),
            "ratio_cpu": round(statistics.fmean(cpu) / statistics.fmean(ref_cpu), 4),
            "ratio_cpu_median": round(statistics.median(cpu) / statistics.median(ref_cpu), 4),
            # Ratios of the samples taken side by side: their spread is the machine's noise.
            "paired_ratio_cpu_quartiles": [round(q, 4) for q in _quartiles(
                [a / b for a, b in zip(cpu, ref_cpu, strict=True)])],
        }
    return out


def depth_run(depth: int, steps: int, warmup: int, device: torch.device, dtype: torch.dtype,
              names: Optional[list[str]] = None, compile: bool = False) -> dict:
    """The arms (default all) at one depth, interleaved step by step; mean step times and ratios to ``gelu``
    (with ``compile``, every arm's model under ``torch.compile``, the GELU model's too)."""
    arms = [_Arm(name, depth, device, dtype, compile)
            for name in ["gelu"] + [n for n in names or ARMS if n != "gelu"]]
    times: dict[str, list[tuple[float, float]]] = {arm.name: [] for arm in arms}
    update_cpu: dict[str, list[float]] = {arm.name: [] for arm in arms if arm.plugin is not None}
    for step in range(steps):
        shift = step % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            sample = _timed(arm.step, device)
            if step >= warmup:
                times[arm.name].append(sample)
                if arm.updates_at(step):
                    update_cpu[arm.name].append(sample[1])
    result = {"depth": depth, "measured_steps": steps - warmup, "arms": _summary(times, "gelu")}
    for name, cpu in update_cpu.items():
        result["arms"][name]["updates"] = len(cpu)
        result["arms"][name]["update_step_ms_cpu_mean"] = round(1e3 * statistics.fmean(cpu), 2) if cpu else None
    return result


def per_call(device: torch.device, dtype: torch.dtype, repeats: int, inner: int) -> dict:
    """Forward, and forward + backward, of one activation on a ``128 x 256`` input, interleaved.

    Every gradient is set to None before each backward, as ``optimizer.zero_grad()`` does by
    default in a training step. The ``learn_eps=False`` arm has no parameter: against the default
    arm it shows what the learnable ``eps`` costs (its gradient, and the autograd engine's work
    to deliver it), apart from the kernels.
    """
    acts = {"GELU": nn.GELU(), "EAFOActivation(GELU)": EAFOActivation(base=nn.GELU()),
            "EAFOActivation(GELU, learn_eps=False)": EAFOActivation(base=nn.GELU(), learn_eps=False),
            "EAFOActivation(ReLU)": EAFOActivation("relu"), "CRReLU": CRReLU()}
    acts = {k: v.to(device=device, dtype=dtype) for k, v in acts.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, WIDTH, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(BATCH, WIDTH, generator=g).to(device=device, dtype=dtype)

    def forward(act):
        for _ in range(inner):
            act(x)

    params = {act: list(act.parameters()) for act in acts.values()}

    def forward_backward(act):
        for _ in range(inner):
            x.grad = None
            for p in params[act]:
                p.grad = None
            act(x).backward(grad)

    out = {}
    for label, fn in (("forward", forward), ("forward_backward", forward_backward)):
        for act in acts.values():
            fn(act)  # warm-up (and the first call's kernel build)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in acts}
        for r in range(repeats):
            names = list(acts)[r % len(acts):] + list(acts)[:r % len(acts)]
            for name in names:
                wall, cpu = _timed(lambda act=acts[name], fn=fn: fn(act), device)
                times[name].append((wall / inner, cpu / inner))
        summary = _summary(times, "GELU")
        out[label] = {name: {"us_cpu_median": round(1e3 * s["ms_cpu_median"], 2),
                             "ratio_cpu_median": s["ratio_cpu_median"],
                             "paired_ratio_cpu_quartiles": s["paired_ratio_cpu_quartiles"],
                             "ratio_wall": s["ratio_wall"]}
                      for name, s in summary.items()}
    return out


def channels_last(device: torch.device, dtype: torch.dtype, repeats: int, shape=(32, 64, 16, 16)) -> dict:
    """Forward + backward of ``EAFOActivation(base=GELU)`` and ``CRReLU`` on an NCHW input and on
    the same input in channels_last, interleaved; the output's layout is reported too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    inputs = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    out: dict = {}
    for label, act in (("EAFOActivation(GELU)", EAFOActivation(base=nn.GELU())), ("CRReLU", CRReLU())):
        act = act.to(device=device, dtype=dtype)
        runs = {}
        for layout, t in inputs.items():
            t = t.detach().requires_grad_(True)
            g_in = grad.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else grad

            def step(t=t, g_in=g_in, act=act):
                t.grad = None
                act(t).backward(g_in)

            runs[layout] = step
            step()
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for r in range(repeats):
            for layout in list(runs)[r % 2:] + list(runs)[:r % 2]:
                times[layout].append(_timed(runs[layout], device))
        summary = _summary(times, "contiguous")
        kept = act(inputs["channels_last"]).is_contiguous(memory_format=torch.channels_last)
        out[label] = {"shape": list(shape), "output_stays_channels_last": kept,
                      **{f"{k}_ms_cpu_median": v["ms_cpu_median"] for k, v in summary.items()},
                      "channels_last_over_contiguous_cpu_median": summary["channels_last"]["ratio_cpu_median"]}
    return out


def sync_check(depth: int, steps: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Train ``plugin_n10``; every step without an update runs under sync debug mode "error"."""
    arm = _Arm("plugin_n10", depth, device, dtype)
    synchronising: list[int] = []
    first_error = None
    for step in range(steps):
        quiet = step > 0 and not arm.updates_at(step)  # the first step builds and compiles
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")
        try:
            arm.step()
        except RuntimeError as err:  # a synchronisation: the step is broken off, so the run ends here
            synchronising.append(step)
            first_error = str(err)[:2000]
            break
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    ran = synchronising[0] + 1 if synchronising else steps
    checked = sum(1 for s in range(1, ran) if not arm.updates_at(s))
    return {"depth": depth, "dtype": str(dtype).replace("torch.", ""), "steps": steps,
            "steps_checked": checked, "synchronising_steps": synchronising, "first_error": first_error,
            "ok": not synchronising}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="*", default=[12, 48], help="none: the per-call parts only")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="gelu always runs")
    parser.add_argument("--steps", type=int, default=210, help="training steps per arm (>= 100 for an update at n100)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (model and data)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--call-repeats", type=int, default=30, help="rounds of the per-call benchmark")
    parser.add_argument("--no-per-call", action="store_true", help="skip the per-call micro-benchmark")
    parser.add_argument("--compile", action="store_true",
                        help="every arm's model under torch.compile (Inductor), the GELU model's too")
    parser.add_argument("--sync-check", action="store_true",
                        help="CUDA: check that plugin_n10's steps without an update never synchronise")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.sync_check:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise SystemExit("bench_depth: --sync-check needs --device cuda and a GPU")
        report = {"sync_check": [sync_check(d, min(args.steps, 60), device, dtype) for d in args.depths]}
        print(json.dumps(report, indent=2))
        return report
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    allocator = "malloc keeps freed memory" if device.type == "cpu" and _keep_freed_memory() else "default"
    # The float32 CPU calls of EAFOActivation go through the C++ operator once its background
    # build is done (the Python Function before): wait for it, so every step runs the same path.
    operator = "not used"
    if device.type == "cpu" and dtype == torch.float32:
        built = dispatch.torch_op(wait=True) is not None
        operator = "dynact_op::spline" if built else f"the Python Function (operator: {dispatch._op_failure})"
    report: dict = {
        "benchmark": f"{args.depths} x (Linear({WIDTH}, {WIDTH}) + GELU), batch {BATCH}, SGD: step time per arm, "
                     "ratios to the GELU model; arms interleaved step by step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": allocator,
        "eafo_float32_cpu_calls": operator,
        "steps": args.steps,
        "warmup_steps_left_out": args.warmup,
        "compiled": args.compile,
    }
    if not args.no_per_call:
        report["per_call_128x256"] = per_call(device, dtype, args.call_repeats, inner=20)
        report["channels_last_fwd_bwd"] = channels_last(device, dtype, args.call_repeats)
    report["depths"] = {str(d): depth_run(d, args.steps, args.warmup, device, dtype, args.arms, args.compile)
                        for d in args.depths}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
