"""Issue #18: models nobody here wrote (timm ViT, Hugging Face BERT and Llama), ddp_spawn, FSDP2
and the kernel cache. One test per point of the issue (points 1-5), each with a real model or a
real strategy; every test runs on CPU.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dynact import ActivationOptimizer, EAFOActivation, EAFOCallback

pytestmark = pytest.mark.filterwarnings(
    "ignore:The number of training batches",
    "ignore:.*does not have many workers",
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated",
)


def _hf_trainer(model, out, rows, callback, steps: int = 4):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                             seed=0)
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])


def _token_rows(vocab: int, n: int = 16, length: int = 12, labels: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    if labels:
        return [{"input_ids": row, "labels": row} for row in ids]
    return [{"input_ids": row, "labels": int(row[0] % 2)} for row in ids]


# ----------------------------------------------------------------------------- point 1
def test_point01_exact_gelu_of_timm_vit_is_updated_not_skipped_as_overflow():
    # torch's exact GELU is inf at float32's largest value: the base's own overflow is no
    # reason to refuse an update that adds nothing there (the spline is zero beyond its grid).
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    opt = ActivationOptimizer(vit, convert=(nn.GELU,), every_n_steps=2, sample_size=256)
    names = opt.layer_names
    assert names == ["blocks.0.mlp.act"]
    act = vit.get_submodule(names[0])
    assert isinstance(act, EAFOActivation) and isinstance(act.base, nn.GELU)
    before = act.s.clone()
    sgd = torch.optim.SGD(vit.parameters(), lr=1e-2)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 3, (16,))
    for _ in range(4):
        sgd.zero_grad()
        nn.functional.cross_entropy(vit(x), y).backward()
        sgd.step()
        opt.step()
    assert opt.skips == {names[0]: {}}
    assert opt.metrics()[f"accepted/{names[0]}"] == 1.0
    assert float((act.s - before).abs().max()) > 1e-3  # refreshed from the measured density


def test_point01_bert_under_the_hf_trainer_gets_every_gelu_updated(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.activations import GELUActivation

    from dynact.integrations.transformers import EAFOTrainerCallback

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_act="gelu")
    model = BertForSequenceClassification(config)
    callback = EAFOTrainerCallback(model, every_n_steps=2, window=2, sample_size=256, convert=(GELUActivation,))
    names = [n for n in callback.layer_names if isinstance(model.get_submodule(n), EAFOActivation)]
    assert names == [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
    before = [model.get_submodule(n).s.clone() for n in names]
    trainer = _hf_trainer(model, tmp_path, _token_rows(64, labels=False), callback)
    trainer.train()
    assert all(callback.optimizer.skips[n] == {} for n in callback.layer_names)  # the pooler's tanh too
    accepted = [r for r in trainer.state.log_history if f"accepted/{names[0]}" in r]
    # step 2 re-fits the estimators' grids to the data; step 4 updates
    assert [r["step"] for r in accepted] == [4]
    assert all(r[f"accepted/{n}"] == 1.0 for r in accepted for n in names)
    for n, s0 in zip(names, before, strict=True):
        assert float((model.get_submodule(n).s - s0).abs().max()) > 1e-3


def test_point01_the_guard_still_catches_an_overflow_the_update_makes():
    from dynact.update_guards import overflows

    act = EAFOActivation(nn.GELU())
    assert not overflows(act, torch.float32)  # GELU(3.4e38) = inf is the base's, not the update's
    assert not overflows(act, torch.float16)
    # a correction of 1e4 next to 6e4: finite in float32, beyond float16's 65504
    act = EAFOActivation(nn.GELU(), lo=5e4, hi=6.5e4, knots=8, init="zero")
    with torch.no_grad():
        act.s[1:-1] = 1e6
    assert overflows(act, torch.float16) and not overflows(act, torch.float32)


# ----------------------------------------------------------------------------- point 2
def test_point02_llama_silu_is_measured_converted_and_updated_under_the_hf_trainer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.activations import ACT2CLS, MishActivation, SiLUActivation

    from dynact.activations import activation_types, make_activation
    from dynact.integrations.transformers import EAFOTrainerCallback

    # every transformers class with a counterpart in the registry is registered, and computes it
    kinds = activation_types()
    assert kinds[SiLUActivation] == "silu_hf" and kinds[MishActivation] == "mish_hf"
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    for name, torch_twin in [("silu_hf", nn.SiLU()), ("mish_hf", nn.Mish()), ("gelu_hf", nn.GELU())]:
        assert torch.allclose(make_activation(name)(x), torch_twin(x), atol=1e-12)
    plain = {cls if isinstance(cls, type) else cls[0] for cls in ACT2CLS.values()}
    for cls in (SiLUActivation, MishActivation, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.PReLU):
        assert cls in plain and cls in kinds

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    callback = EAFOTrainerCallback(model, every_n_steps=2, window=2, sample_size=256, convert=("silu_hf",))
    names = callback.layer_names
    assert names == [f"model.layers.{i}.mlp.act_fn" for i in range(2)]
    acts = [model.get_submodule(n) for n in names]
    assert all(isinstance(a, EAFOActivation) and type(a.base) is SiLUActivation for a in acts)
    assert acts[0].base_name == "silu_hf"
    before = [a.s.clone() for a in acts]
    trainer = _hf_trainer(model, tmp_path, _token_rows(64), callback, steps=6)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert all(callback.optimizer.skips[n] == {} for n in names)
    rows = [r for r in trainer.state.log_history if f"entropy/{names[0]}" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]  # measured at every update
    assert any(r.get(f"accepted/{n}") == 1.0 for r in rows for n in names)
    for a, s0 in zip(acts, before, strict=True):
        assert float((a.s - s0).abs().max()) > 1e-3  # updated from the measured density


# ----------------------------------------------------------------------------- point 3
class _Tiny(pl.LightningModule):
    """Linear-ReLU-Linear on 4 features; rank 0 saves its activation's state when training ends."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        if self.global_rank == 0:
            torch.save({k: v.clone() for k, v in self.net[1].state_dict().items()}, os.path.join(self.out, "rank0.pt"))


