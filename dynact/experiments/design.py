"""``dynact design``: one EAFO step of a static activation under a chosen input density.

It writes ``design.json`` (entropies before and after the step, the WAFBC's bounds and
entropy) and ``design.png`` (the base, the stepped activation and the WAFBC over the input
density, and the change ``f~ - f`` on its own axis), prints the JSON and ends with a one-line
summary (:func:`summary_line`).

Entropies are discretised at the output resolution ``delta``: ``H_delta = -sum P_i log P_i +
log delta`` over output bins ``[k delta, (k+1) delta)``. The WAFBC's output is uniform on its
bounds ``[lower, upper]``, so its continuous entropy is the ceiling ``log(upper - lower)``; binned,
the two bins cut by ``lower`` and ``upper`` each add ``p log(delta / (L p)) <= delta / (e L)``
(``L = upper - lower``, ``p`` the bin's mass), so the WAFBC's ``H_delta`` may exceed that ceiling
by up to ``2 delta / (e L)``. ``design.json`` reports the ceiling both ways
(``entropy_ceiling``, ``entropy_ceiling_binned``: a uniform output's ``H_delta`` on the same bins,
which the WAFBC reaches) and the bound (``ceiling_excess_bound``).

Example::

    dynact design --base tanh --density normal --method g --eta 0.05 --out design_tanh

:func:`design` returns the same numbers for use from Python.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from dynact import eafo
from dynact.activations import activation_names, make_activation
from dynact.density import Density

__all__ = ["design", "main", "summary_line"]

_DESCRIPTION = (
    "Apply one EAFO step to a base activation under an input density; plot the base, "
    "the stepped activation, their difference and the worst activation (WAFBC) for that density, "
    "and report the output entropies before and after."
)

_EPILOG = (
    "Entropies are in nats, discretised at the output resolution --delta. The WAFBC's output is "
    "uniform on its bounds, so its entropy is the ceiling log(upper - lower) up to binning: the two "
    "bins cut by the bounds add at most 2 delta / (e (upper - lower)) (reported as ceiling_excess_bound). "
    "Takes a second or two."
)

#: Probabilities of the input quantiles that bound the density's bulk: the WAFBC takes its
#: bounds from the base's output range there, and the plot shows it.
BULK = (0.001, 0.999)
#: The default output resolution is the input's standard deviation over this.
_DELTA_PER_STD = 20
#: The plot shows the bulk widened by this fraction of its width on each side.
_PLOT_MARGIN = 0.25


def _density_spec(spec: str, lo: float, hi: float, bins: int) -> Density:
    """A :class:`~dynact.density.Density` from ``normal | laplace | uniform | student-t:NU | FILE``.

    The analytic densities have zero mean and unit variance (Student's t: the standard t,
    whose variance is ``nu / (nu - 2)``), so they are comparable with CRReLU's N(0, 1).
    """
    from scipy import stats

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


def _parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(prog="dynact design", description=_DESCRIPTION, epilog=_EPILOG)
    p.add_argument("--base", default="relu",
                   help=f"base activation ({', '.join(n for n in activation_names() if n != 'eafo')}) "
                   "(default: relu)")
    p.add_argument("--density", default="normal",
                   help="input density: normal | laplace | uniform (zero mean, unit variance) | student-t:NU | "
                   "path to a saved density (.pt) (default: normal)")
    p.add_argument("--eta", type=float, default=0.05, help="EAFO step size (default: 0.05)")
    p.add_argument("--method", choices=("x", "g"), default="x",
                   help="x: first-order step (any activation); g: exact in the inverse (strictly increasing, "
                   "continuous slope where the density has mass: elu, celu, softplus, tanh, sigmoid) (default: x)")
    p.add_argument("--lo", type=float, default=-8.0, help="grid start (default: -8; ignored for a density file)")
    p.add_argument("--hi", type=float, default=8.0, help="grid end (default: 8; ignored for a density file)")
    p.add_argument("--bins", type=int, default=1600,
                   help="grid cells between --lo and --hi (default: 1600; ignored for a density file)")
    p.add_argument("--delta", type=float, default=None,
                   help=f"output resolution of the discretised entropy (default: the input's std / {_DELTA_PER_STD})")
    p.add_argument("--out", default="design_out", help="folder for design.png and design.json (default: design_out)")
    return p


def _bulk_range(f: Callable, density: Density) -> tuple[float, float, float, float]:
    """The bulk ``[x_lo, x_hi]`` between the :data:`BULK` quantiles, and ``f``'s range on it."""
    x_lo, x_hi = (density.quantile(q) for q in BULK)
    x = density.grid
    inside = x[(x > x_lo) & (x < x_hi)]
    pts = torch.cat([x.new_tensor([x_lo]), inside, x.new_tensor([x_hi])])
    y, _, _ = eafo.derivatives(f, pts)
    return x_lo, x_hi, float(y.min()), float(y.max())


