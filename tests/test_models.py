"""dynact.experiments.models: the paper's architectures (parameter counts, activations, heads) on timm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynact.activations import activation_names, make_activation
from dynact.experiments.models import create_model, deit_tiny, model_names, tnt_small, vit_tiny

# The paper's parameter counts: (fixed activation, one learnable scalar per MLP).
PAPER_COUNTS = {
    ("vit_tiny", "cifar10"): (5_399_818, 5_399_830),
    ("vit_tiny", "cifar100"): (5_417_188, 5_417_200),
    ("vit_tiny", "imagenet"): (5_754_472, 5_754_484),
    ("deit_tiny", "cifar10"): (5_365_076, 5_365_088),
    ("deit_tiny", "cifar100"): (5_399_816, 5_399_828),
    ("deit_tiny", "imagenet"): (5_910_800, 5_910_812),
    ("tnt_small", "cifar10"): (21_525_298, 21_525_322),
    ("tnt_small", "cifar100"): (21_559_948, 21_559_972),
}
GEOMETRY = {"cifar10": (10, 32, 4), "cifar100": (100, 32, 4), "imagenet": (1000, 224, 16)}
SMALL = dict(embed_dim=32, depth=2, num_heads=2)
TNT_SMALL = dict(embed_dim=48, inner_dim=12, depth=2)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mlp_acts(model: nn.Module) -> dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if name.endswith(("mlp.act", "mlp_in.act"))}


@pytest.mark.parametrize("arch,dataset", list(PAPER_COUNTS))
def test_parameter_counts_match_the_paper(arch, dataset):
    fixed, learnable = PAPER_COUNTS[(arch, dataset)]
    num_classes, img_size, patch_size = GEOMETRY[dataset]
    # Shapes are all a count needs: the meta device skips allocating and initialising 5-21M weights.
    geometry = dict(num_classes=num_classes, img_size=img_size, patch_size=patch_size, device="meta")
    assert _count(create_model(arch, act="gelu", **geometry)) == fixed
    assert _count(create_model(arch, act="relu", **geometry)) == fixed
    crrelu = _count(create_model(arch, act="crrelu", **geometry))
    assert crrelu == learnable
    # EAFO's spline lives in buffers, so it adds exactly CRReLU's one scalar per MLP.
    assert _count(create_model(arch, act="eafo", **geometry)) == crrelu


def test_count_on_a_real_device_equals_the_meta_count():
    assert _count(vit_tiny(10, 32, 4, act="crrelu")) == PAPER_COUNTS[("vit_tiny", "cifar10")][1]


def test_learnable_scalar_is_one_per_mlp_activation():
    # 12 blocks with one MLP each for ViT/DeiT; TNT has an inner and an outer MLP per block.
    assert len(_mlp_acts(vit_tiny(act="crrelu", device="meta"))) == 12
    assert len(_mlp_acts(deit_tiny(act="crrelu", device="meta"))) == 12
    tnt = tnt_small(act="crrelu", device="meta")
    assert len(_mlp_acts(tnt)) == 24
    assert all(mod.eps.numel() == 1 and mod.eps.requires_grad for mod in _mlp_acts(tnt).values())


@pytest.mark.parametrize("act", activation_names())
def test_act_replaces_every_mlp_activation(act):
    expected = type(make_activation(act))
    for builder in (vit_tiny, deit_tiny, tnt_small):
        small = TNT_SMALL if builder is tnt_small else SMALL
        net = builder(10, 16, 4, act=act, **small)
        acts = _mlp_acts(net)
        assert acts and all(type(mod) is expected for mod in acts.values()), builder.__name__
        if act != "gelu":
            assert not any(isinstance(m, nn.GELU) for m in net.modules())
        # Each site gets its own module (no shared scalars).
        assert len({id(m) for m in acts.values()}) == len(acts)


def test_act_kwargs_reach_each_activation():
    net = vit_tiny(act="crrelu", act_kwargs={"eps": -0.03}, **SMALL)
    assert all(m.eps.item() == pytest.approx(-0.03) for m in _mlp_acts(net).values())


def test_vit_pre_logits_keeps_tanh_and_feeds_the_head():
    net = vit_tiny(10, 16, 4, act="relu", **SMALL)
    assert isinstance(net.pre_logits.act, nn.Tanh)
    x = torch.randn(3, 3, 16, 16)
    features = net.forward_head(net.forward_features(x), pre_logits=True)
    assert features.abs().max() <= 1.0  # after tanh
    torch.testing.assert_close(net(x), net.head(features))


def test_models_have_no_dropout_or_drop_path():
    for builder in (vit_tiny, deit_tiny, tnt_small):
        net = builder(10, 32, 4, device="meta")
        for name, mod in net.named_modules():
            if isinstance(mod, nn.Dropout):
                assert mod.p == 0.0, name
            assert getattr(mod, "drop_prob", 0.0) == 0.0, name


def test_forward_shapes_and_distilled_heads():
    x = torch.randn(2, 3, 16, 16)
    assert vit_tiny(7, 16, 4, **SMALL)(x).shape == (2, 7)
    assert tnt_small(7, 16, 4, **TNT_SMALL)(x).shape == (2, 7)
    deit = deit_tiny(7, 16, 4, **SMALL)
    deit.set_distilled_training(True)
    cls, dist = deit.train()(x)
    assert cls.shape == dist.shape == (2, 7)
    # Evaluation averages the class and distillation heads.
    deit.eval()
    tokens = deit.forward_features(x)
    torch.testing.assert_close(deit(x), (deit.head(tokens[:, 0]) + deit.head_dist(tokens[:, 1])) / 2)


def test_one_channel_small_variant_for_digits():
    net = vit_tiny(10, 8, 2, act="crrelu", in_chans=1, embed_dim=48, depth=2, num_heads=4)
    assert net(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert net.patch_embed.num_patches == 16


def test_unknown_model_name_lists_the_models():
    with pytest.raises(ValueError, match="unknown model 'vit_huge'.*vit_tiny, deit_tiny, tnt_small"):
        create_model("vit_huge")
    assert model_names() == ["vit_tiny", "deit_tiny", "tnt_small"]


def test_unknown_activation_lists_the_registry():
    with pytest.raises(ValueError, match="unknown activation 'swish2'.*crrelu, eafo"):
        vit_tiny(act="swish2")


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=30, patch_size=4), "img_size must be a positive multiple of patch_size=4"),
    (dict(num_classes=0), "num_classes must be a positive int"),
    (dict(patch_size=0), "patch_size must be a positive int"),
])
def test_bad_geometry_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vit_tiny(**kwargs)