@pytest.mark.timeout(180)
def test_point03_ddp_spawn_returns_the_trained_activations_to_the_calling_process(tmp_path):
    pl.seed_everything(0)
    model = _Tiny(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g))
    cb = EAFOCallback(every_n_steps=2, window=2, sample_size=64, curves_every=0)
    trainer = pl.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", max_steps=4, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(data, batch_size=8))
    act = model.net[1]
    assert isinstance(act, EAFOActivation) and isinstance(act.base, nn.ReLU)
    rank0 = torch.load(tmp_path / "rank0.pt")
    assert set(rank0) == {"s", "lo", "hi", "eps"}
    for name, value in rank0.items():
        assert torch.equal(getattr(act, name).detach(), value), name
    assert not torch.equal(act.s, EAFOActivation("relu").s)  # trained: refreshed from the data
    assert float(act.eps) != 0.01  # eps took SGD steps
    assert isinstance(act.eps, nn.Parameter)


# ----------------------------------------------------------------------------- point 5
_LOAD = ("import dynact.kernels.dispatch as k, torch; lib = k._load(); assert lib is not None, k._failure; "
         "assert k.available(torch.zeros(3)); print(k._lib._name)")


def _load_in_subprocess(cache) -> subprocess.CompletedProcess:
    # A SIGBUS kills the process that loads the library: never this one.
    env = {**os.environ, "DYNACT_CACHE": str(cache), "DYNACT_KERNELS": "auto",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", _LOAD], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler")
