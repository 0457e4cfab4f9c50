"""Classifier heads shared by every model: the cosine head that Circle loss needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Softmax scale for a cosine head's similarities when a run records none (Circle loss's default gamma).
DEFAULT_COSINE_SCALE = 64.0


class CosineClassifier(nn.Module):
    """Cosine similarities between L2-normalised features and L2-normalised class weights.

    Outputs lie in [-1, 1]; Circle loss (``waferlab.losses.CircleLoss``) consumes them directly.
    Accepts ``(N, C)`` or ``(N, C, 1, 1)`` features (1x1-conv heads) and keeps the input's rank.
    """

    is_cosine = True

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.dim() == 4
        feats = x.flatten(1) if spatial else x
        out = F.linear(F.normalize(feats, dim=1), F.normalize(self.weight, dim=1))
        return out[:, :, None, None] if spatial else out


def use_cosine_head(model: nn.Module) -> nn.Module:
    """Replace ``model.classifier`` (a Linear or a 1x1 Conv2d) by a :class:`CosineClassifier`."""
    old = model.classifier
    if isinstance(old, nn.Linear):
        in_f, out_f = old.in_features, old.out_features
    elif isinstance(old, nn.Conv2d) and old.kernel_size == (1, 1):
        in_f, out_f = old.in_channels, old.out_channels
    else:
        raise TypeError(f"cannot put a cosine head on classifier of type {type(old).__name__}")
    new = CosineClassifier(in_f, out_f)
    _replace_module(model, old, new)
    model.classifier = new
    return model


def is_cosine(model: nn.Module) -> bool:
    """True when the model outputs cosine similarities rather than logits."""
    return bool(getattr(getattr(model, "classifier", None), "is_cosine", False))


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)
