"""The ``dynact`` command: ``train``, ``compare`` and ``design``.

``dynact train ...`` hands its arguments to Lightning's CLI (every Trainer flag and YAML config
works), ``dynact compare ...`` runs a sweep of activations and writes a report, and
``dynact design ...`` applies one EAFO step to an activation under a chosen input density and
plots the result. ``dynact <command> --help`` describes each.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from importlib import import_module
from pathlib import Path
from typing import Callable, Sequence

# command -> (module, function, one-line help). Heavy modules load only for their command.
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("dynact.train", "main", "train a model with Lightning's CLI (configs in examples/configs)"),
    "compare": ("dynact.compare", "main", "compare activations (ReLU, CRReLU, dynamic EAFO, ...) over seeds"),
    "design": ("dynact.cli", "design_main", "design a static activation: one EAFO step under a chosen density"),
}


def _usage() -> str:
    width = max(map(len, _COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, _, text) in _COMMANDS.items()]
    return "usage: dynact <command> [options]\n\ncommands:\n" + "\n".join(lines) + \
        "\n\nRun 'dynact <command> --help' for a command's options."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynact`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from dynact import __version__

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


# --------------------------------------------------------------------------- design
def _density_spec(spec: str, lo: float, hi: float, bins: int):
    """A :class:`~dynact.density.Density` from ``normal | laplace | uniform | student-t:NU | FILE``.

    The analytic densities have zero mean and unit variance (Student's t: the standard t,
    whose variance is ``nu / (nu - 2)``), so they are comparable with CRReLU's N(0, 1).
    """
    from scipy import stats

    from dynact.density import Density

    name = spec.strip().lower()
    table: dict[str, Callable[[], object]] = {
        "normal": lambda: stats.norm(),
        "laplace": lambda: stats.laplace(scale=1 / math.sqrt(2)),
        "uniform": lambda: stats.uniform(loc=-math.sqrt(3), scale=2 * math.sqrt(3)),
    }
    if name in table:
        return Density.from_pdf(table[name]().pdf, lo, hi, bins)
    if name.startswith("student-t"):
        _, _, nu = name.partition(":")
        try:
            nu_f = float(nu)
        except ValueError:
            nu_f = float("nan")
        if not (math.isfinite(nu_f) and nu_f > 0):
            raise ValueError(f"--density {spec!r}: write student-t:NU with NU > 0 degrees of freedom, e.g. student-t:3")
        return Density.from_pdf(stats.t(df=nu_f).pdf, lo, hi, bins)
    path = Path(spec)
    if path.is_file():
        return Density.load(path)
    raise ValueError(
        f"--density {spec!r}: choose normal, laplace, uniform, student-t:NU, or the path of a "
        "density file saved with Density.save"
    )


def _design_parser() -> argparse.ArgumentParser:
    from dynact.activations import activation_names

    p = argparse.ArgumentParser(
        prog="dynact design",
        description="Apply one EAFO step to a base activation under an input density; plot the base, "
        "the corrected activation and the worst activation (WAFBC) for that density, and report "
        "the output entropies before and after.",
    )
    p.add_argument("--base", default="relu", help=f"base activation ({', '.join(n for n in activation_names() if n != 'eafo')})")
    p.add_argument("--density", default="normal", help="normal | laplace | uniform | student-t:NU | path to a saved density (.pt)")
    p.add_argument("--eta", type=float, default=0.05, help="EAFO step size (default 0.05)")
    p.add_argument("--method", choices=("x", "g"), default="x", help="x: first-order step (any activation); g: exact in the inverse (smooth increasing only)")
    p.add_argument("--lo", type=float, default=-8.0, help="grid start (ignored for a density file)")
    p.add_argument("--hi", type=float, default=8.0, help="grid end (ignored for a density file)")
    p.add_argument("--bins", type=int, default=1600, help="grid size (ignored for a density file)")
    p.add_argument("--delta", type=float, default=None, help="output resolution of the discretised entropy (default: the input's std / 20)")
    p.add_argument("--out", default="design_out", help="folder for design.png and design.json (default design_out)")
    return p


_DELTA_PER_STD = 20


def design(base: str, density, eta: float, method: str = "x", delta: float | None = None) -> dict:
    """The numbers behind ``dynact design``: entropies of base, corrected activation and WAFBC.

    The WAFBC shares the base's values at the grid ends, so it is the worst activation with
    the base's boundary conditions (eafo-math.md section 4); its entropy is the ceiling
    ``log(upper - lower)`` up to discretisation.
    """
    from dynact import eafo
    from dynact.activations import make_activation

    if base.strip().lower() == "eafo":
        raise ValueError("--base eafo: the dynamic activation is designed during training; pick a static base")
    act = make_activation(base)
    if delta is None:
        # A resolution tied to the input's scale: fine enough to see the shape, coarse enough
        # that a flat part's atom is not split into bins narrower than the step's bump.
        delta = density.mean_std()[1] / _DELTA_PER_STD
    y, _, _ = eafo.derivatives(act, density.grid)
    corrected = eafo.step(act, density, eta, method=method)
    lower, upper = float(y[0]), float(y[-1])
    if not lower < upper:
        raise ValueError(f"--base {base}: its values at the grid ends ({lower:g}, {upper:g}) bound no interval")
    worst = eafo.wafbc(density, lower, upper)
    h_before = eafo.output_entropy(act, density, delta)
    h_after = eafo.output_entropy(eafo.Tabulated(density.grid, corrected), density, delta)
    return {
        "base": base,
        "eta": eta,
        "method": method,
        "grid": {"lo": density.lo, "hi": density.hi, "bins": density.bins},
        "delta": delta,
        "entropy_in": density.entropy(),
        "entropy_before": h_before,
        "entropy_after": h_after,
        "entropy_change": h_after - h_before,
        "wafbc_bounds": [lower, upper],
        "entropy_wafbc": eafo.output_entropy(eafo.Tabulated(density.grid, worst), density, delta),
        "entropy_ceiling": math.log(upper - lower),
        "_curves": {"x": density.grid, "base": y, "corrected": corrected, "wafbc": worst,
                    "correction": eafo.correction(act, density), "p": density.p},
    }


def _plot_design(result: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = {k: v.cpu().numpy() for k, v in result["_curves"].items()}
    fig, (ax, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.plot(c["x"], c["base"], label=f"base: {result['base']}  H={result['entropy_before']:.4f}")
    ax.plot(c["x"], c["corrected"], label=f"EAFO step (eta={result['eta']:g})  H={result['entropy_after']:.4f}")
    ax.plot(c["x"], c["wafbc"], "--", label=f"WAFBC (worst)  H={result['entropy_wafbc']:.4f}")
    ax.set_xlabel("x (pre-activation)")
    ax.set_ylabel("activation")
    ax.legend(fontsize=8, loc="upper left")
    twin = ax.twinx()
    twin.fill_between(c["x"], c["p"], alpha=0.15, color="gray")
    twin.set_ylabel("input density p(x)")
    ax.set_title(title)
    ax_c.plot(c["x"], c["correction"], color="C1")
    ax_c.axhline(0, color="k", lw=0.5)
    ax_c.set_title("correction c(x) = p' - p f''/f'")
    ax_c.set_xlabel("x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def design_main(argv: Sequence[str] | None = None) -> int:
    """``dynact design``: write ``design.png`` and ``design.json`` to ``--out`` and print the JSON."""
    parser = _design_parser()
    args = parser.parse_args(argv)
    try:
        density = _density_spec(args.density, args.lo, args.hi, args.bins)
        result = design(args.base, density, args.eta, args.method, args.delta)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {out}: cannot create it ({err.strerror}); choose a writable folder")
    result["density"] = args.density
    _plot_design(result, f"{args.base} under {args.density}", out / "design.png")
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public["plot"] = str(out / "design.png")
    (out / "design.json").write_text(json.dumps(public, indent=2) + "\n")
    print(json.dumps(public, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
