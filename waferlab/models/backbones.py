"""ResNet34 backbones of the attention study (seeds.md A.3) and loading of torchvision-layout weights.

``resnet34_backbone`` yields the stage outputs of torchvision's ResNet34 at output stride 32 (standard),
16 (the study's custom dilated variant: layer4 at stride 1 with dilation rates 1, 2, 4) or 8 (waferlab's
addition, DeepLab-style: also layer3 at stride 1 with dilation 2, and layer4's rates doubled to 2, 4, 8),
so the last stage keeps a usable grid at wafer-map sizes (2x2 / 4x4 / 8x8 at 64 px) for CAMs. Every
variant keeps torchvision's module names and weight shapes, so ``resnet34-b627a593.pth`` (ImageNet,
``IMAGENET1K_V1``) or any state dict saved from ``torchvision.models.resnet34()`` loads into it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from waferlab.errors import WaferlabError

IMAGENET_URL = "https://download.pytorch.org/models/resnet34-b627a593.pth"
DILATION_RATES = (1, 2, 4)
#: Output strides the backbone offers (the stride of layer4), declared once; builders validate against it.
OUTPUT_STRIDES = (32, 16, 8)
STAGE_CHANNELS = (64, 64, 128, 256, 512)  # stem, layer1..layer4


class ResNet34Backbone(nn.Module):
    """torchvision ResNet34 without avgpool/fc; ``forward`` returns ``[stem, layer1, .., layer4]``.

    ``stem`` is the ReLU output of conv1/bn1 (stride 2, before the max-pool, as timm's first feature);
    layer1..layer4 have strides 4, 8, 16, 32 (``output_stride=32``), 4, 8, 16, 16 (16, the study's
    ``dilated=True``) or 4, 8, 8, 8 (8). Module names equal torchvision's (``conv1``, ``bn1``,
    ``layer1.0.conv1``, ...) so its weights load as is.
    """

    def __init__(self, in_chans: int = 3, dilated: bool = False, output_stride: int | None = None) -> None:
        super().__init__()
        import torchvision

        tv = torchvision.models.resnet34(weights=None)
        self.in_chans = in_chans
        self.output_stride = check_output_stride(16 if dilated else 32, output_stride)
        self.dilated = self.output_stride < 32
        self.conv1 = tv.conv1
        if in_chans != 3:  # same init as torchvision's stem
            self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1, self.relu, self.maxpool = tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        self.channels = STAGE_CHANNELS
        if self.output_stride == 16:
            _dilate_stage(self.layer4, DILATION_RATES)
        elif self.output_stride == 8:
            _dilate_stage(self.layer3, (2,) * len(self.layer3))
            _dilate_stage(self.layer4, tuple(2 * r for r in DILATION_RATES))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        l1 = self.layer1(self.maxpool(stem))
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        l4 = self.layer4(l3)
        return [stem, l1, l2, l3, l4]


def check_output_stride(default: int, output_stride: object = None, model: str = "resnet34") -> int:
    """``output_stride`` (None = ``default``) validated against :data:`OUTPUT_STRIDES`; else a user error."""
    value = default if output_stride is None else output_stride
    if isinstance(value, bool) or value not in OUTPUT_STRIDES:
        raise WaferlabError(f"model {model!r}: option output_stride must be one of "
                            f"{', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride!r}")
    return int(value)


def _dilate_stage(stage: nn.Sequential, rates: tuple[int, ...]) -> None:
    """Run a torchvision ResNet stage at stride 1 with dilated 3x3 convs, keeping the weight layout.

    The first block's 3x3 conv and 1x1 downsample run at stride 1; block i uses dilation = padding =
    ``rates[i]`` in both of its 3x3 convs. With the study's rates (1, 2, 4) on layer4 this is its dilated
    stage (A.3; the study's resnet.py passes one rate per block; that it applies to both convs of a
    BasicBlock, as in DeepLab-style BasicBlocks, is inferred).
    """
    first = stage[0]
    first.conv1.stride = (1, 1)
    first.downsample[0].stride = (1, 1)
    first.stride = 1
    for block, rate in zip(stage, rates, strict=True):
        for conv in (block.conv1, block.conv2):
            conv.dilation = (rate, rate)
            conv.padding = (rate, rate)


def resnet34_backbone(
    in_chans: int = 3, pretrained: str | os.PathLike[str] | None = None, dilated: bool = False,
    output_stride: int | None = None,
) -> ResNet34Backbone:
    """Build the ResNet34 backbone; ``pretrained`` is None, ``"imagenet"`` or a local .pth/.safetensors.

    ``output_stride`` (32, 16, 8) overrides ``dilated`` (which means 16, the study's variant).
    """
    state: dict[str, torch.Tensor] | None = None
    if pretrained is not None:  # read the weights first: a bad file fails before any model is built
        if str(pretrained).lower() == "imagenet":
            state, source = _download_imagenet_state(), "ImageNet ResNet34 weights"
        else:
            state, source = load_torchvision_state(pretrained), str(pretrained)
    backbone = ResNet34Backbone(in_chans=in_chans, dilated=dilated, output_stride=output_stride)
    if state is not None:
        load_backbone_state(backbone, state, source)
    return backbone


def _download_imagenet_state() -> dict[str, torch.Tensor]:
    """torchvision's ``IMAGENET1K_V1`` ResNet34 weights via the weights API (cached after the first run)."""
    import torchvision

    try:
        return torchvision.models.ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as exc:  # URLError, SSL, HTTP, timeout, truncated download: all mean "no weights"
        raise WaferlabError(
            f"could not download the ImageNet ResNet34 weights from {IMAGENET_URL} ({_one_line(exc)}); "
            "without network, fetch that file elsewhere and pass it as a local file, e.g. "
            "--pretrained /path/resnet34-b627a593.pth"
        ) from None


def load_torchvision_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict (``.pth``/``.pt`` via ``torch.load(weights_only=True)`` or ``.safetensors``).

    Every model's local-weights option reads files through this one function. Also unwraps
    ``{"state_dict"|"model"|"model_state_dict": ...}`` checkpoints and a DataParallel ``module.``
    prefix. Any unreadable file raises a one-line :class:`WaferlabError` naming it.
    """
    p = Path(path)
    if p.is_dir():
        raise WaferlabError(f"pretrained weights path {p} is a folder; give the .pth/.safetensors file in it")
    if not p.is_file():
        raise WaferlabError(
            f"pretrained weights file not found: {p} (use 'imagenet' or a path to a .pth/.safetensors file)"
        )
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refuses anything but tensors
        raise WaferlabError(
            f"cannot read weights file {p}: corrupt, or not a plain state dict of tensors "
            f"({_unpickler_reason(exc)}); "
            "save model.state_dict(), not the model"
        ) from None
    except Exception as exc:
        raise WaferlabError(
            f"cannot read weights file {p} (corrupt, truncated or not a .pth/.safetensors file): "
            f"{_one_line(exc)}"
        ) from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise WaferlabError(f"weights file {p} does not hold a state dict (got {type(obj).__name__})")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WaferlabError(
                f"weights file {p}: entry {key!r} is not a tensor, so this is not a state dict"
            )
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    return state


def load_backbone_state(backbone: ResNet34Backbone, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a torchvision-layout ResNet34 state dict into ``backbone`` (``fc.*`` ignored).

    The stem conv is adapted to ``backbone.in_chans`` like timm's ``adapt_input_conv`` (1 channel: sum
    over RGB; others: RGB repeated and scaled by 3/in_chans). A missing, unexpected or mis-shaped key
    raises a one-line :class:`WaferlabError` naming ``source`` and the key.
    """
    from timm.models import adapt_input_conv

    expected = backbone.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise WaferlabError(
            f"weights {source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); "
            "expected torchvision's resnet34 layout (conv1.weight, layer1.0.conv1.weight, ...)"
        )
    # Old torchvision files (the ImageNet one included) have no BatchNorm num_batches_tracked buffers.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WaferlabError(
            f"weights {source}: missing key {missing[0]!r} ({len(missing)} missing in all); "
            "expected torchvision's resnet34 layout"
        )
    loaded: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        value = state.get(key)
        if value is None:
            loaded[key] = target
            continue
        if key == "conv1.weight" and value.dim() == 4 and value.shape[1] != target.shape[1]:
            if value.shape[1] != 3:
                raise WaferlabError(
                    f"weights {source}: key 'conv1.weight' has {value.shape[1]} input channels; "
                    f"only 3-channel stems can be adapted to in_chans={target.shape[1]}"
                )
            value = adapt_input_conv(target.shape[1], value)
        if tuple(value.shape) != tuple(target.shape):
            raise WaferlabError(
                f"weights {source}: key {key!r} has shape {tuple(value.shape)}, "
                f"the model needs {tuple(target.shape)}"
            )
        loaded[key] = value.to(target.dtype)
    backbone.load_state_dict(loaded, strict=True)


def _unpickler_reason(exc: BaseException) -> str:
    """The informative part of torch's long weights-only refusal (e.g. ``Unsupported global: ...``)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = " ".join(text.split(marker, 1)[1].split("\n\n")[:2]).strip()
        reason = " ".join(rest.split())
        reason = reason.split(". ")[0]
        return reason[:200]
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: keeps WaferlabError messages on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
