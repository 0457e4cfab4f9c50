"""Localisation of CAMs: against the true pattern region of synthetic maps (pointing game, IoU, mass
inside the region) and, with no mask at all, against the failed dies (fail-mass lift, for real maps).

Scores are computed on the wafer only: the mask and the thresholded CAM are both cut to the dies, and
each score comes with its chance level (what a CAM placed at random on the wafer would get).
"""

from __future__ import annotations

import numpy as np

from waferlab.explain.cam import as_maps, wafer_area

#: Default share of the wafer area kept by the top-k threshold.
DEFAULT_TOP_FRACTION = 0.15
#: Default absolute threshold on the [0, 1] CAM.
DEFAULT_THRESHOLD = 0.5
#: CAM values within this of the maximum count as the peak (ties of the pointing game).
_PEAK_TOL = 1e-6


def _iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    inter = (pred & truth).sum(axis=1)
    union = (pred | truth).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def localisation(
    cams: np.ndarray,
    masks: np.ndarray,
    maps,
    top_fraction: float = DEFAULT_TOP_FRACTION,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Per-map localisation scores (NaN where the map has no pattern region on the wafer).

    ``pointing_game``: 1 if the CAM's peak die lies in the mask (0 for a flat, all-zero CAM; a peak shared
    by several dies scores the share of them inside the mask);
    ``pointing_chance``: the mask's share of the wafer; ``iou_threshold``: IoU of {CAM >= threshold}
    with the mask; ``iou_top``: IoU of the top ``top_fraction`` of wafer dies by CAM with the mask;
    ``iou_top_chance``: the expected IoU of that many dies drawn at random; ``iou_k``: IoU of the top k
    wafer pixels by CAM with the mask, k = the mask's area (1 for a perfect CAM), ``iou_k_chance`` its
    chance level; ``mass_inside``: the CAM's share of its wafer mass inside the mask (chance: the mask's
    share of the wafer, ``pointing_chance``).
    """
    arr = as_maps(maps).numpy()
    n = len(arr)
    wafer = wafer_area(arr).reshape(n, -1)
    truth = (np.asarray(masks).reshape(n, -1) > 0) & wafer
    cam = np.where(wafer, np.asarray(cams, dtype=np.float32).reshape(n, -1), -1.0)
    area = wafer.sum(axis=1)
    m_area = truth.sum(axis=1)
    valid = (m_area > 0) & (area > 0)
    peak_val = cam.max(axis=1)
    # Every wafer pixel at the peak counts (a plateau, e.g. an upsampled coarse CAM or a binary one, would
    # otherwise be scored by whichever tied pixel comes first in raster order): the hit is the share of the
    # peak pixels inside the mask, i.e. the chance that the peak, ties broken at random, lies in the region.
    at_peak = wafer & (cam >= (peak_val - _PEAK_TOL)[:, None])
    hit = np.where(peak_val > 0, (at_peak & truth).sum(axis=1) / np.maximum(at_peak.sum(axis=1), 1), 0.0)
    chance = m_area / np.maximum(area, 1)

    pred_thr = (cam >= threshold) & wafer & (peak_val[:, None] > 0)
    k = np.maximum(1, np.rint(top_fraction * area)).astype(np.int64)
    order = np.argsort(-cam, axis=1, kind="stable")
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.arange(cam.shape[1])[None, :].repeat(n, 0), axis=1)
    pred_top = (pos < k[:, None]) & wafer & (cam > 0)
    exp_inter = k * chance
    top_chance = exp_inter / np.maximum(k + m_area - exp_inter, 1e-9)
    pred_k = (pos < np.maximum(m_area, 1)[:, None]) & wafer & (cam > 0)
    k_inter = m_area * chance
    k_chance = k_inter / np.maximum(2 * m_area - k_inter, 1e-9)
    heat = np.where(wafer, np.clip(cam, 0.0, None), 0.0)
    total = heat.sum(axis=1)
    inside = np.where(total > 0, (heat * truth).sum(axis=1) / np.maximum(total, 1e-12), np.nan)

    def masked(v: np.ndarray) -> np.ndarray:
        return np.where(valid, v.astype(np.float64), np.nan)

    return {
        "pointing_game": masked(hit),
        "pointing_chance": masked(chance),
        "iou_threshold": masked(np.nan_to_num(_iou(pred_thr, truth))),
        "iou_top": masked(np.nan_to_num(_iou(pred_top, truth))),
        "iou_top_chance": masked(top_chance),
        "iou_k": masked(np.nan_to_num(_iou(pred_k, truth))),
        "iou_k_chance": masked(k_chance),
        "mass_inside": masked(inside),
    }


def fail_mass_lift(cams: np.ndarray, maps) -> np.ndarray:
    """Per map: the CAM's share of its wafer mass on failed dies / the failed dies' share of the wafer.

    Needs no mask, so it scores real maps: 1 = no better than uniform heat, higher = heat on the failed
    dies. NaN where the map has no failed die or the CAM is zero on the whole wafer.
    """
    arr = as_maps(maps).numpy()
    n = len(arr)
    wafer = wafer_area(arr).reshape(n, -1)
    failed = (arr.reshape(n, -1) == 2) & wafer
    heat = np.where(wafer, np.clip(np.asarray(cams, dtype=np.float64).reshape(n, -1), 0.0, None), 0.0)
    total = heat.sum(axis=1)
    share = failed.sum(axis=1) / np.maximum(wafer.sum(axis=1), 1)
    on_failed = (heat * failed).sum(axis=1) / np.maximum(total, 1e-12)
    return np.where((total > 0) & (share > 0), on_failed / np.maximum(share, 1e-12), np.nan)
