"""Faithfulness and localisation scores of CAM methods for one model, per class and overall."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from waferlab.data.table import UNLABELED
from waferlab.engine.predict import InputSpec
from waferlab.explain.cam import as_maps, compute_cams, parse_methods, resolve_device
from waferlab.explain.faithfulness import DEFAULT_STEPS, faithfulness, road_scores
from waferlab.explain.localization import (
    DEFAULT_THRESHOLD,
    DEFAULT_TOP_FRACTION,
    fail_mass_lift,
    localisation,
)

#: ROAD solves a sparse system per map and percentile; it is scored on at most this many maps.
DEFAULT_ROAD_MAPS = 32
#: Bootstrap resamples of the CAM-minus-random AUC differences.
DEFAULT_BOOTSTRAP = 1000


@dataclass
class ScoreSettings:
    """How ``score_model`` scores: methods, curve points, batches, device, ROAD, thresholds, bootstrap."""

    methods: Sequence[str] = ("gradcam", "gradcam++")
    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    device: str | None = None
    road: bool = True
    road_maps: int = DEFAULT_ROAD_MAPS
    top_fraction: float = DEFAULT_TOP_FRACTION
    threshold: float = DEFAULT_THRESHOLD
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    progress: bool = False


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


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = DEFAULT_BOOTSTRAP,
                      seed: int = 0) -> dict:
    """Mean of a - b over maps where both are finite, with a percentile-bootstrap 95% interval."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    d = d[np.isfinite(d)]
    if not len(d):
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (max(1, resamples), len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(len(d))}


def _method_scores(model: nn.Module, t, cams: np.ndarray, preds: np.ndarray, spec: InputSpec,
                   masks: np.ndarray | None, correct: np.ndarray, s: ScoreSettings) -> dict[str, np.ndarray]:
    """Per-map scores of one method's CAMs: deletion/insertion AUCs, ROAD, fail-mass lift, localisation."""
    dev = resolve_device(s.device)
    per_map = dict(faithfulness(model, t, cams, preds, spec, steps=s.steps, batch_size=s.batch_size,
                                device=dev, seed=s.seed))
    n_road = min(len(t), s.road_maps) if s.road else 0
    if n_road:
        r = np.full(len(t), np.nan)
        r[:n_road] = road_scores(model, t[:n_road], cams[:n_road], preds[:n_road], spec,
                                 batch_size=s.batch_size, device=dev, seed=s.seed)
        per_map["road"] = r
    per_map["fail_mass_lift"] = fail_mass_lift(cams, t)
    if masks is not None:
        loc = localisation(cams, masks, t, top_fraction=s.top_fraction, threshold=s.threshold)
        per_map.update({key: np.where(correct, v, np.nan) for key, v in loc.items()})
    return per_map


def score_model(model: nn.Module, maps, labels: np.ndarray, spec: InputSpec, masks: np.ndarray | None = None,
                settings: ScoreSettings | None = None) -> dict:
    """Score every CAM method on ``maps`` (uint8 (N,S,S)); ``labels`` index ``spec.class_names`` (-1 = none).

    Each map's CAM explains the predicted class; deletion/insertion track that class's probability and are
    compared with a random die order (paired bootstrap interval of the difference, overall and per class).
    Localisation (pointing game, IoU, mass inside) uses ``masks`` and only the correctly classified maps.
    """
    s = settings or ScoreSettings()
    names = parse_methods(s.methods)
    t = as_maps(maps, spec.image_size, spec.resize)
    masks = None if masks is None else as_maps(masks, spec.image_size, spec.resize, mask=True).numpy()
    labels = np.asarray(labels, dtype=np.int64)
    res = compute_cams(model, t, spec, names, batch_size=s.batch_size, device=s.device, progress=s.progress)
    preds = res.targets
    groups = np.array([spec.class_names[k] if k >= 0 else UNLABELED for k in labels], dtype=object)
    order = [*spec.class_names, UNLABELED]
    correct = (preds == labels) & (labels >= 0)
    out: dict = {"n_maps": len(t), "accuracy": float(correct.sum() / max(1, (labels >= 0).sum())),
                 "cam_layer_hw": list(res.feature_hw), "notes": res.notes, "methods": {}}
    random = faithfulness(model, t, None, preds, spec, steps=s.steps, batch_size=s.batch_size,
                          device=s.device, seed=s.seed)
    out["random_order"] = aggregate(random, groups, order)
    for name in names:
        per_map = _method_scores(model, t, res.cams[name], preds, spec, masks, correct, s)
        block = aggregate(per_map, groups, order)
        parts = [("overall", np.ones(len(t), bool))] + [(c, groups == c) for c in block["per_class"]]
        for key in ("deletion_auc", "insertion_auc"):
            diff = {g: paired_difference(per_map[key][sel], random[key][sel], s.bootstrap, s.seed)
                    for g, sel in parts}
            block[f"{key}_vs_random"] = diff
        out["methods"][name] = block
    return out
