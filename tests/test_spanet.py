"""SP&A-Net: faithfulness to the official parameter count, the fixed attention, Keras padding, options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from waferlab.errors import WaferlabError
from waferlab.models import create_model
from waferlab.models.profile import count_params
from waferlab.models.spanet import SamePad, SelfAttention, SelfProliferate, SPABlock, SPANet, hard_sigmoid


def test_parameter_count_matches_official_model_without_attention() -> None:
    # The official notebook's model (SA absent from the graph), 10 classes: 2,573,112 trainable parameters.
    model = create_model("spanet", num_classes=10, attention="none")
    assert count_params(model) == 2_573_112
    # Keras counts BN moving mean/var as non-trainable: 2,601,928 in all.
    running = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert count_params(model) + running == 2_601_928


def test_attention_variants_and_patterns() -> None:
    counts = {}
    for attention in ("none", "gate", "gc"):
        for pattern in ("all", "ghostnet"):
            model = create_model("spanet", num_classes=9, attention=attention, sa_pattern=pattern)
            sa = [m for m in model.modules() if isinstance(m, SelfAttention)]
            expected = 0 if attention == "none" else (16 if pattern == "all" else 7)
            assert len(sa) == expected and all(m.mode == attention for m in sa)
            counts[attention, pattern] = count_params(model)
            model.eval()
            with torch.no_grad():
                assert model(torch.rand(2, 3, 48, 48)).shape == (2, 9)
    assert counts["none", "all"] < counts["gate", "ghostnet"] < counts["gate", "all"]
    assert counts["gate", "all"] == counts["gc", "all"]  # same layers, different fusion


def test_default_is_gate_attention_in_every_block_with_logits_output() -> None:
    model = create_model("spanet", num_classes=4)
    assert model.attention_mode == "gate" and model.sa_pattern == "all"
    assert isinstance(model.classifier, nn.Conv2d) and model.classifier.bias is None
    assert model.cam_target_layer is model.head_conv
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64) * 4)
    # Logits, not probabilities (the official model's softmax output is removed).
    assert not torch.allclose(out.sum(1), torch.ones(3))
    cam = model.forward_features(torch.rand(1, 3, 64, 64))
    assert cam.shape == (1, 960, 2, 2)


def test_keras_batchnorm_defaults() -> None:
    bns = [m for m in SPANet(3).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)


def test_gate_uses_global_context() -> None:
    # The official SA applied softmax over a size-1 axis, so the gate at a position saw only that position.
    # Fixed: the gate at (0, 0) must change when a far-away pixel changes.
    torch.manual_seed(0)
    sa = SelfAttention(8, ratio=2, mode="gate").eval()
    x = torch.randn(1, 8, 7, 7)
    far = x.clone()
    far[:, :, 6, 6] += 5.0
    with torch.no_grad():
        g, g_far = sa.gate(x), sa.gate(far)
        assert ((g[:, :, 0, 0] - g_far[:, :, 0, 0]).abs().max()) > 1e-4
        assert ((g >= 0) & (g <= 1)).all()
        assert torch.allclose(sa(x), x * g)
        # softmax over the positions: attention weights sum to 1 and the context is their weighted mean
        w = torch.softmax(sa.score(x).flatten(2), dim=-1)
        assert torch.allclose(sa.context(x).flatten(), (x.flatten(2) * w).sum(-1).flatten(), atol=1e-5)


def test_gc_mode_adds_the_same_context_everywhere() -> None:
    torch.manual_seed(1)
    sa = SelfAttention(6, ratio=2, mode="gc").eval()
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        delta = sa(x) - x
    assert delta.abs().max() > 0
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-6)


def test_hard_sigmoid_is_keras2() -> None:
    x = torch.tensor([-3.0, -2.5, 0.0, 1.0, 2.5, 4.0])
    assert torch.allclose(hard_sigmoid(x), torch.tensor([0.0, 0.0, 0.5, 0.7, 1.0, 1.0]))


def test_keras_same_padding_is_asymmetric_for_stride_2() -> None:
    assert SamePad.amounts(64, 3, 2) == (0, 1)  # even size: extra pad only at the bottom/right
    assert SamePad.amounts(65, 3, 2) == (1, 1)
    assert SamePad.amounts(64, 5, 2) == (1, 2)
    assert SamePad.amounts(33, 5, 2) == (2, 2)
    # A 3x3 stride-2 box filter on ones: Keras samples the grid from the top-left corner, so the first output
    # sees a full 3x3 window (9) and the last one a window cut by the bottom/right padding (6).
    conv = nn.Sequential(SamePad(3, 2), nn.Conv2d(1, 1, 3, 2, 0, bias=False))
    nn.init.ones_(conv[1].weight)
    with torch.no_grad():
        out = conv(torch.ones(1, 1, 8, 8))
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0] == 9 and out[0, 0, -1, -1] == 4 and out[0, 0, 0, -1] == 6
    model = SPANet(2, attention="none").eval()
    for size, expect in ((64, 32), (65, 33), (33, 17)):
        assert model.stem(torch.zeros(1, 3, size, size)).shape[-1] == expect


def test_self_proliferate_channels_and_block_shapes() -> None:
    sp = SelfProliferate(10, 7, ratio=2)
    assert sp.primary.out_channels == 4 and sp.cheap.out_channels == 4
    assert sp(torch.rand(1, 10, 5, 5)).shape == (1, 7, 5, 5)
    block = SPABlock(16, 48, 24, kernel=3, stride=2, ratio=2, attention="gate")
    assert block(torch.rand(2, 16, 10, 10)).shape == (2, 24, 5, 5)
    assert not isinstance(block.shortcut, nn.Identity)  # always a conv shortcut


def test_width_and_ratio_options() -> None:
    base = count_params(create_model("spanet", num_classes=9, attention="none"))
    half = create_model("spanet", num_classes=9, attention="none", width=0.5)
    assert count_params(half) < base
    widths = [half.head_conv[0].out_channels]
    widths += [c for b in half.blocks for c in (b.expand[0].cout, b.project[0].cout)]
    assert all(c % 4 == 0 for c in widths)
    assert half.head_conv[0].out_channels == 480 and half.blocks[-1].project[0].cout == 80
    assert count_params(create_model("spanet", num_classes=9, attention="none", ratio=4)) > base
    for ratio in (1, 3):
        m = create_model("spanet", num_classes=9, ratio=ratio).eval()
        with torch.no_grad():
            assert m(torch.rand(1, 3, 32, 32)).shape == (1, 9)


BAD_OPTIONS = [{"attention": "se"}, {"sa_pattern": "some"}, {"ratio": 0}, {"ratio": 1.5}, {"width": 0.0},
               {"depth": 3}]


@pytest.mark.parametrize("options", BAD_OPTIONS)
def test_bad_options_are_user_errors(options: dict) -> None:
    with pytest.raises(WaferlabError):
        create_model("spanet", num_classes=3, **options)


def test_pretrained_local_file_skips_classifier(tmp_path) -> None:
    from safetensors.torch import save_file

    src = create_model("spanet", num_classes=9)
    path = tmp_path / "spanet.safetensors"
    save_file(src.state_dict(), str(path))
    dst = create_model("spanet", num_classes=4, pretrained=str(path))
    assert torch.equal(dst.head_conv[0].weight, src.head_conv[0].weight)
    assert dst.classifier.weight.shape[0] == 4
    with pytest.raises(WaferlabError, match="ImageNet"):
        create_model("spanet", num_classes=4, pretrained="imagenet")
    with pytest.raises(WaferlabError, match="missing key|unexpected key"):
        create_model("spanet", num_classes=4, attention="none", pretrained=str(path))


def test_bn_momentum_option_defaults_to_keras_and_is_validated() -> None:
    import torch.nn as nn

    from waferlab.errors import WaferlabError

    moms = {m.momentum for m in create_model("spanet", 9).modules() if isinstance(m, nn.BatchNorm2d)}
    assert moms == {0.01}
    moms = {m.momentum for m in create_model("spanet", 9, bn_momentum=0.1).modules()
            if isinstance(m, nn.BatchNorm2d)}
    assert moms == {0.1}
    with pytest.raises(WaferlabError, match="bn_momentum"):
        create_model("spanet", 9, bn_momentum=0)