def design(base: str, density: Density, eta: float, method: str = "x", delta: float | None = None) -> dict:
    """The numbers behind ``dynact design``: entropies of base, stepped activation and WAFBC.

    The WAFBC's bounds are the base's output range over the density's bulk (between the
    :data:`BULK` quantiles), not its values at the grid's ends, which for an unbounded base
    would be set by the grid rather than by the data. Its entropy is the ceiling
    ``log(upper - lower)`` of every activation with that output range (the WAFBC section of
    docs/math.md), up to discretisation: binned at ``delta`` it equals a uniform output's
    (``entropy_ceiling_binned``), which exceeds ``log(upper - lower)`` by at most
    ``ceiling_excess_bound = 2 delta / (e (upper - lower))`` (the module's docstring says why).

    Returns:
        A dict of JSON-ready figures, plus ``"_curves"`` (tensors on ``density.grid``) for the plot.
    """

    if base.strip().lower() == "eafo":
        raise ValueError("--base eafo: the dynamic activation is designed during training; pick a static base")
    act = make_activation(base)
    if delta is None:
        # A resolution tied to the input's scale: fine enough to see the shape, coarse enough
        # that a flat part's atom is not split into bins narrower than the step's bump.
        delta = density.mean_std()[1] / _DELTA_PER_STD
    y, _, _ = eafo.derivatives(act, density.grid)
    try:
        stepped = eafo.step(act, density, eta, method=method)
    except ValueError as err:
        raise ValueError(f"--base {base} --method {method}: {err}") from None
    x_lo, x_hi, lower, upper = _bulk_range(act, density)
    if not lower < upper:
        raise ValueError(
            f"--base {base}: it is constant ({lower:g}) on the density's bulk x in [{x_lo:.3g}, {x_hi:.3g}]; "
            "its output carries no information to optimise"
        )
    worst = eafo.wafbc(density, lower, upper)
    h_before = eafo.output_entropy(act, density, delta)
    h_after = eafo.output_entropy(eafo.Tabulated(density.grid, stepped), density, delta)
    change = stepped - y
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
        "max_abs_change": float(change.abs().max()),
        "bulk": {"quantiles": list(BULK), "x": [x_lo, x_hi]},
        "wafbc_bounds": [lower, upper],
        "entropy_wafbc": eafo.output_entropy(eafo.Tabulated(density.grid, worst), density, delta),
        "entropy_ceiling": math.log(upper - lower),
        "entropy_ceiling_binned": _binned_uniform_entropy(lower, upper, delta),
        "ceiling_excess_bound": 2 * delta / (math.e * (upper - lower)),
        "_curves": {"x": density.grid, "base": y, "stepped": stepped, "change": change, "wafbc": worst,
                    "first_order": eta * eafo.correction(act, density), "p": density.p},
    }


def _binned_uniform_entropy(lower: float, upper: float, delta: float) -> float:
    """``H_delta`` of a uniform output on ``[lower, upper]``, binned as :func:`dynact.eafo.output_entropy`
    bins (edges at multiples of ``delta``): the full bins' share plus the two cut bins'."""
    width = upper - lower
    first, last = math.floor(lower / delta), math.ceil(upper / delta)
    edges = torch.arange(first, last + 1, dtype=torch.float64) * delta
    mass = (torch.clamp(edges[1:], max=upper) - torch.clamp(edges[:-1], min=lower)).clamp_min(0) / width
    mass = mass[mass > 0]
    return float(-(mass * mass.log()).sum()) + math.log(delta)


def summary_line(result: dict, out: Path) -> str:
    """The line ``dynact design`` ends with: the step's entropy change and the WAFBC's against its ceiling."""
    lower, upper = result["wafbc_bounds"]
    return (
        f"{result['base']} under {result.get('density', 'the density')}, one EAFO step (method {result['method']}, "
        f"eta {result['eta']:g}): output entropy {result['entropy_before']:.4f} -> {result['entropy_after']:.4f} nats "
        f"({result['entropy_change']:+.4f}); WAFBC {result['entropy_wafbc']:.4f} vs ceiling "
        f"log({upper - lower:.3g}) = {result['entropy_ceiling']:.4f} "
        f"({result['entropy_wafbc'] - result['entropy_ceiling']:+.4f} from binning at delta {result['delta']:.3g}, "
        f"at most {result['ceiling_excess_bound']:.4f}); wrote {out / 'design.png'}, {out / 'design.json'}"
    )


