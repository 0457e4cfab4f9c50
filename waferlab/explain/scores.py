"""Faithfulness and localisation scores of CAM methods for one model, per class and overall."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from waferlab.data.table import UNLABELED
from waferlab.explain.cam import as_maps, compute_cams, parse_methods, resolve_device
from waferlab.explain.faithfulness import DEFAULT_STEPS, faithfulness, road_scores
from waferlab.explain.localization import DEFAULT_THRESHOLD, DEFAULT_TOP_FRACTION, localisation

#: ROAD solves a sparse system per map and percentile; it is scored on at most this many maps.
DEFAULT_ROAD_MAPS = 32


def _mean(values: np.ndarray) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def aggregate(per_map: dict[str, np.ndarray], groups: np.ndarray, group_order: Sequence[str]) -> dict:
    """Mean of each per-map score (NaN ignored) overall and per group, with the map counts behind them."""
    def block(sel: np.ndarray) -> dict:
        out: dict = {"n_maps": int(sel.sum())}
        for key, values in per_map.items():
            v = np.asarray(values, dtype=np.float64)[sel]
            out[key] = _mean(v)
            out[f"n_{key}"] = int(np.isfinite(v).sum())
        return out

    groups = np.asarray(groups, dtype=object)
    per_class = {g: block(groups == g) for g in group_order if (groups == g).any()}
    return {"overall": block(np.ones(len(groups), bool)), "per_class": per_class}


def score_model(
    model: nn.Module,
    maps,
    labels: np.ndarray,
    class_names: Sequence[str],
    encoding: str,
    methods: Sequence[str] = ("gradcam", "gradcam++"),
    masks: np.ndarray | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    road: bool = True,
    road_maps: int = DEFAULT_ROAD_MAPS,
    top_fraction: float = DEFAULT_TOP_FRACTION,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Score every CAM method on ``maps`` (uint8 (N,S,S)); ``labels`` index ``class_names`` (-1 = none).

    Each map's CAM explains the predicted class; deletion/insertion track that class's probability and
    are compared with a random die order. Localisation (pointing game, IoU) uses ``masks`` and only the
    correctly classified maps, where the explained class is the true one.
    """
    names = parse_methods(methods)
    dev = resolve_device(device)
    t = as_maps(maps)
    labels = np.asarray(labels, dtype=np.int64)
    res = compute_cams(model, t, encoding, names, batch_size=batch_size, device=dev, progress=progress)
    preds = res.targets
    groups = np.array([class_names[k] if k >= 0 else UNLABELED for k in labels], dtype=object)
    order = [*class_names, UNLABELED]
    correct = (preds == labels) & (labels >= 0)
    out: dict = {
        "n_maps": len(t),
        "accuracy": float(correct.sum() / max(1, (labels >= 0).sum())),
        "cam_layer_hw": list(res.feature_hw),
        "notes": res.notes,
        "methods": {},
    }
    kw = dict(steps=steps, batch_size=batch_size, device=dev, seed=seed)
    random = faithfulness(model, t, None, preds, encoding, **kw)
    out["random_order"] = aggregate(random, groups, order)
    n_road = min(len(t), road_maps) if road else 0
    for name in names:
        cams = res.cams[name]
        per_map: dict[str, np.ndarray] = dict(faithfulness(model, t, cams, preds, encoding, **kw))
        if n_road:
            r = np.full(len(t), np.nan)
            r[:n_road] = road_scores(model, t[:n_road], cams[:n_road], preds[:n_road], encoding,
                                     batch_size=batch_size, device=dev, seed=seed)
            per_map["road"] = r
        if masks is not None:
            loc = localisation(cams, masks, t, top_fraction=top_fraction, threshold=threshold)
            for key, values in loc.items():
                per_map[key] = np.where(correct, values, np.nan)
        out["methods"][name] = aggregate(per_map, groups, order)
    return out
