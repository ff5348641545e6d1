"""A trained activation survives saving and reloading: Hugging Face folders, Lightning
checkpoints and plain state_dicts, all through dynact.conversion.convert_like."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import dynact
from dynact import CRReLU, EAFOActivation
from dynact.conversion import convert_like_state_dict, to_eafo

transformers = pytest.importorskip("transformers")

TOL = 1e-5


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32, hidden_act="gelu")
    return BertForMaskedLM(cfg)


def _tokens():
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))


def _train_with_trainer(model, out, convert, steps=4):
    """A few real Trainer steps with EAFOTrainerCallback refreshing the splines every step."""
    from transformers import Trainer, TrainingArguments

    from dynact.integrations.transformers import EAFOTrainerCallback

    callback = EAFOTrainerCallback(model, every_n_steps=1, window=1, convert=convert, mode="refresh")
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=steps, logging_steps=1,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    return callback


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _dynact_state(model):
    """Every tensor of dynact's modules (the spline, its grid, eps), by name."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("s", "lo", "hi", "eps")}


# --------------------------------------------------------------------------- Hugging Face
def test_plain_from_pretrained_drops_the_trained_activations_and_ours_keeps_them(tmp_path):
    from transformers import GPT2LMHeadModel
    from transformers.activations import NewGELUActivation

    from dynact.integrations.transformers import from_pretrained

    model = _gpt2()
    fresh_s = EAFOActivation(base=NewGELUActivation()).s.clone()
    _train_with_trainer(model, tmp_path / "run", convert=("gelu_new",))
    act = model.transformer.h[0].mlp.act
    assert isinstance(act, EAFOActivation) and isinstance(act.base, NewGELUActivation)
    assert not torch.allclose(act.s, fresh_s, atol=1e-4)  # the Trainer run refreshed the spline
    assert float(act.eps.detach()) != pytest.approx(0.01, abs=1e-6)  # and trained eps
    ids = _tokens()
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "saved", max_shard_size="20KB")  # sharded safetensors
    assert len(list((tmp_path / "saved").glob("*.safetensors"))) > 1
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["dynact"]
    assert saved["modules"]["transformer.h.1.mlp.act"]["base"]["name"] == "gelu_new"

    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "saved")  # the problem: GELU again
    assert isinstance(plain.transformer.h[0].mlp.act, NewGELUActivation)
    assert (_logits(plain, ids) - want).abs().max() > 1e-4

    loaded = from_pretrained(GPT2LMHeadModel, tmp_path / "saved")
    assert type(loaded) is GPT2LMHeadModel
    for name in ("transformer.h.0.mlp.act", "transformer.h.1.mlp.act"):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert type(b) is EAFOActivation and type(b.base) is NewGELUActivation and b.knots == a.knots
    got = _logits(loaded, ids)
    assert (got - want).abs().max() < TOL
    for key, value in _dynact_state(model).items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # the Trainer's own checkpoint folder loads the same way (written through the callback's on_save)
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert "dynact" in json.loads((ckpt / "config.json").read_text())
    assert (_logits(from_pretrained(GPT2LMHeadModel, ckpt), ids) - want).abs().max() < TOL


def test_crrelu_swapped_into_gpt2_round_trips_with_its_trained_eps(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    from dynact.integrations.transformers import from_pretrained

    model = _gpt2()
    swapped = dynact.swap_activations(model, "gelu_new", "crrelu")
    assert swapped == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    with torch.no_grad():  # as if trained: different eps per layer
        model.transformer.h[0].mlp.act.eps.fill_(-0.3)
        model.transformer.h[1].mlp.act.eps.fill_(0.7)
    ids = _tokens()
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "d")
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path / "d")  # Auto classes resolve to the real one
    assert type(loaded) is GPT2LMHeadModel
    assert [type(loaded.get_submodule(f"transformer.h.{i}.mlp.act")) for i in (0, 1)] == [CRReLU, CRReLU]
    assert float(loaded.transformer.h[0].mlp.act.eps.detach()) == pytest.approx(-0.3)
    assert float(loaded.transformer.h[1].mlp.act.eps.detach()) == pytest.approx(0.7)
    assert (_logits(loaded, ids) - want).abs().max() < TOL


def test_a_stateless_registry_swap_and_dtype_and_device_map_pass_through(tmp_path):
    from transformers import GPT2LMHeadModel

    from dynact.integrations.transformers import from_pretrained

    model = _gpt2()
    dynact.swap_activations(model, "gelu_new", "silu")  # no tensor says so: only the record does
    ids = _tokens()
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "d")
    loaded = from_pretrained(GPT2LMHeadModel, tmp_path / "d", device_map="cpu")
    assert type(loaded.transformer.h[1].mlp.act) is nn.SiLU
    assert (_logits(loaded, ids) - want).abs().max() < TOL
    half = from_pretrained(GPT2LMHeadModel, tmp_path / "d", dtype=torch.bfloat16)
    assert half.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert type(half.transformer.h[0].mlp.act) is nn.SiLU


