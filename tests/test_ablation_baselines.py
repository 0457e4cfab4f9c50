"""SP&A-Net's ablation peers: ResNet50 + SE / NL / SNL / GC, attention blocks, widths, figure sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from waferlab.errors import WaferlabError
from waferlab.models import create_model
from waferlab.models.attention import SpectralNonLocal, ablation_attention, group_count
from waferlab.models.baselines import RESNET50_ATTENTION
from waferlab.models.profile import count_params
from waferlab.models.sizes import FIGURE_SIZES

torch.set_num_threads(1)


def _attention_slots(model: nn.Module) -> dict[str, list[int]]:
    """{stage: indices of the Bottlenecks whose attention slot (timm's ``se``) is filled}."""
    return {stage: [i for i, b in enumerate(getattr(model.net, stage)) if b.se is not None]
            for stage in ("layer1", "layer2", "layer3", "layer4")}


@pytest.mark.parametrize("kind", list(RESNET50_ATTENTION))
def test_resnet50_attention_placement(kind: str) -> None:
    model = create_model(f"{kind}_resnet50", num_classes=4)
    slots = _attention_slots(model)
    for stage, indices in slots.items():
        want = RESNET50_ATTENTION[kind].get(stage, ())
        assert indices == (list(range(len(getattr(model.net, stage)))) if want is None else list(want))
    plain = create_model("resnet50", num_classes=4)
    assert all(not v for v in _attention_slots(plain).values())
    assert count_params(model) > count_params(plain)


def test_resnet50_attn_norm_option() -> None:
    se = create_model("se_resnet50", num_classes=3)
    assert isinstance(se.net.layer1[0].se.bn, nn.Identity)  # SENet has no norm
    se_bn = create_model("se_resnet50", num_classes=3, attn_norm="bn")
    assert isinstance(se_bn.net.layer1[0].se.bn, nn.BatchNorm2d)
    gc = create_model("gc_resnet50", num_classes=3, attn_norm="gn")
    assert isinstance(gc.net.layer2[0].se.mlp_add.norm, nn.GroupNorm)
    for name, norm in (("snl_resnet50", "ln"), ("se_resnet50", "bn"), ("gc_resnet50", "gn")):
        model = create_model(name, num_classes=3, attn_norm=norm).train()
        for size in (32, 64):
            out = model(torch.rand(2, 3, size, size))
            out.sum().backward()
            assert out.shape == (2, 3) and torch.isfinite(out).all()
    for bad in ({"attn_norm": "batch"}, {"width": 0.1}, {"width": "big"}):
        with pytest.raises(WaferlabError) as info:
            create_model("nl_resnet50", num_classes=3, **bad)
        assert "\n" not in str(info.value)
    with pytest.raises(WaferlabError, match="width 1"):
        create_model("gc_resnet50", num_classes=3, width=0.5, pretrained="imagenet")


def test_spectral_nonlocal_matches_its_definition() -> None:
    torch.manual_seed(0)
    snl = SpectralNonLocal(8).eval()
    x = torch.randn(2, 8, 3, 4)
    with torch.no_grad():
        assert torch.equal(snl(x), x)  # the norm's scale starts at 0: identity
        snl.norm.weight.fill_(1.0)
        snl.norm.running_var.uniform_(0.5, 2.0)
        t = torch.relu(snl.t(x)).flatten(2)
        p = torch.relu(snl.p(x)).flatten(2)
        m = torch.einsum("nci,ncj->nij", t, p)
        m = (m + m.transpose(1, 2)) / 2
        d = m.sum(-1).rsqrt()
        a = d[:, :, None] * m * d[:, None, :]
        assert torch.allclose(snl.affinity(x), a, atol=1e-6) and torch.allclose(a, a.transpose(1, 2))
        g = snl.g(x).flatten(2)
        spread = torch.einsum("nij,ncj->nci", a, g).view(2, 4, 3, 4)
        inner = snl.w1(snl.g(x)) + snl.w2(spread)
        torch.testing.assert_close(snl(x), x + torch.relu(snl.norm(inner)), rtol=1e-4, atol=1e-5)


def test_ablation_attention_blocks_and_norms() -> None:
    assert group_count(8) == 4 and group_count(96) == 32 and group_count(2) == 1
    x = torch.randn(2, 64, 5, 5)
    for kind in ("se", "nl", "snl", "gc"):
        for norm in (None, "bn", "ln", "gn"):
            block = ablation_attention(kind, 64, norm).train()
            out = block(x)
            out.sum().backward()
            assert out.shape == x.shape and torch.isfinite(out).all()
            if kind in ("nl", "snl", "gc"):  # residual blocks that start as the identity
                assert torch.allclose(block.eval()(x), x, atol=1e-6)
    with pytest.raises(ValueError):
        ablation_attention("cbam", 64)


@pytest.mark.parametrize("name", ["ghostnet_100", "mobilenetv2_100", "mobilenetv3_large_100", "gc_resnet34"])
def test_timm_peers_build_at_three_widths(name: str) -> None:
    counts = []
    for width in (0.5, 1.0, 1.5):
        model = create_model(name, num_classes=5, width=width)
        counts.append(count_params(model))
        if width == 0.5:  # the new option trains at 32 and 64 px
            for size in (32, 64):
                out = model.train()(torch.rand(2, 3, size, size))
                out.sum().backward()
                assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert counts[0] < counts[1] < counts[2]
    assert counts[1] == count_params(create_model(name, num_classes=5))  # width 1 is the stock model


# The figure's x-positions are read by eye (about +-0.1M) and ResNet widths move in steps of 8 channels, so a
# size matches within 0.1M or 2%, whichever is larger.
@pytest.mark.parametrize("name", list(FIGURE_SIZES))
def test_figure_sizes_land_on_the_published_counts(name: str) -> None:
    for width, published in FIGURE_SIZES[name]:
        params = count_params(create_model(name, num_classes=9, width=width)) / 1e6
        assert abs(params - published) <= max(0.1, 0.02 * published), (name, width, params, published)
