"""Faithfulness of CAMs in wafer terms: deletion and insertion curves over failed dies, plus ROAD.

Deletion turns failed dies back into good dies, most relevant first, and tracks the probability of the
explained class; a faithful CAM makes it drop fast (low AUC). Insertion starts from the all-good wafer
and puts failed dies back, most relevant first; a faithful CAM makes it rise fast (high AUC). Both are
compared with a random die order, which is what "no explanation" scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from waferlab.engine.predict import InputSpec, PredictOptions, predict_probs
from waferlab.explain.cam import as_maps, model_device, resolve_device

#: Points on each curve: fractions 0, 1/steps, ..., 1 of the failed dies changed.
DEFAULT_STEPS = 20
_NOT_FAILED = np.iinfo(np.int32).max


def relevance_ranks(maps, cams: np.ndarray | None, seed: int = 0) -> np.ndarray:
    """Rank of every failed die by CAM relevance (0 = most relevant); other pixels get a huge rank.

    Ties (e.g. dies where the CAM is zero) are broken at random (seeded), never by raster order, which
    would favour the top-left of the wafer. ``cams=None`` gives a purely random order (the baseline).
    """
    arr = as_maps(maps).numpy()
    n = len(arr)
    rng = np.random.default_rng(seed)
    ranks = np.full(arr.shape, _NOT_FAILED, dtype=np.int32).reshape(n, -1)
    flat_maps = arr.reshape(n, -1)
    flat_cams = None if cams is None else np.asarray(cams, dtype=np.float64).reshape(n, -1)
    for i in range(n):
        idx = np.flatnonzero(flat_maps[i] == 2)
        if not len(idx):
            continue
        tie = rng.random(len(idx))
        order = np.argsort(tie) if flat_cams is None else np.lexsort((tie, -flat_cams[i, idx]))
        ranks[i, idx[order]] = np.arange(len(idx), dtype=np.int32)
    return ranks.reshape(arr.shape)


@dataclass
class Curves:
    """Deletion/insertion curves (N, T) of the explained class's probability at ``fractions`` (T,)."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    n_failed: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """Maps with at least one failed die (others have flat, meaningless curves)."""
        return self.n_failed > 0

    def deletion_auc(self) -> np.ndarray:
        """Area under each deletion curve (lower = more faithful); NaN where there is no failed die."""
        return np.where(self.valid, np.trapezoid(self.deletion, self.fractions, axis=1), np.nan)

    def insertion_auc(self) -> np.ndarray:
        """Area under each insertion curve (higher = more faithful); NaN where there is no failed die."""
        return np.where(self.valid, np.trapezoid(self.insertion, self.fractions, axis=1), np.nan)


def perturbation_curves(
    model: nn.Module,
    maps,
    ranks: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    spec: InputSpec,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    device=None,
) -> Curves:
    """Deletion and insertion curves for maps whose failed dies are ordered by ``ranks``.

    For each map and each fraction f in 0..1 (``steps`` + 1 points) the first round(f * n_failed)
    dies in rank order are turned good (deletion) or are the only failed dies left (insertion); the
    probabilities come from the one prediction function.
    """
    dev = resolve_device(device) if device is not None else model_device(model)
    opts = PredictOptions(device=str(dev), batch_size=batch_size)
    t = as_maps(maps)
    n = len(t)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    is_fail = t == 2
    n_failed = is_fail.flatten(1).sum(1).numpy()
    ks = torch.from_numpy(np.rint(fractions[None, :] * n_failed[:, None]).astype(np.int64))  # (N, T)
    r = torch.from_numpy(np.asarray(ranks, dtype=np.int64))
    tgt = np.asarray(targets, dtype=np.int64)
    deletion = np.zeros((n, len(fractions)), np.float32)
    insertion = np.zeros((n, len(fractions)), np.float32)
    n_t = len(fractions)
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        m, rk, fail, k = t[sl, None], r[sl, None], is_fail[sl, None], ks[sl, :, None, None]
        good = torch.ones((), dtype=torch.uint8)
        deleted = torch.where(rk < k, good, m)                    # (b, T, H, W)
        inserted = torch.where(fail & (rk >= k), good, m)
        rows = tgt[sl].repeat(n_t)
        for out, variants in ((deletion, deleted), (insertion, inserted)):
            probs = predict_probs(model, variants.reshape(-1, *t.shape[-2:]), spec, opts)
            out[sl] = probs[np.arange(len(rows)), rows].reshape(-1, n_t)
    return Curves(fractions=fractions, deletion=deletion, insertion=insertion, n_failed=n_failed)


def faithfulness(
    model: nn.Module,
    maps,
    cams: np.ndarray | None,
    targets: Sequence[int] | np.ndarray,
    spec: InputSpec,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    device=None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-map deletion and insertion AUCs for one CAM (``cams=None``: the random die order)."""
    curves = perturbation_curves(model, maps, relevance_ranks(maps, cams, seed=seed), targets, spec,
                                 steps=steps, batch_size=batch_size, device=device)
    return {"deletion_auc": curves.deletion_auc(), "insertion_auc": curves.insertion_auc()}


class _ScaledOutputs(nn.Module):
    """Wrap a model so a softmax of its outputs gives the run's class probabilities (spec's logit scale)."""

    def __init__(self, model: nn.Module, logit_scale: float) -> None:
        super().__init__()
        self.model = model
        self.logit_scale = float(logit_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(x).float().flatten(1) * self.logit_scale, dim=-1)


def road_scores(
    model: nn.Module,
    maps,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    spec: InputSpec,
    percentiles: Sequence[int] = (20, 40, 60, 80),
    batch_size: int = 32,
    device=None,
    seed: int = 0,
) -> np.ndarray:
    """pytorch-grad-cam's ROAD combined score per map (higher = more faithful).

    ROAD imputes removed pixels of the encoded input by noisy linear interpolation; on one-hot wafer
    maps that yields in-between values, so it is an image-space check next to the wafer-space curves.
    """
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from waferlab.engine.predict import prepare_batch

    dev = resolve_device(device) if device is not None else model_device(model)
    model.to(dev).eval()
    wrapped = _ScaledOutputs(model, spec.logit_scale).eval()
    t = as_maps(maps)
    metric = ROADCombined(percentiles=list(percentiles))
    tg = np.asarray(targets, dtype=np.int64)
    out = np.zeros(len(t), np.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(t), batch_size):
            sl = slice(start, min(start + batch_size, len(t)))
            x = prepare_batch(t[sl], spec, dev).float().contiguous()
            targets_b = [ClassifierOutputSoftmaxTarget(int(k)) for k in tg[sl]]
            out[sl] = np.asarray(metric(x, np.asarray(cams[sl], np.float32), targets_b, wrapped),
                                 dtype=np.float32).reshape(-1)
    return out
