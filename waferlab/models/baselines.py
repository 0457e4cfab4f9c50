"""timm baselines under the waferlab model contract: attention ResNet34s and ResNet50s, lightweight CNNs.

Each model is a timm network (``pretrained=False`` unless asked) wrapped in :class:`TimmClassifier`,
which exposes ``cam_target_layer`` (the module whose output is the 4-D map fed to global pooling)
and ``classifier`` (the final Linear) without registering either twice in the state dict.
``pretrained="imagenet"`` downloads timm's weights (network needed); a local path loads a timm-layout
state dict, strict on the backbone, classifier skipped, first conv adapted to ``in_chans``.

ResNet50 baselines of SP&A-Net's ablation (seeds.md B.7, table r1: ResNet50 + SE / NL / SNL / GC). The
paper gives no placement; each follows its own paper, in timm's attention slot of a Bottleneck (after
bn3, before the residual add; Wang et al. put NL blocks after a residual block instead):

==============  ======================================================  ====================
model           attention (see ``attention.ablation_attention``)         where
==============  ======================================================  ====================
``resnet50``    none                                                    --
``se_resnet50`` SE, reduction 16 (SENet)                                every block
``nl_resnet50`` non-local, embedded Gaussian (timm NonLocalAttn)         layer2 blocks 0, 2;
                                                                        layer3 blocks 0, 2, 4
``snl_resnet50`` spectral non-local (SNL, one unit, C/2)                layer3 block 4 (before
                                                                        the last block, as SNL)
``gc_resnet50`` GC block, C/16, LayerNorm, additive fusion (GCNet)      every block of layer2-4
==============  ======================================================  ====================

Option ``attn_norm`` (bn|ln|gn) swaps the attention's normalisation (table r1's BN/LN/GN columns). Their
ImageNet weights are torchvision's ResNet50 (``resnet50.tv_in1k``); the attention starts at its init.

Option ``width`` (every baseline here) scales the channels for the accuracy-vs-parameters figure's three
sizes: timm's own width argument for GhostNet (``width``) and the MobileNets (``channel_multiplier``), and
the four stage widths and stem of the ResNets (timm's ``channels``/``stem_width``; ``waferlab.models.sizes``
lists the widths used). ImageNet weights exist only at width 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from waferlab.errors import WaferlabError
from waferlab.models.backbones import load_torchvision_state
from waferlab.models.registry import register
from waferlab.models.spanet import load_backbone_weights

#: How ``width`` reaches each timm family: a keyword of timm's generator, or the ResNet stage widths.
WIDTH_STYLES = ("ghostnet", "mobilenetv2", "mobilenetv3", "resnet")
#: Where each ResNet50 baseline's attention sits: {stage: block indices (None = every block)}.
RESNET50_ATTENTION: dict[str, dict[str, tuple[int, ...] | None]] = {
    "se": {"layer1": None, "layer2": None, "layer3": None, "layer4": None},
    "nl": {"layer2": (0, 2), "layer3": (0, 2, 4)},
    "snl": {"layer3": (4,)},
    "gc": {"layer2": None, "layer3": None, "layer4": None},
}


@dataclass(frozen=True)
class TimmRecipe:
    """How to build one baseline from timm and where its CAM layer and classifier live."""

    timm_name: str
    cam_path: str  # dotted path inside the timm model (digits index Sequentials)
    classifier_attr: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    imagenet_from: str | None = None  # timm model whose ImageNet weights seed this one's backbone
    attention_keys: tuple[str, ...] = ()  # key substrings that may be absent from plain-backbone weights
    width_style: str = "resnet"  # one of WIDTH_STYLES
    attention: str | None = None  # a key of RESNET50_ATTENTION: attention placed after timm builds the net


RECIPES: dict[str, TimmRecipe] = {
    # timm has no ImageNet weights for attention ResNet34s: their backbone takes torchvision's ResNet34
    # weights (IMAGENET1K_V1 = timm resnet34.tv_in1k, as in the attention study); attention starts at init.
    "se_resnet34": TimmRecipe("seresnet34", "layer4", "fc", imagenet_from="resnet34.tv_in1k",
                              attention_keys=(".se.",)),
    "eca_resnet34": TimmRecipe("resnet34", "layer4", "fc", {"block_args": {"attn_layer": "eca"}},
                               imagenet_from="resnet34.tv_in1k", attention_keys=(".se.",)),
    "gc_resnet34": TimmRecipe("resnet34", "layer4", "fc", {"block_args": {"attn_layer": "gc"}},
                              imagenet_from="resnet34.tv_in1k", attention_keys=(".se.",)),
    "ghostnet_100": TimmRecipe("ghostnet_100", "blocks.-1", "classifier", width_style="ghostnet"),
    "mobilenetv2_100": TimmRecipe("mobilenetv2_100", "bn2", "classifier", width_style="mobilenetv2"),
    "mobilenetv3_large_100": TimmRecipe("mobilenetv3_large_100", "blocks.-1", "classifier",
                                        width_style="mobilenetv3"),
    "resnet50": TimmRecipe("resnet50", "layer4", "fc", imagenet_from="resnet50.tv_in1k"),
    **{f"{kind}_resnet50": TimmRecipe("resnet50", "layer4", "fc", imagenet_from="resnet50.tv_in1k",
                                      attention_keys=(".se.",), attention=kind)
       for kind in RESNET50_ATTENTION},
}

DESCRIPTIONS = {
    "se_resnet34": "ResNet34 with squeeze-and-excitation in every block (timm seresnet34)",
    "eca_resnet34": "ResNet34 with efficient channel attention in every block (timm, attn_layer=eca)",
    "gc_resnet34": "ResNet34 with global-context blocks (GCNet) in every block (timm, attn_layer=gc)",
    "ghostnet_100": "GhostNet 1.0x (timm ghostnet_100), the lightweight net SP&A-Net builds on",
    "mobilenetv2_100": "MobileNetV2 1.0x (timm mobilenetv2_100)",
    "mobilenetv3_large_100": "MobileNetV3-Large 1.0x (timm mobilenetv3_large_100)",
    "resnet50": "ResNet50 (timm resnet50), the backbone of SP&A-Net's ablation baselines",
    "se_resnet50": "ResNet50 with squeeze-and-excitation in every block (SP&A-Net ablation baseline)",
    "nl_resnet50": "ResNet50 with 5 non-local blocks in layer2/layer3 (SP&A-Net ablation baseline)",
    "snl_resnet50": "ResNet50 with a spectral non-local block in layer3 (SP&A-Net ablation baseline)",
    "gc_resnet50": "ResNet50 with global-context blocks in layer2-4 (SP&A-Net ablation baseline)",
}


def _resolve(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)  # type: ignore[index]
    return module


class TimmClassifier(nn.Module):
    """A timm model with the waferlab contract; ``forward`` is the timm model's forward (logits)."""

    def __init__(self, net: nn.Module, recipe: TimmRecipe) -> None:
        super().__init__()
        self.net = net
        self._recipe = recipe

    @property
    def cam_target_layer(self) -> nn.Module:
        """Module whose output is the 4-D feature map right before global pooling."""
        return _resolve(self.net, self._recipe.cam_path)

    @property
    def classifier(self) -> nn.Module:
        """The final layer producing class scores (timm's ``fc`` or ``classifier``)."""
        return getattr(self.net, self._recipe.classifier_attr)

    def __setattr__(self, name: str, value: Any) -> None:
        # ``model.classifier = new`` (the cosine head) replaces timm's own layer, so it stays registered once.
        if name == "classifier" and "net" in self.__dict__.get("_modules", {}):
            setattr(self.net, self._recipe.classifier_attr, value)
            return
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.flatten(1) if out.dim() > 2 else out


