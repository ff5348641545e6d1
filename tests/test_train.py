"""ImageClassifier's recipe (schedule, weight decay, distillation, checks) and ``dynact train``."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import re
import runpy
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynact.experiments.data import DigitsDataModule
from dynact.experiments.models import ImageClassifier
from dynact.experiments.train import build_cli, main

REPO = Path(__file__).resolve().parents[1]
#: The configs shipped inside the package, and the copies users start from.
CONFIGS = REPO / "dynact" / "experiments" / "configs"
EXAMPLE_CONFIGS = REPO / "examples" / "configs"
DIGITS = dict(num_classes=10, img_size=8, patch_size=2)
TINY = dict(in_chans=1, embed_dim=16, depth=1, num_heads=2)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # The digits configs set torch_threads: 1 for the whole process; give later tests it back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _digits_model(**kwargs) -> ImageClassifier:
    return ImageClassifier(**{"arch": "vit_tiny", **DIGITS, "model_kwargs": TINY, **kwargs})


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    return pl.Trainer(**(defaults | kwargs))


class _RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


def _expected_lr(t: int, lr: float, min_lr: float, warmup_lr: float, warmup: int, total: int) -> float:
    if t < warmup:
        return warmup_lr + (lr - warmup_lr) * t / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_schedule_is_linear_warmup_then_cosine_per_step():
    model = _digits_model(lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=1)
    record = _RecordLR()
    # 5 steps per epoch: the schedule counts the batches the Trainer will really run.
    _trainer(max_epochs=4, limit_train_batches=5, callbacks=[record]).fit(model, DigitsDataModule(batch_size=32))
    assert model.schedule_steps() == (5, 20)
    assert [t for t, _ in record.seen] == list(range(20))
    for t, lr in record.seen:
        assert lr == pytest.approx(_expected_lr(t, 1e-3, 1e-5, 1e-6, 5, 20), rel=1e-9), t
    assert record.seen[0][1] == pytest.approx(1e-6) and record.seen[5][1] == pytest.approx(1e-3)


def test_schedule_length_follows_epochs_not_a_shorter_run():
    # epochs=10 fixes the schedule; stopping after 3 steps must not compress it.
    model = _digits_model(warmup_epochs=2, epochs=10)
    record = _RecordLR()
    _trainer(max_steps=3, limit_train_batches=5, callbacks=[record]).fit(model, DigitsDataModule(batch_size=32))
    assert model.schedule_steps() == (10, 50)
    assert record.seen[2][1] == pytest.approx(_expected_lr(2, 2.5e-4, 1e-5, 1e-6, 10, 50))


def test_schedule_with_max_steps_only_spans_the_run():
    # Trainer(max_steps=...) without epochs: the schedule is the run's length, warm-up in
    # epochs of the loader's real length.
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    warmup = round(0.2 * len(data.train_dataloader()))
    model = _digits_model(warmup_epochs=0.2)
    record = _RecordLR()
    _trainer(max_steps=12, callbacks=[record]).fit(model, DigitsDataModule(batch_size=32))
    assert model.schedule_steps() == (warmup, 12)
    assert len(record.seen) == 12
    for t, lr in record.seen:
        assert lr == pytest.approx(_expected_lr(t, 2.5e-4, 1e-5, 1e-6, warmup, 12), rel=1e-9), t


def test_weight_decay_skips_norms_biases_tokens_and_activation_scalars():
    model = _digits_model(act="crrelu", weight_decay=0.05)
    trainer = _trainer(max_steps=1)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    groups = trainer.optimizers[0].param_groups
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW)
    decay = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = dict(model.net.named_parameters())
    assert decay | no_decay == {id(p) for p in names.values()} and not decay & no_decay
    for name, p in names.items():
        skip = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert (id(p) in no_decay) == skip, name
    assert id(model.net.blocks[0].mlp.act.eps) in no_decay


def test_deit_without_teacher_trains_both_heads_on_labels_and_says_so(caplog):
    model = _digits_model(arch="deit_tiny")
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    model.train()
    cls, dist = model.net(x)
    expected = 0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, y)
    torch.testing.assert_close(model.training_step((x, y), 0), expected)
    with caplog.at_level(logging.INFO):
        _trainer(max_steps=1).fit(model, DigitsDataModule(batch_size=32))
    assert "no distillation teacher given" in caplog.text


@pytest.fixture
def teacher_file(tmp_path) -> Path:
    """A small timm teacher that always predicts class 7, saved as a plain state_dict."""
    teacher = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    with torch.no_grad():
        teacher.fc.weight.zero_()
        teacher.fc.bias.copy_(F.one_hot(torch.tensor(7), 10).float() * 5)
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    return path


def test_deit_hard_distillation_uses_teacher_argmax(teacher_file, caplog):
    model = _digits_model(arch="deit_tiny", teacher="resnet10t", teacher_weights=str(teacher_file),
                          teacher_kwargs={"in_chans": 1})
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert not any(k.startswith("_teacher") or "teacher" in k for k in model.state_dict())
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    model.train()
    cls, dist = model.net(x)
    expected = 0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, torch.full_like(y, 7))
    torch.testing.assert_close(model.training_step((x, y), 0), expected)
    with caplog.at_level(logging.INFO):
        _trainer(max_steps=1).fit(model, DigitsDataModule(batch_size=32))
    assert not model.teacher.training
    assert "hard distillation from teacher 'resnet10t'" in caplog.text


def test_teacher_errors_name_the_fix(tmp_path, teacher_file):
    with pytest.raises(FileNotFoundError, match="teacher_weights file .*missing.pth' does not exist"):
        _digits_model(arch="deit_tiny", teacher="resnet10t", teacher_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="use arch='deit_tiny'"):
        _digits_model(arch="vit_tiny", teacher="resnet10t", teacher_weights=str(teacher_file))
    with pytest.raises(ValueError, match="needs both teacher"):
        _digits_model(arch="deit_tiny", teacher_weights=str(teacher_file))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=5),
     r"num_classes=5 but DigitsDataModule gives num_classes=10; set the model's num_classes to 10"),
    (dict(img_size=16), r"img_size=16 but DigitsDataModule gives img_size=8"),
    (dict(model_kwargs=dict(TINY, in_chans=3)), r"set the model's model_kwargs.in_chans to 1"),
])
def test_model_data_mismatch_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _trainer(max_steps=1).fit(_digits_model(**kwargs), DigitsDataModule())


@pytest.mark.parametrize("kwargs", [dict(lr=0), dict(min_lr=1.0), dict(warmup_epochs=-1), dict(epochs=0)])
def test_bad_recipe_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError, match=f"invalid {next(iter(kwargs))}="):
        _digits_model(**kwargs)


def test_checkpoint_reloads_model_and_eafo_buffers(tmp_path):
    model = _digits_model(act="eafo")
    trainer = _trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    act = model.net.blocks[0].mlp.act
    # Give the spline (a buffer, never trained) values that only the state_dict can carry.
    with torch.no_grad():
        act.s.copy_(torch.linspace(-0.5, 0.5, act.s.numel()).view_as(act.s))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = ImageClassifier.load_from_checkpoint(path)
    assert restored.hparams.act == "eafo" and restored.hparams.model_kwargs == TINY
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(restored.eval()(x), model.eval()(x))


# ----------------------------------------------------------------------------- dynact train


def _result_line(stdout: str) -> dict[str, str]:
    """The run's last line, ``result: <figures> | <layers> | <paths>``, as {"figures", "layers", "paths"}."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("result: "), stdout[-2000:]
    figures, layers, paths = last.removeprefix("result: ").split(" | ")
    return {"figures": figures, "layers": layers, "paths": paths}


