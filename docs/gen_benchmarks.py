"""Tables for the Benchmarks page, generated from the benchmarks' JSON files.

A MkDocs hook (``hooks:`` in ``mkdocs.yml``): on the page that holds the marker
``<!-- benchmarks:json -->`` it puts one section per ``benchmarks/results/*.json`` file, with
the file's settings (the command, when the file records it, and the machine) and a table for
each of its results. Save a benchmark's output there to have it on the site::

    python benchmarks/bench_activation.py --threads 1 > benchmarks/results/activation.json

Run as a script, it prints the generated Markdown: ``python docs/gen_benchmarks.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "<!-- benchmarks:json -->"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
#: Keys shown first in a file's settings line, when present.
_FIRST = ("command", "benchmark", "device", "machine", "torch", "threads", "torch_threads", "date")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list) and all(_scalar(v) for v in value):
        text = " / ".join(_cell(v) for v in value)
    elif _scalar(value):
        text = "" if value is None else str(value)
    else:
        text = json.dumps(value, separators=(",", ":"))
        text = text if len(text) <= 60 else text[:57] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: dict[str, dict[str, Any]], first: str) -> list[str]:
    columns: list[str] = []
    for row in rows.values():
        columns += [k for k in row if k not in columns]
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for name, row in rows.items()]
    return lines + [""]


def _block(title: str, value: Any, depth: int = 0) -> list[str]:
    """Markdown for one non-scalar entry of a results file."""
    head = [f"**{title}**", ""]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return head + _table({str(i + 1): row for i, row in enumerate(value)}, "#")
    if isinstance(value, dict) and value and all(_scalar(v) or isinstance(v, list) for v in value.values()):
        return head + _table({k: {"value": v} for k, v in value.items()}, "key")
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        flat = all(all(not isinstance(x, dict) for x in v.values()) for v in value.values())
        if flat or depth >= 2:
            return head + _table(value, "")
        return [line for key, sub in value.items() for line in _block(f"{title}: {key}", sub, depth + 1)]
    return head + [_cell(value), ""]


def render(name: str, data: Any) -> str:
    """One file's section: its settings line, then a table per result."""
    lines = [f"### {name}", ""]
    if not isinstance(data, dict):
        return "\n".join(lines + _block("results", data))
    settings = {k: v for k, v in data.items() if _scalar(v) or (isinstance(v, list) and all(map(_scalar, v)))}
    ordered = [k for k in _FIRST if k in settings] + [k for k in settings if k not in _FIRST]
    if "command" in settings:
        lines += [f"`{settings['command']}`", ""]
    lines += ["; ".join(f"{k}: {_cell(settings[k])}" for k in ordered if k != "command") + ".", ""]
    for key, value in data.items():
        if key not in settings:
            lines += _block(key, value)
    return "\n".join(lines)


def generated(results: Path = RESULTS) -> str:
    """The Markdown for every JSON file under ``results`` (a note when there is none)."""
    files = sorted(results.glob("*.json")) if results.is_dir() else []
    if not files:
        return (
            "No benchmark JSON is stored in `benchmarks/results/` yet. Each script under "
            "`benchmarks/` prints one; save it there (`python benchmarks/bench_activation.py "
            "> benchmarks/results/activation.json`) and rebuild the site to see it here."
        )
    parts = []
    for file in files:
        try:
            parts.append(render(file.stem, json.loads(file.read_text(encoding="utf-8"))))
        except json.JSONDecodeError as err:
            parts.append(f"### {file.stem}\n\n`{file.name}` is not valid JSON ({err.msg}, line {err.lineno}).")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: replace the marker on the page that holds it."""
    return markdown.replace(MARKER, generated()) if MARKER in markdown else markdown


if __name__ == "__main__":
    print(generated())
