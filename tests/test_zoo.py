"""The model zoo: everyday models built from configs (no weights), each with dynact's plugin added
in one line, every activation call site measured, converted, updated, saved, reloaded and baked.

A model family is one entry of ``ZOO``: a name and a builder returning ``(model, inputs, output)``
(``output`` picks the tensor to compare from the model's output). Each case checks, over a few
training steps with an update every second step:

- the call sites the plugin measures equal the activation calls counted by forward hooks on the
  unconverted model (an independent count: one forward, a counter per call);
- every converted site is updated, and every update of it is accepted;
- a fresh model rebuilt from the saved state (``convert_like_state_dict``, or ``save_pretrained`` +
  ``dynact.integrations.transformers.from_pretrained``) gives the same outputs;
- ``dynact.bake`` gives the same outputs.

The rows of ``docs/zoo_table.md`` are generated from these runs: ``DYNACT_WRITE_ZOO=1 python -m
pytest tests/test_zoo.py`` rewrites the table; otherwise the last test checks it is up to date.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import dynact
from dynact.activations import activation_types, find_activations
from dynact.conversion import convert_like_state_dict
from dynact.registry import family_of

TABLE = Path(__file__).resolve().parents[1] / "docs" / "zoo_table.md"
ROWS: dict[str, dict] = {}


# ----------------------------------------------------------------------------- the models
def _tv(name, channels_last=False, **kw):
    def build():
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=10, **kw)
        x = torch.randn(4, 3, 32, 32)
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        return model, (x,), lambda out: out
    return build


def _timm(name, **kw):
    def build():
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
        return model, (torch.randn(4, 3, 32, 32),), lambda o: o
    return build


def _hf(config_cls, model_cls, **cfg):
    def build():
        import transformers

        config = getattr(transformers, config_cls)(**cfg)
        model = getattr(transformers, model_cls)(config)
        ids = torch.randint(0, cfg["vocab_size"], (2, 12))
        inputs = {"input_ids": ids}
        if model_cls.startswith("T5"):
            inputs["decoder_input_ids"] = ids[:, :6]
        return model, inputs, lambda out: out.logits
    return build


def _gpt2_lora():
    from peft import LoraConfig, get_peft_model

    model, inputs, pick = _hf("GPT2Config", "GPT2LMHeadModel", **GPT2)()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0)
    return get_peft_model(model, lora), inputs, pick


class SharedAct(nn.Module):
    """A hand-written model that builds one activation and calls it in every block."""

    def __init__(self, depth: int = 4, width: int = 16) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        x = self.act(self.inp(x))
        for block in self.blocks:
            x = x + self.act(block(x))
        return self.out(x)


GPT2 = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
ZOO = {
    "torchvision resnet18": _tv("resnet18"),
    "torchvision resnet50": _tv("resnet50"),
    "torchvision mobilenet_v2": _tv("mobilenet_v2"),
    "torchvision mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "torchvision efficientnet_b0": _tv("efficientnet_b0"),
    "torchvision convnext_tiny": _tv("convnext_tiny"),
    "torchvision convnext_tiny (channels_last)": _tv("convnext_tiny", channels_last=True),
    "timm vit_tiny_patch16_224": _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
    "timm convnext_atto": _timm("convnext_atto"),
    "transformers GPT-2": _hf("GPT2Config", "GPT2LMHeadModel", **GPT2),
    "transformers BERT": _hf("BertConfig", "BertForSequenceClassification", vocab_size=64, hidden_size=32,
                             num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3),
    "transformers Llama": _hf("LlamaConfig", "LlamaForCausalLM", vocab_size=64, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
    "transformers T5": _hf("T5Config", "T5ForConditionalGeneration", vocab_size=64, d_model=32, d_kv=8, d_ff=64,
                           num_layers=2, num_heads=2, decoder_start_token_id=0),
    "transformers Bloom": _hf("BloomConfig", "BloomForCausalLM", vocab_size=64, hidden_size=32, n_layer=2, n_head=2),
    "GPT-2 + PEFT LoRA": _gpt2_lora,
    "custom: one GELU called in every block": lambda: (SharedAct(), (torch.randn(16, 8),), lambda o: o),
}


# ----------------------------------------------------------------------------- helpers
def _run(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _hooked_calls(model, inputs) -> int:
    """Activation calls in one forward, counted by a forward hook on every activation module."""
    calls = Counter()
    handles = [m.register_forward_hook(lambda mod, a, o: calls.update([id(mod)]))
               for _, m in find_activations(model)]
    with torch.no_grad():
        _run(model, inputs)
    for h in handles:
        h.remove()
    return sum(calls.values())


def _loss(out) -> torch.Tensor:
    return out.float().pow(2).mean()


def _train(model, inputs, pick, steps: int = 6) -> tuple[dynact.ActivationOptimizer, list[dict]]:
    families = tuple(sorted({family_of(type(m)) for _, m in find_activations(model)}))
    act_opt = dynact.ActivationOptimizer(model, every_n_steps=2, window=2, sample_size=512, convert=families, bins=128)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    updates = []
    model.train()
    for _ in range(steps):
        loss = _loss(pick(_run(model, inputs)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        new = act_opt.step()
        if new:
            updates.append(new)
    return act_opt, updates


def _reloaded(name, build, model, tmp_path):
    torch.manual_seed(1)  # other weights than the trained model's: everything must come from the save
    fresh, _, _ = build()
    if hasattr(model, "merge_and_unload"):  # PEFT: merged, saved, reloaded as a plain transformers model
        from dynact.integrations.transformers import from_pretrained

        merged = model.merge_and_unload()
        merged.save_pretrained(tmp_path)
        return merged, from_pretrained(type(merged), tmp_path)
    if hasattr(model, "save_pretrained"):
        from dynact.integrations.transformers import from_pretrained

        model.save_pretrained(tmp_path)
        return model, from_pretrained(type(model), tmp_path)
    state = model.state_dict()
    convert_like_state_dict(fresh, state)
    fresh.load_state_dict(state)
    return model, fresh


def _same(a, b, inputs, pick) -> bool:
    a.eval()
    b.eval()
    with torch.no_grad():
        ya, yb = pick(_run(a, inputs)), pick(_run(b, inputs))
    return torch.allclose(ya, yb, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the test
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name, tmp_path):
    torch.manual_seed(0)
    model, inputs, pick = ZOO[name]()
    model.eval()
    calls = _hooked_calls(model, inputs)
    kinds = sorted({type(m).__name__ for _, m in find_activations(model)})
    act_opt, updates = _train(model, inputs, pick)

    assert len(act_opt.layer_names) == calls, (act_opt.layer_names, calls)
    dynamic = [n for n, m in act_opt.layers.items() if isinstance(m, dynact.EAFOActivation)]
    assert len(dynamic) == len(act_opt.layer_names)  # every site's family was asked for
    tags = {n: dynact.core.tag("accepted", n) for n in dynamic}
    accepted = {n: [u[tags[n]] for u in updates if tags[n] in u] for n in dynamic}
    assert all(v and all(a == 1.0 for a in v) for v in accepted.values()), accepted
    assert not any(act_opt.skips.values()), act_opt.skips

    act_opt.remove()
    saved, reloaded = _reloaded(name, ZOO[name], model, tmp_path)
    assert _same(saved, reloaded, inputs, pick)
    baked = dynact.bake(copy.deepcopy(saved))
    assert not find_activations(baked, (dynact.EAFOActivation,))
    assert _same(saved, baked, inputs, pick)
    ROWS[name] = {
        "types": ", ".join(kinds), "sites": calls, "converted": len(dynamic),
        "accepted": sum(len(v) for v in accepted.values()), "reload": "same outputs", "bake": "same outputs",
    }


def _table() -> str:
    head = ("| model | activation types | call sites | converted | updates accepted | save + reload | bake |\n"
            "|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {name} | {r['types']} | {r['sites']} | {r['converted']} | {r['accepted']} | {r['reload']} | {r['bake']} |\n"
        for name, r in ((n, ROWS[n]) for n in ZOO if n in ROWS)
    )
    return head + rows


def test_zoo_table_is_up_to_date():
    """The table in the docs is the one these runs generate (run the whole file)."""
    if len(ROWS) < len(ZOO):
        pytest.skip("the zoo cases did not all run in this session")
    table = _table()
    if os.environ.get("DYNACT_WRITE_ZOO") == "1":
        TABLE.write_text(table, encoding="utf-8")
    assert TABLE.read_text(encoding="utf-8") == table, "docs/zoo_table.md is stale: rerun with DYNACT_WRITE_ZOO=1"


def test_registry_covers_every_activation_class_of_the_zoo():
    """Every nn.Module whose class name says it is an activation is one dynact measures."""
    words = ("relu", "gelu", "silu", "swish", "hardswish", "hardsigmoid", "sigmoid", "mish", "tanh", "elu")
    seen = set()
    for name in ZOO:
        model, _, _ = ZOO[name]()
        for m in model.modules():
            cls = type(m)
            if any(w in cls.__name__.lower() for w in words) and next(m.children(), None) is None:
                seen.add(cls)
    types = tuple(activation_types())
    missing = [c.__name__ for c in seen if not issubclass(c, types)]
    assert not missing