def _figure(text: str, name: str) -> float:
    return float(re.search(rf"(?:^|, ){re.escape(name)} (\S+?)(?:,|$)", text).group(1))


def _last_scalar(run_dir: Path, tag: str) -> float:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc.Scalars(tag)[-1].value


def test_dynact_train_runs_the_digits_config_and_ends_with_the_result_line(tmp_path, capsys):
    main([
        "--config", "digits",  # a shipped config by name
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp_path),
        "--model.model_kwargs", '{"in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2}',
    ])
    runs = list((tmp_path / "lightning_logs").iterdir())
    assert len(runs) == 1
    saved = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert saved["model"]["act"] == "crrelu" and saved["model"]["model_kwargs"]["embed_dim"] == 16
    assert list(runs[0].glob("events.out.tfevents.*"))
    checkpoint = next(runs[0].glob("checkpoints/*.ckpt"))
    # The last line: the figures TensorBoard holds, the CRReLU's eps the checkpoint holds, the paths written.
    line = _result_line(capsys.readouterr().out)
    assert line["paths"] == f"tensorboard {runs[0]}, checkpoint {checkpoint}"
    for name in ("val/acc1", "val/loss"):
        assert _figure(line["figures"], name) == pytest.approx(_last_scalar(runs[0], name), rel=1e-3)
    eps = torch.load(checkpoint, weights_only=False)["state_dict"]["net.blocks.0.mlp.act.eps"].item()
    assert line["layers"] == f"1 layer: eps {eps:.4g}"  # depth 1: one CRReLU, no measured figures
    # Subcommands other than fit pass through.
    main(["validate", "--config=digits.yaml", "--trainer.default_root_dir", str(tmp_path),
          "--model.model_kwargs", '{"in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2}',
          "--ckpt_path", str(checkpoint), "--trainer.limit_val_batches", "1"])
    line = _result_line(capsys.readouterr().out)
    assert line["paths"] == f"tensorboard {tmp_path / 'lightning_logs' / 'version_1'}"  # read a checkpoint, wrote none
    assert 0 <= _figure(line["figures"], "val/acc1") <= 1


