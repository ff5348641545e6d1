"""Speed and accuracy of dynact's density estimators against numpy, scipy and KDEpy.

For each distribution (N(0,1), Laplace(0,1), a two-component normal mixture) and sample
size, every method estimates the density on the same 512-point grid over [-8, 8]; the
script prints JSON with wall-clock times (median and min over repeats, one warm-up call
first) and the integrated squared error (ISE) against the true density, plus ratios
measured in the same run. dynact's times cover ``update`` (all values in one call) plus
``compute``, from a fresh estimator; the others cover fit plus evaluation on the grid.
For dynact the worst error of ``dp`` on abs(x) <= 4 is reported too (normal, mixture).

    python benchmarks/bench_density.py                      # n = 1e5 and 1e6, threads 1 and 2
    python benchmarks/bench_density.py --n 100000 --repeats 3

scipy's ``gaussian_kde`` evaluates N x B kernel terms (minutes at 1e6 points), so it only
runs up to ``--scipy-max-n``. KDEpy's ``FFTKDE`` is skipped if it is not installed; it
needs a grid around all the data, so it gets its own 512-point grid and its estimate is
interpolated onto ours for the error. With CUDA available the dynact estimators also run
on the GPU (with and without ``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
from scipy import stats

from dynact.density import KDE, Histogram

LO, HI = -8.0, 8.0


def _mixture_sample(rng, n):
    first = rng.random(n) < 0.6
    return np.where(first, rng.normal(-1.5, 0.5, n), rng.normal(1.5, 1.0, n))


def _mixture_pdf(x):
    return 0.6 * stats.norm.pdf(x, -1.5, 0.5) + 0.4 * stats.norm.pdf(x, 1.5, 1.0)


def _mixture_dpdf(x):
    left = 0.6 * stats.norm.pdf(x, -1.5, 0.5) * -(x + 1.5) / 0.25
    return left + 0.4 * stats.norm.pdf(x, 1.5, 1.0) * -(x - 1.5)


# name: (sampler, pdf, derivative of the pdf or None)
DISTRIBUTIONS = {
    "normal": (lambda rng, n: rng.standard_normal(n), stats.norm.pdf, lambda x: -x * stats.norm.pdf(x)),
    "laplace": (lambda rng, n: rng.laplace(0.0, 1.0, n), stats.laplace.pdf, None),  # p' jumps at 0
    "mixture": (_mixture_sample, _mixture_pdf, _mixture_dpdf),
}

ESTIMATORS = {
    "dynact.Histogram": lambda bins, **kw: Histogram(LO, HI, bins, **kw),
    "dynact.KDE": lambda bins, **kw: KDE(LO, HI, bins, **kw),  # Silverman's rule
    "dynact.KDE(bandwidth='scott')": lambda bins, **kw: KDE(LO, HI, bins, bandwidth="scott", **kw),
}


def _timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None):
    out = fn()  # warm-up (and the result whose error is reported)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return out, {"ms_median": round(statistics.median(times), 4), "ms_min": round(min(times), 4)}


def _errors(grid, h, pdf, p, dpdf=None, dp=None) -> dict:
    out = {"ise": float(np.sum((p - pdf(grid)) ** 2) * h)}
    if dp is not None and dpdf is not None:
        inner = np.abs(grid) <= 4
        out["dp_max_err_abs_x_le_4"] = float(np.max(np.abs(dp - dpdf(grid))[inner]))
    return out


def _thread_probe(threads: int) -> dict:
    """What torch's intra-op threads cost on this machine for a tiny and a mid-size op."""
    torch.set_num_threads(threads)
    small, mid = torch.rand(514, dtype=torch.float64), torch.rand(100_000)
    _, exp_small = _timed(lambda: torch.exp(small), 30)
    _, mul_mid = _timed(lambda: mid * 2.0, 30)
    return {"threads": threads, "exp_514_float64": exp_small, "mul_1e5_float32": mul_mid}


def _dynact_rows(x, bins, grid, h, pdf, dpdf, repeats, device="cpu", sync=lambda: None) -> dict:
    """Time and score every dynact estimator on ``x`` (already on ``device``)."""
    rows = {}
    for label, make in ESTIMATORS.items():
        def full(make=make):
            est = make(bins, device=device)
            est.update(x)
            return est.compute()

        d, tm = _timed(full, repeats, sync)
        est = make(bins, device=device)
        _, upd = _timed(lambda est=est: est.update(x), repeats, sync)
        _, comp = _timed(est.compute, repeats, sync)
        err = _errors(grid, h, pdf, d.p.cpu().numpy(), dpdf, d.dp.cpu().numpy())
        rows[label] = {"method": label, **tm, "update_ms_median": upd["ms_median"],
                       "compute_ms_median": comp["ms_median"], **err}
    return rows


