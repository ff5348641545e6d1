"""EAFOCallback with Lightning's real Trainer on CPU: logging, schedule, resume, DDP, bad input."""

from __future__ import annotations

import csv
import glob
import math
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dynact import EAFOActivation, EAFOCallback

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("entropy_in", "dead", "entropy", "entropy_scale_free", "log_slope", "std", "eps", "outside",
           "update_size", "accepted", "nonfinite")


# ----------------------------------------------------------------------------- small models
class MLP(pl.LightningModule):
    """Two ReLU layers on 16 features, 4 classes; optional dropout to exercise the global RNG."""

    def __init__(self, act: type = nn.ReLU, dropout: float = 0.0, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(16, 32), act(), nn.Dropout(dropout), nn.Linear(32, 32), act(), nn.Linear(32, 4)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DataFirst(pl.LightningModule):
    """The first activation sees the data itself, so its input density is known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.net(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _data(n: int, seed: int = 0, shift: float = 0.0, scale: float = 1.0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(scale * torch.randn(n, 16, generator=g) + shift, torch.randint(0, 4, (n,), generator=g))


def _loader(n: int, batch: int = 32, seed: int = 0, shuffle: bool = False, **kw) -> DataLoader:
    return DataLoader(_data(n, seed, **kw), batch_size=batch, shuffle=shuffle)


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        num_sanity_val_steps=0,
        **kw,
    )


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out["__histograms__"] = acc.Tags()["histograms"]
    out["__images__"] = acc.Tags()["images"]
    return out


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _csv_series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def _dynamic_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".s", ".lo", ".hi", ".eps"))}


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, name, accepted",
    [
        ({"every_n_steps": 0}, "every_n_steps", "positive int"),
        ({"every_n_steps": 2.5}, "every_n_steps", "positive int"),
        ({"estimator": "gmm"}, "estimator", "('kde', 'hist')"),
        ({"mode": "train"}, "mode", "('refresh', 'iterate', 'monitor')"),
        ({"eta": -0.1}, "eta", "> 0"),
        ({"bins": 4}, "bins", "[8, 65536]"),
        ({"sample_size": 0}, "sample_size", "positive int"),
        ({"every_n_steps": 10, "window": 11}, "window", "[1, every_n_steps=10]"),
        ({"convert": (nn.Linear,)}, "convert", "relu (torch.nn.modules.activation.ReLU)"),
        ({"convert": (EAFOActivation,)}, "convert", "gelu (torch.nn.modules.activation.GELU)"),
        ({"curves_every": -1}, "curves_every", ">= 0"),
        ({"init_range": (3.0, -3.0)}, "init_range", "lo must be below hi"),
        ({"max_outside": 1.5}, "max_outside", "(0, 1)"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them_and_the_accepted_values(kwargs, name, accepted):
    with pytest.raises(ValueError) as err:
        EAFOCallback(**kwargs)
    assert name in str(err.value) and accepted in str(err.value)


def test_convert_accepts_registry_names():
    assert EAFOCallback(convert=("relu", nn.GELU)).convert == (nn.ReLU, nn.GELU)


def test_setup_converts_outermost_activations_only_and_hooks_each_once(tmp_path):
    # An EAFOActivation's own ReLU base is part of it: never converted, never hooked apart.
    model = MLP()
    model.net[1] = EAFOActivation("relu", init="zero")
    cb = EAFOCallback(every_n_steps=100)
    _trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(model, _loader(32))
    assert cb.layer_names == ["net.1", "net.4"]
    assert type(model.net[1].base) is nn.ReLU and not torch.any(model.net[1].s)  # untouched
    assert isinstance(model.net[4], EAFOActivation) and type(model.net[4].base) is nn.ReLU
    assert any(p is model.net[4].eps for p in model.trainer.optimizers[0].param_groups[0]["params"])


# ----------------------------------------------------------------------------- logging
def test_short_run_writes_per_layer_entropies_to_tensorboard_and_updates_dynamic_layers(tmp_path):
    pl.seed_everything(0)
    model = MLP()
    cb = EAFOCallback(every_n_steps=4, window=2, sample_size=256, curves_every=2)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, max_steps=12, callbacks=[cb], logger=logger)
    trainer.fit(model, _loader(512))

    acts = {n: m for n, m in model.named_modules() if isinstance(m, EAFOActivation)}
    assert sorted(acts) == ["net.1", "net.4"] == cb.layer_names  # both ReLUs converted, hooked
    assert all(not m._forward_pre_hooks for m in acts.values())  # hooks gone after teardown
    fresh = EAFOActivation("relu")
    for act in acts.values():
        assert not torch.equal(act.s, fresh.s)  # the data replaced CRReLU's initial shape
        assert float(act.eps.detach()) != pytest.approx(0.01)  # eps was in the optimizer

    logged = _scalars(logger.log_dir)
    for layer in acts:
        for metric in METRICS:
            series = logged[f"{metric}/{layer}"]
            assert [step for step, _ in series] == [4, 8, 12], (metric, layer)
            assert all(math.isfinite(v) for _, v in series)
        assert all(v == 1.0 for _, v in logged[f"accepted/{layer}"])
        assert all(0.0 <= v <= 1.0 for _, v in logged[f"dead/{layer}"])
        # logged eps is the module's eps at that step: the last one is the final value
        assert logged[f"eps/{layer}"][-1][1] == pytest.approx(float(acts[layer].eps), rel=1e-6)
        assert f"preact/{layer}" in logged["__histograms__"]
        assert f"curve/{layer}" in logged["__images__"]


def test_logged_measures_match_the_analytic_values_of_the_sampled_input(tmp_path):
    # ReLU on N(0,1) data with frozen weights: input entropy 0.5 log(2 pi e), half the mass
    # on the atom at 0, and the mixed entropy log 2 + H[half-normal] / 2 (the atom's
    # -0.5 log 0.5 plus the continuous half's), H[half-normal] = 0.5 log(pi e / 2): no
    # resolution enters any of them.
    cb = EAFOCallback(every_n_steps=5, window=5, sample_size=4096, mode="monitor", convert=())
    logger = CSVLogger(tmp_path)
    _trainer(tmp_path, max_steps=5, callbacks=[cb], logger=logger).fit(DataFirst(), _loader(320, batch=64))

    h_half = 0.5 * math.log(math.pi * math.e / 2)
    mixed = math.log(2) + 0.5 * h_half
    std = math.sqrt(0.5 - 1 / (2 * math.pi))
    rows = _csv_rows(logger)
    assert _csv_series(rows, "entropy_in/net.0")[0] == (
        5, pytest.approx(0.5 * math.log(2 * math.pi * math.e), abs=0.02))
    assert _csv_series(rows, "entropy/net.0")[0][1] == pytest.approx(mixed, abs=0.03)
    assert _csv_series(rows, "entropy_scale_free/net.0")[0][1] == pytest.approx(mixed - 0.5 * math.log(std), abs=0.03)
    assert _csv_series(rows, "std/net.0")[0][1] == pytest.approx(std, abs=0.02)
    assert _csv_series(rows, "dead/net.0")[0][1] == pytest.approx(0.5, abs=0.02)
    assert _csv_series(rows, "outside/net.0")[0][1] == 0.0
    assert not _csv_series(rows, "accepted/net.0")  # monitor mode: no update
    assert cb.metrics["dead/net.0"] == _csv_series(rows, "dead/net.0")[-1][1]  # exposed in-process too


@pytest.mark.parametrize("scale", [0.01, 30.0])
def test_grids_follow_data_far_narrower_or_wider_than_the_initial_range(tmp_path, scale):
    # N(0, scale^2) inputs on the default [-8, 8] grid: too coarse (0.01) or spilling (30).
    # Within a few windows the estimator's grid fits the data (entropy_in = analytic value)
    # and the spline's grid covers them without being much wider.
    cb = EAFOCallback(every_n_steps=2, window=2, sample_size=8192)
    logger = CSVLogger(tmp_path)
    model = DataFirst()
    _trainer(tmp_path, max_steps=8, callbacks=[cb], logger=logger).fit(model, _loader(2048, batch=256, scale=scale))
    rows = _csv_rows(logger)
    first_outside = _csv_series(rows, "outside/net.0")[0][1]
    assert (first_outside > 0.5) is (scale > 8)  # 30: most of the first window fell outside
    step, h_in = _csv_series(rows, "entropy_in/net.0")[-1]
    assert step == 8
    assert h_in == pytest.approx(0.5 * math.log(2 * math.pi * math.e) + math.log(scale), abs=0.03)
    assert _csv_series(rows, "accepted/net.0")[-1] == (8, 1.0)
    act = model.net[0]
    assert -6 * scale < float(act.lo) < -3 * scale and 3 * scale < float(act.hi) < 6 * scale


def test_static_model_is_measured_untouched_with_one_warning(tmp_path):
    # GELU only and the default mode: nothing to update, so it warns once, logs entropies to a
    # CSVLogger (no TensorBoard), and training (dropout and shuffling included) is exactly
    # what it is without the callback: the callback never draws from the global RNG.
    def run(callbacks, logger):
        pl.seed_everything(0)
        model = MLP(act=nn.GELU, dropout=0.2)
        _trainer(tmp_path, max_epochs=2, callbacks=callbacks, logger=logger).fit(
            model, _loader(192, shuffle=True))
        return model

    cb = EAFOCallback(every_n_steps=3, sample_size=128)
    logger = CSVLogger(tmp_path, name="static")
    with pytest.warns(UserWarning, match="none of the 2 activation modules is an EAFOActivation") as record:
        watched = run([cb], logger)
    assert sum("EAFOActivation" in str(w.message) for w in record) == 1
    plain = run([], False)
    for (name, a), b in zip(watched.state_dict().items(), plain.state_dict().values(), strict=False):
        assert torch.equal(a, b), name
    assert not any(isinstance(m, EAFOActivation) for m in watched.modules())
    rows = _csv_rows(logger)
    assert [s for s, _ in _csv_series(rows, "entropy/net.1")] == [3, 6, 9, 12]
    assert not _csv_series(rows, "accepted/net.1")


class Forwarding(MLP):
    """Calls ``self(x)``, so that Lightning runs the compiled forward."""

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def test_hooks_fire_in_a_compiled_model(tmp_path):
    # Hooks added after a model's first compiled call never fire; the callback adds them in
    # setup, before Lightning's first forward. backend="eager": Dynamo traces, no codegen.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pl.seed_everything(0)
    model = Forwarding()
    logger = CSVLogger(tmp_path)
    cb = EAFOCallback(every_n_steps=3, sample_size=128)
    _trainer(tmp_path, max_steps=6, callbacks=[cb], logger=logger).fit(
        torch.compile(model, backend="eager"), _loader(256))
    assert counters["stats"]["unique_graphs"] > 0  # the forward really went through Dynamo
    rows = _csv_rows(logger)
    for layer in ("net.1", "net.4"):
        assert _csv_series(rows, f"accepted/{layer}") == [(3, 1.0), (6, 1.0)]
        assert all(math.isfinite(v) for _, v in _csv_series(rows, f"entropy_in/{layer}"))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- schedule
class _Snapshots(Callback):
    """Copies of the dynamic buffers after every optimizer step (runs after EAFOCallback)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = _dynamic_state(pl_module)


class TwoLoaders(MLP):
    def training_step(self, batch, batch_idx):
        x = torch.cat([batch["a"][0], batch["b"][0]])
        y = torch.cat([batch["a"][1], batch["b"][1]])
        return F.cross_entropy(self.net(x), y)


def test_updates_follow_optimizer_steps_under_accumulation_and_two_loaders(tmp_path):
    # 12 batches from two loaders, 3 micro-batches per optimizer step: 4 optimizer steps, so
    # with every_n_steps=2 exactly two updates, at steps 2 and 4 (global_step % 2 == 0 holds
    # on 3 micro-batches each, which must not trigger 3 updates).
    pl.seed_everything(0)
    model = TwoLoaders()
    cb = EAFOCallback(every_n_steps=2, sample_size=64, estimator="hist")
    snaps = _Snapshots()
    logger = CSVLogger(tmp_path)
    loaders = {"a": _loader(192, batch=16, seed=1), "b": _loader(192, batch=16, seed=2)}
    _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=3, callbacks=[cb, snaps],
             logger=logger).fit(model, loaders)

    rows = _csv_rows(logger)
    assert [s for s, _ in _csv_series(rows, "accepted/net.1")] == [2, 4]
    # the buffers change at the update steps only (global_step repeats across micro-batches)
    assert sorted(snaps.steps) == [0, 1, 2, 3, 4]
    changed = [k for k in (1, 2, 3, 4) if not torch.equal(snaps.steps[k]["net.1.s"], snaps.steps[k - 1]["net.1.s"])]
    assert changed == [2, 4]


