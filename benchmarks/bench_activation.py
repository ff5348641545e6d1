"""Forward+backward time of EAFOActivation against nn.GELU, nn.ReLU and CRReLU.

Measures one forward and one backward pass (input and ``eps`` gradients) at ViT-Tiny's MLP
activation shape (batch x 65 tokens x 768 hidden), eager and compiled, and prints JSON with
each activation's median time and its ratio to ``nn.GELU`` measured in the same run.
On CUDA the default dtype is bfloat16, on CPU float32.

Usage::

    python benchmarks/bench_activation.py                    # 64 x 65 x 768, eager + compiled
    python benchmarks/bench_activation.py --batch 32 --no-compile --impls
    python benchmarks/bench_activation.py --threads 1 --keep-freed-memory   # without page faults
    python benchmarks/bench_activation.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
from torch import nn

from dynact.activations import CRReLU
from dynact.kernels import dispatch as _kernels
from dynact.spline import EAFOActivation


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(fn, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    fn(x).backward(grad)


def _time_round_robin(fns: dict, x: torch.Tensor, grad: torch.Tensor, warmup: int, repeats: int):
    """Median seconds of ``fn(x).backward(grad)`` for each function, and of its first call.

    The functions take turns within every repeat, so a busy machine slows them alike and the
    ratios stay meaningful even when the absolute times drift. The first call includes any
    compilation (``torch.compile``'s, or building dynact's kernels if not cached yet).
    """
    first: dict[str, float] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        _fwd_bwd(fn, x, grad)
        _sync(x.device)
        first[name] = time.perf_counter() - start
        for _ in range(warmup):
            _fwd_bwd(fn, x, grad)
    _sync(x.device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            _fwd_bwd(fn, x, grad)
            _sync(x.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}, first, times


def _kernel_build_seconds() -> dict[str, float]:
    """Seconds to build dynact's CPU kernels from scratch (what a first run on a machine pays
    once) and to load them from the cache (what every later process pays)."""
    import os

    saved = os.environ.get("DYNACT_CACHE")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["DYNACT_CACHE"] = tmp
            _kernels._reset()
            start = time.perf_counter()
            ok = _kernels._load() is not None
            build = time.perf_counter() - start
            _kernels._reset()
            start = time.perf_counter()
            _kernels._load()
            load = time.perf_counter() - start
    finally:
        if saved is None:
            os.environ.pop("DYNACT_CACHE", None)
        else:
            os.environ["DYNACT_CACHE"] = saved
        _kernels._reset()
    return {"built": ok, "build_s": round(build, 3), "load_from_cache_s": round(load, 4)}


class _Path(nn.Module):
    """Runs ``act`` with dynact's kernel mode forced (the backward follows the forward's choice)."""

    def __init__(self, act: nn.Module, mode: str) -> None:
        super().__init__()
        self.act, self.mode = act, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, _kernels.MODE = _kernels.MODE, self.mode
        try:
            return self.act(x)
        finally:
            _kernels.MODE = before


def _keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks instead of returning them to the system.

    By default every output tensor of this size is a fresh ``mmap`` whose pages fault in on
    first touch, and in a small benchmark that costs more than the activation itself (and
    varies with the order of the arms). A long training run mostly reuses its heap; this
    measures the kernels without the page faults. Returns False where not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        mmap = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        return bool(mmap) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def _activations(device: torch.device, impls: bool, compiled: bool) -> dict[str, nn.Module]:
    acts: dict[str, nn.Module] = {
        "GELU": nn.GELU(),
        "ReLU": nn.ReLU(),
        "CRReLU": CRReLU(),
        "EAFOActivation": EAFOActivation("relu"),
    }
    if impls and not compiled:
        # The slower eager paths, forced: the autograd functions over tensor ops (taken where the
        # fused kernels cannot be built) and the plain ops (what torch.compile traces).
        for mode in ("reference", "ops"):
            acts[f"CRReLU[{mode}]"] = _Path(CRReLU(), mode)
            acts[f"EAFOActivation[{mode}]"] = _Path(EAFOActivation("relu"), mode)
    return {k: v.to(device) for k, v in acts.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=65)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None,
                        help="float32, float16 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    parser.add_argument("--impls", action="store_true", help="also time the reference and plain-ops eager paths")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU: glibc malloc keeps freed blocks (no page faults per output tensor)")
    args = parser.parse_args(argv)
    allocator = "default"
    if args.keep_freed_memory:
        allocator = "malloc keeps freed memory" if _keep_freed_memory() else "default (mallopt unavailable)"

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    shape = (args.batch, args.tokens, args.hidden)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    results: dict[str, dict] = {}
    for mode in modes:
        acts = _activations(device, args.impls, mode == "compiled")
        fns = {name: torch.compile(act, fullgraph=True) if mode == "compiled" else act for name, act in acts.items()}
        seconds, first, samples = _time_round_robin(fns, x, grad, args.warmup, args.repeats)
        ref = seconds["GELU"]
        results[mode] = {
            name: {
                "ms": round(1e3 * t, 3),
                "ratio_to_gelu": round(t / ref, 3),
                # Ratio of the repeat-by-repeat pairs (same moment of the machine's load): the
                # interquartile range of these is the noise of the ratio.
                "ratio_to_gelu_iqr": [round(q, 3) for q in _quartiles(
                    [a / b for a, b in zip(samples[name], samples["GELU"], strict=True)])],
                "first_call_s": round(first[name], 3),
            }
            for name, t in seconds.items()
        }

    report = {
        "benchmark": "activation forward+backward (input and eps grads)",
        "fused_kernels": "cuda (triton)" if device.type == "cuda" and _kernels.available(x) else (
            "cpu (c++)" if device.type == "cpu" and _kernels.available(x) else "unavailable: reference path"),
        "cpu_kernel_build": _kernel_build_seconds() if device.type == "cpu" else None,
        "allocator": allocator,
        "shape": list(shape),
        "dtype": dtype_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