def _ratios(dyn: dict, ref: dict) -> dict:
    """Speedups (> 1: dynact faster) and ISE ratios (< 1: dynact more accurate)."""
    kde, scott, hist = dyn["dynact.KDE"], dyn["dynact.KDE(bandwidth='scott')"], dyn["dynact.Histogram"]
    out = {"histogram_speedup_vs_numpy": round(ref["numpy"]["ms_median"] / hist["ms_median"], 2)}
    for key, other in (("scipy", "scipy"), ("kdepy", "kdepy")):
        if other in ref:
            out[f"kde_speedup_vs_{key}"] = round(ref[other]["ms_median"] / kde["ms_median"], 2)
            out[f"kde_ise_over_{key}_ise"] = round(kde["ise"] / ref[other]["ise"], 3)
            out[f"kde_scott_speedup_vs_{key}"] = round(ref[other]["ms_median"] / scott["ms_median"], 2)
            out[f"kde_scott_ise_over_{key}_ise"] = round(scott["ise"] / ref[other]["ise"], 3)
    return out


def run(args) -> dict:
    rng = np.random.default_rng(args.seed)
    bins = args.bins
    h = (HI - LO) / bins
    grid = LO + h * (np.arange(bins) + 0.5)
    try:
        from KDEpy import FFTKDE
    except ImportError:  # optional dependency: pip install KDEpy
        FFTKDE = None
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    results, ratios, skipped = [], [], []
    if FFTKDE is None:
        skipped.append("KDEpy FFTKDE: not installed")
    if not cuda:
        skipped.append("GPU: no CUDA device")

    for name, (sample, pdf, dpdf) in DISTRIBUTIONS.items():
        for n in args.n:
            x64 = sample(rng, n)
            x32 = torch.from_numpy(x64).float()  # what a training hook sees
            row = {"dist": name, "n": n}

            ref = {}
            counts_to_p = 1.0 / (n * h)
            p, tm = _timed(lambda x64=x64, counts_to_p=counts_to_p:
                           np.histogram(x64, bins=bins, range=(LO, HI))[0] * counts_to_p, args.repeats)
            ref["numpy"] = {"method": "numpy.histogram", **tm, **_errors(grid, h, pdf, p)}
            if n <= args.scipy_max_n:  # Scott's factor, scipy's default
                p, tm = _timed(lambda x64=x64: stats.gaussian_kde(x64)(grid), min(args.repeats, 3))
                ref["scipy"] = {"method": "scipy.gaussian_kde", **tm, **_errors(grid, h, pdf, p)}
            else:
                skipped.append(f"scipy.gaussian_kde at {name} n={n}: O(N B) direct sum, over a minute")
            if FFTKDE is not None:  # Silverman's rule, like dynact.KDE's default
                def kdepy(x64=x64):
                    return FFTKDE(kernel="gaussian", bw="silverman").fit(x64).evaluate(bins)

                (kx, ky), tm = _timed(kdepy, args.repeats)
                p = np.interp(grid, kx, ky, left=0.0, right=0.0)
                ref["kdepy"] = {"method": "KDEpy.FFTKDE", **tm, **_errors(grid, h, pdf, p)}
            results += [{**row, "device": "cpu", **r} for r in ref.values()]

            for threads in args.threads:
                torch.set_num_threads(threads)
                dyn = _dynact_rows(x32, bins, grid, h, pdf, dpdf, args.repeats)
                results += [{**row, "device": "cpu", "torch_threads": threads, **r} for r in dyn.values()]
                ratios.append({**row, "torch_threads": threads, **_ratios(dyn, ref)})
            torch.set_num_threads(args.threads[0])

            if cuda:
                xg = x32.cuda()
                for det in (False, True):
                    old = torch.are_deterministic_algorithms_enabled()
                    torch.use_deterministic_algorithms(det)
                    try:
                        dyn = _dynact_rows(xg, bins, grid, h, pdf, dpdf, args.repeats, "cuda", torch.cuda.synchronize)
                    finally:
                        torch.use_deterministic_algorithms(old)
                    gpu = torch.cuda.get_device_name()
                    results += [{**row, "device": gpu, "deterministic": det, **r} for r in dyn.values()]

    return {
        "config": {
            "command": " ".join(["python", "benchmarks/bench_density.py", *args.argv]),
            "grid": {"lo": LO, "hi": HI, "bins": bins},
            "n": args.n,
            "torch_threads": args.threads,
            "repeats": args.repeats,
            "timing": "wall clock per full estimate: median and min of repeats after one warm-up",
            "dynact_note": "dynact runs its CPU work with one intra-op thread whatever torch_threads says",
            "torch": torch.__version__,
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        },
        "thread_probe": [_thread_probe(t) for t in args.threads],
        "results": results,
        "ratios": ratios,
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=lambda s: int(float(s)), nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--bins", type=int, default=512)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread settings")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scipy-max-n", type=lambda s: int(float(s)), default=100_000)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = argv
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
