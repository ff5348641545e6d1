"""Write one ``dynact train`` config per cell of the paper's Tables 1-3, and keep examples/configs current.

Table 1 is CIFAR-10, Table 2 CIFAR-100 (ViT-Tiny, DeiT-Tiny, TNT-Small), Table 3 ImageNet-1K
(ViT-Tiny, DeiT-Tiny); each compares GELU, ELU, PReLU, CELU, SiLU, Mish and CRReLU. Settings
follow the paper's Appendix E (the README's "The paper's experiments" lists them).

The configs ship inside the package (``dynact/experiments/configs``, found by name:
``dynact train --config vit_tiny_cifar10_crrelu``); this folder holds identical copies to start from.
The script writes the paper's configs into the package, then copies every shipped config here
(the hand-written digits ones included, whose source is the package's file).

    python examples/configs/make_configs.py           # (re)write the package's paper configs and the copies here
    python examples/configs/make_configs.py --check   # exit 1 if any file differs from what it would write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parents[1] / "dynact" / "experiments" / "configs"

ACTIVATIONS = ("gelu", "elu", "prelu", "celu", "silu", "mish", "crrelu")
ARCHS = {"vit_tiny": "ViT-Tiny", "deit_tiny": "DeiT-Tiny", "tnt_small": "TNT-Small"}
# dataset -> (table, data class, data arguments, num_classes, img_size, patch_size, models)
DATASETS = {
    "cifar10": (1, "dynact.data.CIFAR10DataModule", {"root": "data", "download": True}, 10, 32, 4,
                ("vit_tiny", "deit_tiny", "tnt_small")),
    "cifar100": (2, "dynact.data.CIFAR100DataModule", {"root": "data", "download": True}, 100, 32, 4,
                 ("vit_tiny", "deit_tiny", "tnt_small")),
    "imagenet": (3, "dynact.data.ImageNetDataModule", {"root": "data/imagenet"}, 1000, 224, 16,
                 ("vit_tiny", "deit_tiny")),
}
# The paper distils DeiT-Tiny on ImageNet-1K from timm's deit_tiny_patch16_224 (trained with GELU).
IMAGENET_TEACHER = {"teacher": "deit_tiny_patch16_224", "teacher_weights": "checkpoints/deit_tiny_patch16_224.pth"}


def config(arch: str, dataset: str, act: str) -> dict:
    """The config of one cell, as a plain dict in LightningCLI's layout."""
    _, data_class, data_args, num_classes, img_size, patch_size, _ = DATASETS[dataset]
    model = {
        "arch": arch,
        "num_classes": num_classes,
        "img_size": img_size,
        "patch_size": patch_size,
        "act": act,
        "act_kwargs": {"eps": 0.01} if act == "crrelu" else None,
        "lr": 2.5e-4,
        "min_lr": 1.0e-5,
        "warmup_lr": 1.0e-6,
        "warmup_epochs": 20,
        "weight_decay": 0.05,
        "teacher": None,
        "teacher_weights": None,
    }
    if arch == "deit_tiny" and dataset == "imagenet":
        model |= IMAGENET_TEACHER
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 100,
            "gradient_clip_val": 1.0,
            "precision": "bf16-mixed",
            "default_root_dir": f"runs/{arch}_{dataset}_{act}",
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                 "init_args": {"logging_interval": "step"}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val/acc1", "mode": "max", "save_last": True}},
            ],
        },
        "model": model,
        "data": {"class_path": data_class, "init_args": {**data_args, "batch_size": 256}},
    }


def header(arch: str, dataset: str, act: str) -> str:
    table = DATASETS[dataset][0]
    lines = [
        f"# {ARCHS[arch]} on {dataset} with {act} (the paper's Table {table}); written by make_configs.py.",
        "# Appendix E: AdamW (wd 0.05), lr 2.5e-4 at batch 256, cosine to 1e-5 after 20 warm-up epochs",
        "# from 1e-6, gradient clipping 1.0, 100 epochs, timm augmentation, no dropout or drop-path.",
        "# batch_size is per device: with N devices use 256 / N to keep the paper's batch of 256.",
        f"# Run: dynact train --config {arch}_{dataset}_{act}   (shipped with dynact; or the path of a copy)",
    ]
    if arch == "deit_tiny" and dataset == "imagenet":
        lines.append("# Distils from timm's deit_tiny_patch16_224: put its state_dict at teacher_weights,")
        lines.append("# or set teacher and teacher_weights to null to train both heads on the labels.")
    return "\n".join(lines) + "\n"


def cells() -> list[tuple[str, str, str]]:
    """Every (arch, dataset, activation) of Tables 1-3."""
    return [(arch, ds, act) for ds, spec in DATASETS.items() for arch in spec[-1] for act in ACTIVATIONS]


def render(arch: str, dataset: str, act: str) -> str:
    return header(arch, dataset, act) + yaml.safe_dump(config(arch, dataset, act), sort_keys=False)


def expected() -> dict[Path, str]:
    """Every file this script owns and the text it should hold: the paper's configs in the
    package, and here a copy of every config the package ships."""
    shipped = {PACKAGE / f"{arch}_{ds}_{act}.yaml": render(arch, ds, act) for arch, ds, act in cells()}
    for path in sorted(PACKAGE.glob("*.yaml")):
        shipped.setdefault(path, path.read_text())
    return {**shipped, **{HERE / path.name: text for path, text in shipped.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    files = expected()
    stale = [str(path.relative_to(HERE.parents[1])) for path, text in files.items()
             if not path.is_file() or path.read_text() != text]
    # a copy here whose config the package no longer ships
    stale += [str(p.relative_to(HERE.parents[1])) for p in sorted(HERE.glob("*.yaml")) if p not in files]
    if not args.check:
        for path, text in files.items():
            path.write_text(text)
        for path in sorted(HERE.glob("*.yaml")):
            if path not in files:
                path.unlink()
        return 0
    if stale:
        print(f"out of date: {', '.join(stale)}; run python examples/configs/make_configs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
