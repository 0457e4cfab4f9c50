"""Model registry: ``create_model(name, ...)`` builds any registered model with one contract.

Contract of every model: ``forward(x)`` maps ``(N, in_chans, H, W)`` (any H, W >= 32) to
``(N, num_classes)``; ``model.cam_target_layer`` is the module whose output is the 4-D feature map
right before the final pooling (or flatten), where CAMs are taken; ``model.classifier`` is the last
module producing the class scores (swapped for a cosine head by ``head="cosine"``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from waferlab.errors import WaferlabError

if TYPE_CHECKING:  # torch is imported only when a model is built, so `waferlab --help` stays instant
    from torch import nn

Builder = Callable[..., "nn.Module"]

#: Modules whose import registers models; loaded on first use of the registry.
#: Classifier heads ``create_model`` can put on a model: the model's own, an L2-normalised cosine head, or
#: the model's own after a failed-die-weighted pooling (``waferlab.models.heads.FailPooled``).
HEADS: tuple[str, ...] = ("linear", "cosine", "failpool")
MODEL_MODULES = ("waferlab.models.study", "waferlab.models.spanet", "waferlab.models.baselines")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its builder, a one-line description and named option sets worth listing
    (``variants``: (label, options) pairs that ``waferlab models --variants`` prints with their size)."""

    name: str
    builder: Builder
    family: str
    description: str
    variants: tuple[tuple[str, dict[str, object]], ...] = ()


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, family: str, description: str,
             variants: tuple[tuple[str, dict[str, object]], ...] = ()) -> Callable[[Builder], Builder]:
    """Decorator that registers ``builder(num_classes, in_chans, pretrained, **options)`` as ``name``."""

    def deco(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, builder, family, description, variants)
        return builder

    return deco


def _ensure_loaded() -> None:
    for module in MODEL_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    """Names of all registered models, in registration order."""
    _ensure_loaded()
    return list(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a clear error lists the known names otherwise."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise WaferlabError(f"unknown model {name!r}; known models: {known}") from None


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: str | None = None,
    head: str = "linear",
    encoding: str = "onehot",
    **options: object,
) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes and ``in_chans`` input channels.

    ``pretrained``: ``None``, ``"imagenet"`` (downloads through the library's weights API on a
    machine with network) or a path to a local ``.pth``/``.safetensors`` state dict.
    ``head``: ``"linear"``, ``"cosine"`` (L2-normalised cosine classifier, for Circle loss) or
    ``"failpool"`` (the model's own classifier after a failed-die-weighted pooling; ``encoding`` says how
    the input holds the failed dies).
    """
    from torch import nn

    spec = model_spec(name)
    if num_classes < 1:
        raise WaferlabError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise WaferlabError(f"in_chans must be >= 1, got {in_chans}")
    try:
        model = spec.builder(num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise WaferlabError(f"model {name!r}: {exc}") from None
        raise
    if not isinstance(getattr(model, "cam_target_layer", None), nn.Module):
        raise RuntimeError(f"model {name!r} does not expose cam_target_layer")  # a bug, not a user error
    if head == "cosine":
        from waferlab.models.heads import use_cosine_head

        refusal = getattr(type(model), "cosine_head_refusal", None)  # a model whose classifier reads logits
        if refusal:
            raise WaferlabError(f"model {name!r}: head 'cosine' is not supported: {refusal}")
        use_cosine_head(model)
    elif head == "failpool":
        from waferlab.models.heads import FailPooled

        model = FailPooled(model, encoding)
    elif head != "linear":
        raise WaferlabError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
    model.model_name = name  # type: ignore[assignment]
    model.num_classes = num_classes  # type: ignore[assignment]
    model.in_chans = in_chans  # type: ignore[assignment]
    return model
