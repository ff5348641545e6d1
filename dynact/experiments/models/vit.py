"""The paper's three vision transformers, built from timm's models with any activation.

Each builder returns a plain timm model whose MLP activations come from the dynact registry
(:func:`dynact.activations.resolve_activation`). The defaults reproduce the paper's parameter counts
exactly:

============  ======================  =======================  ==========================
model         CIFAR-10 (32 px, p 4)   CIFAR-100                ImageNet-1K (224 px, p 16)
============  ======================  =======================  ==========================
ViT-Tiny      5,399,818               5,417,188                5,754,472
DeiT-Tiny     5,365,076               5,399,816                5,910,800
TNT-Small     21,525,298              21,559,948               --
============  ======================  =======================  ==========================

An activation with one learnable scalar (``crrelu``, ``eafo``, ``prelu``) adds one parameter
per MLP: 12 for ViT-Tiny and DeiT-Tiny, 24 for TNT-Small (inner and outer MLPs).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from timm.layers import trunc_normal_
from timm.models.deit import VisionTransformerDistilled
from timm.models.tnt import TNT
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dynact.activations import ActSpec, resolve_activation, swap_activations

__all__ = ["vit_tiny", "deit_tiny", "tnt_small", "create_model", "model_names"]


class _ViTWithPreLogits(VisionTransformer):
    """timm's ViT plus the original ViT's pre-logits layer (``Linear(D, D)`` then ``tanh``).

    timm 1.0 dropped ``representation_size``; the paper's ViT-Tiny count includes this layer.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        fc = nn.Linear(self.embed_dim, self.embed_dim, device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        trunc_normal_(fc.weight, std=0.02)
        nn.init.zeros_(fc.bias)
        # tanh is the representation layer's own non-linearity, not an MLP activation,
        # so act= never replaces it.
        self.pre_logits = nn.Sequential(OrderedDict(fc=fc, act=nn.Tanh()))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.pre_logits(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def _with_activation(
    model: nn.Module, act: ActSpec, act_kwargs: Optional[dict[str, Any]], expected: int
) -> nn.Module:
    """Replace the model's MLP GELUs by ``act`` (built with ``act_kwargs``); check the count."""
    factory = resolve_activation(act)
    kwargs = dict(act_kwargs or {})
    if factory is None or (factory is nn.GELU and not kwargs):
        return model
    # ``act`` names the activation to build, not a wrapper around timm's GELU: "eafo" is the
    # registry's EAFOActivation (ReLU base) unless act_kwargs give a base.
    if getattr(factory, "wraps_base", False):
        kwargs.setdefault("base", "relu")
    replaced = swap_activations(model, nn.GELU, factory, **kwargs)
    # Every GELU in these timm models is an MLP activation; a different count means timm
    # changed its layout and the paper's counts no longer hold.
    if len(replaced) != expected:
        raise RuntimeError(
            f"expected {expected} MLP activations in {type(model).__name__}, replaced {len(replaced)}: "
            f"{replaced}; the installed timm's layout differs from the paper's model"
        )
    return model


def _check_geometry(name: str, num_classes: int, img_size: int, patch_size: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{name}: patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(img_size, int) or img_size < patch_size or img_size % patch_size:
        raise ValueError(
            f"{name}: img_size must be a positive multiple of patch_size={patch_size}, got {img_size!r}"
        )


def vit_tiny(
    num_classes: int = 10,
    img_size: int = 32,
    patch_size: int = 4,
    act: ActSpec = "gelu",
    *,
    act_kwargs: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> VisionTransformer:
    """ViT-Tiny: timm ``VisionTransformer`` (embed 192, depth 12, 3 heads) with a pre-logits layer.

    Args:
        num_classes: classifier outputs.
        img_size: input side in pixels (square images).
        patch_size: patch side; ``img_size`` must be a multiple of it.
        act: MLP activation, a registry name (``relu, gelu, elu, prelu, celu, silu, mish,
            crrelu, eafo``), a class or a factory; every block's MLP gets its own module.
        act_kwargs: keyword arguments for each activation (e.g. ``{"eps": 0.01}``).
        **kwargs: passed to timm's ``VisionTransformer`` (e.g. ``embed_dim``, ``depth``,
            ``num_heads``, ``in_chans`` for smaller variants). No dropout or drop-path by default.

    Example:
        >>> net = vit_tiny(num_classes=10, img_size=32, patch_size=4, act="crrelu")
        >>> sum(p.numel() for p in net.parameters())
        5399830
    """
    _check_geometry("vit_tiny", num_classes, img_size, patch_size)
    resolve_activation(act)  # an unknown name fails before the model is built
    cfg = dict(embed_dim=192, depth=12, num_heads=3) | kwargs
    net = _ViTWithPreLogits(img_size=img_size, patch_size=patch_size, num_classes=num_classes, **cfg)
    return _with_activation(net, act, act_kwargs, expected=cfg["depth"])


def deit_tiny(
    num_classes: int = 10,
    img_size: int = 32,
    patch_size: int = 4,
    act: ActSpec = "gelu",
    *,
    act_kwargs: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> VisionTransformerDistilled:
    """DeiT-Tiny: timm's distilled ViT (class and distillation tokens, two heads), embed 192, depth 12.

    In training mode with ``set_distilled_training(True)`` it returns ``(cls_logits, dist_logits)``;
    otherwise the average of the two heads. Arguments as in :func:`vit_tiny`.
    """
    _check_geometry("deit_tiny", num_classes, img_size, patch_size)
    resolve_activation(act)
    cfg = dict(embed_dim=192, depth=12, num_heads=3) | kwargs
    net = VisionTransformerDistilled(img_size=img_size, patch_size=patch_size, num_classes=num_classes, **cfg)
    return _with_activation(net, act, act_kwargs, expected=cfg["depth"])


def tnt_small(
    num_classes: int = 10,
    img_size: int = 32,
    patch_size: int = 4,
    act: ActSpec = "gelu",
    *,
    act_kwargs: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> TNT:
    """TNT-Small: timm ``TNT`` with embed 384, inner dim 24, 6 outer / 4 inner heads, depth 12.

    ``first_stride=4``, ``legacy=True`` and no qkv bias, as in the paper's count. timm's TNT has no
    ``act_layer`` argument, so the inner and outer MLP GELUs (24) are swapped after building.
    Arguments as in :func:`vit_tiny`.
    """
    _check_geometry("tnt_small", num_classes, img_size, patch_size)
    resolve_activation(act)
    cfg = dict(
        embed_dim=384,
        inner_dim=24,
        depth=12,
        num_heads_outer=6,
        num_heads_inner=4,
        qkv_bias=False,
        first_stride=4,
        legacy=True,
    ) | kwargs
    net = TNT(img_size=img_size, patch_size=patch_size, num_classes=num_classes, **cfg)
    return _with_activation(net, act, act_kwargs, expected=2 * cfg["depth"])


# name -> builder. One line per model; every name-based entry point goes through create_model.
_MODELS: dict[str, Callable[..., nn.Module]] = {
    "vit_tiny": vit_tiny,
    "deit_tiny": deit_tiny,
    "tnt_small": tnt_small,
}


def model_names() -> list[str]:
    """The registered model names."""
    return list(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name; ``kwargs`` go to its builder.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    key = str(name).strip().lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(_MODELS)}")
    return _MODELS[key](**kwargs)
