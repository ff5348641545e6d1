"""Settings of ``dynact dpo``: the paper's recipe, the offline smoke check, and their checks.

The paper's recipe (its appendix E.2, "DPO pipeline"): batch 32, RMSprop, a linear warm-up of
150 steps to a constant learning rate, gradient norm clipped at 10, at most 512 tokens per
prompt + response and 256 per prompt, one epoch of SFT on the preferred responses and one of
DPO. The learning rate's digits did not survive in the paper's text; 5e-7 is the value of the
DPO reference implementation the appendix describes (``config/config.yaml`` of
github.com/eric-mitchell/direct-preference-optimization, ``lr: 5e-7``, beside the same
``warmup_steps: 150``, ``max_grad_norm: 10.0`` and ``optimizer: RMSprop``). The paper trained on
two GPUs with that code's FSDP trainer; here the batch is split over however many processes
``accelerate launch`` starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from dynact.experiments.dpo.data import DATASETS
from dynact.experiments.dpo.models import check_arms

__all__ = ["DPOSettings", "PRESETS", "PAPER_BETAS", "PAPER_LR"]

PAPER_BETAS = (0.1, 1.0, 2.0, 5.0)
PAPER_LR = 5e-7

_PAPER = {
    "model": "gpt2",
    "batch_size": 32,
    "lr": PAPER_LR,
    "warmup_steps": 150,
    "sft_steps": None,  # one epoch
    "dpo_steps": None,
    # The reference evaluates every 20,000 examples (625 steps of 32) on 256 held-out pairs.
    "eval_every": 625,
    "every_n_steps": 100,
    "eval_rows": 256,
    "threads": None,
    "about": "the paper's recipe (appendix E.2) on GPT-2 small",
}

#: ``--data`` -> defaults. ``offline`` is the smoke check: a tiny randomly initialised GPT-2,
#: a tokenizer trained on the spot and a generated preference set; its learning rate is high
#: because the model starts from random weights, not from GPT-2's.
PRESETS: dict[str, dict[str, Any]] = {
    "offline": {
        "model": "tiny",
        "batch_size": 32,
        # From random weights SFT needs a high rate to learn in 16 steps; at 2e-3 one DPO run in 24
        # diverged (eval loss 14.8, with or without EAFO updates), at 1e-3 none did.
        "lr": 1e-3,
        "warmup_steps": 3,
        "sft_steps": 16,
        "dpo_steps": 8,
        "eval_every": 4,
        "every_n_steps": 4,
        "eval_rows": 64,
        "threads": 1,
        "about": "a smoke check of the machinery: a 2-block GPT-2 with random weights, a tokenizer "
        "trained on the spot and 320 generated preference pairs; it says nothing about the paper's claim",
    },
    "hh": {**_PAPER, "about": _PAPER["about"] + ", Anthropic HH"},
    "shp": {**_PAPER, "about": _PAPER["about"] + ", Stanford Human Preferences"},
    "jsonl": {**_PAPER, "eval_rows": None, "about": _PAPER["about"] + ", a local JSONL file"},
}


@dataclass
class DPOSettings:
    """Everything a sweep depends on. ``None`` fields take the ``--data`` preset's value."""

    data: str = "offline"
    model: Optional[str] = None
    arms: list[str] = field(default_factory=lambda: ["gelu", "crrelu", "eafo"])
    betas: list[float] = field(default_factory=lambda: list(PAPER_BETAS))
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    max_grad_norm: float = 10.0
    max_length: int = 512
    max_prompt_length: int = 256
    truncate_prompts: Optional[bool] = None
    sft_steps: Optional[int] = None
    dpo_steps: Optional[int] = None
    eval_every: Optional[int] = None
    eval_rows: Optional[int] = None
    limit: Optional[int] = None
    every_n_steps: Optional[int] = None
    threads: Optional[int] = None
    bf16: bool = False
    out: str = "dpo_out"
    about: str = ""

    def resolve(self) -> "DPOSettings":
        """Fill the preset's defaults and check every value; returns ``self``.

        Raises:
            ValueError: an unknown data set, arm or model kind; a beta that is not a finite
                number > 0; a size or step count < 1; no seeds. Nothing has been trained yet.
        """
        kind = self.data if self.data in PRESETS else "jsonl"
        if kind == "jsonl" and not self.data.endswith(".jsonl"):
            raise ValueError(f"--data {self.data!r}: unknown data set; choose {', '.join(DATASETS)} "
                             "or the path of a .jsonl file with prompt, chosen and rejected columns")
        preset = PRESETS[kind]
        for key, value in preset.items():
            if getattr(self, key) in (None, ""):
                setattr(self, key, value)
        if self.truncate_prompts is None:
            self.truncate_prompts = self.data in ("hh", "shp")  # long dialogues: keep their ends
        self.arms = check_arms(self.arms)
        if not self.betas:
            raise ValueError("--betas is empty; give values > 0 such as 0.1,1,2,5")
        for b in self.betas:
            if not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0):
                raise ValueError(f"--betas: beta must be a finite number > 0 (the DPO penalty), got {b!r}")
        self.betas = sorted({float(b) for b in self.betas})
        if not self.seeds:
            raise ValueError("--seeds must be >= 1")
        for name in ("batch_size", "max_length", "max_prompt_length", "sft_steps", "dpo_steps", "eval_every",
                     "eval_rows", "limit", "every_n_steps", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"--max-grad-norm must be a finite number > 0, got {self.max_grad_norm!r}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"--max-prompt-length ({self.max_prompt_length}) must be below --max-length "
                             f"({self.max_length}), which holds prompt and response")
        return self

    def identity(self) -> dict[str, Any]:
        """What must match for ``--resume``: everything except the arms, betas and seeds (which
        may grow) and the output folder."""
        keep = asdict(self)
        for key in ("arms", "betas", "seeds", "out", "threads"):
            keep.pop(key)
        return keep
