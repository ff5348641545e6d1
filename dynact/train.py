"""``dynact train``: Lightning's CLI over :class:`~dynact.models.ImageClassifier` and any data module.

Every Trainer flag and YAML config works, as with any ``LightningCLI``::

    dynact train --config examples/configs/digits.yaml
    dynact train --config examples/configs/vit_tiny_cifar10_crrelu.yaml --trainer.devices 4
    dynact train validate --config examples/configs/digits.yaml --ckpt_path last.ckpt

``fit`` is implied when the first argument is not a subcommand (``fit``, ``validate``, ``test``,
``predict``). The data module is chosen by class name or path, e.g.
``--data CIFAR10DataModule --data.root data``.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import dynact.data  # noqa: F401  (imported so that --data accepts short names, e.g. DigitsDataModule)
from dynact.models import ImageClassifier

__all__ = ["main", "build_cli"]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class _TrainCLI(LightningCLI):
    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--torch_threads",
            type=Optional[int],
            default=None,
            help="CPU threads for torch's operators (torch.set_num_threads); default: torch's choice. "
            "1 suits small models on a busy CPU, where threads of one process wait on each other",
        )

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = config.get("torch_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"torch_threads must be >= 1 (or null for torch's default), got {threads}")
            torch.set_num_threads(threads)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # `dynact train` forwards the words after "train", so sys.argv holding them too is expected;
        # Lightning's warning about passing both would fire on every run.
        if isinstance(args, list):
            self.config = parser.parse_args(args)
        else:
            super().parse_arguments(parser, args)


def build_cli(argv: Optional[list[str]] = None, run: bool = True) -> LightningCLI:
    """Parse ``argv`` (default ``sys.argv[1:]``), build model, data and Trainer, and run them.

    With ``run=False`` nothing is trained and ``argv`` has no subcommand: the returned CLI holds
    the instantiated ``model``, ``datamodule`` and ``trainer`` (useful to check a config).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if run and (not args or args[0] not in _SUBCOMMANDS):
        args = ["fit", *args]
    return _TrainCLI(
        ImageClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``dynact train``: ``argv`` is everything after ``train``."""
    build_cli(argv, run=True)


if __name__ == "__main__":
    main()
