"""Draw docs/images/activations.png: ReLU, CRReLU and an EAFOActivation refreshed from a skewed density.

Every curve is computed by dynact itself (``CRReLU``, ``EAFOActivation.refresh``); nothing is
drawn by hand. The left panel uses a negative ``eps``, the right a positive one, with the same
magnitude, so the picture also shows what the sign of ``eps`` does.

    python docs/make_figure.py            # writes docs/images/activations.png (a few seconds on a CPU)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from scipy.stats import skewnorm  # noqa: E402

from dynact import CRReLU, EAFOActivation  # noqa: E402
from dynact.density import Density  # noqa: E402

#: |eps| of both panels: far larger than the 0.01 CRReLU starts from, so the shapes can be seen.
EPS = 0.3
#: The measured density the spline is refreshed from: skewed to the right, centred on 0.3, std ~ 1.3.
DENSITY = skewnorm(a=4.0, loc=-0.8, scale=1.6)


def curves(eps: float, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """ReLU, CRReLU(eps) and an EAFOActivation(relu, eps) refreshed from ``DENSITY``, on ``x``."""
    density = Density.from_pdf(DENSITY.pdf, -8.0, 8.0, 1600)
    eafo = EAFOActivation("relu", lo=-6.0, hi=6.0, eps=eps)
    eafo.refresh(density)
    with torch.no_grad():
        return {
            "ReLU": torch.relu(x),
            f"CRReLU, eps = {eps:+g}": CRReLU(eps=eps)(x),
            f"EAFOActivation refreshed, eps = {eps:+g}": eafo(x),
        }


def draw(out: Path) -> None:
    x = torch.linspace(-3.0, 3.0, 601)
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4), sharey=True, constrained_layout=True)
    for ax, eps in zip(axes, (-EPS, EPS), strict=True):
        for (label, y), style in zip(curves(eps, x).items(), ("k:", "C0--", "C3-"), strict=True):
            ax.plot(x, y, style, lw=1.8, label=label)
        twin = ax.twinx()
        twin.fill_between(x, DENSITY.pdf(x.numpy()), color="0.85", zorder=0)
        twin.set_ylim(0, 1.6)
        twin.set_yticks([])
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.set_title(f"eps {'< 0' if eps < 0 else '> 0'}", fontsize=10)
        ax.set_xlabel("pre-activation x  (grey: the density the spline was refreshed from)", fontsize=8)
        ax.set_ylim(-0.6, 3.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("activation f(x)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images" / "activations.png")
    draw(parser.parse_args().out)
