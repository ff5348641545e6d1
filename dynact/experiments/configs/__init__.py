"""The ``dynact train`` configs that ship inside the package, found by name from any folder.

``digits``, ``digits_eafo`` and ``digits_sweep`` (the main job's recipe, which ``dynact compare``
reads) run offline on a CPU; one more per cell of the paper's Tables 1-3 is named
``{arch}_{dataset}_{act}`` (``vit_tiny_cifar10_crrelu``, ...). They are read with
:mod:`importlib.resources`, so an editable install, ``pip install .`` and an installed wheel
all find them. ``examples/configs/`` in the repository holds identical copies to start from.

Example::

    dynact train --config digits_eafo            # the shipped file, by name (".yaml" optional)
    dynact train --config my_configs/digits.yaml # a path works as before
"""

from __future__ import annotations

import contextlib
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:  # importlib.resources.abc from Python 3.11, importlib.abc before
    from importlib.resources.abc import Traversable

__all__ = ["SUFFIX", "as_path", "find", "is_bare_name", "lookup", "names", "not_found_message", "read_text"]

SUFFIX = ".yaml"
# A word that can only be meant as a config's name (no folder, no inline YAML).
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _folder() -> Traversable:
    return resources.files(__name__)


def names() -> list[str]:
    """The shipped configs' names, sorted, without ``.yaml``."""
    return sorted(p.name[: -len(SUFFIX)] for p in _folder().iterdir() if p.name.endswith(SUFFIX))


def lookup(name: str) -> Optional[Traversable]:
    """The shipped config called ``name`` (``.yaml`` optional), or ``None`` when none is."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if not _NAME.fullmatch(stem) or stem not in names():
        return None
    return _folder() / (stem + SUFFIX)


def not_found_message(name: str) -> str:
    """Why ``name`` names neither a file nor a shipped config, and what does."""
    return (f"{name!r} is neither a file nor a config shipped with dynact; shipped: {', '.join(names())} "
            "(give a name, with or without .yaml, or a path)")


def find(name: str) -> Traversable:
    """The shipped config called ``name``; raises ValueError listing the names when there is none."""
    found = lookup(name)
    if found is None:
        raise ValueError(not_found_message(name))
    return found


def read_text(name: str) -> str:
    """The text of the shipped config called ``name`` (see :func:`find`)."""
    return find(name).read_text(encoding="utf-8")


def is_bare_name(text: str) -> bool:
    """Whether ``text`` can only be meant as a config's name: one word, no folder, no inline YAML."""
    return bool(_NAME.fullmatch(text))


@contextlib.contextmanager
def as_path(spec: str) -> Iterator[Path]:
    """A file-system path for ``spec``: an existing file as given, else the shipped config of
    that name (a real file for as long as the ``with`` block runs, even from a zipped install)."""
    path = Path(spec).expanduser()
    if path.is_file():
        yield path
        return
    with resources.as_file(find(spec)) as shipped:
        yield Path(shipped)
