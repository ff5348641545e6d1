"""dynact in a plain PyTorch loop: no Lightning, no Trainer.

An MLP with ReLU layers learns scikit-learn's digits. ``ActivationOptimizer`` turns the ReLUs
into dynamic EAFO activations (before the weight optimizer is built, so their ``eps`` are
trained), samples their inputs, and refreshes them every ``every_n_steps`` optimizer steps.

    python examples/plain_pytorch.py          # about 10 s on a laptop CPU
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

from dynact import ActivationOptimizer


def main(steps: int = 300, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
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
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"train accuracy {accuracy:.3f}")
    return act_opt.metrics()


if __name__ == "__main__":
    main()