def _figure(result: dict, title: str):
    """The design figure: activations over the input density on top, the change below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = {k: v.cpu().numpy() for k, v in result["_curves"].items()}
    (x_lo, x_hi), (lower, upper) = result["bulk"]["x"], result["wafbc_bounds"]
    # Show the bulk and a margin: beyond it the density, and so the step, is negligible, and
    # an unbounded base would stretch the y-axis to the grid's end.
    margin = _PLOT_MARGIN * (x_hi - x_lo)
    shown = (c["x"] >= x_lo - margin) & (c["x"] <= x_hi + margin)
    c = {k: v[shown] for k, v in c.items()}
    q_lo, q_hi = (f"{100 * q:g}%" for q in result["bulk"]["quantiles"])

    fig, (ax, ax_d) = plt.subplots(2, 1, figsize=(8, 7.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.7]})
    dens = ax.twinx()
    shade = dens.fill_between(c["x"], c["p"], color="0.6", alpha=0.25, lw=0, label="input density p(x)")
    dens.set_ylim(0, float(c["p"].max()) / 0.45)  # the density fills the lower half or so
    dens.set_yticks([])
    ax.set_zorder(dens.get_zorder() + 1)
    ax.patch.set_visible(False)

    bulk = ax.axvspan(x_lo, x_hi, color="C2", alpha=0.05, lw=0,
                      label=f"bulk: x between the {q_lo} and {q_hi} quantiles")
    for b in (lower, upper):
        ax.axhline(b, color="C2", lw=0.7, ls=":")
    ax.plot(c["x"], c["wafbc"], color="C2", lw=1.4, ls="-.",
            label=f"WAFBC (worst), bounds [{lower:.3g}, {upper:.3g}] (dotted) = base's range on the bulk  "
            f"H={result['entropy_wafbc']:.4f}")
    ax.plot(c["x"], c["stepped"], color="C1", lw=2.6, alpha=0.85,
            label=rf"one EAFO step $\tilde f$ (method {result['method']}, $\eta$={result['eta']:g})"
                  f"  H={result['entropy_after']:.4f}")
    ax.plot(c["x"], c["base"], color="k", lw=1.3, ls="--",
            label=f"base f: {result['base']}  H={result['entropy_before']:.4f}")
    ax.set_ylabel("activation")
    ax.set_title(title)
    # Headroom above the curves for the legend, so that it never hides them.
    top = max(float(c[k].max()) for k in ("base", "stepped", "wafbc"))
    bottom = min(float(c[k].min()) for k in ("base", "stepped", "wafbc"))
    span = top - bottom
    ax.set_ylim(bottom - 0.05 * span, top + 0.45 * span)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=[h for h in handles if h is not bulk] + [bulk, shade], fontsize=7.5, loc="upper left",
              framealpha=0.9)

    ax_d.axhline(0, color="k", lw=0.5)
    ax_d.plot(c["x"], c["change"], color="C3", lw=1.8, label=r"change $\tilde f - f$")
    if result["method"] == "g":
        ax_d.plot(c["x"], c["first_order"], color="0.3", lw=1.0, ls="--", label=r"first order $\eta\, c(x)$ (method x)")
    ax_d.set_ylabel(r"$\tilde f - f$")
    ax_d.set_xlabel("x (pre-activation)")
    ax_d.legend(fontsize=7.5, loc="best")
    ax_d.set_title(rf"the change: max $|\tilde f - f|$ = {result['max_abs_change']:.3g}, "
                   rf"entropy {result['entropy_change']:+.4f} nats at $\delta$={result['delta']:.3g}", fontsize=9)
    fig.tight_layout()
    return fig


def _plot(result: dict, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = _figure(result, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``dynact design``: write ``design.png`` and ``design.json`` to ``--out``, print the JSON and
    end with :func:`summary_line`."""
    parser = _parser()
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
    _plot(result, f"{args.base} under {args.density}", out / "design.png")
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public["plot"] = str(out / "design.png")
    (out / "design.json").write_text(json.dumps(public, indent=2) + "\n")
    print(json.dumps(public, indent=2))
    print(summary_line(result, out))
    return 0
