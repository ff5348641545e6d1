"""Activation call sites, registry families, per-channel bases, one plugin per model, copies,
gradient checkpointing and PEFT (issue 28, points 1-8). Each test fails on a dynact that measures
modules rather than call sites, or that lets these cases pass silently."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

import dynact
from dynact import ActivationOptimizer, EAFOActivation
from dynact.conversion import convert_like_state_dict
from dynact.density import Density
from dynact.eafo import output_stats
from dynact.registry import elementwise, family_types
from dynact.sites import CallSites, count_calls, split_call_sites


class Scaled(nn.Module):
    """One GELU module called after each of three blocks whose outputs have scales 1, 3 and 9."""

    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.checkpointed = checkpointed
        with torch.no_grad():
            for i, b in enumerate(self.blocks):
                b.weight.copy_(torch.eye(16) * 3.0**i)
                b.bias.zero_()

    def body(self, x):
        for block in self.blocks:
            x = self.act(block(x)) + x
        return x

    def forward(self, x):
        if self.checkpointed:
            return cp.checkpoint(self.body, x, use_reentrant=False)
        return self.body(x)


def _std(d: Density) -> float:
    w = d.p * d.step
    mean = float((w * d.grid).sum() / w.sum())
    return float(((w * (d.grid - mean) ** 2).sum() / w.sum()) ** 0.5)


def _steps(model, act_opt, n, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    out = {}
    for _ in range(n):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        out = act_opt.step() or out
    return out


# ----------------------------------------------------------------------------- point 1: call sites
def test_a_module_called_at_three_places_is_three_activations_each_measured_on_its_own_input():
    torch.manual_seed(0)
    model = Scaled()
    x = torch.randn(512, 16)
    seen = []  # the inputs the shared module really gets, call by call (the oracle)
    h = model.act.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    act_opt = ActivationOptimizer(model, every_n_steps=1, window=1, sample_size=4096, mode="monitor", estimator="hist")
    assert act_opt.split == {"act": 3}
    assert act_opt.layer_names == ["act.calls.0", "act.calls.1", "act.calls.2"]
    _steps(model, act_opt, 3, x)  # the first windows fit each site's grid to its data
    for i, inp in enumerate(seen):
        d = act_opt.densities[f"act.calls.{i}"]
        assert _std(d) == pytest.approx(float(inp.std()), rel=0.05)
    stds = [_std(act_opt.densities[f"act.calls.{i}"]) for i in range(3)]
    assert stds[1] > 2 * stds[0] and stds[2] > 2 * stds[1]


def test_sites_are_converted_apart_and_rebuilt_from_the_saved_state():
    torch.manual_seed(0)
    model = Scaled()
    act_opt = ActivationOptimizer(model, every_n_steps=2, window=2, sample_size=512)
    assert isinstance(model.act, CallSites) and len(model.act.calls) == 3
    assert all(isinstance(c, EAFOActivation) for c in model.act.calls)
    assert len({id(c.eps) for c in model.act.calls}) == 3
    _steps(model, act_opt, 4, torch.randn(64, 16))
    spans = [float(c.hi - c.lo) for c in model.act.calls]
    assert max(spans) > 3 * min(spans)  # each spline's grid follows its own site's data
    fresh = Scaled()
    convert_like_state_dict(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(8, 16)
    assert torch.equal(fresh(x), model(x))


def test_torchvision_basic_block_gets_two_sites_and_sites_module_keeps_one():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=4)
    counts = count_calls(net)
    assert counts[id(net.layer1[0].relu)] == 2 and counts[id(net.relu)] == 1
    assert split_call_sites(copy.deepcopy(net)) == {f"layer{i}.{j}.relu": 2 for i in range(1, 5) for j in range(2)}
    kept = ActivationOptimizer(copy.deepcopy(net), sites="module", mode="monitor")
    assert len(kept.layer_names) == 9
    split = ActivationOptimizer(net, mode="monitor")
    assert len(split.layer_names) == 17
    with pytest.raises(ValueError, match="sites must be"):
        ActivationOptimizer(nn.Sequential(nn.ReLU()), sites="calls")


def test_an_untraceable_model_is_counted_per_parent():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.GELU()

        def forward(self, x):
            return self.act(self.fc(self.act(x)))

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace the whole model
                x = x + 1
            for b in self.blocks:
                x = b(x)
            return x

    model = Untraceable()
    counts = count_calls(model)
    assert [counts[id(b.act)] for b in model.blocks] == [2, 2]


def test_checkpointed_recomputation_is_neither_sampled_again_nor_sent_to_another_site():
    torch.manual_seed(0)
    x = torch.randn(256, 16, requires_grad=True)
    plain, ckpt = Scaled(), Scaled(checkpointed=True)
    ckpt.load_state_dict(plain.state_dict())
    grads, opts = [], []
    for m in (plain, ckpt):
        act_opt = ActivationOptimizer(m, every_n_steps=1, window=1, sample_size=1000, estimator="hist",
                                      init_range=(-300.0, 300.0))
        with torch.no_grad():
            for i, site in enumerate(m.act.calls):  # distinct sites: a replay sent elsewhere changes the gradient
                site.eps.fill_(0.5 * (i + 1))
        x.grad = None
        m(x).pow(2).sum().backward()
        grads.append(x.grad.clone())
        act_opt.step()
        opts.append(act_opt)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    for name in opts[0].layer_names:
        assert opts[1].densities[name].count == opts[0].densities[name].count == 1000  # one call, sampled once


def test_compiled_model_with_sites_matches_eager_without_recompiling():
    torch.manual_seed(0)
    model = Scaled()
    act_opt = ActivationOptimizer(model, every_n_steps=2, window=1, sample_size=256)
    x = torch.randn(32, 16)
    eager = model(x)
    compiled = torch.compile(model, backend="eager")
    assert torch.allclose(compiled(x), eager)
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    assert model.act._next == 0
    act_opt.remove()


# ----------------------------------------------------------------------------- point 2/3: registry, names
@pytest.mark.parametrize("cls", [nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SELU])
def test_everyday_activations_are_measured_and_convertible(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), cls(), nn.Linear(32, 2))
    act_opt = ActivationOptimizer(model, every_n_steps=2, window=2, sample_size=512, convert=(cls,))
    assert isinstance(model[1], EAFOActivation) and type(model[1].base) is cls
    out = _steps(model, act_opt, 4, torch.randn(128, 8))
    assert out["accepted/1"] == 1.0


def test_names_are_families():
    transformers = pytest.importorskip("transformers")
    from transformers.activations import NewGELUActivation, SiLUActivation

    assert {nn.GELU, NewGELUActivation} <= set(family_types("gelu"))
    assert {nn.SiLU, SiLUActivation} <= set(family_types("silu"))
    assert family_types("gelu_new") == (NewGELUActivation,)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    llama = transformers.LlamaForCausalLM(cfg)
    act_opt = ActivationOptimizer(llama, convert=("silu",))
    assert len(act_opt.converted) == 2
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2))
    with pytest.warns(UserWarning, match=r"2 x NewGELUActivation \(convert='gelu'\)"):
        ActivationOptimizer(gpt2, convert=(nn.GELU,))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2))
    assert len(ActivationOptimizer(gpt2, convert=("gelu",)).converted) == 2


def test_an_activation_class_dynact_does_not_know_is_named_with_the_fix():
    class MyRelu(nn.Module):
        def forward(self, x):
            return x.clamp_min(0)

    model = nn.Sequential(nn.Linear(2, 4), MyRelu(), nn.Linear(4, 2), nn.ReLU())
    with pytest.warns(UserWarning, match=r"does not know.*MyRelu.*register_activation\('myrelu', MyRelu"):
        act_opt = ActivationOptimizer(model)
    assert act_opt.layer_names == ["3"]


# ----------------------------------------------------------------------------- point 4: per-channel bases
def test_channel_prelu_is_measured_and_converted_with_its_channels_averaged():
    torch.manual_seed(0)
    prelu = nn.PReLU(num_parameters=8)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(-0.5, 0.9, 8))
    d = Density.from_pdf(lambda t: torch.exp(-t**2 / 2) / (2 * torch.pi) ** 0.5, -8, 8, 801)
    mean_slope = float(prelu.weight.detach().mean())
    oracle = output_stats(lambda t: torch.where(t > 0, t, mean_slope * t), d)
    assert output_stats(elementwise(prelu), d)["std"] == pytest.approx(oracle["std"], rel=1e-6)

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), copy.deepcopy(prelu), nn.Conv2d(8, 2, 3))

    x = torch.randn(16, 3, 12, 12)
    for mode in ("monitor", "refresh"):
        model = net()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no skipped update
            act_opt = ActivationOptimizer(model, every_n_steps=2, window=2, mode=mode, convert=(nn.PReLU,))
            out = _steps(model, act_opt, 4, x)
        assert "entropy/1" in out and not act_opt.skips["1"]
        if mode == "refresh":
            assert out["accepted/1"] == 1.0 and model[1].base.weight.shape == (8,)


# ----------------------------------------------------------------------------- point 6/7: plugins, copies
def test_a_second_plugin_on_the_same_model_is_refused_naming_the_first():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    first = ActivationOptimizer(model)
    first_named = r"already has a dynact plugin: ActivationOptimizer\(every_n_steps=100.*test_sites"
    with pytest.raises(ValueError, match=first_named):
        ActivationOptimizer(model, every_n_steps=10)
    first.remove()
    ActivationOptimizer(model, every_n_steps=10)  # after remove() a new one is welcome


def test_two_lightning_callbacks_on_one_model_are_refused(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, _):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=8)
    two = [dynact.EAFOCallback(every_n_steps=6), dynact.EAFOCallback(every_n_steps=4)]
    trainer = pl.Trainer(max_steps=2, callbacks=two, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="already has a dynact plugin"):
        trainer.fit(Tiny(), loader)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_model_carries_no_live_hook_of_the_original_plugin(how):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    act_opt = ActivationOptimizer(model, every_n_steps=4, window=4, sample_size=64)
    act_opt.step()  # inside the window
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    before = act_opt._layers["1"].estimator.state_dict()
    twin(torch.randn(8, 4))  # the original plugin must not see the copy's data
    after = act_opt._layers["1"].estimator.state_dict()
    assert all(torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k] for k, v in before.items())
    assert len(twin[1]._forward_pre_hooks) == 0  # the dead hook removed itself
    new = ActivationOptimizer(twin, every_n_steps=4)
    assert len(twin[1]._forward_pre_hooks) == 1
    new.remove()


def test_a_copy_given_a_new_plugin_has_one_hook_per_layer_before_any_forward():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
    ActivationOptimizer(model)
    twin = copy.deepcopy(model)
    ActivationOptimizer(twin)
    assert len(twin[1]._forward_pre_hooks) == 1


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
        ActivationOptimizer(None)


# ----------------------------------------------------------------------------- point 8: HF checkpointing
def test_transformers_gradient_checkpointing_samples_each_value_once():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    counts = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        act_opt = ActivationOptimizer(model, every_n_steps=1, window=1, sample_size=512, mode="monitor",
                                      estimator="hist")
        ids = torch.randint(0, 32, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        act_opt.step()
        counts.append({n: d.count for n, d in act_opt.densities.items()})
    assert counts[0] == counts[1] and set(counts[0].values()) == {512}


# ----------------------------------------------------------------------------- point 5: PEFT
def _peft_gpt2(seed: int):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    return model, lambda m: peft.get_peft_model(m, lora)


def test_peft_after_the_plugin_warns_that_eps_is_frozen_and_train_eps_unfreezes_it():
    model, wrap = _peft_gpt2(0)
    act_opt = ActivationOptimizer(model, convert=("gelu",))
    model = wrap(model)
    assert not any(act.eps.requires_grad for act in act_opt.layers.values())
    with pytest.warns(UserWarning, match="eps of 2 converted layer.*get_peft_model.*train_eps"):
        act_opt.step()
    assert act_opt.train_eps() == act_opt.layer_names
    assert all(act.eps.requires_grad for act in act_opt.layers.values())


def test_peft_records_resolve_after_merge_and_adapter_resume_restores_the_activations(tmp_path):
    from dynact.integrations.transformers import from_pretrained

    model, wrap = _peft_gpt2(0)
    peft_model = wrap(model)
    act_opt = ActivationOptimizer(peft_model, every_n_steps=2, window=2, sample_size=256, convert=("gelu",))
    assert all(act.eps.requires_grad for act in act_opt.layers.values())
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 32, (4, 12))
    for _ in range(4):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        act_opt.step()
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    # A resume in a new process: the same model and adapters, the adapter checkpoint, the plugin's state.
    peft_model.save_pretrained(tmp_path / "adapter")
    torch.save(act_opt.state_dict(), tmp_path / "dynact.pt")
    import peft

    base, _ = _peft_gpt2(0)
    resumed = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    again = ActivationOptimizer(resumed, convert=("gelu",))
    again.load_state_dict(torch.load(tmp_path / "dynact.pt", weights_only=False))
    resumed.eval()
    with torch.no_grad():
        assert torch.allclose(resumed(input_ids=ids).logits, want, atol=1e-6)
    # Merged and saved as a plain transformers model: the records name the model's own modules.
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = from_pretrained(type(merged), tmp_path / "merged").eval()
    assert isinstance(reloaded.transformer.h[0].mlp.act, EAFOActivation)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, want, atol=1e-5)


def test_swap_activations_gives_every_call_site_its_own_module():
    torch.manual_seed(0)
    model = Scaled()
    names = dynact.swap_activations(model, nn.ReLU, "crrelu")
    assert names == ["act.calls.0", "act.calls.1", "act.calls.2"]
    assert len({id(c.eps) for c in model.act.calls}) == 3
    shared = Scaled()
    assert dynact.swap_activations(shared, nn.ReLU, "crrelu", sites="module") == ["act"]
    fresh = Scaled()
    convert_like_state_dict(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(fresh(x), model(x))
