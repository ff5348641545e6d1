"""dynact.experiments.data: CIFAR in its real on-disk format, ImageNet-style folders and digits, through the
real torchvision readers, timm transforms and Lightning's Trainer."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from dynact.experiments.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageNetDataModule,
)
from dynact.experiments.models import ImageClassifier

TINY_VIT = dict(embed_dim=32, depth=1, num_heads=2)


def _write_cifar(root: Path, per_file: int = 8, hundred: bool = False, seed: int = 0) -> dict[str, tuple]:
    """Write CIFAR-10 (or -100) in its distributed layout: pickled dicts, one per batch file.

    ``data`` is ``N x 3072`` uint8 (channel-major 32x32), labels under ``labels`` (``fine_labels``
    for CIFAR-100), and a meta file with the class names. Returns ``file -> (data, labels)``.
    """
    rng = np.random.default_rng(seed)
    if hundred:
        folder, files, label_key, classes = root / "cifar-100-python", ["train", "test"], "fine_labels", 100
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20})
    else:
        folder, label_key, classes = root / "cifar-10-batches-py", "labels", 10
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    folder.mkdir(parents=True)
    written = {}
    for name in files:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=per_file).tolist()
        names = [f"{i}.png" for i in range(per_file)]
        entry = {"batch_label": name, "data": data, label_key: labels, "filenames": names}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data, labels)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f, protocol=2)
    return written


def _write_image_folder(root: Path, classes=("ant", "bee", "cat"), per_class: int = 4) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def _fit_two_steps(model: ImageClassifier, datamodule: pl.LightningDataModule) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule)
    return trainer


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_reads_the_real_format_and_trains_through_the_trainer(tmp_path):
    written = _write_cifar(tmp_path, per_file=8)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 40 and len(dm.val_set) == 8
    assert dm.val_set.targets == written["test_batch"][1]
    # Evaluation is deterministic and, at the native 32 px, exactly the normalised pixels.
    x, y = dm.val_set[3]
    pixels = written["test_batch"][0][3].reshape(3, 32, 32).astype(np.float32) / 255.0
    expected = (pixels - np.array(CIFAR10_MEAN)[:, None, None]) / np.array(CIFAR10_STD)[:, None, None]
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)
    assert y == written["test_batch"][1][3]
    torch.testing.assert_close(dm.val_set[3][0], x)
    # Training augmentation is random.
    torch.manual_seed(0)
    assert not torch.equal(dm.train_set[0][0], dm.train_set[0][0])

    model = ImageClassifier("vit_tiny", num_classes=10, img_size=32, patch_size=8, warmup_epochs=0,
                            model_kwargs=TINY_VIT)
    before = model.net.head.weight.detach().clone()
    trainer = _fit_two_steps(model, CIFAR10DataModule(root=str(tmp_path), batch_size=4, num_workers=0))
    assert trainer.global_step == 2
    assert not torch.equal(before, model.net.head.weight.detach())
    assert {"train/loss", "val/loss", "val/acc1", "val/acc5"} <= set(trainer.callback_metrics)


def test_cifar100_reads_fine_labels(tmp_path):
    written = _write_cifar(tmp_path, per_file=6, hundred=True)
    dm = CIFAR100DataModule(root=str(tmp_path), batch_size=2, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 100
    assert dm.train_set.targets == written["train"][1]
    assert dm.val_set.classes[:2] == ["c0", "c1"]


def test_cifar_missing_files_name_the_folder_and_files(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message and "download=True" in message


def test_cifar_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    # A URL that cannot be fetched stands in for a machine without internet.
    monkeypatch.setattr(CIFAR10, "url", (tmp_path / "absent.tar.gz").as_uri())
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), download=True, num_workers=0)
    with pytest.raises(FileNotFoundError, match="download=True failed.*cifar-10-batches-py"):
        dm.prepare_data()


def test_cifar_folder_with_a_corrupt_file_names_it(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"data_batch_3' is not a CIFAR10 file: it does not unpickle"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup("fit")


def test_cifar100_file_in_a_cifar10_folder_is_named(tmp_path):
    _write_cifar(tmp_path)
    other = _write_cifar(tmp_path / "other", hundred=True)
    folder = tmp_path / "cifar-10-batches-py"
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": other["train"][0], "fine_labels": other["train"][1]}, f)
    with pytest.raises(ValueError, match=r"data_batch_2' is not a CIFAR10 file: it has keys .*'labels'"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup("fit")


def test_cifar_labels_out_of_range_are_reported(tmp_path):
    _write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(path.read_bytes())
    entry["labels"][0] = 42
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch' is not a CIFAR10 file: labels in \[\d+, 42\], expected 0..9"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup("fit")


# ----------------------------------------------------------------------------- ImageNet folder


def test_image_folder_trains_through_the_trainer(tmp_path):
    _write_image_folder(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=4, img_size=32, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 3 and len(dm.train_set) == 12
    x, _ = dm.val_set[0]
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(dm.val_set[0][0], x)

    model = ImageClassifier("deit_tiny", num_classes=3, img_size=32, patch_size=8, warmup_epochs=0,
                            model_kwargs=TINY_VIT)
    trainer = _fit_two_steps(model, ImageNetDataModule(root=str(tmp_path), batch_size=4, img_size=32, num_workers=0))
    assert trainer.global_step == 2
    assert "val/acc5" not in trainer.callback_metrics  # top-5 needs at least 5 classes


def test_image_folder_missing_split_is_named(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"val' does not exist.*train/ and val/"):
        ImageNetDataModule(root=str(tmp_path), num_workers=0).setup("fit")


def test_image_folder_with_different_classes_is_rejected(tmp_path):
    _write_image_folder(tmp_path)
    (tmp_path / "val" / "cat").rename(tmp_path / "val" / "dog")
    with pytest.raises(ValueError, match=r"only in train: \['cat'\], only in val: \['dog'\]"):
        ImageNetDataModule(root=str(tmp_path), num_workers=0).setup("fit")


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_drawn_by_seed_stratified_and_standardised():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup("fit")
    b.setup("fit")
    x_train, y_train = a.train_set.tensors
    x_val, y_val = a.val_set.tensors
    assert x_train.shape == (1437, 1, 8, 8) and x_val.shape == (360, 1, 8, 8)
    torch.testing.assert_close(x_val, b.val_set.tensors[0])  # same seed, same split
    # Stratified: each class's validation share is within one image of 20 %.
    for c in range(10):
        total = int((y_train == c).sum() + (y_val == c).sum())
        assert abs(int((y_val == c).sum()) - 0.2 * total) <= 1
    assert abs(float(x_train.mean())) < 1e-5 and float(x_train.std()) == pytest.approx(1.0, abs=1e-3)
    c = DigitsDataModule(seed=1)
    c.setup("fit")
    # another seed holds out other images, in the same number per class
    assert not torch.equal(c.val_set.tensors[1], y_val)
    assert torch.equal(torch.bincount(c.val_set.tensors[1]), torch.bincount(y_val))
    assert c.train_set.tensors[0].shape == x_train.shape


def test_loader_settings():
    dm = DigitsDataModule(batch_size=100, num_workers=0)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last and not val.drop_last
    assert not train.persistent_workers
    assert train.pin_memory == torch.cuda.is_available()
    assert len(train) == 1437 // 100 and len(val) == 4
    cifar = CIFAR10DataModule(num_workers=None)
    assert 1 <= cifar.num_workers <= 8
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        DigitsDataModule(val_fraction=1.0)
