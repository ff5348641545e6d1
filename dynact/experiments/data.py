"""Data modules for the paper's data sets, plus an offline default (scikit-learn's digits).

- :class:`CIFAR10DataModule`, :class:`CIFAR100DataModule`: torchvision's readers of the
  ``cifar-10-batches-py`` / ``cifar-100-python`` folders (downloaded when ``download=True`` and
  the machine is online).
- :class:`ImageNetDataModule`: a folder with ``train/`` and ``val/`` class sub-folders.
- :class:`DigitsDataModule`: 1,797 bundled 8x8 grey digits, a stratified split drawn by ``seed``,
  no network.

Training images go through timm's transform factory with DeiT's settings (the paper's "timm
augmentation": random resized crop, flip, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing
0.25, bicubic); evaluation transforms are deterministic (resize, centre crop, normalise).
Every module exposes ``num_classes``, ``img_size`` and ``in_chans`` so that
:class:`~dynact.experiments.models.ImageClassifier` can check that the model fits the data.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageNetDataModule",
    "DigitsDataModule",
    "train_transform",
    "eval_transform",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# DeiT's training augmentation, which the paper calls "timm augmentation".
AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
RE_PROB = 0.25


def train_transform(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    auto_augment: Optional[str] = AUTO_AUGMENT,
    re_prob: float = RE_PROB,
) -> Callable:
    """timm's training transform with DeiT's settings (PIL image in, normalised tensor out)."""
    return create_transform(
        img_size,
        is_training=True,
        auto_augment=auto_augment,
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        interpolation="bicubic",
        mean=mean,
        std=std,
    )


def eval_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float) -> Callable:
    """Deterministic evaluation transform: resize to ``img_size / crop_pct``, centre crop, normalise."""
    return create_transform(
        img_size, is_training=False, interpolation="bicubic", mean=mean, std=std, crop_pct=crop_pct
    )


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


class _ImageDataModule(pl.LightningDataModule):
    """Loaders shared by every module: shuffled training batches, ordered validation batches."""

    num_classes: Optional[int] = None
    img_size: int = 32
    in_chans: int = 3

    def __init__(self, batch_size: int, num_workers: Optional[int], pin_memory: Optional[bool]) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or None for min(8, cpu count)), got {num_workers!r}")
        self.batch_size = batch_size
        self.num_workers = _default_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            # Equal batches keep the per-step schedule and batch statistics uniform, as in DeiT.
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)


# ----------------------------------------------------------------------------- CIFAR


def _without_md5(reader: type) -> type:
    """torchvision's reader with the file checks kept and the md5 sums dropped.

    The format is still checked when the batches are read; dropping the checksums lets re-packed
    or subset folders in the same format load (torchvision's own download still verifies them).
    """
    return type(
        f"_{reader.__name__}Files",
        (reader,),
        {
            "train_list": [[name, None] for name, _ in reader.train_list],
            "test_list": [[name, None] for name, _ in reader.test_list],
            "meta": {**reader.meta, "md5": None},
        },
    )


# Module-level, so that datasets pickle by reference into spawned loader workers.
_CIFAR10Files = _without_md5(CIFAR10)
_CIFAR100Files = _without_md5(CIFAR100)


class _CIFARDataModule(_ImageDataModule):
    reader: type = CIFAR10  # torchvision's class: downloads and verifies the archive
    files_reader: type = _CIFAR10Files  # reads the extracted folder
    label_key: str = "labels"
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 256,
        img_size: int = 32,
        download: bool = False,
        auto_augment: Optional[str] = AUTO_AUGMENT,
        re_prob: float = RE_PROB,
        num_workers: Optional[int] = None,
        pin_memory: Optional[bool] = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        self.root = Path(root).expanduser()
        self.img_size = img_size
        self.download = download
        self.auto_augment = auto_augment
        self.re_prob = re_prob

    @property
    def folder(self) -> Path:
        """Where the batch files live: ``<root>/cifar-10-batches-py`` or ``<root>/cifar-100-python``."""
        return self.root / self.reader.base_folder

    def _files(self) -> list[str]:
        names = [name for name, _ in self.reader.train_list + self.reader.test_list]
        return names + [self.reader.meta["filename"]]

    def _missing(self) -> list[str]:
        return [name for name in self._files() if not (self.folder / name).is_file()]

    def _not_found(self, missing: list[str], reason: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.reader.__name__} files not found in {str(self.folder)!r} (missing: {', '.join(missing)}); "
            f"{reason}. Put the extracted {self.reader.filename} there (from {self.reader.url}), i.e. "
            f"{', '.join(self._files())} inside {str(self.folder)!r}, or pass root= pointing at the "
            f"folder that contains {self.reader.base_folder!r}"
        )

    def prepare_data(self) -> None:
        missing = self._missing()
        if not missing or not self.download:
            return
        try:
            self.reader(str(self.root), train=True, download=True)  # md5-checked download
        except Exception as err:  # no network, proxy, disk: all end in the same advice
            raise self._not_found(missing, f"download=True failed ({type(err).__name__}: {err})") from err

    def setup(self, stage: Optional[str] = None) -> None:
        missing = self._missing()
        if missing:
            reason = "download=False" if not self.download else "the download did not produce them"
            raise self._not_found(missing, reason + " (pass download=True on a machine with internet)")
        reader, root = self.files_reader, str(self.root)
        train_tf = train_transform(self.img_size, self.mean, self.std, self.auto_augment, self.re_prob)
        val_tf = eval_transform(self.img_size, self.mean, self.std, crop_pct=1.0)
        try:
            self.train_set = reader(root, train=True, transform=train_tf)
            self.val_set = reader(root, train=False, transform=val_tf)
        except Exception as err:
            raise self._bad_file(err) from err
        # torchvision reads CIFAR-100's "fine_labels" in a CIFAR-10 folder too; the label range tells.
        for split in (self.train_set, self.val_set):
            labels = np.asarray(split.targets)
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise self._bad_file(None)

    def _bad_file(self, err: Optional[Exception]) -> ValueError:
        for name in self._files():
            is_meta = name == self.reader.meta["filename"]
            meta_key = self.reader.meta["key"] if is_meta else None
            problem = _cifar_file_problem(self.folder / name, meta_key, self.label_key, self.num_classes)
            if problem:
                return ValueError(
                    f"{str(self.folder / name)!r} is not a {self.reader.__name__} file: {problem}. "
                    f"Replace it with the original from {self.reader.url}"
                )
        return ValueError(f"could not read {self.reader.__name__} from {str(self.folder)!r}: {err}")


def _cifar_file_problem(path: Path, meta_key: Optional[str], label_key: str, num_classes: int) -> Optional[str]:
    """Describe what is wrong with one CIFAR file (None when it looks right).

    A batch file is a pickled dict with ``data`` (``N x 3072`` uint8, channel-major 32x32) and
    ``label_key`` (N ints); the meta file (``meta_key`` given) is a dict holding the class names.
    """
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as err:
        return f"it does not unpickle ({type(err).__name__}: {err})"
    if not isinstance(entry, dict):
        return f"it holds a {type(entry).__name__}, expected a dict"
    if meta_key is not None:
        return None if meta_key in entry else f"it has no {meta_key!r} entry (class names)"
    if "data" not in entry or label_key not in entry:
        return f"it has keys {sorted(map(str, entry))}, expected 'data' and {label_key!r}"
    data = np.asarray(entry["data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        return f"'data' is {data.dtype} with shape {data.shape}, expected uint8 with shape (N, 3072)"
    labels = np.asarray(entry[label_key])
    if len(labels) != len(data):
        return f"{len(labels)} labels for {len(data)} images"
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        return f"labels in [{labels.min()}, {labels.max()}], expected 0..{num_classes - 1}"
    return None


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50,000 train / 10,000 test images, 32x32, 10 classes) via torchvision.

    The test split is the validation set, as in the paper. Files are expected in
    ``<root>/cifar-10-batches-py/`` (``data_batch_1`` ... ``data_batch_5``, ``test_batch``,
    ``batches.meta``); with ``download=True`` they are fetched when missing.

    Args:
        root: folder that contains ``cifar-10-batches-py``.
        batch_size: images per batch (256 in the paper).
        img_size: side of the images fed to the model (32 native; larger upsamples).
        download: fetch the archive when files are missing.
        auto_augment: timm RandAugment policy for training (None to disable).
        re_prob: random-erasing probability for training.
        num_workers: loader processes (None: ``min(8, cpu count)``); persistent when > 0.
        pin_memory: pin host memory (None: when CUDA is available).
    """

    reader = CIFAR10
    label_key = "labels"
    num_classes = 10
    mean, std = CIFAR10_MEAN, CIFAR10_STD


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (100 fine classes) via torchvision; files in ``<root>/cifar-100-python/``
    (``train``, ``test``, ``meta``). Arguments as in :class:`CIFAR10DataModule`."""

    reader = CIFAR100
    files_reader = _CIFAR100Files
    label_key = "fine_labels"
    num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD


# ----------------------------------------------------------------------------- ImageNet


class ImageNetDataModule(_ImageDataModule):
    """ImageNet-1K (or any data set) in a folder: ``<root>/train/<class>/*.JPEG`` and
    ``<root>/val/<class>/*.JPEG`` with the same class folders.

    ``num_classes`` is the number of class folders, known after :meth:`setup`.

    Args:
        root: folder that contains ``train/`` and ``val/``.
        batch_size: images per batch (256 in the paper).
        img_size: model input side (224); validation resizes to ``img_size / 0.875`` and centre-crops.
        auto_augment, re_prob, num_workers, pin_memory: as in :class:`CIFAR10DataModule`.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        batch_size: int = 256,
        img_size: int = 224,
        auto_augment: Optional[str] = AUTO_AUGMENT,
        re_prob: float = RE_PROB,
        num_workers: Optional[int] = None,
        pin_memory: Optional[bool] = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        self.root = Path(root).expanduser()
        self.img_size = img_size
        self.auto_augment = auto_augment
        self.re_prob = re_prob
        self.num_classes = None

    def setup(self, stage: Optional[str] = None) -> None:
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise FileNotFoundError(
                    f"ImageNetDataModule: folder {str(self.root / split)!r} does not exist; root={str(self.root)!r} "
                    "must contain train/ and val/, each with one sub-folder of images per class"
                )
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        train_tf = train_transform(self.img_size, mean, std, self.auto_augment, self.re_prob)
        self.train_set = ImageFolder(str(self.root / "train"), transform=train_tf)
        self.val_set = ImageFolder(str(self.root / "val"), transform=eval_transform(self.img_size, mean, std, 0.875))
        if self.train_set.classes != self.val_set.classes:
            only_train = sorted(set(self.train_set.classes) - set(self.val_set.classes))[:5]
            only_val = sorted(set(self.val_set.classes) - set(self.train_set.classes))[:5]
            raise ValueError(
                f"ImageNetDataModule: train/ and val/ under {str(self.root)!r} have different class folders "
                f"(only in train: {only_train}, only in val: {only_val}); both need the same classes"
            )
        self.num_classes = len(self.train_set.classes)


# ----------------------------------------------------------------------------- digits


class DigitsDataModule(_ImageDataModule):
    """scikit-learn's bundled digits: 1,797 grey 8x8 images of 10 classes, no download.

    A stratified split: ``val_fraction`` of each class held out, which images drawn by ``seed``
    (the same seed gives the same split; ``dynact compare`` gives each seed its own split, so
    its intervals cover the sampling of the data too). Pixels (0..16) are scaled to [0, 1]
    and standardised with the training split's mean and std. Batches are ``(B, 1, 8, 8)``
    float tensors, so models need ``in_chans=1`` and ``img_size=8``.

    Args:
        batch_size: images per batch.
        val_fraction: share of each class held out for validation.
        seed: seed of the split (which images are held out).
        num_workers: loader processes (0: the tensors are already in memory).
        pin_memory: pin host memory (None: when CUDA is available).
    """

    num_classes = 10
    img_size = 8
    in_chans = 1

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.val_fraction = val_fraction
        self.seed = seed

    def setup(self, stage: Optional[str] = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0
        x_train, x_val, y_train, y_val = train_test_split(
            images, digits.target, test_size=self.val_fraction, stratify=digits.target, random_state=self.seed
        )
        mean, std = float(x_train.mean()), float(x_train.std())
        self.train_set = _tensor_set(x_train, y_train, mean, std)
        self.val_set = _tensor_set(x_val, y_val, mean, std)


def _tensor_set(images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> TensorDataset:
    x = torch.from_numpy((images - mean) / std).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels).long())