def test_dynact_train_help_opens_with_what_dynact_adds_then_lightnings_options(capsys):
    from dynact.callbacks import EAFOCallback
    from dynact.cli import main as dynact_main

    with pytest.raises(SystemExit) as info:  # in this process: the console script's path is test_wheel's
        dynact_main(["train", "--help"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dynact train: an image classifier")
    usage = next(i for i, line in enumerate(lines) if line.startswith("usage: dynact train"))
    assert usage < 25  # the dynact section fits on the first screen
    head = "\n".join(lines[:usage])
    for option in inspect.signature(EAFOCallback.__init__).parameters:
        if option != "self":
            assert f"{option}=" in head, option  # every option of the callback, with its default
    assert "every_n_steps=100" in head and "convert=(ReLU,)" in head
    example = re.search(r"example +(dynact train --config (\S+).*)", head)
    assert (CONFIGS / f"{example.group(2)}.yaml").is_file()  # the example's config ships with dynact
    assert "examples/configs/" in head and "crrelu" in head and "--config NAME|PATH" in head
    rest = "\n".join(lines[usage:])
    for flag in ("--config CONFIG", "--trainer.max_epochs", "--model.act", "--data CONFIG"):
        assert flag in rest, flag  # then Lightning's full list
    assert len(lines) > 300


def test_torch_threads_option_sets_operator_threads():
    torch.set_num_threads(2)
    build_cli(["--config", str(EXAMPLE_CONFIGS / "digits.yaml"), "--torch_threads", "1"], run=False)  # a path
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="torch_threads must be >= 1"):
        build_cli(["--config", str(CONFIGS / "digits.yaml"), "--torch_threads", "0"], run=False)


def test_dynact_train_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'vit_huge'; choose one of: vit_tiny"):
        build_cli(["--config", str(CONFIGS / "digits.yaml"), "--model.arch", "vit_huge"], run=False)
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        build_cli(["--config", str(CONFIGS / "digits.yaml"), "--model.act", "swish2"], run=False)


PAPER_CELLS = [(a, d, act) for d, archs in (("cifar10", "vit_tiny deit_tiny tnt_small"),
                                            ("cifar100", "vit_tiny deit_tiny tnt_small"),
                                            ("imagenet", "vit_tiny deit_tiny"))
               for a in archs.split() for act in ("gelu", "elu", "prelu", "celu", "silu", "mish", "crrelu")]


def test_paper_configs_exist_for_every_cell_and_are_current():
    spec = importlib.util.spec_from_file_location("make_configs", EXAMPLE_CONFIGS / "make_configs.py")
    make_configs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_configs)

    assert sorted(make_configs.cells()) == sorted(PAPER_CELLS)
    assert make_configs.main(["--check"]) == 0


def test_examples_configs_are_identical_copies_of_the_shipped_ones():
    from dynact.experiments import configs

    shipped = {p.name: p.read_bytes() for p in CONFIGS.glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in EXAMPLE_CONFIGS.glob("*.yaml")}
    assert copies == shipped
    expected = {f"{a}_{d}_{act}.yaml" for a, d, act in PAPER_CELLS} | {"digits.yaml", "digits_eafo.yaml",
                                                                       "digits_sweep.yaml"}
    assert set(shipped) == expected
    # importlib.resources sees the same files, by name with or without .yaml
    assert configs.names() == sorted(name[:-5] for name in expected)
    assert configs.read_text("digits_eafo") == configs.read_text("digits_eafo.yaml") == shipped[
        "digits_eafo.yaml"].decode()
    # pyproject.toml ships them in the wheel
    assert '"dynact.experiments.configs" = ["*.yaml"]' in (REPO / "pyproject.toml").read_text()


