"""Preference data of ``dynact dpo``: rows of ``{"prompt", "chosen", "rejected"}`` strings.

Sources (``--data``):

- ``offline``: :func:`offline_preferences`, a small set generated deterministically in code
  (arithmetic, opposites, polite replies) in Anthropic HH's form, for machines without internet;
- ``hh`` and ``shp``: Anthropic HH and Stanford Human Preferences through ``datasets`` (online);
- a path to a JSONL file, one ``{"prompt": ..., "chosen": ..., "rejected": ...}`` object a line
  (HH's form: ``prompt`` ends with ``"\\n\\nAssistant:"``, the responses follow it).

Every row is checked before training (:func:`check_rows`): a missing column, a value that is not
a string, or an empty response is a :class:`ValueError` naming the row and the column. Prompts
longer than the prompt limit in tokens are an error too (:func:`fit_prompts`), or are cut to
their last tokens on request, as the DPO reference implementation does for HH.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["COLUMNS", "DATASETS", "check_rows", "fit_prompts", "load_preferences", "offline_preferences", "read_jsonl",
           "sft_rows", "split_rows"]

COLUMNS = ("prompt", "chosen", "rejected")
#: Named sources; anything else must be a path to a ``.jsonl`` file.
DATASETS = ("offline", "hh", "shp")
_HUB = {"hh": "Anthropic/hh-rlhf", "shp": "stanfordnlp/SHP"}
_ASSISTANT = "\n\nAssistant:"

# --------------------------------------------------------------------------- the offline set
_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lena"]
_OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
              ("old", "new"), ("early", "late"), ("full", "empty"), ("open", "closed"), ("high", "low"),
              ("happy", "sad"), ("wet", "dry")]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def _pair(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = (a + b + rng.choice([-3, -2, -1, 1, 2, 3])) % 19
        question = f"What is {_NUMBERS[a]} plus {_NUMBERS[b]}?"
        good, bad = f" {_NUMBERS[a + b]}.", f" {_NUMBERS[wrong]}."
    elif kind == 1:
        word, opposite = rng.choice(_OPPOSITES)
        if rng.random() < 0.5:
            word, opposite = opposite, word
        other = rng.choice([w for pair in _OPPOSITES for w in pair if w not in (word, opposite)])
        question = f"What is the opposite of {word}?"
        good, bad = f" The opposite of {word} is {opposite}.", f" The opposite of {word} is {other}."
    else:
        name = rng.choice(_NAMES)
        question = f"My friend {name} helped me today. What should I say?"
        good = f" You could say: thank you, {name}, that was kind of you."
        bad = f" Say nothing to {name}. It does not matter."
    return {"prompt": f"\n\nHuman: {question}{_ASSISTANT}", "chosen": good, "rejected": bad}


def offline_preferences(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` preference rows generated from ``seed`` (same rows on every machine).

    Three kinds of question with one right and one wrong answer each, so that a model can learn
    the preference within a few hundred steps; it checks the machinery, it is not a benchmark.
    """
    rng = random.Random(seed)
    return [_pair(rng) for _ in range(n)]


# --------------------------------------------------------------------------- checks
def check_rows(rows: Iterable[Any], source: str) -> list[dict[str, str]]:
    """The rows as ``{"prompt", "chosen", "rejected"}`` dicts; a clear error for the first bad one.

    Raises:
        ValueError: no rows; a row that is not an object; a missing column; a value that is not
            a string; an empty (or all-whitespace) ``chosen`` or ``rejected``. The message names
            ``source``, the row (0-based) and the column.
    """
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} is a {type(row).__name__}, not an object with columns {COLUMNS}")
        for col in COLUMNS:
            if col not in row:
                raise ValueError(f"{source}: row {i} has no column {col!r} (it has {sorted(row)}); "
                                 f"every row needs {', '.join(COLUMNS)}")
            if not isinstance(row[col], str):
                raise ValueError(f"{source}: row {i}, column {col!r} is a {type(row[col]).__name__}, not a string")
        for col in ("chosen", "rejected"):
            if not row[col].strip():
                raise ValueError(f"{source}: row {i}, column {col!r} is empty; every response needs text")
        out.append({col: row[col] for col in COLUMNS})
    if not out:
        raise ValueError(f"{source}: no rows")
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a JSONL file in HH's prompt/chosen/rejected form, checked by :func:`check_rows`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r}: no such file; give offline, hh, shp or a .jsonl file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno} is not JSON ({err.msg})") from None
    return check_rows(rows, str(path))


