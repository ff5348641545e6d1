"""Quickstart: add EAFOCallback to your own Lightning model and watch its activations.

The callback turns the model's ReLU modules into dynamic EAFO activations, measures each
layer's pre-activations while training, updates the activations every ``--every-n-steps``
optimizer steps and logs per-layer entropies to TensorBoard. About 20 s on a laptop CPU::

    python examples/quickstart.py
    tensorboard --logdir runs

It ends with one line: the final validation top-1 and loss, the layers' figures after the last
update, and the TensorBoard run and checkpoint it wrote.
"""

from __future__ import annotations

import argparse
import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F

from dynact import EAFOCallback
from dynact.experiments.data import DigitsDataModule
from dynact.summary import trainer_result_line


class DigitsMLP(pl.LightningModule):
    """Your model: any LightningModule whose activations are modules (nn.ReLU, not F.relu)."""

    def __init__(self, hidden: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val/acc1", (logits.argmax(1) == y).float().mean())
        self.log("val/loss", F.cross_entropy(logits, y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def epochs_for(max_steps: int, data: DigitsDataModule) -> int:
    """The epochs ``max_steps`` optimizer steps span. Given only ``max_steps``, Lightning counts
    epochs without an end (``max_epochs=-1``) and its progress bar reads ``Epoch 13/-2``."""
    data.setup("fit")
    return max(1, math.ceil(max_steps / len(data.train_dataloader())))


def main() -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--every-n-steps", type=int, default=50)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args()

    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        max_epochs=epochs_for(args.max_steps, data),  # the steps end the run; this only names the last epoch
        accelerator="cpu",
        callbacks=[EAFOCallback(every_n_steps=args.every_n_steps)],
        logger=TensorBoardLogger(args.logdir, name="quickstart"),
        log_every_n_steps=10,
        # validate (and checkpoint) at every activation update, across epochs: the default
        # --max-steps is a multiple of --every-n-steps, so the last validation is of the final model
        val_check_interval=args.every_n_steps,
        check_val_every_n_epoch=None,
    )
    trainer.fit(DigitsMLP(), datamodule=data)
    print(f"\nPer-layer entropies, histograms and curves:\n    tensorboard --logdir {args.logdir}")
    print(trainer_result_line(trainer))
    return trainer


if __name__ == "__main__":
    main()
