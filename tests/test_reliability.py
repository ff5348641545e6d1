"""Issue #12: EAFOCallback on models nobody here wrote and on extreme values.

One test per case of the issue (numbered as there; case 2 is tested with the spline) and a
seeded fuzz test. (The single collective per update is tested in test_density.py, whose
spawned processes need not import Lightning.) Every
test runs Lightning's real Trainer (or the real estimators) on CPU.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dynact import EAFOActivation, EAFOCallback
from dynact.density import KDE, Histogram
from dynact.experiments.models.classifier import ImageClassifier

pytestmark = pytest.mark.filterwarnings(
    "ignore:The number of training batches",
    "ignore:.*does not have many workers",
    "ignore:.*in the `predict_dataloader`",
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated",
)


# ----------------------------------------------------------------------------- helpers
class Net(pl.LightningModule):
    """A small classifier with the activation ``act`` (any module), trained with SGD."""

    def __init__(self, act: Callable[[], nn.Module] = nn.ReLU, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Probed(Net):
    """``Net`` plus probe activations outside the loss, fed ``feed(step, k)`` (detached)."""

    def __init__(self, feed: Callable[[int, int], torch.Tensor], probes: int = 1, act=nn.ReLU, on_step=None) -> None:
        super().__init__()
        self.feed = feed
        self.on_step = on_step
        self.probes = nn.ModuleList([act() for _ in range(probes)])
        self.bad_outputs: list[tuple[int, int]] = []  # (step, probe) with finite input, non-finite output

    def training_step(self, batch, batch_idx):
        if self.on_step is not None:
            self.on_step(self, self.global_step)
        for k, probe in enumerate(self.probes):
            x = self.feed(self.global_step, k)
            with torch.no_grad():
                y = probe(x)
            finite = torch.isfinite(x)
            if not bool(torch.isfinite(y[finite]).all()):
                self.bad_outputs.append((self.global_step, k))
        return super().training_step(batch, batch_idx)


def _loader(n: int = 64, batch: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=batch)


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu", devices=1, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, **kw,
    )


def _csv(logger: CSVLogger) -> list[dict[str, str]]:
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def _callback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "ActivationOptimizer: layer" in str(w.message)]


# ----------------------------------------------------------------------------- case 1
@pytest.mark.parametrize(
    "act, kwargs",
    [
        (lambda: nn.SiLU(inplace=True), {}),  # not converted by the defaults
        (lambda: nn.ReLU(inplace=True), {"mode": "monitor"}),
        (lambda: nn.ReLU(inplace=True), {"convert": ()}),
    ],
    ids=["silu-defaults", "relu-monitor", "relu-convert-none"],
)
def test_case01_inplace_activations_that_stay_are_measured_and_stay_inplace(tmp_path, act, kwargs):
    pl.seed_everything(0)
    model = Net(act)
    logger = CSVLogger(tmp_path)
    cb = EAFOCallback(every_n_steps=2, sample_size=128, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ActivationOptimizer: none of")
        _trainer(tmp_path, max_steps=4, callbacks=[cb], logger=logger).fit(model, _loader())
    rows = _csv(logger)
    for name in ("net.1", "net.3"):
        assert [s for s, _ in _series(rows, f"entropy_in/{name}")] == [2, 4]
        assert all(math.isfinite(v) for _, v in _series(rows, f"entropy_out/{name}"))
    assert cb.skips == {"net.1": {}, "net.3": {}}
    assert model.net[1].inplace is True and model.net[3].inplace is True  # not changed


# ----------------------------------------------------------------------------- case 3
_EXTREME = {
    "range-2e5": lambda g, n: (torch.rand(n, generator=g) - 0.5) * 2e5,
    "cauchy-1e6": lambda g, n: 1e6 * torch.tan(math.pi * (torch.rand(n, generator=g) - 0.5)),
    "near-1e30": lambda g, n: 1e30 * torch.randn(n, generator=g),
}


@pytest.mark.parametrize("stream", list(_EXTREME))
@pytest.mark.parametrize("mode", ["refresh", "monitor"])
def test_case03_extreme_ranges_are_measured_or_skipped_and_training_continues(tmp_path, stream, mode):
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(1)
    model = Probed(lambda step, k: _EXTREME[stream](g, 512))
    logger = CSVLogger(tmp_path)
    cb = EAFOCallback(every_n_steps=2, sample_size=256, mode=mode, curves_every=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, max_steps=12, callbacks=[cb], logger=logger).fit(model, _loader(192))
    rows = _csv(logger)
    assert [s for s, _ in _series(rows, "skipped/probes.0")] == [2, 4, 6, 8, 10, 12]  # every update ran
    for key in ("entropy_in", "entropy_out", "dead", "outside"):
        assert all(math.isfinite(v) for _, v in _series(rows, f"{key}/probes.0")), key
    assert not model.bad_outputs
    assert all(bool(torch.isfinite(t).all()) for t in model.probes[0].state_dict().values())


# ----------------------------------------------------------------------------- case 4
def test_case04_window_of_infinities_of_both_signs_is_skipped_as_nonfinite(tmp_path):
    pl.seed_everything(0)
    signs = torch.tensor([-math.inf, math.inf]).repeat(128)

    def feed(step, k):
        return signs.clone() if step in (2, 3) else torch.randn(256)

    model = Probed(feed)
    cb = EAFOCallback(every_n_steps=2, sample_size=64)
    with pytest.warns(UserWarning, match=r"layer 'probes.0' saw 128 NaN/Inf"):
        _trainer(tmp_path, max_steps=6, callbacks=[cb]).fit(model, _loader(96))
    assert cb.skips["probes.0"] == {"nonfinite": 1}


# ----------------------------------------------------------------------------- case 5
def test_case05_nonfinite_eps_with_finite_input_is_skipped_with_a_message_about_eps(tmp_path):
    pl.seed_everything(0)

    def break_eps(model, step):
        if step == 2:
            with torch.no_grad():
                model.probes[0].eps.fill_(math.nan)

    model = Probed(lambda step, k: torch.randn(256), on_step=break_eps)
    cb = EAFOCallback(every_n_steps=2, sample_size=64)
    with pytest.warns(UserWarning) as record:
        _trainer(tmp_path, max_steps=8, callbacks=[cb]).fit(model, _loader(128))
    messages = _callback_warnings(record)
    assert len(messages) == 1 and "'probes.0'" in messages[0] and "['eps']" in messages[0]
    assert cb.skips["probes.0"] == {"parameters": 3}  # the updates after steps 4, 6 and 8
    assert cb.skips["net.1"] == {} and cb.skips["net.3"] == {}


# ----------------------------------------------------------------------------- case 6
@pytest.mark.parametrize(
    "precision, feed",
    [
        # (the precision plugins make half the default dtype: build the data in float32)
        ("16-true", lambda step, k: torch.linspace(-6e4, 6e4, 512, dtype=torch.float32).half()),
        ("bf16-true", lambda step, k: (1000.0 + 0.01 * torch.randn(512, dtype=torch.float32)).bfloat16()),
    ],
)
def test_case06_half_precision_grids_that_cannot_be_stored_are_skipped(tmp_path, precision, feed):
    pl.seed_everything(0)
    model = Probed(feed)
    cb = EAFOCallback(every_n_steps=2, sample_size=256, curves_every=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _trainer(tmp_path, max_steps=8, precision=precision, callbacks=[cb]).fit(model, _loader(128))
    probe = model.probes[0]
    assert sum(cb.skips["probes.0"].values()) >= 1
    assert set(cb.skips["probes.0"]) <= {"grid", "constant"}
    assert len([m for m in _callback_warnings(record) if "'probes.0'" in m]) == len(cb.skips["probes.0"])
    assert all(bool(torch.isfinite(t).all()) for t in probe.state_dict().values())
    assert float(probe.lo) < float(probe.hi)


def test_case06_an_update_that_would_overflow_float16_inputs_is_undone(tmp_path):
    # A float32 layer fed float16 values up to 6e4: a grid placed in float32 reaches past
    # 65504, where relu(x) + eps * s(x) would overflow float16 for finite inputs.
    pl.seed_everything(0)
    x = torch.linspace(-6e4, 6e4, 512, dtype=torch.float32).half()
    model = Probed(lambda step, k: x)
    cb = EAFOCallback(every_n_steps=2, sample_size=256, curves_every=0)
    with pytest.warns(UserWarning, match=r"layer 'probes.0' would overflow its torch.float16 input"):
        _trainer(tmp_path, max_steps=8, callbacks=[cb]).fit(model, _loader(128))
    assert cb.skips["probes.0"].get("overflow", 0) >= 1
    assert not model.bad_outputs
    with torch.no_grad():
        assert bool(torch.isfinite(model.probes[0](torch.tensor([-65504.0, 65504.0]).half())).all())


# ----------------------------------------------------------------------------- case 7
@pytest.mark.parametrize("value", [0.5, 0.0, 1e-30])
def test_case07_constant_input_is_skipped_with_one_warning_and_its_grid_is_left_alone(tmp_path, value):
    pl.seed_everything(0)
    model = Probed(lambda step, k: torch.full((256,), value))
    logger = CSVLogger(tmp_path)
    cb = EAFOCallback(every_n_steps=2, sample_size=64)
    with pytest.warns(UserWarning) as record:
        _trainer(tmp_path, max_steps=8, callbacks=[cb], logger=logger).fit(model, _loader(128))
    messages = [m for m in _callback_warnings(record) if "'probes.0'" in m]
    assert len(messages) == 1 and "constant" in messages[0]
    assert cb.skips["probes.0"] == {"constant": 4}
    rows = _csv(logger)
    assert _series(rows, "skipped/probes.0") == [(2, 1.0), (4, 2.0), (6, 3.0), (8, 4.0)]
    assert _series(rows, "entropy_in/probes.0") == []  # nothing drifting is logged
    est = cb.core._layers["probes.0"].estimator
    assert (est.lo, est.hi) == cb.init_range  # the grid was never re-fitted
    assert torch.equal(model.probes[0].s, EAFOActivation("relu").s)


# ----------------------------------------------------------------------------- case 8
def _prelu_07() -> nn.Module:
    act = nn.PReLU()
    with torch.no_grad():
        act.weight.fill_(0.7)
    return act


@pytest.mark.parametrize(
    "make",
    [lambda: nn.ELU(alpha=0.3), lambda: nn.GELU(approximate="tanh"), _prelu_07, lambda: nn.CELU(3.0)],
    ids=["elu-0.3", "gelu-tanh", "prelu-0.7", "celu-3"],
)
def test_case08_conversion_keeps_the_module_settings_and_parameters(tmp_path, make):
    pl.seed_everything(0)
    model = Net(make, lr=0.0)
    original = copy.deepcopy(model.net[1])
    cb = EAFOCallback(every_n_steps=100, convert=(type(original),))
    _trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(model, _loader(16))
    act = model.net[1]
    assert isinstance(act, EAFOActivation)
    assert repr(act.base) == repr(original)
    for (name, a), b in zip(act.base.named_parameters(), original.parameters(), strict=False):
        assert torch.equal(a, b), name
    x = torch.linspace(-5.0, 5.0, 1001)
    with torch.no_grad():
        correction = float(act.eps) * x * torch.exp(-0.5 * x * x)  # the initial correction
        assert torch.allclose(act(x), original(x) + correction, atol=1e-5)


# ----------------------------------------------------------------------------- case 9
@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_case09_validate_test_and_predict_leave_the_model_unchanged(tmp_path, stage):
    pl.seed_everything(0)
    model = Net()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(32, 8)
    with torch.no_grad():
        out = model(x)
    cb = EAFOCallback(every_n_steps=1, collect_eval=True)
    getattr(_trainer(tmp_path, callbacks=[cb]), stage)(model, _loader(32))
    assert isinstance(model.net[1], nn.ReLU) and isinstance(model.net[3], nn.ReLU)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(x), out)
    # fit, with the same callback, still converts
    _trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(model, _loader(32))
    assert isinstance(model.net[1], EAFOActivation)


# ----------------------------------------------------------------------------- case 10
def _classifier(act: str = "relu") -> ImageClassifier:
    return ImageClassifier(
        "vit_tiny", num_classes=4, img_size=8, patch_size=4, act=act, warmup_epochs=0,
        model_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2},
    )


def _images(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=8)


def test_case10_a_converted_checkpoint_loads_back_into_the_model_its_hyperparameters_build(tmp_path):
    pl.seed_everything(0)
    model = _classifier()
    cb = EAFOCallback(every_n_steps=2, sample_size=64, curves_every=0)
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[cb])
    trainer.fit(model, _images())
    path = tmp_path / "converted.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path)
    act = loaded.net.blocks[0].mlp.act
    assert isinstance(act, EAFOActivation) and isinstance(act.base, nn.ReLU)
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values(), strict=False):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 8, 8)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_case10_a_plain_checkpoint_resumes_with_the_callback_converting(tmp_path):
    pl.seed_everything(0)
    plain = _classifier()
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(plain, _images())
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)

    model = _classifier()
    cb = EAFOCallback(every_n_steps=2, sample_size=64, curves_every=0)
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[cb])
    trainer.fit(model, _images(), ckpt_path=str(path))
    assert trainer.global_step == 4
    act = model.net.blocks[0].mlp.act
    assert isinstance(act, EAFOActivation)
    # the resumed optimizer knows the new eps (it has state for it after two more steps)
    assert act.eps in trainer.optimizers[0].state


# ----------------------------------------------------------------------------- case 11
@pytest.mark.parametrize(
    "kwargs, name, valid",
    [
        ({"seed": 2**70}, "seed", "[0, 2**62]"),
        ({"seed": -1}, "seed", "[0, 2**62]"),
        ({"bins": 10**7}, "bins", "[8, 65536]"),
        ({"sample_size": 10**7}, "sample_size", "[1, 1048576]"),
        ({"init_range": (-1.7e308, 1.7e308)}, "init_range", "[-1e+100, 1e+100]"),
    ],
)
def test_case11_arguments_out_of_range_fail_at_construction_with_the_range(kwargs, name, valid):
    with pytest.raises(ValueError) as err:
        EAFOCallback(**kwargs)
    assert name in str(err.value) and valid in str(err.value)


# ----------------------------------------------------------------------------- case 12
@pytest.mark.parametrize("cls", [Histogram, KDE])
def test_case12_a_meta_tensor_is_refused_and_the_estimator_keeps_working(cls):
    est = cls(-4.0, 4.0, 64)
    with pytest.raises(ValueError, match="meta"):
        est.update(torch.empty(100, device="meta"))
    assert est.device.type == "cpu"
    est.update(torch.randn(1000))
    assert est.compute().count == 1000


@pytest.mark.parametrize(
    "lo, hi, match",
    [(-1.7e308, 1.7e308, r"\[-1e\+100, 1e\+100\]"), (0.0, 1e-300, "bin width"), (1e6, 1e6 + 1e-9, "bin width")],
)
def test_case12_grids_the_numerics_cannot_handle_are_refused_at_construction(lo, hi, match):
    with pytest.raises(ValueError, match=match):
        KDE(lo, hi, 256)


@pytest.mark.parametrize(
    "kde, values",
    [
        (lambda: KDE(-1.0, 1.0, 64), torch.ones(1000)),  # all exactly at hi
        (lambda: KDE(-1.0, 1.0, 64), -torch.ones(1000)),  # all exactly at lo
        (lambda: KDE(-1.0, 1.0, 64, bandwidth=1e300),
         0.3 * torch.randn(1000, generator=torch.Generator().manual_seed(0))),
        (lambda: KDE(-1.0, 1.0, 64, bandwidth=0.5),
         0.3 * torch.randn(1000, generator=torch.Generator().manual_seed(0))),
    ],
    ids=["at-hi", "at-lo", "bandwidth-1e300", "bandwidth-0.5"],
)
def test_case12_kde_mass_on_the_grid_and_outside_add_up_to_one(kde, values):
    est = kde()
    est.update(values)
    d = est.compute()
    assert float(d.p.sum()) * d.step + d.outside == pytest.approx(1.0, abs=1e-9)
    assert d.outside > 0.05  # (the old estimate said 0 for all four)


def test_case12_huge_values_give_a_finite_derivative_bandwidth():
    est = KDE(-5e30, 5e30, 256)
    est.update(1e30 * torch.randn(10_000, generator=torch.Generator().manual_seed(0)))
    d = est.compute()
    assert all(math.isfinite(b) and b > 0 for b in est.last_bandwidths)
    assert bool(torch.isfinite(d.dp).all())


# ----------------------------------------------------------------------------- fuzz
_SEGMENTS = ("normal", "cauchy", "constant", "huge", "nan", "inf")


def _segment(kind: str, value: float, g: torch.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    scale = float(10.0 ** (6 * torch.rand((), generator=g)) - 0.5)
    if kind == "normal":
        x = scale * torch.randn(n, generator=g) + scale * value
    elif kind == "cauchy":
        x = scale * torch.tan(math.pi * (torch.rand(n, generator=g) - 0.5))
    elif kind == "constant":
        x = torch.full((n,), value)
    elif kind == "huge":
        x = float(10.0 ** (5 + 25 * torch.rand((), generator=g))) * torch.randn(n, generator=g)
    elif kind == "nan":
        return torch.full((n,), math.nan, dtype=dtype)
    else:
        return torch.where(torch.rand(n, generator=g) < 0.5, -math.inf, math.inf).to(dtype)
    # Finite kinds stay well inside their dtype's range (scaled, not clipped, so that no mass
    # piles up at the largest value), so that the only faults are the injected ones.
    most = torch.finfo(dtype).max / 8
    return (x * min(1.0, most / float(x.abs().max()))).to(dtype)


def test_fuzz_random_streams_never_stop_training_and_skips_match_the_faults(tmp_path, seed=12):
    steps, every, n = 240, 3, 256
    # Probes 0-2 are converted ReLUs fed float32, bfloat16 and float16 values; probe 3 a GELU
    # that is only measured. (A layer's input keeps its dtype through a run.)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float32)
    probes = len(dtypes)
    g = torch.Generator().manual_seed(seed)
    # One segment kind and offset per probe per window, so each window's fault is known.
    plan = [[(_SEGMENTS[int(torch.randint(6, (), generator=g))], float(torch.randn((), generator=g)))
             for _ in range(probes)] for _ in range(steps // every)]
    streams = {
        (step, k): _segment(*plan[step // every][k], g, n, dtypes[k])
        for step in range(steps) for k in range(probes)
    }

    pl.seed_everything(0)
    model = Probed(lambda step, k: streams[(step, k)], probes=probes)
    model.probes[3] = nn.GELU()  # measured only
    logger = CSVLogger(tmp_path)
    cb = EAFOCallback(every_n_steps=every, window=every, sample_size=512, curves_every=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, max_steps=steps, callbacks=[cb], logger=logger).fit(model, DataLoader(
            TensorDataset(torch.randn(steps * 4, 8), torch.randint(0, 4, (steps * 4,))), batch_size=4))
    assert model.global_step == steps
    assert not model.bad_outputs  # finite inputs always gave finite outputs
    rows = _csv(logger)
    for k in range(probes):
        counts = dict(_series(rows, f"skipped/probes.{k}"))
        assert sorted(counts) == [every * (w + 1) for w in range(steps // every)]  # every update ran
        before = 0.0
        for w in range(steps // every):
            kind, now = plan[w][k][0], counts[every * (w + 1)]
            faulty = kind in ("nan", "inf", "constant")
            assert now == before + faulty, (w, k, kind)  # one skip per fault, none otherwise
            before = now
        kinds = [plan[w][k][0] for w in range(steps // every)]
        skips = cb.skips[f"probes.{k}"]
        assert skips.get("nonfinite", 0) == kinds.count("nan") + kinds.count("inf")
        assert skips.get("constant", 0) == kinds.count("constant")
    for name in ("net.1", "net.3"):
        assert cb.skips[name] == {}
