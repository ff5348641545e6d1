"""Models and tokenizers of ``dynact dpo``: GPT-2 with any activation, and the offline tiny set-up.

The offline default needs nothing from a model hub: :func:`train_tokenizer` trains a small
byte-level BPE tokenizer on the preference texts, and :func:`tiny_gpt2_config` describes a
two-block GPT-2 that is randomly initialised. :func:`build_policy` gives either that model or
a pretrained one (``"gpt2"`` or any causal LM name or folder) with an arm's activation.

Arms (see :func:`arm_plan`): ``gelu`` keeps GPT-2's own activation (``gelu_new``, the
tanh-approximate GELU), the control; ``eafo`` keeps it too and lets
:class:`~dynact.ActivationOptimizer` convert it to a dynamic
:class:`~dynact.EAFOActivation` on the same base; every other registry name (``crrelu``,
``relu``, ``silu``, ...) replaces it with :func:`dynact.swap_activations`.
"""

from __future__ import annotations

import copy
from typing import Iterable

from torch import nn

from dynact.activations import activation_names, find_activations, register_transformers_activations, swap_activations

__all__ = [
    "CONTROL_ARM",
    "DYNAMIC_ARM",
    "TINY_MODEL",
    "arm_plan",
    "build_policy",
    "check_arms",
    "count_parameters",
    "frozen_copy",
    "gelu_types",
    "tiny_gpt2_config",
    "train_tokenizer",
]

CONTROL_ARM = "gelu"
DYNAMIC_ARM = "eafo"
#: ``--model`` value of the randomly initialised model built in code.
TINY_MODEL = "tiny"
#: End of text: GPT-2's own special token, used as BOS, EOS and padding like GPT-2 does.
EOS = "<|endoftext|>"


def gelu_types() -> tuple[type, ...]:
    """The GELU module classes an arm replaces: ``nn.GELU`` and transformers' variants."""
    import transformers.activations as hf

    register_transformers_activations()
    names = ("NewGELUActivation", "GELUActivation", "FastGELUActivation", "QuickGELUActivation",
             "GELUTanh", "AccurateGELUActivation")
    return (nn.GELU, *(getattr(hf, n) for n in names if isinstance(getattr(hf, n, None), type)))


def check_arms(arms: Iterable[str]) -> list[str]:
    """Lower-case, de-duplicated arm names; ``ValueError`` naming the choices for an unknown one."""
    register_transformers_activations()
    out: list[str] = []
    for arm in arms:
        key = arm.strip().lower()
        if not key:
            continue
        if key not in activation_names():
            raise ValueError(f"--arms: unknown arm {arm!r}; choose from: {', '.join(activation_names())}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError(f"--arms is empty; give a comma-separated list of: {', '.join(activation_names())}")
    return out


def arm_plan(arm: str) -> dict:
    """How an arm is built and measured: the activation swapped in (``None``: keep GPT-2's) and
    the :class:`~dynact.ActivationOptimizer` mode (``refresh`` converts, ``monitor`` measures)."""
    if arm == DYNAMIC_ARM:
        return {"swap": None, "mode": "refresh"}
    if arm == CONTROL_ARM:
        return {"swap": None, "mode": "monitor"}
    return {"swap": arm, "mode": "monitor"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2's scheme), ready for the trainers.

    ``<|endoftext|>`` is BOS, EOS and padding token, as in GPT-2. Deterministic for given texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS)
    fast.model_max_length = 1024
    return fast


def tiny_gpt2_config(vocab_size: int, n_positions: int = 256, n_layer: int = 2, n_embd: int = 64, n_head: int = 2):
    """A GPT-2 configuration small enough for a CPU smoke check (GPT-2's activation ``gelu_new``)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer, n_embd=n_embd,
                      n_head=n_head, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build_policy(model: str, arm: str, tokenizer=None, seed: int = 0, n_positions: int = 256) -> nn.Module:
    """GPT-2 (or any causal LM) with ``arm``'s activation.

    Args:
        model: :data:`TINY_MODEL` (random weights from ``seed``, sized for ``tokenizer``), or a
            name or folder for ``AutoModelForCausalLM.from_pretrained`` (``"gpt2"``).
        arm: an arm name (see :func:`arm_plan`).

    Raises:
        ValueError: the arm would swap nothing (the model has no GELU modules).
    """
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel, set_seed

    set_seed(seed)
    if model == TINY_MODEL:
        if tokenizer is None:
            raise ValueError("the tiny model needs the tokenizer it is sized for")
        net = GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer), n_positions=n_positions))
    else:
        net = AutoModelForCausalLM.from_pretrained(model)
    swap = arm_plan(arm)["swap"]
    if swap is not None:
        replaced = swap_activations(net, gelu_types(), swap)
        if not replaced:
            raise ValueError(f"arm {arm!r}: model {model!r} has no GELU activation modules to replace")
    elif not find_activations(net, gelu_types()):
        raise ValueError(f"arm {arm!r}: model {model!r} has no GELU activation modules to measure or convert")
    return net


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in evaluation mode with no trainable parameters: DPO's reference."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``model`` (shared tensors once, as ``model.num_parameters()`` counts)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())