@pytest.mark.parametrize("collect_eval", [False, True])
def test_validation_forwards_are_sampled_only_when_asked(tmp_path, collect_eval):
    # Validation data sit far outside the training data's range: if they were sampled, the
    # grid's outside mass would show it at the update after the validation run.
    cb = EAFOCallback(every_n_steps=4, window=4, sample_size=512, mode="monitor", convert=(), collect_eval=collect_eval)
    logger = CSVLogger(tmp_path)
    _trainer(tmp_path, max_steps=8, callbacks=[cb], logger=logger, limit_val_batches=2).fit(
        DataFirst(), _loader(192), _loader(128, shift=50.0))
    outside = dict(_csv_series(_csv_rows(logger), "outside/net.0"))
    assert outside[4] == 0.0  # before the first validation run
    assert (outside[8] > 0.1) is collect_eval


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("epoch_len", [4, 6])
def test_resume_gives_the_same_weights_and_spline_buffers_as_a_straight_run(tmp_path, epoch_len):
    # every_n_steps=4: with 6-step epochs the checkpoint falls mid-window, so the estimators'
    # partial counts must be restored too; with 4-step epochs, the sampling generator's state.
    def fit(ckpt_path=None, checkpoint=None):
        pl.seed_everything(0)
        model = MLP()
        cb = EAFOCallback(every_n_steps=4, window=4, sample_size=256, estimator="kde")
        callbacks = [cb] + ([checkpoint] if checkpoint else [])
        trainer = _trainer(tmp_path, max_epochs=2, callbacks=callbacks, enable_checkpointing=bool(checkpoint))
        trainer.fit(model, _loader(32 * epoch_len), ckpt_path=ckpt_path)
        assert trainer.global_step == 2 * epoch_len
        return model

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=epoch_len, save_top_k=-1)
    straight = fit(checkpoint=ckpt)
    path = tmp_path / "ckpt" / f"epoch=0-step={epoch_len}.ckpt"
    saved = torch.load(path, weights_only=False)
    resumed = fit(ckpt_path=str(path))

    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=False):
        assert torch.equal(a, b), name
    # the second half did update the splines (the comparison is not vacuous)
    assert not torch.equal(saved["state_dict"]["net.1.s"], straight.state_dict()["net.1.s"])
    [state] = [v for k, v in saved["callbacks"].items() if k.startswith("EAFOCallback")]
    assert set(state["layers"]) == {"net.1", "net.4"} and state["generators"]