def test_bert_exact_gelu_to_eafo_round_trips(tmp_path):
    from transformers import BertForMaskedLM
    from transformers.activations import GELUActivation

    from dynact.integrations.transformers import from_pretrained

    model = _bert()
    _train_with_trainer(model, tmp_path / "run", convert=(GELUActivation,), steps=3)
    name = "bert.encoder.layer.1.intermediate.intermediate_act_fn"
    assert isinstance(model.get_submodule(name), EAFOActivation)
    assert float(model.get_submodule(name).eps.detach()) != pytest.approx(0.01, abs=1e-6)  # eps trained
    with torch.no_grad():  # and a spline unlike the fresh one
        model.get_submodule(name).s.mul_(-2.0)
    ids = _tokens()
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "d")
    loaded = from_pretrained(BertForMaskedLM, tmp_path / "d")
    act = loaded.get_submodule(name)
    assert type(act) is EAFOActivation and type(act.base) is GELUActivation
    assert (_logits(loaded, ids) - want).abs().max() < TOL
    for key, value in _dynact_state(model).items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_folder_without_dynact_loads_as_plain_and_older_folders_from_their_keys(tmp_path):
    from transformers import GPT2LMHeadModel
    from transformers.activations import NewGELUActivation

    from dynact.integrations.transformers import from_pretrained

    model = _gpt2()
    ids = _tokens()
    model.save_pretrained(tmp_path / "plain")
    loaded = from_pretrained(GPT2LMHeadModel, tmp_path / "plain")
    assert "dynact" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert isinstance(loaded.transformer.h[0].mlp.act, NewGELUActivation)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))

    # saved by a dynact without records: the spline's tensors say what it was
    model.transformer.h[1].mlp.act = EAFOActivation(base=NewGELUActivation(), knots=65, eps=0.2)
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "old")
    assert "dynact" not in json.loads((tmp_path / "old" / "config.json").read_text())  # put in by hand: no record
    loaded = from_pretrained(GPT2LMHeadModel, tmp_path / "old")
    assert loaded.transformer.h[1].mlp.act.knots == 65
    assert (_logits(loaded, ids) - want).abs().max() < TOL


def test_a_record_without_its_weights_is_refused(tmp_path):
    from transformers import GPT2LMHeadModel

    from dynact.integrations.transformers import from_pretrained

    model = _gpt2()
    dynact.swap_activations(model, "gelu_new", "crrelu")
    model.save_pretrained(tmp_path / "d")
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "d")  # keeps config.dynact but loses the CRReLUs
    plain.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="weights lack"):
        from_pretrained(GPT2LMHeadModel, tmp_path / "again")


# --------------------------------------------------------------------------- state_dict and Lightning
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ELU(alpha=0.3),
                         nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def _convert_every_kind(net):
    """An EAFO around the model's own GELU, an EAFO with another base swapped in, a CRReLU, a SiLU."""
    net[1] = to_eafo(net[1], knots=33)
    dynact.swap_activations(net, nn.ReLU, "eafo", base="silu", knots=17, learn_eps=False)
    dynact.swap_activations(net, nn.ELU, "crrelu", learnable=False)
    dynact.swap_activations(net, nn.Tanh, "silu")
    with torch.no_grad():
        net[1].s.mul_(-3.0)
        net[1].eps.fill_(0.4)
        net[3].s.copy_(torch.linspace(0, 1, 17).sin())
        net[3].s[0] = net[3].s[-1] = 0
        net[3].eps.fill_(0.5)
        net[5].eps.fill_(-0.6)
    return net


def _check_same(fresh, trained):
    assert [type(m) for m in fresh] == [type(m) for m in trained]
    assert type(fresh[1].base) is nn.GELU and type(fresh[3].base) is nn.SiLU and type(fresh[7]) is nn.SiLU
    assert fresh[1].knots == 33 and fresh[3].knots == 17
    assert fresh[3].learn_eps is False and fresh[5].learnable is False
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        assert (fresh(x) - trained(x)).abs().max() < TOL


def test_convert_like_state_dict_rebuilds_every_kind_from_a_saved_state_dict(tmp_path):
    trained = _convert_every_kind(_mlp())
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    fresh = _mlp()
    assert convert_like_state_dict(fresh, state) == ["1", "3", "5", "7"]
    fresh.load_state_dict(state)
    _check_same(fresh, trained)
    assert convert_like_state_dict(fresh, state) == []  # already converted: nothing to do

    # a state without records (an older dynact) still converts from its keys
    bare = dict(state)  # a plain dict: no _metadata
    fresh = _mlp()
    assert convert_like_state_dict(fresh, bare) == ["1", "3", "5"]
    assert type(fresh[5]) is CRReLU and type(fresh[3].base) is nn.ReLU  # the keys cannot say more
    assert type(fresh[7]) is nn.Tanh


def test_convert_like_state_dict_with_a_lightning_checkpoint(tmp_path):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch, _):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_load_checkpoint(self, checkpoint):
            convert_like_state_dict(self, checkpoint["state_dict"])

    module = Module()
    _convert_every_kind(module.net)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = Module.load_from_checkpoint(tmp_path / "m.ckpt")
    _check_same(loaded.net, module.net)
    assert float(loaded.net[1].eps) == pytest.approx(float(module.net[1].eps))  # the trained eps


def test_a_state_saved_before_conversion_keeps_the_converted_module():
    saved = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    dynact.swap_activations(saved, nn.GELU, "relu")  # recorded: a ReLU
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    dynact.swap_activations(model, nn.GELU, "relu")
    model[1] = to_eafo(model[1])  # converted since: the ReLU is its base
    state = saved.state_dict()
    assert convert_like_state_dict(model, state) == []
    assert isinstance(model[1], EAFOActivation) and type(model[1].base) is nn.ReLU
    model.load_state_dict(state)
    assert torch.equal(model[0].weight, saved[0].weight)
