"""``dynact dpo``: the paper's LLM experiment (GPT-2, SFT then DPO, CRReLU against GELU).

Every arm x beta x seed: SFT on the chosen responses, then DPO against a frozen copy of the SFT
model, with TRL's trainers; a report in the shape of the paper's Table 4. See
:mod:`dynact.experiments.dpo` for what each arm is and what lands in ``--out``.

Exit codes (as ``dynact compare``'s): 0 done; 1 some runs failed (recorded, redone by
``--resume``); 2 bad input or an unusable ``--out``, found before any training; 3 a file could
not be written mid-sweep (finished runs kept); 130 interrupted (finished runs kept).
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

from dynact.experiments.dpo import runs, sweep
from dynact.experiments.dpo.data import DATASETS
from dynact.experiments.dpo.settings import PAPER_BETAS, DPOSettings
from dynact.experiments.sweep.engine import run_command

__all__ = ["main", "build_parser"]

_DESCRIPTION = (
    "Fine-tune GPT-2 with SFT then DPO for each activation (arm), beta and seed, and compare the "
    "arms by evaluation reward margin, accuracy and loss (the paper's Table 4). The default (--data offline) "
    "is a 2-minute smoke check on CPU with a tiny random GPT-2; it says nothing about the paper's claim."
)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _seeds(text: str) -> list[int]:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seeds, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--seeds must be >= 1, got {n}")
    return list(range(n))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynact dpo", description=_DESCRIPTION)
    p.add_argument("--data", default="offline",
                   help=f"{', '.join(DATASETS)} or a .jsonl file of prompt/chosen/rejected")
    p.add_argument("--model", default=None, help="tiny (random, built in code) or a causal LM name or folder "
                   "(gpt2); default: tiny offline, gpt2 otherwise")
    p.add_argument("--arms", default="gelu,crrelu,eafo", help="activations: gelu (GPT-2's own, the control), eafo "
                   "(dynamic, GELU base), or any registry name swapped in (crrelu, relu, silu, ...); "
                   "default: gelu,crrelu,eafo")
    p.add_argument("--betas", type=_floats, default=list(PAPER_BETAS),
                   help="DPO penalties, comma-separated, each > 0 (default: the paper's 0.1,1,2,5)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1], help="seeds per arm and beta: 0 .. N-1 (default: 2)")
    p.add_argument("--batch-size", type=int, default=None, help="total batch, split over the processes (paper: 32)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (paper: 5e-7, the DPO reference's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (paper: 150)")
    p.add_argument("--max-grad-norm", type=float, default=10.0, help="gradient clipping (default: 10, the paper's)")
    p.add_argument("--max-length", type=int, default=512, help="tokens of prompt + response (default: 512)")
    p.add_argument("--max-prompt-length", type=int, default=256, help="tokens of a prompt (default: 256)")
    p.add_argument("--truncate-prompts", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the last --max-prompt-length tokens of longer prompts (default: on for hh/shp; "
                   "otherwise a longer prompt is an error)")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="SFT optimizer steps (default: offline 16, else one epoch)")
    p.add_argument("--dpo-steps", type=int, default=None,
                   help="DPO optimizer steps (default: offline 8, else one epoch)")
    p.add_argument("--eval-every", type=int, default=None, help="DPO steps between evaluations")
    p.add_argument("--eval-rows", type=int, default=None,
                   help="evaluation pairs used (offline 64, hub sets 256 as in the DPO reference)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many rows of each split")
    p.add_argument("--every-n-steps", type=int, default=None, help="optimizer steps between activation updates "
                   "and measurements (offline 4, else 100)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (offline: 1)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision on GPUs")
    p.add_argument("--out", default="dpo_out", help="output folder (default: dpo_out)")
    p.add_argument("--resume", action="store_true", help="continue a sweep in --out, skipping finished runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per finished run)")
    return p


def settings_from_args(args: argparse.Namespace) -> DPOSettings:
    """Checked settings (``ValueError`` for bad input)."""
    return DPOSettings(
        data=args.data, model=args.model, arms=args.arms.split(","), betas=args.betas, seeds=args.seeds,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
        max_length=args.max_length, max_prompt_length=args.max_prompt_length, truncate_prompts=args.truncate_prompts,
        sft_steps=args.sft_steps, dpo_steps=args.dpo_steps, eval_every=args.eval_every, eval_rows=args.eval_rows,
        limit=args.limit, every_n_steps=args.every_n_steps, threads=args.threads, bf16=args.bf16, out=args.out,
    ).resolve()


def main(argv: Optional[list[str]] = None) -> int:
    """``dynact dpo``: check everything, run the sweep, write the report; return the exit code."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_in)
    missing = [m for m in ("transformers", "trl", "datasets", "tokenizers", "accelerate") if find_spec(m) is None]
    if missing:
        parser.error(f"needs {', '.join(missing)}: pip install 'dynact[hf]'")
    start = time.perf_counter()
    prep = None
    try:
        settings = settings_from_args(args)
        if not args.resume or not _all_done(settings):
            with runs.quiet(settings.threads):
                prep = runs.prepare(settings)  # bad data fails here, before any training
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    command = "dynact dpo " + " ".join(args_in)
    out = Path(settings.out)
    results, code = run_command(
        "dynact dpo", parser, command, out,
        run=lambda: sweep.run_sweep(settings, resume=args.resume, progress=not args.no_progress, command=command,
                                    prep=prep),
        done=lambda: sum(1 for r in sweep.load_records(settings).values() if r["status"] == "ok"))
    if results is not None and sweep.is_main_process():
        print(f"report: {out / 'report.md'}  results: {out / 'results.json'}  ({time.perf_counter() - start:.0f} s)")
    return code


def _all_done(settings: DPOSettings) -> bool:
    records = sweep.load_records(settings)
    return all(records.get((a, b, s), {}).get("status") == "ok"
               for a in settings.arms for b in settings.betas for s in settings.seeds)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
