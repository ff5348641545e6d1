"""Training throughput of ViT-Tiny (CIFAR geometry: 32 px, patch 4) per MLP activation.

One epoch of CIFAR-shaped random data (50,000 images by default) per activation through the real
``ImageClassifier`` and Lightning ``Trainer`` (AdamW, per-step schedule, gradient clipping 1.0),
in bf16 mixed precision. Prints JSON: images/second per activation and the ratio to GELU, all
measured in the same run. No download needed.

    python benchmarks/bench_models.py                               # GPU: the full epoch per activation
    python benchmarks/bench_models.py --steps 4 --batch-size 16     # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dynact.activations import activation_names
from dynact.experiments.models import ImageClassifier


class _Throughput(pl.Callback):
    """Images/second from the end of the warm-up batches to the end of the epoch."""

    def __init__(self, skip: int, batch_size: int) -> None:
        self.skip, self.batch_size = skip, batch_size
        self.start = self.batches = None

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.skip - 1:
            self._sync(pl_module)
            self.start = time.perf_counter()
        self.batches = batch_idx + 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.elapsed = time.perf_counter() - self.start
        self.images_per_s = (self.batches - self.skip) * self.batch_size / self.elapsed


def _measure(act: str, loader: DataLoader, args: argparse.Namespace) -> float:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier("vit_tiny", num_classes=10, img_size=32, patch_size=4, act=act, warmup_epochs=0)
    meter = _Throughput(skip=args.skip, batch_size=args.batch_size)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=1,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[meter],
    )
    trainer.fit(model, loader)
    return meter.images_per_s


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activations", nargs="+", default=activation_names())
    parser.add_argument("--images", type=int, default=50_000, help="images in the epoch (CIFAR: 50,000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="stop the epoch after this many steps")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args(argv)

    steps = args.images // args.batch_size
    if args.steps is not None:
        steps = min(steps, args.steps)
    args.skip = min(args.skip, max(steps - 1, 0))
    if steps - args.skip < 1:
        parser.error("need at least one timed step: raise --images/--steps or lower --skip")
    torch.manual_seed(0)
    n = steps * args.batch_size
    data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        pin_memory=torch.cuda.is_available())

    rates = {act: _measure(act, loader, args) for act in args.activations}
    reference = rates.get("gelu")
    result = {
        "benchmark": "vit_tiny_cifar_shaped_train_epoch",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "steps": steps,
        "timed_steps": steps - args.skip,
        "images_per_s": {act: round(r, 1) for act, r in rates.items()},
        "ratio_to_gelu": {act: round(r / reference, 3) for act, r in rates.items()} if reference else None,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