# ----------------------------------------------------------------------------- DDP
class RankDump(MLP):
    """Writes each rank's dynamic buffers and a fingerprint of its data at the end of training."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.seen = 0.0

    def training_step(self, batch, batch_idx):
        self.seen += float(batch[0].sum())
        return super().training_step(batch, batch_idx)

    def on_train_end(self):
        torch.save({"buffers": _dynamic_state(self), "seen": self.seen},
                   os.path.join(self.out, f"rank{self.global_rank}.pt"))


@pytest.mark.timeout(180)
def test_ddp_ranks_keep_identical_dynamic_activations(tmp_path):
    # Two gloo processes see different halves of the data; the last update (step 9) happens
    # after the last forward, so DDP's buffer broadcast cannot hide a difference.
    pl.seed_everything(0)
    model = RankDump(str(tmp_path))
    cb = EAFOCallback(every_n_steps=3, window=3, sample_size=256, estimator="hist")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=9, callbacks=[cb], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, _loader(2 * 9 * 16, batch=16))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["seen"] != r1["seen"]  # different data on each rank
    fresh = EAFOActivation("relu")
    for name, value in r0["buffers"].items():
        assert torch.equal(value, r1["buffers"][name]), name
        if name.endswith(".s"):
            assert not torch.equal(value, fresh.s)


# ----------------------------------------------------------------------------- bad input
class Probed(MLP):
    """MLP plus a probe activation outside the loss whose input turns NaN/Inf at ``poison`` steps."""

    def __init__(self, poison: dict[int, float]) -> None:
        super().__init__()
        self.poison = poison
        self.probe_in = nn.Linear(16, 8)
        self.probe = nn.ReLU()

    def training_step(self, batch, batch_idx):
        h = self.probe_in(batch[0]).detach()
        if self.global_step in self.poison:
            h = torch.full_like(h, self.poison[self.global_step])
        self.probe(h)
        return super().training_step(batch, batch_idx)


def test_nonfinite_window_skips_only_that_layer_with_a_warning_and_a_count(tmp_path):
    n, sample = 4, 128

    def run(poison):
        pl.seed_everything(0)
        model = Probed(poison)
        snaps = _Snapshots()
        logger = CSVLogger(tmp_path, name=f"p{len(poison)}")
        cb = EAFOCallback(every_n_steps=n, window=n, sample_size=sample)
        _trainer(tmp_path, max_steps=3 * n, callbacks=[cb, snaps], logger=logger).fit(model, _loader(32 * 3 * n))
        return model, snaps.steps, _csv_rows(logger)

    clean, clean_snaps, _ = run({})
    with pytest.warns(UserWarning, match=r"layer 'probe' saw 256 NaN/Inf"):
        bad, snaps, rows = run({n + 1: math.nan, n + 2: math.inf})  # two forwards of window 2

    assert dict(_csv_series(rows, "nonfinite/probe")) == {n: 0.0, 2 * n: 2.0 * sample, 3 * n: 0.0}
    assert [s for s, _ in _csv_series(rows, "accepted/probe")] == [n, 3 * n]  # skipped at 2n
    assert torch.equal(snaps[2 * n]["probe.s"], snaps[n]["probe.s"])  # unchanged while poisoned
    assert not torch.equal(snaps[3 * n]["probe.s"], snaps[2 * n]["probe.s"])  # updates again after
    # everything else is exactly as in the clean run
    for (name, a), b in zip(bad.state_dict().items(), clean.state_dict().values(), strict=False):
        if not name.startswith("probe."):
            assert torch.equal(a, b), name
    assert all(math.isfinite(float(v)) for v in _dynamic_state(bad).values() for v in v.flatten())


def test_bf16_mixed_precision_updates_and_runs_without_logger(tmp_path):
    pl.seed_everything(0)
    model = MLP()
    cb = EAFOCallback(every_n_steps=3, sample_size=256)
    _trainer(tmp_path, max_steps=6, precision="bf16-mixed", callbacks=[cb]).fit(model, _loader(256))
    fresh = EAFOActivation("relu")
    for name, value in _dynamic_state(model).items():
        assert value.dtype == torch.float32 and bool(torch.isfinite(value).all()), name
        if name.endswith(".s"):
            assert not torch.equal(value, fresh.s), name


# ----------------------------------------------------------------------------- example
def test_quickstart_example_runs_and_writes_tensorboard_entropies(tmp_path, monkeypatch, capsys):
    # In this process (a second interpreter would only add its start-up): the script as run from a shell.
    import runpy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--max-steps", "20", "--every-n-steps", "10",
                                      "--logdir", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")  # raises if it fails
    assert f"tensorboard --logdir {tmp_path}" in capsys.readouterr().out
    [events] = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    logged = _scalars(os.path.dirname(events))
    layers = [t.split("/", 1)[1] for t in logged if t.startswith("entropy/")]
    assert len(layers) == 2
    assert all([s for s, _ in logged[f"accepted/{layer}"]] == [10, 20] for layer in layers)
