"""A griffe extension for the API reference: dynact's docstrings in Markdown.

The docstrings are Google style with two reStructuredText habits that Markdown would render
badly: Sphinx roles (``:class:`~dynact.EAFOActivation``` becomes `` `EAFOActivation` ``) and
simple tables (a ``====  ====`` rule above and below the rows, which Markdown would read as a
heading); and the singular ``Example:`` heading, which Google style reads as an admonition
rather than as doctest code. All are rewritten when griffe loads a docstring; the source is left as it is.
Used by ``mkdocs.yml`` (``extensions: [docs/griffe_rst.py]``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

#: ``:role:`target``` or ``:role:`~a.b.target``` (the tilde keeps only the last part).
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
_RULE = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _columns(rule: str) -> list[int]:
    """Start of each column of a simple table, from its ``====`` rule."""
    return [m.start() for m in re.finditer(r"=+", rule)]


def _split(line: str, starts: list[int]) -> list[str]:
    bounds = starts[1:] + [None]
    return [line[a:b].strip() if a < len(line) else "" for a, b in zip(starts, bounds, strict=True)]


def _table(rows: list[str], starts: list[int]) -> list[str]:
    """A Markdown table from a simple table's rows; a row whose first cell is empty continues
    the row above it."""
    cells: list[list[str]] = []
    for line in rows:
        if not line.strip():
            continue
        parts = _split(line, starts)
        if cells and not parts[0]:
            cells[-1] = [f"{old} {new}".strip() for old, new in zip(cells[-1], parts, strict=True)]
        else:
            cells.append(parts)
    width = len(starts)
    header = ["name", "meaning"] if width == 2 else [""] * width
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * width]
    return out + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells] + [""]


def markdown(text: str) -> str:
    """The docstring ``text`` with roles as code spans, simple tables as Markdown tables, and
    ``Example:`` / ``Example::`` headings as Google's ``Examples:`` section (whose ``>>>``
    lines are rendered as code)."""
    lines = _ROLE.sub(_role, text).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("Example:", "Example::"):
            out.append(lines[i].replace("Example::", "Examples:").replace("Example:", "Examples:"))
            i += 2 if i + 1 < len(lines) and not lines[i + 1].strip() else 1
            continue
        if _RULE.match(lines[i]):
            end = next((j for j in range(i + 1, len(lines)) if _RULE.match(lines[j])), None)
            if end is not None:
                indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
                starts = _columns(lines[i])
                out += [indent + row for row in _table(lines[i + 1 : end], starts)]
                i = end + 1
                continue
        # An RST literal-block marker ("Data flow::"): the indented block is code in Markdown too.
        out.append(lines[i][:-1] if lines[i].endswith("::") and lines[i].strip() != "::" else lines[i])
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
