"""dynact in a plain PyTorch loop: no Lightning, no Trainer.

An MLP with ReLU layers learns scikit-learn's digits. ``ActivationOptimizer`` turns the ReLUs
into dynamic EAFO activations (before the weight optimizer is built, so their ``eps`` are
trained), samples their inputs, and refreshes them every ``every_n_steps`` optimizer steps.
A fifth of the images is held out; the run ends with one line: their top-1 and loss, the
layers' figures after the last update, and the checkpoint written (model and activation
optimizer: ``load_state_dict`` both to resume).

    python examples/plain_pytorch.py          # about 10 s on a laptop CPU
    python examples/plain_pytorch.py --steps 50 --out runs/plain_pytorch
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
from sklearn.datasets import load_digits
from torch import nn

from dynact import ActivationOptimizer
from dynact.summary import result_line


def main(steps: int = 300, seed: int = 0, out: Optional[str] = None) -> dict[str, float]:
    """Train for ``steps`` optimizer steps; save a checkpoint under ``out`` (None: nothing written).
    Returns the activation optimizer's latest per-layer figures."""
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    held_out = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) < len(x) // 5
    x_val, y_val, x, y = x[held_out], y[held_out], x[~held_out], y[~held_out]
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    # 1. Build the activation optimizer first: it converts nn.ReLU to EAFOActivation.
    act_opt = ActivationOptimizer(model, every_n_steps=50, window=10, sample_size=1024)
    # 2. Then the weight optimizer, which now sees every eps.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(x), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        updated = act_opt.step()  # 3. once per optimizer step; a dict when it updated
        if updated:
            eps = {k: round(v, 4) for k, v in updated.items() if k.startswith("eps/")}
            h = {k: round(v, 3) for k, v in updated.items() if k.startswith("entropy_scale_free/")}
            print(f"step {step + 1}: loss {loss.item():.3f}, {eps}, {h}")
    act_opt.remove()
    with torch.no_grad():
        logits = model(x_val)
    figures = {"val/acc1": (logits.argmax(1) == y_val).float().mean().item(),
               "val/loss": nn.functional.cross_entropy(logits, y_val).item()}
    checkpoint = None
    if out is not None:
        checkpoint = Path(out) / "checkpoint.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "activation_optimizer": act_opt.state_dict(), "step": steps},
                   checkpoint)
    print(result_line(figures, act_opt.metrics(), {"checkpoint": checkpoint and str(checkpoint)}))
    return act_opt.metrics()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/plain_pytorch", help="folder of the checkpoint (default %(default)s)")
    cli = parser.parse_args()
    main(cli.steps, cli.seed, cli.out)
