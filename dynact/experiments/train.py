"""``dynact train``: Lightning's CLI over :class:`~dynact.experiments.models.ImageClassifier` and any data module.

Every Trainer flag and YAML config works, as with any ``LightningCLI``; ``--config`` also takes
the name of a config shipped with dynact (:mod:`dynact.experiments.configs`, ``.yaml`` optional),
so these run from any folder::

    dynact train --config digits
    dynact train --config vit_tiny_cifar10_crrelu --trainer.devices 4
    dynact train validate --config digits.yaml --ckpt_path last.ckpt
    dynact train --config my_configs/digits.yaml     # a path, as with any LightningCLI

``fit`` is implied when the first argument is not a subcommand (``fit``, ``validate``, ``test``,
``predict``). The data module is chosen by class name or path, e.g.
``--data CIFAR10DataModule --data.root data``. ``--help`` opens with what dynact adds
(:func:`dynact_help`), then Lightning's full list; a run ends with one line saying what it
reached and wrote (:func:`dynact.summary.trainer_result_line`).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import dynact.experiments.data  # noqa: F401  (imported so that --data accepts short names, e.g. DigitsDataModule)
from dynact.activations import activation_names
from dynact.callbacks import EAFOCallback
from dynact.experiments import configs
from dynact.experiments.models import ImageClassifier
from dynact.summary import trainer_result_line

__all__ = ["main", "build_cli", "dynact_help", "resolve_configs"]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _shown(value) -> str:
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_shown, value)) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def dynact_help() -> str:
    """The section ``dynact train --help`` opens with: what is trained, the callback's options
    (read from its signature, defaults included), where the paper's configs are, an example."""
    options = ", ".join(f"{name}={_shown(param.default)}" for name, param in
                        inspect.signature(EAFOCallback.__init__).parameters.items() if name != "self")
    wrap = textwrap.TextWrapper(width=100, initial_indent="    ", subsequent_indent="    ")
    return "\n".join([
        "dynact train: an image classifier (dynact.models.ImageClassifier: ViT-Tiny, DeiT-Tiny, TNT-S of the",
        "paper, or a small ViT on digits) with the activation of your choice, trained by Lightning's CLI:",
        "every Trainer flag and YAML key below works.",
        "",
        "  --model.act NAME    the blocks' MLP activation: " + " ".join(activation_names()),
        "  EAFOCallback        per-layer entropies and dead mass, and the EAFO updates of --model.act eafo;",
        "                      add it in a config's trainer.callbacks (the shipped digits_eafo.yaml) or with",
        "                      --trainer.callbacks+=dynact.callbacks.EAFOCallback --trainer.callbacks.every_n_steps 50",
        "                      Its options, with their defaults (help(dynact.EAFOCallback) explains each):",
        *wrap.wrap(options),
        "  --config NAME|PATH  a YAML file, or a config shipped with dynact by name (.yaml optional), from any",
        "                      folder: digits, digits_eafo, digits_sweep (offline, CPU), and one per cell of the",
        "                      paper's Tables 1-3 ({vit_tiny,deit_tiny,tnt_small}_{cifar10,cifar100}_{act},",
        "                      {vit_tiny,deit_tiny}_imagenet_{act}; Appendix E's settings); copies to edit are in",
        "                      examples/configs/ of the repository",
        "  example             dynact train --config digits_eafo --trainer.max_epochs 5",
        "",
        "The run ends with one line: final val top-1 and loss, the layers' figures, the TensorBoard run and",
        "checkpoint written. Subcommands: fit (implied), validate, test, predict. Lightning's options follow.",
        "",
    ])


class _Parser(LightningArgumentParser):
    """Lightning's parser, whose help opens with :func:`dynact_help`."""

    @override
    def format_help(self) -> str:
        return dynact_help() + "\n" + super().format_help()


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


def _config_value(value: str, stack: contextlib.ExitStack) -> str:
    """A ``--config`` value as LightningCLI reads it: a file as given, a shipped config's name as
    the path of that file (kept on disk while ``stack`` is open), anything else (inline YAML) as is."""
    if Path(value).expanduser().is_file() or configs.lookup(value) is None:
        if configs.is_bare_name(value) and not Path(value).expanduser().exists():
            print(f"dynact train: error: --config {configs.not_found_message(value)}", file=sys.stderr)
            raise SystemExit(2)
        return value
    return str(stack.enter_context(configs.as_path(value)))


def resolve_configs(args: list[str], stack: contextlib.ExitStack) -> list[str]:
    """``args`` with every ``--config NAME`` (``-c NAME``, ``--config=NAME``) of a shipped config
    replaced by its path; paths and everything else unchanged."""
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token in ("--config", "-c") and i + 1 < len(args):
            out += [token, _config_value(args[i + 1], stack)]
            i += 2
            continue
        if token.startswith("--config="):
            token = "--config=" + _config_value(token[len("--config="):], stack)
        out.append(token)
        i += 1
    return out


def build_cli(argv: Optional[list[str]] = None, run: bool = True) -> LightningCLI:
    """Parse ``argv`` (default ``sys.argv[1:]``), build model, data and Trainer, and run them.

    With ``run=False`` nothing is trained and ``argv`` has no subcommand: the returned CLI holds
    the instantiated ``model``, ``datamodule`` and ``trainer`` (useful to check a config).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if run and (not args or args[0] not in _SUBCOMMANDS):
        args = ["fit", *args]
    # A shipped config is a real file already unless the package is zipped; then its temporary
    # copy must outlive the run, which reads it again when it saves config.yaml.
    with contextlib.ExitStack() as stack:
        return _TrainCLI(
            ImageClassifier,
            LightningDataModule,
            subclass_mode_data=True,
            args=resolve_configs(args, stack),
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_class=_Parser,
            parser_kwargs={"prog": "dynact train"},
        )


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``dynact train``: ``argv`` is everything after ``train``. Ends with the
    run's result line (:func:`dynact.summary.trainer_result_line`) on the main process."""
    cli = build_cli(argv, run=True)
    if cli.trainer.is_global_zero:
        # validate / test / predict write no checkpoint (the one they read is the user's own)
        print(trainer_result_line(cli.trainer, checkpoint=cli.subcommand == "fit"), flush=True)


if __name__ == "__main__":
    main()
