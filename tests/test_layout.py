"""The layout's rules, read from the source with ast (nothing is imported).

- The library imports nothing from the experiments layer.
- No import cycle among library modules.
- No library function over 60 lines.
- An import of a dynact module inside a library function is there only to keep an optional
  dependency optional, and a comment on its line says which one.

Every ``import`` and ``from ... import`` statement counts, wherever it is (module level, inside a
function or class, under ``if TYPE_CHECKING``); ``importlib.import_module`` strings do not.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

#: The experiments layer: these modules and everything under them are not the library.
EXPERIMENTS = ("dynact.experiments", "dynact.cli")
#: Public names of the experiments kept at their old paths (re-exports): neither library nor experiments.
ALIASES = ("dynact.models", "dynact.data")
MAX_FUNCTION_LINES = 60
#: What the comment on an in-function import of a dynact module must say.
OPTIONAL_MARK = "# optional dependency"

ROOT = Path(__file__).resolve().parents[1]


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the dynact package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted((root / "dynact").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _library(modules: dict[str, Path]) -> dict[str, Path]:
    return {n: p for n, p in modules.items() if not _under(n, EXPERIMENTS) and not _under(n, ALIASES)}


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imports(name: str, path: Path, known) -> list[tuple[str, ast.stmt]]:
    """``(module, statement)`` for each dynact module that ``name``'s file imports.

    ``from a import b`` names ``a.b`` when that is a module, else ``a``; relative imports are
    resolved against ``name``'s package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.extend((t, node) for t in dict.fromkeys(targets) if t == "dynact" or t.startswith("dynact."))
    return out


def _graph(library: dict[str, Path], known) -> dict[str, set[str]]:
    return {n: {t for t, _ in _imports(n, p, known) if t in library and t != n} for n, p in library.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def _functions(path: Path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


MODULES = _modules()
LIBRARY = _library(MODULES)


def test_the_library_and_the_experiments_are_both_found():
    for name in ("dynact", "dynact.activations", "dynact.spline", "dynact.core", "dynact.density",
                 "dynact.kernels", "dynact.kernels.dispatch", "dynact.callbacks", "dynact.integrations.transformers"):
        assert name in LIBRARY, f"{name} is not counted as library"
    assert any(_under(n, EXPERIMENTS) for n in MODULES), "no experiment module found: is EXPERIMENTS stale?"


def test_the_library_imports_nothing_from_the_experiments():
    bad = [f"{name} (line {node.lineno}) imports {target}"
           for name, path in LIBRARY.items() for target, node in _imports(name, path, MODULES)
           if _under(target, EXPERIMENTS)]
    assert not bad, "the library imports the experiments layer:\n" + "\n".join(bad)


def test_no_import_cycle_among_dynact_modules():
    cycle = _find_cycle(_graph(MODULES, MODULES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_function_over_the_limit():
    long = [f"{name}:{fn.name} (line {fn.lineno}): {fn.end_lineno - fn.lineno + 1} lines"
            for name, path in MODULES.items() for fn in _functions(path)
            if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_in_function_imports_of_dynact_say_which_optional_dependency():
    bad = []
    for name, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        inner = {id(n) for fn in _functions(path) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
        bad += [f"{name} line {node.lineno}: {lines[node.lineno - 1].strip()}"
                for _, node in _imports(name, path, MODULES)
                if id(node) in inner and OPTIONAL_MARK not in lines[node.lineno - 1]]
    assert not bad, (f"imports of dynact modules inside functions need a {OPTIONAL_MARK!r} comment naming it "
                     "(or belong at module level):\n" + "\n".join(bad))
