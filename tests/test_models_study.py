"""The attention-ResNet34 study models: shapes at 224 px (seeds.md A.3-A.4), CAM layers, weight loading."""

from __future__ import annotations

import urllib.error
import warnings

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from waferlab.errors import WaferlabError
from waferlab.models import create_model, list_models, model_spec
from waferlab.models.attention import FPA, GAD, GADS, GAU, PAM, ChannelAttentionDA, ChannelGate, SpatialGate
from waferlab.models.backbones import load_torchvision_state, resnet34_backbone
from waferlab.models.study import GridPool

torch.set_num_threads(1)

# CAM feature map (C, H, W) at 224 px, as listed in seeds.md A.4.
CAM_AT_224 = {
    "resnet34": (512, 7, 7),
    "danet": (128, 7, 7),
    "cbam": (512, 4, 4),
    "pan": (64, 56, 56),
    "cbam_da": (512, 4, 4),
    "pan_da": (64, 56, 56),
    "pan_inverse": (512, 14, 14),
    "pan_dualinverse": (512, 14, 14),
}
STUDY = list(CAM_AT_224)
GAP_MODELS = ["resnet34", "cbam", "pan", "cbam_da", "pan_inverse", "pan_dualinverse"]


def _capture(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], torch.utils.hooks.RemovableHandle]:
    store: dict[str, torch.Tensor] = {}
    handle = model.cam_target_layer.register_forward_hook(lambda m, i, o: store.__setitem__("fmap", o))
    return store, handle


def test_registered_in_study_family() -> None:
    names = list_models()
    for name in STUDY:
        assert name in names
        assert model_spec(name).family == "attention-study"


@pytest.mark.parametrize("name", STUDY)
def test_forward_backward_224_and_any_size(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=8)
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.out_features == 8
    store, handle = _capture(model)
    out = model(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 8) and torch.isfinite(out).all()
    assert tuple(store["fmap"].shape) == (2, *CAM_AT_224[name])
    out.logsumexp(dim=1).sum().backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    stem_grad = model.backbone.conv1.weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0  # gradient reaches the backbone
    # The CAM layer is a property: its weights must not be registered (and saved) twice.
    assert not any(k.startswith("cam_target_layer.") for k in model.state_dict())
    if name == "danet":
        assert model.mlp[0].in_features == 128 * 7 * 7  # the study's 6272-wide flatten

    model.eval()
    with torch.no_grad():
        # Sizes follow the input: non-square odd maps and a tiny 32 px map at batch 1.
        assert model(torch.rand(2, 3, 50, 70)).shape == (2, 8)
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 8)
        out = model(torch.rand(2, 3, 97, 33))
        fmap = store["fmap"]
        if name in GAP_MODELS:  # the CAM map is what the final global average pooling consumes
            torch.testing.assert_close(out, model.classifier(fmap.mean(dim=(2, 3))), rtol=1e-4, atol=1e-5)
        elif name == "danet":  # ... or what the flatten consumes, through the adaptive 7x7 pooling
            pooled = torch.nn.functional.adaptive_avg_pool2d(fmap, 7)
            expected = model.classifier(model.mlp(pooled.flatten(1)))
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    handle.remove()


def test_bad_options_are_user_errors() -> None:
    _one_line_error(lambda: create_model("danet", 8, dropout=1.5), "dropout")
    _one_line_error(lambda: create_model("pan_da", 8, attn_dropout="x"), "attn_dropout")
    _one_line_error(lambda: create_model("pan", 8, heads=4), "heads")
    model = create_model("cbam", 8, dropout=0.2)
    assert model.drop.p == 0.2


def test_cosine_head_on_study_model() -> None:
    model = create_model("pan", num_classes=4, head="cosine").eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 4) and out.abs().max() <= 1.0 + 1e-5
    # PAN_DA's classifier reads the two branches' logits: a cosine head there is refused in one line
    with pytest.raises(WaferlabError, match="head 'cosine' is not supported") as info:
        create_model("pan_da", num_classes=4, head="cosine")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["danet", "cbam_da", "pan_da"])
def test_pam_option(name: str) -> None:
    model = create_model(name, num_classes=3, pam="literal")
    pams = [m for m in model.modules() if isinstance(m, PAM)]
    assert pams and all(m.mode == "literal" for m in pams)
    for size in (32, 64):
        out = model(torch.rand(2, 3, size, size))
        out.sum().backward()
        assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert all(m.mode == "canonical" for m in create_model(name, 3).modules() if isinstance(m, PAM))
    _one_line_error(lambda: create_model(name, 3, pam="literl"), "pam")