def _adapt_first_conv(state: dict[str, torch.Tensor], net: nn.Module, first_conv: str) -> None:
    key = f"{first_conv}.weight"
    own = net.state_dict().get(key)
    if key in state and own is not None and state[key].shape[1] != own.shape[1]:
        from timm.models import adapt_input_conv

        state[key] = adapt_input_conv(own.shape[1], state[key])


@contextmanager
def _hub_offline_if_unreachable() -> Iterator[None]:
    """Put huggingface_hub in offline mode when its host does not resolve: cached weights still load
    and missing ones fail at once, instead of after a minute of retries."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    try:
        socket.getaddrinfo(urlparse(hub.ENDPOINT).hostname or "huggingface.co", 443)
        reachable = True
    except OSError:
        reachable = False
    old = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = old or not reachable
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old


def _scaled(channels: int, width: float) -> int:
    """A ResNet stage width times ``width``, rounded to a multiple of 8 (at least 8)."""
    return max(8, int(channels * width + 4) // 8 * 8)


def _create_net(recipe: TimmRecipe, num_classes: int, in_chans: int, width: float) -> nn.Module:
    """The timm network of ``recipe`` at channel multiplier ``width`` (timm's own arguments)."""
    import timm

    common = {"num_classes": num_classes, "in_chans": in_chans, **recipe.kwargs}
    if width == 1.0:
        return timm.create_model(recipe.timm_name, pretrained=False, **common)
    if recipe.width_style == "ghostnet":
        from timm.models.ghostnet import _create_ghostnet

        return _create_ghostnet(recipe.timm_name, width=width, **common)
    if recipe.width_style == "mobilenetv2":
        from timm.models.efficientnet import _gen_mobilenet_v2

        return _gen_mobilenet_v2(recipe.timm_name, channel_multiplier=width, **common)
    if recipe.width_style == "mobilenetv3":
        from timm.models.mobilenetv3 import _gen_mobilenet_v3

        return _gen_mobilenet_v3(recipe.timm_name, channel_multiplier=width, **common)
    channels = tuple(_scaled(c, width) for c in (64, 128, 256, 512))
    return timm.create_model(recipe.timm_name, pretrained=False, channels=channels,
                             stem_width=_scaled(64, width), **common)


def _place_attention(net: nn.Module, kind: str, norm: str | None) -> None:
    """Put ``kind`` attention into the Bottlenecks of :data:`RESNET50_ATTENTION` (timm's ``se`` slot)."""
    from waferlab.models.attention import ablation_attention

    for stage, indices in RESNET50_ATTENTION[kind].items():
        blocks = getattr(net, stage)
        for i in range(len(blocks)) if indices is None else indices:
            blocks[i].se = ablation_attention(kind, blocks[i].conv3.out_channels, norm)


def build_timm(name: str, num_classes: int, in_chans: int = 3, pretrained: str | None = None,
               width: float = 1.0, attn_norm: str | None = None) -> TimmClassifier:
    """Build baseline ``name`` from its :data:`RECIPES` entry, optionally with pretrained weights."""
    import timm

    recipe = RECIPES[name]
    net = _create_net(recipe, num_classes, in_chans, width)
    if recipe.attention is not None:
        _place_attention(net, recipe.attention, attn_norm)
    first_conv = net.pretrained_cfg.get("first_conv", "conv1")
    skip = (f"{recipe.classifier_attr}.",)
    if pretrained == "imagenet":
        if width != 1.0:
            raise WaferlabError(f"{name}: ImageNet weights exist only at width 1, not {width}")
        source = recipe.imagenet_from or recipe.timm_name
        try:
            with _hub_offline_if_unreachable():
                ref = timm.create_model(source, pretrained=True, num_classes=num_classes, in_chans=in_chans)
        except Exception as exc:  # no network, no cache, hub error: one line for the user
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WaferlabError(f"{name}: cannot download ImageNet weights for timm {source!r} (network "
                                f"needed; or pass a local weights file): {msg}") from None
        load_backbone_weights(net, ref.state_dict(), f"timm {source} ImageNet weights",
                              skip_prefixes=skip, allow_missing=recipe.attention_keys)
    elif pretrained is not None:
        state = load_torchvision_state(pretrained)
        if all(k.startswith("net.") for k in state):  # a waferlab checkpoint of this wrapper
            state = {k[4:]: v for k, v in state.items()}
        _adapt_first_conv(state, net, first_conv)
        load_backbone_weights(net, state, str(Path(pretrained)), skip_prefixes=skip,
                              allow_missing=recipe.attention_keys)
    return TimmClassifier(net, recipe)


def _check_width(name: str, width: object) -> float:
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0.25 <= width <= 4:
        raise WaferlabError(f"model {name!r}: option width must be a number in [0.25, 4], got {width!r}")
    return float(width)


def _make_builder(name: str):  # noqa: ANN202 - a registry builder
    if RECIPES[name].attention is not None:
        def builder(num_classes: int, in_chans: int = 3, pretrained: str | None = None, width: float = 1.0,
                    attn_norm: str | None = None) -> TimmClassifier:
            from waferlab.models.attention import ATTN_NORMS

            if attn_norm is not None and attn_norm not in ATTN_NORMS:
                raise WaferlabError(f"model {name!r}: option attn_norm must be one of "
                                    f"{', '.join(ATTN_NORMS)}, got {attn_norm!r}")
            return build_timm(name, num_classes, in_chans, pretrained, _check_width(name, width), attn_norm)
    else:
        def builder(num_classes: int, in_chans: int = 3, pretrained: str | None = None,  # type: ignore[misc]
                    width: float = 1.0) -> TimmClassifier:
            return build_timm(name, num_classes, in_chans, pretrained, _check_width(name, width))

    builder.__name__ = f"build_{name}"
    builder.__doc__ = f"Build {name}: {DESCRIPTIONS[name]}. Options: width" + (
        ", attn_norm (bn|ln|gn)." if RECIPES[name].attention else ".")
    return builder


def _family(name: str) -> str:
    if name.endswith("resnet34"):
        return "attention-resnet34"
    return "resnet50-ablation" if name.endswith("resnet50") else "lightweight"


for _name in RECIPES:
    register(_name, family=_family(_name), description=DESCRIPTIONS[_name])(_make_builder(_name))
