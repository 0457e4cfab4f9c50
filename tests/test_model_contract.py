"""Every registered model honours the contract: shapes, CAM layer, gradients, cosine head, 1/3 channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from waferlab.errors import WaferlabError
from waferlab.models import create_model, list_models, model_spec
from waferlab.models.heads import CosineClassifier, is_cosine

NUM_CLASSES = 5
MODELS = list_models()


def _run(model: nn.Module, in_chans: int, size: int) -> None:
    """Forward + backward one batch of 2; check output, CAM map and that gradients reach the input conv."""
    model.train()
    model.zero_grad(set_to_none=True)
    seen: dict[str, object] = {}
    first_conv: list[nn.Conv2d] = []

    def cam_hook(_m: nn.Module, _i: object, out: object) -> None:
        seen["cam"] = out

    def conv_hook(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not first_conv:
            first_conv.append(m)  # the first convolution that runs is the one that sees the input

    handles = [model.cam_target_layer.register_forward_hook(cam_hook)]
    handles += [m.register_forward_pre_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        x = torch.rand(2, in_chans, size, size)
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    cam = seen["cam"]
    assert isinstance(cam, torch.Tensor) and cam.dim() == 4, "cam_target_layer must output a 4-D map"
    assert cam.shape[0] == 2 and cam.shape[2] >= 1 and cam.shape[3] >= 1
    torch.nn.functional.cross_entropy(out, torch.tensor([0, NUM_CLASSES - 1])).backward()
    conv = first_conv[0]
    assert conv.in_channels == in_chans
    grad = conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_registry_is_populated() -> None:
    for name in ("spanet", "se_resnet34", "eca_resnet34", "gc_resnet34", "ghostnet_100", "mobilenetv2_100",
                 "mobilenetv3_large_100", "resnet50", "se_resnet50", "nl_resnet50", "snl_resnet50",
                 "gc_resnet50"):
        assert name in MODELS
        assert model_spec(name).description


@pytest.mark.parametrize("name", MODELS)
def test_model_contract(name: str) -> None:
    torch.manual_seed(0)
    # 32 px is the edge case (1x1 maps at stride 32); 64 px the usual size; 1 channel = gray encoding.
    for in_chans, sizes in ((1, (32,)), (3, (32, 64))):
        model = create_model(name, num_classes=NUM_CLASSES, in_chans=in_chans)
        assert isinstance(model.classifier, nn.Linear | nn.Conv2d)
        assert model.model_name == name and model.in_chans == in_chans
        for size in sizes:
            _run(model, in_chans, size)
    # The state dict holds every tensor once (no module registered under two names).
    tensors = [t for t in model.state_dict().values() if t.numel() > 0]
    assert len({t.data_ptr() for t in tensors}) == len(tensors)


@pytest.mark.parametrize("name", MODELS)
def test_cosine_head(name: str) -> None:
    torch.manual_seed(0)
    if name == "pan_da":  # its classifier reads logits (study.PANDA.cosine_head_refusal)
        with pytest.raises(WaferlabError, match="cosine"):
            create_model(name, num_classes=NUM_CLASSES, in_chans=3, head="cosine")
        return
    model = create_model(name, num_classes=NUM_CLASSES, in_chans=3, head="cosine")
    assert is_cosine(model) and isinstance(model.classifier, CosineClassifier)
    assert sum(isinstance(m, CosineClassifier) for m in model.modules()) == 1
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, NUM_CLASSES)
    assert out.abs().max() <= 1.0 + 1e-5
    assert out.std() > 0


@pytest.mark.parametrize("name", MODELS)
def test_failpool_head(name: str) -> None:
    """head="failpool": the same contract; the CAM layer's map is zero on cells without failed dies."""
    from waferlab.data.encode import encode

    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, in_chans=3, head="failpool")
    assert isinstance(model.classifier, nn.Linear | nn.Conv2d) and model.model_name == name
    _run(model, 3, 64)
    maps = torch.ones(2, 64, 64, dtype=torch.uint8)
    maps[:, :, :32] = 2  # failed dies on the left half only
    seen: list[torch.Tensor] = []
    handle = model.cam_target_layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        model.eval()(encode(maps, "onehot"))
    finally:
        handle.remove()
    fmap = seen[0]
    w = fmap.shape[-1]
    if w >= 2:
        assert fmap[..., w // 2 + w % 2:].abs().max() == 0 and fmap[..., : w // 2].abs().max() > 0
    assert not model.model.cam_target_layer._forward_hooks  # the gate's hook lives only during a forward


def test_bad_model_options_are_user_errors() -> None:
    with pytest.raises(WaferlabError, match="unknown model"):
        create_model("no_such_net", num_classes=3)
    with pytest.raises(WaferlabError):
        create_model("ghostnet_100", num_classes=3, depth=7)
    with pytest.raises(WaferlabError, match="not found"):
        create_model("mobilenetv2_100", num_classes=3, pretrained="/nonexistent/weights.pth")


def test_models_command_prints_params_and_macs(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from waferlab.cli import main
    from waferlab.models.profile import count_macs, count_params

    assert main(["models", "--model", "mobilenetv2_100", "--model", "spanet", "--sizes", "32", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"mobilenetv2_100", "spanet"}
    net = create_model("mobilenetv2_100", num_classes=9)
    assert rows["mobilenetv2_100"]["params"] == count_params(net)
    assert rows["mobilenetv2_100"]["macs_32"] == count_macs(net, 32) > 0
    # MACs of a plain Linear: exactly in*out per sample
    assert count_macs(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), 32) == 3 * 32 * 32 * 10
    assert main(["models", "--model", "spanet", "--sizes", "64,128"]) == 0
    table = capsys.readouterr().out
    assert "MACs@128" in table and "spanet" in table
    assert main(["models", "--sizes", "16"]) == 2
    assert "waferlab: error:" in capsys.readouterr().err
    # --variants lists each registered option set (SP&A-Net's attention types, ratios) with its exact size
    assert main(["models", "--model", "spanet", "--sizes", "32", "--variants", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    none = create_model("spanet", 9, attention="none")
    assert rows["spanet[attention=none]"]["params"] == count_params(none)
    assert rows["spanet[r=0.25]"]["options"] == {"r": 0.25}
    listed = [r for r in rows.values() if r.get("variant_of") == "spanet"]
    assert len(listed) == len(model_spec("spanet").variants)


def test_imagenet_without_network_is_one_line_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import socket

    import huggingface_hub.constants as hub

    def no_dns(*_a: object, **_k: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    offline_before = hub.HF_HUB_OFFLINE
    with pytest.raises(WaferlabError, match="cannot download ImageNet weights") as info:
        create_model("mobilenetv2_100", num_classes=3, pretrained="imagenet")
    assert "\n" not in str(info.value)
    assert hub.HF_HUB_OFFLINE == offline_before  # the temporary offline switch is undone


def test_local_timm_weights_load_into_attention_resnet(tmp_path) -> None:
    import timm

    state = timm.create_model("resnet34", num_classes=1000).state_dict()  # plain ResNet34, timm layout
    torch.save(state, tmp_path / "resnet34.pth")
    model = create_model("eca_resnet34", num_classes=4, in_chans=1, pretrained=str(tmp_path / "resnet34.pth"))
    assert torch.equal(model.net.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    # the RGB stem is adapted to 1 channel (timm's adapt_input_conv sums over the input channels)
    assert torch.allclose(model.net.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    with pytest.raises(WaferlabError, match="unexpected key"):
        create_model("ghostnet_100", num_classes=4, pretrained=str(tmp_path / "resnet34.pth"))