def test_config_names_resolve_to_shipped_files_and_paths_and_inline_yaml_pass_through(tmp_path, monkeypatch, capsys):
    import contextlib

    from dynact.experiments.train import resolve_configs

    monkeypatch.chdir(tmp_path)  # an empty folder: no examples/configs here
    mine = tmp_path / "digits.yaml"
    with contextlib.ExitStack() as stack:
        args = resolve_configs(["fit", "--config", "digits_eafo", "-c", "vit_tiny_cifar10_gelu.yaml",
                                "--config=digits_sweep", "--config", "{trainer: {max_epochs: 1}}"], stack)
        assert args[2] == str(CONFIGS / "digits_eafo.yaml") and args[4] == str(CONFIGS / "vit_tiny_cifar10_gelu.yaml")
        assert args[5] == f"--config={CONFIGS / 'digits_sweep.yaml'}" and args[7] == "{trainer: {max_epochs: 1}}"
        # a file in the working folder wins over the shipped config of the same name
        mine.write_text("seed_everything: 1\n")
        assert resolve_configs(["--config", "digits.yaml"], stack) == ["--config", "digits.yaml"]
    with pytest.raises(SystemExit) as info:
        build_cli(["--config", "digits_efo"], run=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'digits_efo' is neither a file nor a config shipped with dynact" in err and "digits_eafo," in err


@pytest.mark.parametrize("arch,dataset,act", PAPER_CELLS)
def test_paper_config_has_appendix_e_settings(arch, dataset, act):
    cfg = yaml.safe_load((CONFIGS / f"{arch}_{dataset}_{act}.yaml").read_text())
    model, trainer, data = cfg["model"], cfg["trainer"], cfg["data"]
    assert (model["arch"], model["act"]) == (arch, act)
    assert (model["num_classes"], model["img_size"], model["patch_size"]) == {
        "cifar10": (10, 32, 4), "cifar100": (100, 32, 4), "imagenet": (1000, 224, 16)}[dataset]
    assert (model["lr"], model["min_lr"], model["warmup_lr"], model["warmup_epochs"], model["weight_decay"]) == (
        2.5e-4, 1e-5, 1e-6, 20, 0.05)
    assert (trainer["max_epochs"], trainer["gradient_clip_val"], data["init_args"]["batch_size"]) == (100, 1.0, 256)
    assert model["act_kwargs"] == ({"eps": 0.01} if act == "crrelu" else None)


@pytest.mark.parametrize("name,count", [
    ("vit_tiny_cifar10_crrelu", 5_399_830),
    ("deit_tiny_cifar100_gelu", 5_399_816),
    ("tnt_small_cifar10_prelu", 21_525_322),
    ("vit_tiny_imagenet_mish", 5_754_472),
    ("deit_tiny_imagenet_crrelu", 5_910_812),
])
def test_paper_config_builds_the_paper_model(name, count):
    args = ["--config", str(CONFIGS / f"{name}.yaml")]
    if "deit_tiny_imagenet" in name:  # the teacher's weights are not in the repository
        args += ["--model.teacher", "null", "--model.teacher_weights", "null"]
    cli = build_cli(args, run=False)
    assert sum(p.numel() for p in cli.model.parameters()) == count
    assert cli.trainer.gradient_clip_val == 1.0 and cli.trainer.max_epochs == 100
    assert cli.datamodule.num_classes in (10, 100, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("act", ["gelu", "crrelu", "eafo"])
def test_vit_tiny_trains_in_bf16_on_gpu(act):
    model = ImageClassifier("vit_tiny", num_classes=10, img_size=32, patch_size=4, act=act, warmup_epochs=0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(model, loader)
    assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_digits_eafo_config_wires_the_callback_to_eafo_activations():
    from dynact.callbacks import EAFOCallback
    from dynact.spline import EAFOActivation

    cli = build_cli(["--config", "digits_eafo"], run=False)
    assert any(isinstance(cb, EAFOCallback) for cb in cli.trainer.callbacks)
    acts = [m for m in cli.model.net.modules() if isinstance(m, EAFOActivation)]
    assert len(acts) == cli.model.hparams.model_kwargs["depth"]


def test_top1_is_the_fraction_of_images_not_the_mean_over_classes():
    # Unequal classes: the model always ranks the classes 0 > 1 > ... > 9, so four of six images
    # (label 0) are right at top-1 and five (labels 0..4) at top-5, while the mean over the
    # three classes present of each class's top-1 is (1 + 0 + 0) / 3.
    model = _digits_model()
    with torch.no_grad():
        model.net.head.weight.zero_()
        model.net.head.bias.copy_(torch.arange(10, 0, -1, dtype=torch.float32))
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 0, 0, 0, 1, 7])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)  # 4 + 2
    (metrics,) = _trainer(limit_val_batches=None).validate(model, loader, verbose=False)
    assert metrics["val/acc1"] == pytest.approx(4 / 6)
    assert metrics["val/acc5"] == pytest.approx(5 / 6)
    assert metrics["val/acc1_macro"] == pytest.approx(1 / 3)
    logits = torch.arange(10, 0, -1, dtype=torch.float32).expand(6, 10)
    assert metrics["val/loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


# ----------------------------------------------------------------------------- the examples' last line
def test_quickstart_ends_with_the_result_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--max-steps", "20", "--every-n-steps", "10",
                                      "--logdir", str(tmp_path)])
    trainer = runpy.run_path(str(REPO / "examples" / "quickstart.py"))["main"]()
    line = _result_line(capsys.readouterr().out)
    # the progress bar counts to the last epoch the steps reach, not "Epoch 13/-2" (max_epochs -1)
    steps_per_epoch = trainer.num_training_batches
    assert trainer.global_step == 20 and trainer.max_epochs == math.ceil(20 / steps_per_epoch) >= 1
    assert trainer.current_epoch <= trainer.max_epochs
    from lightning.pytorch.callbacks import RichProgressBar

    bar = trainer.progress_bar_callback
    if isinstance(bar, RichProgressBar):  # the bar that printed "Epoch 13/-2"
        assert bar._get_train_description(trainer.max_epochs - 1).strip() == \
            f"Epoch {trainer.max_epochs - 1}/{trainer.max_epochs - 1}"
    [run] = (tmp_path / "quickstart").iterdir()
    [checkpoint] = run.glob("checkpoints/*.ckpt")
    assert line["paths"] == f"tensorboard {run}, checkpoint {checkpoint}"
    assert _figure(line["figures"], "val/acc1") == pytest.approx(_last_scalar(run, "val/acc1"), rel=1e-3)
    assert _figure(line["figures"], "val/loss") == pytest.approx(_last_scalar(run, "val/loss"), rel=1e-3)
    # two ReLU layers made dynamic: the eps range of the line is that of the last update TensorBoard holds
    assert line["layers"].startswith("2 layers: dead ")
    eps = [_last_scalar(run, f"eps/{layer}") for layer in ("net.2", "net.4")]
    low, high = re.search(r"eps (\S+)\.\.(\S+)$", line["layers"]).groups()
    assert (float(low), float(high)) == pytest.approx((min(eps), max(eps)), rel=1e-3)