def test_backbone_strides(tv_state) -> None:
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        std = [tuple(f.shape[1:]) for f in resnet34_backbone().eval()(x)]
        dil_model = resnet34_backbone(dilated=True).eval()
        dil = [tuple(f.shape[1:]) for f in dil_model(x)]
    assert std == [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
    assert dil == [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 14, 14)]  # stride 16
    rates = [block.conv2.dilation[0] for block in dil_model.layer4]
    assert rates == [1, 2, 4]
    assert dil_model.layer4[0].downsample[0].stride == (1, 1)
    # Same weight layout as torchvision's resnet34 (without fc).
    tv_keys = {k for k in tv_state if not k.startswith("fc.")}
    assert set(dil_model.state_dict()) == tv_keys


# --------------------------------------------------------------------------------------------------
# pretrained weights


@pytest.fixture(scope="module")
def tv_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = torchvision.models.resnet34()
    with torch.no_grad():  # non-default BN statistics, so a load that skipped buffers would show
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def weight_files(tv_state, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("weights")
    pth, st = folder / "resnet34-local.pth", folder / "resnet34-local.safetensors"
    torch.save(tv_state, pth)
    save_file({k: v.contiguous() for k, v in tv_state.items()}, str(st))
    return {"pth": str(pth), "safetensors": str(st)}


def _assert_backbone_equals(model: torch.nn.Module, state: dict[str, torch.Tensor], skip=()) -> None:
    got = model.backbone.state_dict()
    for key, value in state.items():
        if key.startswith("fc.") or key in skip:
            continue
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize(("name", "kind"), [("resnet34", "pth"), ("pan", "safetensors"), ("cbam_da", "pth")])
def test_local_weights_load_identically(name, kind, tv_state, weight_files) -> None:
    model = create_model(name, num_classes=8, pretrained=weight_files[kind])
    _assert_backbone_equals(model, tv_state)


def test_load_torchvision_state_roundtrip(tv_state, weight_files) -> None:
    for path in weight_files.values():
        state = load_torchvision_state(path)
        assert set(state) == set(tv_state)
        assert all(torch.equal(state[k], tv_state[k]) for k in tv_state)


def test_gray_stem_is_adapted(tv_state, weight_files) -> None:
    rgb = tv_state["conv1.weight"]
    gray = create_model("pan_inverse", num_classes=8, in_chans=1, pretrained=weight_files["safetensors"])
    torch.testing.assert_close(gray.backbone.conv1.weight, rgb.sum(dim=1, keepdim=True))
    _assert_backbone_equals(gray, tv_state, skip={"conv1.weight"})
    two = create_model("resnet34", num_classes=8, in_chans=2, pretrained=weight_files["pth"])
    torch.testing.assert_close(two.backbone.conv1.weight, rgb[:, :2] * 1.5)  # timm: repeat, scale 3/in_chans


def test_file_without_bn_counters_loads(tv_state, tmp_path) -> None:
    """The official ImageNet file predates num_batches_tracked; such files must load."""
    old = {k: v for k, v in tv_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(old, path)
    _assert_backbone_equals(create_model("danet", num_classes=8, pretrained=str(path)), old)


def _one_line_error(func, *parts: str) -> str:
    with pytest.raises(WaferlabError) as info:
        func()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


def test_corrupt_weight_files(tmp_path) -> None:
    bad_pth = tmp_path / "broken.pth"
    bad_pth.write_bytes(b"\x00not a pickle or zip" * 10)
    _one_line_error(lambda: create_model("resnet34", 8, pretrained=str(bad_pth)), "broken.pth")
    bad_st = tmp_path / "broken.safetensors"
    bad_st.write_bytes(b"\xff" * 64)
    _one_line_error(lambda: create_model("pan", 8, pretrained=str(bad_st)), "broken.safetensors")
    _one_line_error(lambda: create_model("cbam", 8, pretrained=str(tmp_path / "absent.pth")), "absent.pth")
    not_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_state)
    _one_line_error(lambda: create_model("cbam", 8, pretrained=str(not_state)), "list.pth")
    whole = tmp_path / "whole_module.pth"  # a pickled module, not a state dict: weights_only refuses it
    torch.save(torch.nn.Linear(2, 2), whole)
    _one_line_error(lambda: load_torchvision_state(whole), "whole_module.pth", "state dict")
    truncated = tmp_path / "truncated.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    _one_line_error(lambda: load_torchvision_state(truncated), "truncated.pth")
    _one_line_error(lambda: load_torchvision_state(tmp_path), "folder")


def test_wrong_layout_files(tv_state, tmp_path) -> None:
    # A waferlab model's own state dict: "backbone."-prefixed keys are not torchvision's layout.
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in tv_state.items()}, str(prefixed))
    _one_line_error(lambda: create_model("resnet34", 8, pretrained=str(prefixed)), "prefixed", "backbone.")
    # ResNet18 lacks layer1.2 etc.
    r18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), r18)
    _one_line_error(lambda: create_model("pan", 8, pretrained=str(r18)), "resnet18.pth", "missing key")
    # Right keys, one wrong shape.
    bad = dict(tv_state)
    bad["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    shaped = tmp_path / "shape.pth"
    torch.save(bad, shaped)
    key = "layer2.0.conv1.weight"
    _one_line_error(lambda: create_model("danet", 8, pretrained=str(shaped)), "shape.pth", key)


def test_imagenet_without_network(monkeypatch) -> None:
    def no_network(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet34_Weights, "get_state_dict", no_network)
    msg = _one_line_error(lambda: create_model("cbam", 8, pretrained="imagenet"), "--pretrained", "URLError")
    assert "resnet34-b627a593.pth" in msg


def test_imagenet_loads_through_weights_api(monkeypatch, tv_state) -> None:
    """With network the weights API's state dict (here stubbed with a fixed one) ends up in the backbone."""
    weights_enum = torchvision.models.ResNet34_Weights
    monkeypatch.setattr(weights_enum, "get_state_dict", lambda self, **kw: dict(tv_state))
    _assert_backbone_equals(create_model("pan_dualinverse", 8, pretrained="imagenet"), tv_state)


# --------------------------------------------------------------------------------------------------
# attention modules


def test_pam_and_cam_definitions() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 16, 5, 6)
    pam, cam = PAM(16, reduction=8), ChannelAttentionDA()
    torch.testing.assert_close(pam(x), x)  # gamma starts at 0: identity
    torch.testing.assert_close(cam(x), x)
    with torch.no_grad():
        pam.gamma.fill_(1.0)
        cam.gamma.fill_(1.0)
    flat = x.flatten(2)  # N, C, HW
    # PAM: out[c, i] = sum_j V[c, j] * softmax_j(q_i . k_j)
    q, k, v = (conv(x).flatten(2) for conv in (pam.query_conv, pam.key_conv, pam.value_conv))
    attn = torch.softmax(torch.einsum("nci,ncj->nij", q, k), dim=-1)
    expected_pam = torch.einsum("ncj,nij->nci", v, attn).view_as(x) + x
    torch.testing.assert_close(pam(x), expected_pam, rtol=1e-4, atol=1e-5)
    # The study's literal PAM: bmm(attn, V^T) is (HW, C); its view(N, C, H, W) reads that memory as C x HW
    literal = PAM(16, reduction=8, mode="literal")
    literal.load_state_dict(pam.state_dict())
    canonical_out = torch.einsum("ncj,nij->nci", v, attn)  # N, C, HW
    mixed = canonical_out.transpose(1, 2).reshape_as(x)
    torch.testing.assert_close(literal(x), mixed + x, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(literal(x), pam(x), atol=1e-3)
    # CAM: softmax over channels of (row max - energy), energy = X X^T
    energy = flat @ flat.transpose(1, 2)
    attn_c = torch.softmax(energy.max(dim=-1, keepdim=True).values - energy, dim=-1)
    torch.testing.assert_close(cam(x), (attn_c @ flat).view_as(x) + x, rtol=1e-4, atol=1e-5)


def test_cbam_gates() -> None:
    x = torch.randn(2, 32, 6, 6)
    ca, sa = ChannelGate(32, 16), SpatialGate(7)
    assert ca.mlp[0].out_channels == 2 and ca.mlp[0].bias is None
    wc, ws = ca(x), sa(x)
    assert wc.shape == (2, 32, 1, 1) and ws.shape == (2, 1, 6, 6)
    assert ((wc > 0) & (wc < 1)).all() and ((ws > 0) & (ws < 1)).all()


def test_fpa_sizes_and_tiny_maps() -> None:
    fpa = FPA(32)
    assert fpa(torch.randn(2, 32, 14, 14)).shape == (2, 32, 14, 14)
    assert fpa(torch.randn(2, 32, 13, 9)).shape == (2, 32, 13, 9)
    # A 2x2 map (l4 of a 32 px input): the pyramid stays at 2x2 instead of collapsing to 1x1.
    seen = []
    handle = fpa.down3.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    out = fpa.train()(torch.randn(2, 32, 2, 2))
    handle.remove()
    assert out.shape == (2, 32, 2, 2) and torch.isfinite(out).all() and seen == [(2, 2)]


def _fpa_reference(fpa: FPA, x: torch.Tensor) -> torch.Tensor:
    """FPA at 224 px (a 14x14 map) as the study computes it, by hand with torch.nn.functional on fpa's
    weights (eval-mode BN): pyramid 14 -> 7 -> 4 -> 2, up 2 -> 4 (ConvT k4 s2 p1), 4 -> 7 (ConvT k4 s1 p0,
    the study's stride-1 step) and 7 -> 14 (ConvT k4 s2 p1)."""
    F = torch.nn.functional

    def bn(y: torch.Tensor, m: torch.nn.BatchNorm2d) -> torch.Tensor:
        return F.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    def conv_bn(y: torch.Tensor, seq: torch.nn.Sequential, stride: int = 1) -> torch.Tensor:
        conv = seq[0]
        return bn(F.conv2d(y, conv.weight, conv.bias, stride, conv.kernel_size[0] // 2), seq[1])

    def down(y: torch.Tensor, d) -> torch.Tensor:  # noqa: ANN001
        return F.relu(bn(F.conv2d(y, d.conv.weight, None, 2, d.conv.kernel_size[0] // 2), d.bn))

    def up(y: torch.Tensor, seq: torch.nn.Sequential, stride: int, padding: int) -> torch.Tensor:
        return F.relu(bn(F.conv_transpose2d(y, seq[0].weight, None, stride, padding), seq[1]))

    master = conv_bn(x, fpa.master)
    gp = conv_bn(F.adaptive_avg_pool2d(x, 1), fpa.gp)
    d1 = down(x, fpa.down1)
    d2 = down(d1, fpa.down2)
    d3 = down(d2, fpa.down3)
    assert [t.shape[-1] for t in (d1, d2, d3)] == [7, 4, 2]
    b1, b2, b3 = conv_bn(d1, fpa.conv7), conv_bn(d2, fpa.conv5), conv_bn(d3, fpa.conv3)
    m2 = F.relu(b2 + up(b3, fpa.up3, 2, 1))
    m1 = F.relu(b1 + up(m2, fpa.up2, 1, 0))  # 4 -> 7
    mask = up(m1, fpa.up1, 2, 1)
    return F.relu(master * mask + gp)


def test_fpa_uses_the_study_stride1_convt_at_224() -> None:
    torch.manual_seed(3)
    fpa = FPA(32)
    with torch.no_grad():
        for m in fpa.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    fpa.eval()
    x = torch.randn(2, 32, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(fpa(x), _fpa_reference(fpa, x), rtol=1e-4, atol=1e-5)
        # where no step is n -> n + 3 the doubling ConvT stays (16x16: levels 8, 4, 2, every step doubles)
        seen = []
        handle = fpa.up2.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
        assert fpa(torch.randn(1, 32, 16, 16)).shape == (1, 32, 16, 16)
        fpa(x)
        handle.remove()
        assert seen == [(8, 8)]  # the stride-1 step at 14x14 calls the ConvT functionally, not the module


def test_fusion_blocks_follow_the_skip_size() -> None:
    hi, lo = torch.randn(2, 16, 7, 9), torch.randn(2, 8, 13, 17)  # odd: ConvT would give 14x18
    assert GAU(16, 8, upsample=True)(hi, lo).shape == (2, 8, 13, 17)
    assert GAU(16, 8, upsample=False)(torch.randn(2, 16, 13, 17), lo).shape == (2, 8, 13, 17)
    acc, deep = torch.randn(2, 8, 25, 25), torch.randn(2, 16, 13, 13)
    assert GAD(8, 16, downsample=True)(acc, deep).shape == (2, 16, 13, 13)
    assert GADS(8, 16, downsample=True)(acc, deep).shape == (2, 16, 13, 13)
    same = torch.randn(2, 16, 25, 25)
    assert GAD(8, 16, downsample=False)(acc, same).shape == (2, 16, 25, 25)
    assert GADS(8, 16, downsample=False)(acc, same).shape == (2, 16, 25, 25)


def test_grid_pool_matches_adaptive_pooling_and_exports(tmp_path) -> None:
    """DANet's 7x7 grid pooling equals adaptive average pooling and, unlike it, exports to ONNX at
    sizes that are not multiples of 7 (a 64 px input gives a 2x2 map)."""
    import numpy as np
    import onnxruntime as ort

    for h, w in [(1, 1), (2, 3), (7, 7), (9, 4), (16, 23)]:
        x = torch.randn(2, 3, h, w)
        torch.testing.assert_close(GridPool(7)(x), torch.nn.functional.adaptive_avg_pool2d(x, 7))
    model = create_model("danet", num_classes=4).eval()
    x = torch.rand(1, 3, 64, 64)
    path = tmp_path / "danet.onnx"
    with warnings.catch_warnings():  # shape-dependent Python branches are constants at a fixed export size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