@pytest.mark.timeout(600)
def test_point05_a_damaged_cached_library_is_rebuilt_and_a_sound_one_reused(tmp_path):
    from dynact.kernels import dispatch as _kernels

    if _kernels._load() is None:
        pytest.skip(f"the library cannot be built here: {_kernels._failure}")
    # this process's library, as a build would have left it in a fresh cache (saves a build)
    library = tmp_path / Path(_kernels._lib._name).name
    shutil.copyfile(_kernels._lib._name, library)
    record = library.with_name(library.name + ".sha256")
    record.write_text(_kernels._fingerprint(library))
    good = library.read_bytes()
    assert record.read_text().split() == [str(len(good)), hashlib.sha256(good).hexdigest()]

    # sound: loaded as it is, nothing rebuilt or rewritten
    stamp = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (library, record)]
    again = _load_in_subprocess(tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(library)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (library, record)] == stamp

    for damage in ("truncated", "garbage"):
        if damage == "truncated":  # the SIGBUS: the first 4096 bytes, record kept
            library.write_bytes(good[:4096])
        else:  # a foreign file and no record (as a cache from before the records)
            library.write_bytes(b"not a shared library\n")
            record.unlink()
        run = _load_in_subprocess(tmp_path)
        assert run.returncode == 0, (damage, run.returncode, run.stderr)  # -7 would be SIGBUS
        rebuilt = library.read_bytes()
        assert len(rebuilt) == len(good), damage
        assert record.read_text().split() == [str(len(rebuilt)), hashlib.sha256(rebuilt).hexdigest()]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([library.name, record.name])  # no leftovers


# ----------------------------------------------------------------------------- point 4
def _fsdp_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from dynact import CRReLU

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), CRReLU(), nn.Linear(16, 2))
        opt = ActivationOptimizer(model, every_n_steps=2, window=2, sample_size=64, mode="refresh")
        fully_shard(model)  # refused 0-d eps ("fully_shard doesn't support scalar parameters")
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)  # different data on each rank
        losses, accepted = [], []
        for _ in range(4):
            x, y = torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
            sgd.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            sgd.step()
            updates = opt.num_updates
            opt.step()
            if opt.num_updates > updates:
                accepted.append(opt.metrics()["accepted/1"])
            losses.append(float(loss.detach()))
        state = {f"{n}.{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for n in ("1", "3") for k, v in model.get_submodule(n).state_dict().items()}
        record = {"state": state, "skips": opt.skips, "losses": losses, "accepted": accepted}
        torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_point04_fsdp2_shards_converted_activations_and_both_ranks_stay_identical(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert set(r0["state"]) == {"1.eps", "1.s", "1.lo", "1.hi", "3.eps"}
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    assert r0["state"]["3.eps"].shape == (1,) and float(r0["state"]["3.eps"]) != 0.01  # trained, in step
    assert all(math.isfinite(v) for v in r0["losses"] + r1["losses"])
    # The updates read the sharded eps whole on both ranks: made, not skipped, and alike
    assert r0["skips"] == r1["skips"] and not any(r0["skips"].values())
    assert r0["accepted"] == r1["accepted"] == [1.0, 1.0]
    fresh = EAFOActivation("relu")  # the spline was refreshed away from its initial shape
    assert float((r0["state"]["1.s"] - fresh.s).abs().max()) > 1e-3


def test_point04_eps_has_shape_1_and_checkpoints_holding_it_0d_still_load():
    from dynact import CRReLU

    for make in (lambda: CRReLU(0.01), lambda: CRReLU(0.01, learnable=False), lambda: EAFOActivation("relu")):
        act = make()
        assert act.eps.shape == (1,)
        assert sum(p.numel() for p in act.parameters()) in (0, 1)  # the paper's counts: one number
        old = {k: (v.reshape(()) if k == "eps" else v) for k, v in act.state_dict().items()}
        old["eps"] = torch.tensor(-0.03)  # as saved before: 0-d
        fresh = make()
        fresh.load_state_dict(old)
        assert fresh.eps.shape == (1,) and float(fresh.eps) == pytest.approx(-0.03)
        x = torch.tensor(0.7, requires_grad=True)  # a 0-d input keeps a 0-d output and gradient
        y = fresh(x)
        assert y.shape == ()
        y.backward()
        assert x.grad.shape == ()
        if fresh.eps.requires_grad:
            assert fresh.eps.grad.shape == (1,)
            # d/d eps of relu(x) + eps * x exp(-x^2/2) at x = 0.7 (the spline interpolates it)
            assert float(fresh.eps.grad) == pytest.approx(0.7 * math.exp(-0.245), abs=1e-3)
    # converted from a plain checkpoint (before conversion), the eps shape is kept
    from dynact.conversion import to_eafo

    act = to_eafo(nn.ReLU())
    act.load_state_dict({})
    assert act.eps.shape == (1,)
