"""Every GPU-only test and benchmark of dynact in one call, one JSON out (at most ~10 minutes).

For whoever has a GPU for a few minutes: run it from the repository root and send back the
JSON; the README's GPU figures come from it.

    python benchmarks/gpu_check.py                    # writes gpu_check.json
    python benchmarks/gpu_check.py --out /tmp/h200.json --quick

Stages, each in its own process with its own time limit (a stage that fails or runs out of
time is recorded as such and the next one runs):

1. ``pytest -k "cuda or gpu"`` over ``tests/``: the fused Triton kernels against the reference
   path (fp32, bf16, fp16; values, grad_x, grad_eps), determinism, autocast + torch.compile,
   the spline and the density estimators on CUDA, ViT-Tiny training in bf16.
2. ``bench_activation.py --device cuda --dtype bfloat16 --impls``: forward+backward time of
   GELU, ReLU, CRReLU and EAFOActivation (fused and reference paths), eager and compiled,
   ratios to GELU.
3. ``bench_callback.py --accelerator gpu --precision bf16-mixed``: ViT-Tiny step time with
   GELU, ReLU, CRReLU, EAFOActivation and the ReLU model with EAFOCallback at every_n_steps
   50 and 10, ratios to the GELU model.
4. ``bench_depth.py --device cuda --dtype bfloat16``: the deep, narrow model (12 and 48 blocks
   of Linear(256, 256) + GELU) with GELU, the converted EAFOActivation and ActivationOptimizer
   every 100 and 10 steps, ratios to the GELU model; and ``--sync-check``: the plugin's steps
   without an update under ``torch.cuda.set_sync_debug_mode("error")``, which must never
   synchronise with the host.

Without a CUDA device it prints that it skipped and exits 0.

The JSON holds the GPU's name, the date, the versions, each stage's result and time, and a
``summary`` with the two figures the issue asks for next to their goals.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], limit: float) -> dict:
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, env=env)
        out = {"returncode": proc.returncode, "stdout": proc.stdout, "stderr_tail": proc.stderr[-3000:]}
    except subprocess.TimeoutExpired as err:
        out = {"returncode": None, "timed_out": True, "stdout": (err.stdout or b"").decode(errors="replace")
               if isinstance(err.stdout, bytes) else (err.stdout or "")}
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["command"] = " ".join(cmd)
    return out


def _json_from(stdout: str):
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        return json.loads(stdout[start:])
    except json.JSONDecodeError:
        return None


def _depth_summary(depth: dict | None, sync: dict | None) -> dict:
    """The deep model's ratios to the GELU model and the sync check's verdict."""
    out: dict = {}
    try:
        for d, run in depth["depths"].items():
            for arm in ("eafo_static", "plugin_n100", "plugin_n10"):
                out[f"depth{d}_{arm}_over_gelu"] = run["arms"][arm]["ratio_wall"]
        out["goal_depth48"] = "eafo_static <= 1.08, plugin_n100 <= 1.10, plugin_n10 <= 1.30"
    except (KeyError, TypeError):
        out["bench_depth"] = "no result"
    try:
        out["steps_without_update_synchronise"] = not all(r["ok"] for r in sync["sync_check"])
        out["sync_check"] = [{k: r[k] for k in ("depth", "steps_checked", "synchronising_steps", "first_error")}
                             for r in sync["sync_check"]]
    except (KeyError, TypeError):
        out["sync_check"] = "no result"
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="shorter benchmarks (about 3 minutes in all)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device visible"}))
        return {"skipped": "no CUDA device visible"}
    try:
        import triton

        triton_version = triton.__version__
    except Exception as err:  # reported; the tests then show the fallback
        triton_version = f"unavailable ({type(err).__name__})"
    py = sys.executable
    report: dict = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "stages": {},
    }
    quick = args.quick

    # 1. GPU-only tests (about a minute; the first Triton compilations are most of it).
    tests = _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or gpu", "tests/"], limit=150)
    tail = tests["stdout"].strip().splitlines()[-1:] if tests.get("stdout") else []
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", " ".join(tail))}
    tests["counts"] = counts
    tests["stdout"] = tests["stdout"][-6000:]
    report["stages"]["tests"] = tests

    # 2. The activation alone, bf16, eager and compiled.
    act = _run([py, "benchmarks/bench_activation.py", "--device", "cuda", "--dtype", "bfloat16", "--impls",
                "--batch", "256", "--repeats", "30" if quick else "100", "--warmup", "5"], limit=120)
    act["result"] = _json_from(act.pop("stdout", ""))
    report["stages"]["bench_activation"] = act

    # 3. ViT-Tiny training steps, bf16 mixed precision.
    steps, rounds = ("60", "1") if quick else ("110", "2")
    cb = _run([py, "benchmarks/bench_callback.py", "--accelerator", "gpu", "--precision", "bf16-mixed",
               "--batch", "256", "--steps", steps, "--rounds", rounds, "--warmup", "10"], limit=200)
    cb["result"] = _json_from(cb.pop("stdout", ""))
    report["stages"]["bench_callback"] = cb

    # 4. The deep, narrow model in bf16, and the check that steps without an update never synchronise.
    depth = _run([py, "benchmarks/bench_depth.py", "--device", "cuda", "--dtype", "bfloat16",
                  "--steps", "110" if quick else "210", "--call-repeats", "10" if quick else "30"], limit=240)
    depth["result"] = _json_from(depth.pop("stdout", ""))
    report["stages"]["bench_depth"] = depth
    sync = _run([py, "benchmarks/bench_depth.py", "--device", "cuda", "--dtype", "bfloat16", "--sync-check"],
                limit=120)
    sync["result"] = _json_from(sync.pop("stdout", ""))
    report["stages"]["sync_check"] = sync

    summary: dict = {"tests": counts}
    summary.update(_depth_summary(depth.get("result"), sync.get("result")))
    try:
        eager = act["result"]["results"]["eager"]
        summary["eafo_fwd_bwd_eager_over_gelu"] = eager["EAFOActivation"]["ratio_to_gelu"]
        summary["crrelu_fwd_bwd_eager_over_gelu"] = eager["CRReLU"]["ratio_to_gelu"]
        compiled = act["result"]["results"]["compiled"]
        summary["eafo_fwd_bwd_compiled_over_gelu"] = compiled["EAFOActivation"]["ratio_to_gelu"]
        summary["goal_eafo_fwd_bwd"] = "<= 1.2 (goal 1.0)"
    except (KeyError, TypeError):
        summary["bench_activation"] = "no result"
    try:
        res = cb["result"]["results"]
        summary["vit_step_eafo_n50_over_gelu"] = res["eafo_n50"]["ratio_to_gelu_mean"]
        summary["vit_step_eafo_n10_over_gelu"] = res["eafo_n10"]["ratio_to_gelu_mean"]
        summary["vit_step_crrelu_over_gelu"] = res["crrelu"]["ratio_to_gelu_mean"]
        summary["vit_step_eafo_n50_over_relu"] = res["eafo_n50"]["ratio_to_relu_mean"]
        summary["goal_vit_step_n50"] = "<= 1.05 (goal 1.02)"
    except (KeyError, TypeError):
        summary["bench_callback"] = "no result"
    report["summary"] = summary

    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"gpu_check: wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
