"""timm baselines under the waferlab model contract: attention ResNet34s and lightweight CNNs.

Each model is a timm network (``pretrained=False`` unless asked) wrapped in :class:`TimmClassifier`,
which exposes ``cam_target_layer`` (the module whose output is the 4-D map fed to global pooling)
and ``classifier`` (the final Linear) without registering either twice in the state dict.
``pretrained="imagenet"`` downloads timm's weights (network needed); a local path loads a timm-layout
state dict, strict on the backbone, classifier skipped, first conv adapted to ``in_chans``.
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


@dataclass(frozen=True)
class TimmRecipe:
    """How to build one baseline from timm and where its CAM layer and classifier live."""

    timm_name: str
    cam_path: str  # dotted path inside the timm model (digits index Sequentials)
    classifier_attr: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    imagenet_from: str | None = None  # timm model whose ImageNet weights seed this one's backbone
    attention_keys: tuple[str, ...] = ()  # key substrings that may be absent from plain-backbone weights


RECIPES: dict[str, TimmRecipe] = {
    # timm has no ImageNet weights for attention ResNet34s: their backbone takes torchvision's ResNet34
    # weights (IMAGENET1K_V1 = timm resnet34.tv_in1k, as in the attention study); attention starts at init.
    "se_resnet34": TimmRecipe("seresnet34", "layer4", "fc", imagenet_from="resnet34.tv_in1k",
                              attention_keys=(".se.",)),
    "eca_resnet34": TimmRecipe("resnet34", "layer4", "fc", {"block_args": {"attn_layer": "eca"}},
                               imagenet_from="resnet34.tv_in1k", attention_keys=(".se.",)),
    "gc_resnet34": TimmRecipe("resnet34", "layer4", "fc", {"block_args": {"attn_layer": "gc"}},
                              imagenet_from="resnet34.tv_in1k", attention_keys=(".se.",)),
    "ghostnet_100": TimmRecipe("ghostnet_100", "blocks.-1", "classifier"),
    "mobilenetv2_100": TimmRecipe("mobilenetv2_100", "bn2", "classifier"),
    "mobilenetv3_large_100": TimmRecipe("mobilenetv3_large_100", "blocks.-1", "classifier"),
}

DESCRIPTIONS = {
    "se_resnet34": "ResNet34 with squeeze-and-excitation in every block (timm seresnet34)",
    "eca_resnet34": "ResNet34 with efficient channel attention in every block (timm, attn_layer=eca)",
    "gc_resnet34": "ResNet34 with global-context blocks (GCNet) in every block (timm, attn_layer=gc)",
    "ghostnet_100": "GhostNet 1.0x (timm ghostnet_100), the lightweight net SP&A-Net builds on",
    "mobilenetv2_100": "MobileNetV2 1.0x (timm mobilenetv2_100)",
    "mobilenetv3_large_100": "MobileNetV3-Large 1.0x (timm mobilenetv3_large_100)",
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


def build_timm(name: str, num_classes: int, in_chans: int = 3,
               pretrained: str | None = None) -> TimmClassifier:
    """Build baseline ``name`` from its :data:`RECIPES` entry, optionally with pretrained weights."""
    import timm

    recipe = RECIPES[name]
    net = timm.create_model(recipe.timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                            **recipe.kwargs)
    first_conv = net.pretrained_cfg.get("first_conv", "conv1")
    skip = (f"{recipe.classifier_attr}.",)
    if pretrained == "imagenet":
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


def _make_builder(name: str):  # noqa: ANN202 - a registry builder
    def builder(num_classes: int, in_chans: int = 3, pretrained: str | None = None) -> TimmClassifier:
        return build_timm(name, num_classes, in_chans, pretrained)

    builder.__name__ = f"build_{name}"
    builder.__doc__ = f"Build {name}: {DESCRIPTIONS[name]}."
    return builder


for _name in RECIPES:
    _family = "attention-resnet34" if _name.endswith("resnet34") else "lightweight"
    register(_name, family=_family, description=DESCRIPTIONS[_name])(_make_builder(_name))
