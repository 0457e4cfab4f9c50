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


# --------------------------------------------------------------------------------- fail-weighted pooling
_WRAPPED = "model."


def _drop_wrapper_prefix(_module: nn.Module, state: dict, prefix: str, _meta: object) -> None:
    """state_dict hook of :class:`FailPooled`: ``<prefix>model.x`` -> ``<prefix>x`` (order kept)."""
    inner = prefix + _WRAPPED
    items = list(state.items())
    for key, _ in items:
        del state[key]
    for key, value in items:
        state[prefix + key[len(inner):] if key.startswith(inner) else key] = value


def _add_wrapper_prefix(_module: nn.Module, state: dict, prefix: str, *_args: object) -> None:
    """load_state_dict pre-hook of :class:`FailPooled`: ``<prefix>x`` -> ``<prefix>model.x``."""
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + _WRAPPED)]:
        state[prefix + _WRAPPED + key[len(prefix):]] = state.pop(key)

#: Added to the mean failed-die density before dividing by it: a map without failed dies gets weights 0.
FAIL_POOL_EPS = 1e-3
#: Encoded value above which a gray/rgb pixel is a failed die (levels 0, 0.5 or 127/255, and 1).
_FAILED_LEVEL = 0.75


def failed_dies(x: torch.Tensor, encoding: str) -> torch.Tensor:
    """(N, 1, H, W) float indicator of the failed dies of an encoded batch (``waferlab.data.encode``)."""
    if encoding == "onehot":
        return x[:, 2:3]
    return (x[:, :1] > _FAILED_LEVEL).to(x.dtype)


class FailGate(nn.Module):
    """Weights a feature map (N, C, h, w) by the failed-die density of each of its cells, divided by the
    map's mean density: the model's average pooling after it becomes a failed-die-weighted average.

    This module is the CAM layer of a :class:`FailPooled` model, so a CAM is the class evidence of each cell
    times its share of the failed dies: heat can only sit where dies failed (good dies carry none).
    """

    def forward(self, fmap: torch.Tensor, failed: torch.Tensor) -> torch.Tensor:
        from waferlab.models.study import pool_matrix

        # adaptive average pooling as two matrix products: the same values, and it exports to ONNX at any size
        (h_in, w_in), (h, w) = failed.shape[-2:], fmap.shape[-2:]
        failed = failed.to(fmap.dtype)
        d = pool_matrix(int(h_in), int(h), failed) @ failed @ pool_matrix(int(w_in), int(w), failed).T
        return fmap * (d / (d.mean(dim=(2, 3), keepdim=True) + FAIL_POOL_EPS))


class FailPooled(nn.Module):
    """A model whose CAM-layer map is weighted by the local failed-die density before its own pooling.

    The wrapped model is unchanged (weights, layers, classifier); during each forward its
    ``cam_target_layer`` output passes through :class:`FailGate` (a forward hook that lives only for that
    call), so the class evidence the classifier sums comes from cells with failed dies, and a CAM taken on
    ``self.cam_target_layer`` (the gate) shows it there. Why: the plain models put Center/Loc evidence on the
    good dies around the pattern (``benchmarks/explain_inversion.py``), which no CAM method can fix.
    The state dict is the wrapped model's, key for key (no ``model.`` prefix), so weights move freely between
    a ``failpool`` run and a ``linear`` one (``--init``).
    """

    def __init__(self, model: nn.Module, encoding: str = "onehot") -> None:
        super().__init__()
        self.model = model
        self.gate = FailGate()
        self.encoding = encoding
        save_hook = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        save_hook(_drop_wrapper_prefix)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_add_wrapper_prefix)
        else:  # torch < 2.5
            self._register_load_state_dict_pre_hook(_add_wrapper_prefix, with_module=True)

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.gate

    @property
    def classifier(self) -> nn.Module:
        return self.model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        failed = failed_dies(x, self.encoding)
        handle = self.model.cam_target_layer.register_forward_hook(
            lambda _module, _inputs, out: self.gate(out, failed))
        try:
            return self.model(x)
        finally:
            handle.remove()
