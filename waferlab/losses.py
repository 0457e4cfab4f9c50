"""Classification losses for imbalanced wafer-map classes: Circle, focal, (weighted) cross-entropy, and the
multi-label losses (binary cross-entropy, asymmetric loss) for MixedWM38-style multi-hot labels.

:func:`build_loss` is the factory the training engine calls. A loss whose ``expects`` attribute is
``"cosine"`` needs the model's cosine head (``create_model(..., head="cosine")``); the others take
plain logits. Each loss serves one task (:data:`LOSS_TASKS`): multiclass losses take class indices,
multilabel losses take (N, K) multi-hot targets and one independent sigmoid per label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from waferlab.errors import WaferlabError
from waferlab.models.heads import DEFAULT_COSINE_SCALE

#: Every loss and the task it serves (``multiclass``: one class index per map, softmax; ``multilabel``: a
#: multi-hot row per map, one sigmoid per label). The task names are ``waferlab.engine.config.TASKS``.
LOSS_TASKS: dict[str, str] = {
    "ce": "multiclass", "weighted_ce": "multiclass", "focal": "multiclass", "circle": "multiclass",
    "bce": "multilabel", "asl": "multilabel",
}
LOSS_NAMES = tuple(LOSS_TASKS)
WEIGHT_KINDS = ("inverse", "sqrt_inverse", "effective")


class CircleLoss(nn.Module):
    """Class-level Circle loss (Sun et al. 2020; SP&A-Net's ``CycleLoss.py``) for one positive per sample.

    With scores s (N, K) and one-hot y: alpha_p = relu(1 + m - s_p), alpha_n = relu(s_n + m) (no
    gradient through alpha), z = gamma * [y * alpha_p * (s - (1 - m)) + (1 - y) * alpha_n * (s - m)],
    loss = cross-entropy(z, y). ``mode="cosine"`` takes cosine similarities from the cosine head, as
    the Circle-loss paper intends; ``mode="softmax"`` applies softmax to logits first, reproducing the
    official SP&A code, whose model fed softmax probabilities to this loss.
    """

    def __init__(self, gamma: float = DEFAULT_COSINE_SCALE, margin: float = 0.25,
                 mode: str = "cosine") -> None:
        super().__init__()
        if mode not in ("cosine", "softmax"):
            raise WaferlabError(f"circle loss: mode must be 'cosine' or 'softmax', got {mode!r}")
        if not gamma > 0:
            raise WaferlabError(f"circle loss: gamma (scale) must be > 0, got {gamma}")
        if not 0 <= margin < 1:
            raise WaferlabError(f"circle loss: margin must be in [0, 1), got {margin}")
        self.gamma = float(gamma)
        self.margin = float(margin)
        self.mode = mode
        self.expects = "cosine" if mode == "cosine" else "logits"

    def circle_logits(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The margin-rescaled logits z that go into cross-entropy."""
        scores = scores.float()  # the margins and scale need float32 under mixed precision
        s = torch.softmax(scores, dim=1) if self.mode == "softmax" else scores
        if self.mode == "cosine" and scores.detach().abs().amax() > 1.0 + 1e-4:
            raise WaferlabError("circle loss (mode cosine) needs cosine similarities in [-1, 1]: build the "
                                "model with head='cosine', or use mode='softmax' on logits")
        y = F.one_hot(target, s.shape[1]).to(s.dtype)
        m = self.margin
        alpha_p = torch.relu(1.0 + m - s).detach()
        alpha_n = torch.relu(s + m).detach()
        return self.gamma * (y * alpha_p * (s - (1.0 - m)) + (1.0 - y) * alpha_n * (s - m))

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.circle_logits(scores, target), target)


class CrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` declaring what it expects (logits) as a class attribute, like the other losses,
    rather than an attribute stuck onto a torch module instance."""

    expects = "logits"


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): mean of w_y (1 - p_y)^gamma (-log p_y) over the batch.

    With class weights the mean is weighted (divided by the sum of the samples' weights), exactly as
    ``nn.CrossEntropyLoss(weight=...)`` does, so gamma=0 gives weighted cross-entropy.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if not gamma >= 0:
            raise WaferlabError(f"focal loss: gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        w = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("weight", w)
        self.expects = "logits"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1.0 - logp.exp()).clamp_min(0.0) ** self.gamma) * logp
        if self.weight is None:
            return loss.mean()
        w = self.weight.to(loss.device)[target]
        return (w * loss).sum() / w.sum()


def batch_normaliser(criterion: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """What ``criterion``'s batch mean divides by: the sum of the samples' class weights for a weighted
    multiclass loss (``nn.CrossEntropyLoss(weight=...)``, :class:`FocalLoss`), else the number of rows.
    DDP needs it to turn the ranks' means into the mean over the global batch."""
    weight = getattr(criterion, "weight", None)
    if isinstance(weight, torch.Tensor) and target.dim() == 1 and not target.is_floating_point():
        return weight.to(target.device, torch.float64)[target].sum()
    return torch.tensor(float(len(target)), dtype=torch.float64, device=target.device)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss for multi-label classification (Ridnik et al., ICCV 2021), on logits.

    With p = sigmoid(x), shifted probability p_m = max(p - clip, 0) for negatives and targets y in {0,1}:
    L = -[y (1 - p)^gamma_pos log p + (1 - y) p_m^gamma_neg log(1 - p_m)], summed over the labels and
    averaged over the maps. gamma_pos = gamma_neg = clip = 0 gives :class:`MultiLabelBCE` exactly.
    Deviations from the official ``AsymmetricLoss``: the mean over maps instead of the batch sum (so the
    learning rate does not depend on the batch size); log p via ``logsigmoid`` instead of
    ``log(clamp(p, 1e-8))`` (equal except beyond |logit| ~ 18). As in the official default
    (``disable_torch_grad_focal_loss=True``) no gradient flows through the focusing weights.
    """

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05) -> None:
        super().__init__()
        if not gamma_pos >= 0 or not gamma_neg >= 0:
            raise WaferlabError(f"asl loss: gamma_pos and gamma_neg must be >= 0, "
                                f"got {gamma_pos}, {gamma_neg}")
        if not 0 <= clip < 1:
            raise WaferlabError(f"asl loss: clip must be in [0, 1), got {clip}")
        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.clip = float(clip)
        self.expects = "logits"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        y = _multi_hot_target(target, x)
        log_pos = F.logsigmoid(x)
        if self.clip > 0:
            log_neg = torch.log((torch.sigmoid(-x) + self.clip).clamp(max=1.0))  # log(1 - p_m)
        else:
            log_neg = F.logsigmoid(-x)
        loss = y * log_pos + (1.0 - y) * log_neg
        if self.gamma_pos > 0 or self.gamma_neg > 0:
            with torch.no_grad():
                p = torch.sigmoid(x)
                p_m = (p - self.clip).clamp(min=0.0)
                base = y * (1.0 - p) + (1.0 - y) * p_m  # 1 - p_t
                gamma = y * self.gamma_pos + (1.0 - y) * self.gamma_neg
                weight = base.pow(gamma)
            loss = loss * weight
        return -loss.sum(dim=1).mean()


class MultiLabelBCE(nn.Module):
    """Binary cross-entropy with one sigmoid per label, summed over labels and averaged over maps."""

    def __init__(self) -> None:
        super().__init__()
        self.expects = "logits"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        loss = F.binary_cross_entropy_with_logits(x, _multi_hot_target(target, x), reduction="none")
        return loss.sum(dim=1).mean()


def _multi_hot_target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(N, K) multi-hot targets as float on the logits' device; a class-index vector is an error."""
    if target.shape != logits.shape:
        raise WaferlabError(f"multi-label loss: targets of shape {tuple(target.shape)} do not match logits "
                            f"{tuple(logits.shape)}; pass (N, K) multi-hot rows (task multilabel)")
    return target.to(device=logits.device, dtype=logits.dtype)


def _to_numpy(values: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def class_weights(labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int,
                  kind: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class weights (float32, length ``num_classes``, mean 1 over present classes) for weighted losses.

    ``inverse``: 1/n_c; ``sqrt_inverse``: 1/sqrt(n_c); ``effective``: (1 - beta)/(1 - beta^n_c), the
    "effective number of samples" of Cui et al. 2019. Negative labels (unlabeled) are ignored; a class
    with no sample gets the largest weight, as it is at least as rare as the rarest present class.
    """
    arr = _to_numpy(labels).astype(np.int64).ravel()
    arr = arr[arr >= 0]
    if arr.size and arr.max() >= num_classes:
        raise WaferlabError(f"class weights: label {int(arr.max())} out of range for {num_classes} classes")
    return weights_from_counts(np.bincount(arr, minlength=num_classes), kind, beta)


def weights_from_counts(counts: Sequence[int] | np.ndarray | torch.Tensor, kind: str = "inverse",
                        beta: float = 0.999) -> torch.Tensor:
    """Class weights from per-class counts; see :func:`class_weights` for the kinds."""
    n = _to_numpy(counts).astype(float)
    if n.ndim != 1 or n.size == 0 or (n < 0).any():
        raise WaferlabError("class weights: counts must be a non-empty list of non-negative numbers")
    present = n > 0
    if not present.any():
        raise WaferlabError("class weights: no labelled sample to weight (all class counts are 0)")
    if kind == "inverse":
        w = 1.0 / np.where(present, n, 1.0)
    elif kind == "sqrt_inverse":
        w = 1.0 / np.sqrt(np.where(present, n, 1.0))
    elif kind == "effective":
        if not 0 < beta < 1:
            raise WaferlabError(f"class weights: beta must be in (0, 1), got {beta}")
        w = (1.0 - beta) / (1.0 - np.power(beta, np.where(present, n, 1.0)))
    else:
        raise WaferlabError(f"class weights: unknown kind {kind!r}; use one of {', '.join(WEIGHT_KINDS)}")
    w = w / w[present].mean()
    w[~present] = w[present].max()
    return torch.tensor(w, dtype=torch.float32)


_OPTIONS: dict[str, tuple[str, ...]] = {
    "ce": ("label_smoothing",),
    "weighted_ce": ("kind", "beta", "label_smoothing"),
    "focal": ("gamma", "kind", "beta"),
    "circle": ("gamma", "margin", "mode"),
    "bce": (),
    "asl": ("gamma_pos", "gamma_neg", "clip"),
}


def check_loss_task(name: str, task: str) -> None:
    """Raise a one-line error unless loss ``name`` exists and serves ``task`` (before any data is read)."""
    from waferlab.engine.config import TASKS

    if task not in TASKS:
        raise WaferlabError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if name not in LOSS_TASKS:
        raise WaferlabError(f"unknown loss {name!r}; use one of {', '.join(LOSS_NAMES)}")
    if LOSS_TASKS[name] != task:
        fits = ", ".join(n for n, t in LOSS_TASKS.items() if t == task)
        raise WaferlabError(f"loss {name!r} is a {LOSS_TASKS[name]} loss but the task is {task}; "
                            f"use one of {fits} (e.g. --loss {fits.split(', ')[0]})")


def build_loss(name: str, num_classes: int,
               class_counts: Sequence[int] | np.ndarray | torch.Tensor | None = None, **kw: Any) -> nn.Module:
    """Build a loss by name: ``ce``, ``weighted_ce`` (needs ``class_counts``), ``focal``, ``circle``;
    multi-label ``bce``, ``asl``.

    Options: ce ``label_smoothing``; weighted_ce ``kind`` (inverse|sqrt_inverse|effective), ``beta``,
    ``label_smoothing``; focal ``gamma`` and, with ``class_counts``, ``kind``/``beta`` (class-weighted
    focal when ``kind`` is given); circle ``gamma`` (scale), ``margin``, ``mode`` (cosine|softmax);
    asl ``gamma_pos`` (0), ``gamma_neg`` (4), ``clip`` (0.05). For the multi-label losses ``num_classes``
    is the number of labels and ``class_counts`` is not used. The returned module has ``expects`` =
    ``"cosine"`` (needs the cosine head) or ``"logits"``; its task is ``LOSS_TASKS[name]``.
    """
    if name not in _OPTIONS:
        raise WaferlabError(f"unknown loss {name!r}; use one of {', '.join(LOSS_NAMES)}")
    unknown = sorted(set(kw) - set(_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(_OPTIONS[name])
        raise WaferlabError(f"loss {name!r}: unknown option {unknown[0]!r} (allowed: {allowed})")
    weight = None
    if LOSS_TASKS[name] == "multilabel":
        return _build_multilabel(name, kw)
    if class_counts is not None:
        counts = _to_numpy(class_counts)
        if counts.shape != (num_classes,):
            raise WaferlabError(f"loss {name!r}: class_counts has shape {counts.shape}, "
                                f"expected ({num_classes},)")
    if name == "weighted_ce" or (name == "focal" and "kind" in kw):
        if class_counts is None:
            raise WaferlabError(f"loss {name!r}: class weights need the training class counts")
        weight = weights_from_counts(counts, kw.get("kind", "inverse"), float(kw.get("beta", 0.999)))
    try:
        if name == "ce" or name == "weighted_ce":
            smoothing = float(kw.get("label_smoothing", 0.0))
            if not 0 <= smoothing < 1:
                raise WaferlabError(f"loss {name!r}: label_smoothing must be in [0, 1), got {smoothing}")
            return CrossEntropy(weight=weight, label_smoothing=smoothing)
        if name == "focal":
            return FocalLoss(gamma=float(kw.get("gamma", 2.0)), weight=weight)
        return CircleLoss(gamma=float(kw.get("gamma", DEFAULT_COSINE_SCALE)),
                          margin=float(kw.get("margin", 0.25)), mode=str(kw.get("mode", "cosine")))
    except (TypeError, ValueError) as exc:
        raise WaferlabError(f"loss {name!r}: bad option value ({exc})") from None


def _build_multilabel(name: str, kw: dict[str, Any]) -> nn.Module:
    try:
        if name == "bce":
            return MultiLabelBCE()
        return AsymmetricLoss(gamma_pos=float(kw.get("gamma_pos", 0.0)),
                              gamma_neg=float(kw.get("gamma_neg", 4.0)), clip=float(kw.get("clip", 0.05)))
    except (TypeError, ValueError) as exc:
        raise WaferlabError(f"loss {name!r}: bad option value ({exc})") from None