def fit_prompts(rows: list[dict[str, str]], tokenizer, max_prompt_length: int, truncate: bool,
                source: str) -> list[dict[str, str]]:
    """Hold every prompt to ``max_prompt_length`` tokens.

    ``truncate=False``: a longer prompt is a :class:`ValueError` naming the row and its length.
    ``truncate=True``: it keeps its last ``max_prompt_length`` tokens (the end is what the
    response answers), as the DPO reference implementation does for HH.
    """
    out = []
    for i, row in enumerate(rows):
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            if not truncate:
                raise ValueError(
                    f"{source}: row {i}, column 'prompt' has {len(ids)} tokens, over the limit of "
                    f"{max_prompt_length} (--max-prompt-length); raise the limit or pass --truncate-prompts"
                )
            row = {**row, "prompt": tokenizer.decode(ids[-max_prompt_length:])}
        out.append(row)
    return out


def split_rows(rows: list[dict[str, str]], eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """A fixed shuffle (``seed``) of ``rows`` cut into training and evaluation rows."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval fraction must be in (0, 1), got {eval_fraction!r}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(rows)))
    if n_eval >= len(rows):
        raise ValueError(f"{len(rows)} rows are too few to hold out {n_eval} for evaluation")
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def sft_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Supervised fine-tuning rows: each prompt with its preferred response (prompt/completion)."""
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]


# --------------------------------------------------------------------------- hub data sets
def _split_hh(example: dict[str, str]) -> dict[str, str]:
    # HH stores whole dialogues; the prompt is everything up to the last assistant turn.
    cut = example["chosen"].rfind(_ASSISTANT) + len(_ASSISTANT)
    return {"prompt": example["chosen"][:cut], "chosen": example["chosen"][cut:],
            "rejected": example["rejected"][cut:]}


def _split_shp(example: dict[str, Any]) -> dict[str, str]:
    a, b = " " + example["human_ref_A"], " " + example["human_ref_B"]
    good, bad = (a, b) if int(example["labels"]) == 1 else (b, a)
    return {"prompt": f"\n\nHuman: {example['history']}{_ASSISTANT}", "chosen": good, "rejected": bad}


def _load_hub(name: str, split: str, limit: Optional[int]) -> list[dict[str, str]]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - the hf extra brings it
        raise ValueError(f"--data {name} needs the 'datasets' package: pip install 'dynact[hf]'") from err
    try:
        ds = datasets.load_dataset(_HUB[name], split=split)
    except Exception as err:
        raise ValueError(
            f"--data {name}: could not load {_HUB[name]!r} ({type(err).__name__}: {err}); it needs the internet "
            "(or a datasets cache); offline, use --data offline or a local .jsonl file"
        ) from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    convert = _split_hh if name == "hh" else _split_shp
    return check_rows((convert(ex) for ex in ds), f"{_HUB[name]} ({split})")


def load_preferences(data: str, n_offline: int = 320, eval_fraction: float = 0.2,
                     limit: Optional[int] = None) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training and evaluation rows of a source (``offline``, ``hh``, ``shp`` or a JSONL path).

    The hub sets use their own ``train`` and ``test`` splits (``limit`` rows of each at most);
    the offline set and JSONL files hold out ``eval_fraction`` of their rows with a fixed shuffle.
    """
    if data == "offline":
        return split_rows(offline_preferences(n_offline), eval_fraction)
    if data in _HUB:
        return _load_hub(data, "train", limit), _load_hub(data, "test", limit)
    if not data.endswith(".jsonl"):
        raise ValueError(f"--data {data!r}: unknown data set; choose {', '.join(DATASETS)} or a .jsonl file")
    rows = read_jsonl(data)
    if limit is not None:
        rows = rows[:limit]
    return split_rows(rows, eval_fraction)
