"""The data modules, at their public path: they live in :mod:`dynact.experiments.data`.

``dynact.data.DigitsDataModule`` (the class path the example configs use), the CIFAR and
ImageNet modules and the transforms keep working from here.
"""

from dynact.experiments.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageNetDataModule,
    eval_transform,
    train_transform,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageNetDataModule",
    "DigitsDataModule",
    "train_transform",
    "eval_transform",
]