def test_plain_pytorch_ends_with_the_result_line_and_its_checkpoint_restores_the_model(tmp_path, capsys):
    from sklearn.datasets import load_digits
    from torch import nn

    from dynact.conversion import convert_like_state_dict

    metrics = runpy.run_path(str(REPO / "examples" / "plain_pytorch.py"))["main"](steps=60, out=str(tmp_path))
    line = _result_line(capsys.readouterr().out)
    assert line["paths"] == f"checkpoint {tmp_path / 'checkpoint.pt'}"
    assert line["layers"].startswith("2 layers: dead ")
    low, high = re.search(r"eps (\S+)\.\.(\S+)$", line["layers"]).groups()
    assert (float(low), float(high)) == pytest.approx((min(metrics["eps/1"], metrics["eps/3"]),
                                                       max(metrics["eps/1"], metrics["eps/3"])), rel=1e-3)
    # the held-out top-1 and loss, recomputed from the checkpoint on the same fifth of the images
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    convert_like_state_dict(model, saved["model"])
    model.load_state_dict(saved["model"])
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    held_out = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)) < len(x) // 5
    with torch.no_grad():
        logits = model(x[held_out])
    assert held_out.sum() == 359
    top1 = (logits.argmax(1) == y[held_out]).float().mean().item()
    assert _figure(line["figures"], "val/acc1") == pytest.approx(top1, abs=1e-4)
    assert _figure(line["figures"], "val/loss") == pytest.approx(F.cross_entropy(logits, y[held_out]).item(), rel=1e-3)
