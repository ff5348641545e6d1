"""The ``dynact`` command: ``train``, ``compare``, ``design`` and ``dpo`` (``dynact --version``).

``dynact train ...`` hands its arguments to Lightning's CLI (every Trainer flag and YAML config
works), ``dynact compare ...`` runs a sweep of activations and writes a report, and
``dynact design ...`` applies one EAFO step to an activation under a chosen input density and
plots the result. ``dynact <command> --help`` describes each.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Sequence

from dynact import __version__

# command -> (module, function, one-line help). Heavy modules load only for their command.
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("dynact.experiments.train", "main",
              "train a model with Lightning's CLI (shipped configs by name: --config digits_eafo)"),
    "compare": ("dynact.experiments.compare", "main",
                "compare activations (ReLU, CRReLU, dynamic EAFO, ...) over seeds"),
    "design": ("dynact.experiments.design", "main",
               "design a static activation: one EAFO step under a chosen density"),
    "dpo": ("dynact.experiments.dpo.command", "main",
            "the paper's LLM experiment: GPT-2, SFT then DPO, CRReLU against GELU"),
}


def _usage() -> str:
    width = max(map(len, _COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, _, text) in _COMMANDS.items()]
    return "usage: dynact <command> [options]\n\ncommands:\n" + "\n".join(lines) + \
        "\n\nRun 'dynact <command> --help' for a command's options, 'dynact --version' for the version."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynact`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"dynact {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in _COMMANDS:
        print(f"dynact: unknown command {command!r}; choose one of: {', '.join(_COMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module, func, _ = _COMMANDS[command]
    result = getattr(import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
