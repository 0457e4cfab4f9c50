"""Synthetic wafer maps of all 9 WM-811K classes (and MixedWM38-style mixtures) with true pattern masks.

Each map is drawn on a realistic die grid (circle or slight ellipse filling the grid, optional flat or notch),
with a clustered random background of failed dies and one geometric pattern whose region is recorded as the
map's mask. Grid sizes follow a WM-811K-like distribution (many small grids) drawn independently of the
class, so the class cannot be read from the map shape. Parameter ranges were tuned against the real samples
in ``shared/data`` (see ``waferlab.data.calibrate`` and ``benchmarks/synth_calibration.py``).

The module-level ``*_P`` / ``*_MAX`` / ``*_MIN`` constants are the domain-randomisation knobs added for
synthetic-to-real transfer (issue 14): thin, whole Edge-Ring rings (real median depth 1.0 die), thinner
Edge-Loc arcs, scratches that often start at the rim or run along a die row / column (some short and
solid, most nearly unbroken), solid / lobed / near-rim Loc blobs (often 2-3, some tiny), and background
artefacts of every class (edge die loss, tiny clusters, probe-card sites). They only act on
WM-811K-style maps; MixedWM38-style maps keep their own calibration. All draws come from the one seeded
generator, so the same seed still gives identical maps.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waferlab.data.table import MIXED38_TYPES, WM811K_CLASSES, WaferTable
from waferlab.errors import WaferlabError

#: Side of a MixedWM38 map.
MIXED_SIZE = 52
#: Types that MixedWM38 combines into mixtures (Near-full and Random only occur alone).
MIXABLE_TYPES: tuple[str, ...] = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Scratch")
#: Wafers per synthetic lot, as in WM-811K.
LOT_SIZE = 25
#: Fraction of maps tagged "Training" (the rest "Test").
TRAIN_FRACTION = 0.8

# Domain-randomisation knobs (probability per map), tuned against the real samples (issue 14).
#: Edge-Ring: the ring is the outermost die ring only (else 2-3 dies deep).
RING_THIN_P = 0.9
#: Edge-Ring: the ring is thicker on one side.
RING_ECCENTRIC_P = 0.25
#: Edge-Ring: the ring covers only 200-330 degrees (real rings: a quarter cover < 70% of the rim sectors).
RING_PARTIAL_P = 0.25
#: Edge-Ring: a sparse ring (80-95% of its dies fail; real outermost-two-ring failure rate 0.65, not 0.75).
RING_SPARSE_P = 0.15
#: Edge-Loc: widest half-angle of an arc, degrees (real arcs cover ~0.29 of the outermost ring, not 0.15).
EDGE_LOC_HALF_MAX = 85.0
#: Edge-Loc: a solid blob on the rim instead of an arc, and its largest radius (real rim blobs reach ~0.4 of
#: the wafer radius and were called Loc; real Edge-Loc solidity 0.69, not 0.51). 0.25 (arcs nearer the real
#: ring_coverage 0.29) lost on the calibration part: macro-F1 0.773 vs 0.803, 9 real Edge-Loc called none.
EDGE_LOC_BLOB_P = 0.4
EDGE_LOC_BLOB_MAX = 0.4
#: Edge-Loc: a short deep arc (6-18 degrees, 2-3.5 dies deep) instead of a long one: small real Edge-Loc
#: clusters in noisy wafers were called none (edge die loss is 1 die deep).
EDGE_LOC_SMALL_P = 0.25
#: Loc: a blob close to (not on) the rim (real Loc profiles peak at radius 0.35, not 0.65).
LOC_NEAR_RIM_P = 0.1
#: Loc: smallest centre radius of a blob (real Loc blobs sit as close as ~0.12 to the centre and were
#: called Center; Center blobs stay within ~0.1).
LOC_R_MIN = 0.12
#: Loc: largest relative amplitude of the lobed outline.
LOC_LOBE_MAX = 0.3
#: Loc: a tiny blob, 1.5-3 dies in radius (real Loc misses: 4-15-die clusters in noisy small wafers were
#: called Scratch; 0.2 made the largest component too small, 25 dies against the real median 40).
LOC_TINY_P = 0.1
#: Loc: chance of 1 / 2 / 3 blobs (real Loc: median 2 dense clusters, n_clusters; 0.7 / 0.22 / 0.08 gave 1).
LOC_N_BLOBS_P = (0.6, 0.27, 0.13)
#: Loc: lowest failure probability inside a blob (real Loc clusters are dense: cluster_fill 0.78; 0.75 gave
#: 0.71, and loose 35-70% blobs 0.65).
LOC_P_MIN = 0.85
#: Scratch: starts at the rim.
SCRATCH_FROM_RIM_P = 0.4
#: Scratch: a clearly curved arc (real scratches are straighter: straightness 0.975, elongation 0.16).
SCRATCH_ARC_P = 0.05
#: Scratch: runs along the rim (a chord or an arc following the rim, 0.65-0.9 of the radius out): most real
#: scratches the model missed sat there, while the generator aimed every scratch at the middle.
SCRATCH_ALONG_RIM_P = 0.3
#: Scratch: a polyline with 1-3 kinks; std of the gentle curvature (x 1/R). Real scratches are straight
#: (straightness 0.975, elongation 0.16; 0.45 / 0.6 gave 0.948 / 0.25 and looked like streaky Loc blobs).
SCRATCH_KINK_P = 0.15
SCRATCH_CURV_SD = 0.25
#: Scratch: a short solid straight segment, 0.3-0.7 R long (real scratches missed as none were short
#: unbroken 1-die lines, 6-12 dies, in noisy wafers). Ordinary scratches stay 0.4-1.6 R long although their
#: longest straight run (0.30 of the diameter at matched sizes) exceeds the real 0.23: 0.4-1.1 R, with 10 % of
#: Donuts drawn as thin 1-2-die circles, lost on the calibration part over three 20,000-map seeds (macro-F1
#: 0.799 against 0.809, with TTA 0.817 against 0.821): real Loc maps went to Scratch and Donut (Loc recall
#: 0.44-0.52), round 10.
SCRATCH_SHORT_P = 0.3
#: Scratch: runs along a die row or column, straight (real scratches: 5 of 12 within 5 degrees of the grid,
#: line_axis_dev median 12; random headings put 9% there, median 24).
SCRATCH_AXIS_P = 0.35
#: Scratch: dash length range (x R) between gaps (real longest unbroken piece ~0.31 of the diameter).
SCRATCH_DASH = (0.2, 0.6)
#: Scratch: largest fraction of missing dashes; lowest failure probability of a drawn die. Real scratches are
#: broken but mostly filled: the longest straight run is 0.92 failed (line_run_fill); 0.35 / 0.7 gave 0.80.
SCRATCH_GAP_MAX = 0.15
SCRATCH_P_MIN = 0.85
#: Background: short runs of failed dies along the rim (edge die loss), tiny clusters, probe-card artefacts.
#: (EDGE_LOSS_P 0.85 matched the real none maps' rim clusters better but sent real Edge-Loc maps to none.)
EDGE_LOSS_P = 0.5
#: Random: failure-rate range, and the chance of strongly uneven density (real Random maps are denser and
#: patchy: failed fraction 0.51, largest cluster 0.43 of the dies; patchy ones were called Donut or Loc).
RANDOM_RATE = (0.2, 0.65)
RANDOM_PATCHY_P = 0.4
SPECKLE_P = 0.25
#: Background: gamma shape of the 6x6 coarse density field (higher: more even; real none maps' failed dies
#: are mostly isolated, 0.60 of them without a failed neighbour).
BG_PATCH_SHAPE = 10.0
PROBE_ARTEFACT_P = 0.08

# Common real WM-811K grid shapes (from the shared samples) and how often they are drawn (relative).
_COMMON_SHAPES: tuple[tuple[int, int, float], ...] = (
    (25, 27, 12.0), (38, 36, 8.0), (53, 52, 5.0), (63, 62, 5.0), (39, 31, 4.0), (39, 37, 4.0),
    (26, 26, 3.0), (33, 33, 3.0), (33, 29, 3.0), (43, 42, 3.0), (46, 46, 2.0), (31, 31, 2.0),
    (35, 31, 2.0), (44, 41, 2.0), (53, 58, 4.0), (45, 48, 2.0), (27, 25, 2.0), (41, 42, 2.0),
)
_COMMON_P = np.array([s[2] for s in _COMMON_SHAPES]) / sum(s[2] for s in _COMMON_SHAPES)


def mixed_class_names() -> tuple[str, ...]:
    """The 38 MixedWM38 classes: ``none``, 8 singles, then 13/12/4 mixtures of 2/3/4 types ("+"-joined)."""
    names = ["none", *MIXED38_TYPES]
    for k in (2, 3, 4):
        for combo in itertools.combinations(MIXABLE_TYPES, k):
            s = set(combo)
            if {"Center", "Donut"} <= s or {"Edge-Loc", "Edge-Ring"} <= s:
                continue  # these never co-occur in MixedWM38
            names.append(_join(combo))
    return tuple(names)


def _join(types) -> str:
    order = {t: i for i, t in enumerate(MIXED38_TYPES)}
    return "+".join(sorted(types, key=order.__getitem__))


# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Geometry:
    """Precomputed coordinates of one wafer outline on an H x W die grid."""

    inside: np.ndarray  # bool (H,W): die present
    u: np.ndarray  # float32 (H,W): column offset from the centre, 1 at the rim
    v: np.ndarray  # float32 (H,W): row offset from the centre, 1 at the rim
    r: np.ndarray  # float32 (H,W): normalised radius
    theta: np.ndarray  # float32 (H,W): polar angle in radians (-pi..pi)
    edge: np.ndarray  # float32 (H,W): distance in dies to the nearest no-die cell (1 for the outermost dies)
    rim: np.ndarray  # float32 (H,W): exp((1 - edge) / 0.6), the shape of the background's rise at the rim
    radius: float  # wafer radius in dies (mean of the two half-axes)
    coarse_i: np.ndarray  # int (H,1): row index into a 6x6 coarse noise grid
    coarse_j: np.ndarray  # int (1,W)


_GEOM_CACHE: dict[tuple[int, int, int], _Geometry] = {}
_N_VARIANTS = 10


def _geometry(h: int, w: int, variant: int) -> _Geometry:
    """Outline ``variant`` (0-3 round with slightly different rims, 4-7 a flat side, 8-9 a notch), cached."""
    key = (h, w, variant)
    geom = _GEOM_CACHE.get(key)
    if geom is not None:
        return geom
    from scipy.ndimage import distance_transform_edt

    ii, jj = np.mgrid[0:h, 0:w].astype(np.float32)
    v = (ii - (h - 1) / 2) / (h / 2)
    u = (jj - (w - 1) / 2) / (w / 2)
    r = np.sqrt(u * u + v * v)
    thr = (1.0, 0.985, 1.015, 0.97)[variant % 4]
    inside = r * r <= thr
    if 4 <= variant < 8:  # a flat: chop the outermost ~1-2 rows/columns on one side
        depth = 0.94 if min(h, w) < 40 else 0.955
        side = (v, -v, u, -u)[variant - 4]
        inside &= side <= depth
    elif variant >= 8:  # a notch: a small wedge at the bottom or the right
        ang = np.arctan2(v, u)
        centre = np.pi / 2 if variant == 8 else 0.0
        d_ang = np.abs(np.angle(np.exp(1j * (ang - centre))))
        inside &= ~((r > 0.9) & (d_ang < 1.6 / max(h, w) * 2))
    edge = distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1].astype(np.float32)
    geom = _Geometry(inside=inside, u=u, v=v, r=r, theta=np.arctan2(v, u).astype(np.float32), edge=edge,
                     rim=np.exp((1.0 - edge) / 0.6).astype(np.float32),
                     radius=(h + w) / 4.0, coarse_i=(np.arange(h) * 6 // h)[:, None],
                     coarse_j=(np.arange(w) * 6 // w)[None, :])
    if len(_GEOM_CACHE) > 4096:  # bound memory for very many distinct shapes
        _GEOM_CACHE.clear()
    _GEOM_CACHE[key] = geom
    return geom


def _draw_shape(rng: np.random.Generator) -> tuple[int, int]:
    """A die-grid shape from a WM-811K-like distribution: common real shapes, else mostly small sides."""
    if rng.random() < 0.5:
        h, w, _ = _COMMON_SHAPES[rng.choice(len(_COMMON_SHAPES), p=_COMMON_P)]
        return (h, w) if rng.random() < 0.8 else (w, h)
    # mostly small sides, a tail of large grids (real maps reach ~110x150) and some elongated ones
    side = 25.0 + 75.0 * rng.beta(1.0, 2.5) if rng.random() < 0.9 else rng.uniform(70.0, 150.0)
    aspect = np.exp(rng.normal(0.0, 0.07)) if rng.random() < 0.9 else rng.uniform(0.5, 0.85)
    h = int(round(side * np.sqrt(aspect)))
    w = int(round(side / np.sqrt(aspect)))
    if rng.random() < 0.5:
        h, w = w, h
    return max(h, 22), max(w, 22)


# ------------------------------------------------------------------------------------------- patterns
# Each pattern function returns (fail probability field P (H,W) float32, region mask bool (H,W)).


def _logistic(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # the logistic function, without overflow


def _ang_dist(theta: np.ndarray, centre: float) -> np.ndarray:
    """Absolute angular distance (radians, 0..pi) between ``theta`` and ``centre``."""
    d = np.abs(theta - centre) % (2 * np.pi)
    return np.minimum(d, 2 * np.pi - d)


def _center(g: _Geometry, rng: np.random.Generator, mixed: bool) -> tuple[np.ndarray, np.ndarray]:
    cu, cv = rng.normal(0.0, 0.04, 2)
    rc = rng.uniform(0.13, 0.3) if mixed else rng.uniform(0.12, 0.42)
    ell = np.exp(rng.normal(0.0, 0.12))
    d = np.sqrt(((g.u - cu) * ell) ** 2 + ((g.v - cv) / ell) ** 2)
    soft = rng.uniform(0.01, 0.03) if mixed else rng.uniform(0.015, 0.09)
    p_in = rng.uniform(0.9, 1.0) if mixed else rng.uniform(0.65, 1.0)
    prob = p_in * _logistic((rc - d) / soft)
    return prob, d <= rc


def _donut(g: _Geometry, rng: np.random.Generator, mixed: bool) -> tuple[np.ndarray, np.ndarray]:
    cu, cv = np.clip(rng.normal(0.0, 0.025, 2), -0.05, 0.05)
    r_in = rng.uniform(0.12, 0.3) if mixed else rng.uniform(0.15, 0.5)
    r_out = min(r_in + (rng.uniform(0.12, 0.3) if mixed else rng.uniform(0.12, 0.4)), 0.9)
    ell = np.exp(rng.normal(0.0, 0.08))
    d = np.sqrt(((g.u - cu) * ell) ** 2 + ((g.v - cv) / ell) ** 2)
    soft = rng.uniform(0.01, 0.04)
    p_in = rng.uniform(0.8, 1.0) if mixed else rng.uniform(0.65, 0.98)
    prob = p_in * _logistic((d - r_in) / soft) * _logistic((r_out - d) / soft)
    region = (d >= r_in) & (d <= r_out)
    if rng.random() < (0.2 if mixed else 0.45):  # a partial ring (open "C"), at least 200 degrees
        half_gap = np.deg2rad(rng.uniform(20.0, 80.0))
        gap = _ang_dist(np.arctan2(g.v - cv, g.u - cu), rng.uniform(-np.pi, np.pi)) < half_gap
        prob = np.where(gap, 0.0, prob)
        region &= ~gap
    return prob, region


def _edge_ring(g: _Geometry, rng: np.random.Generator, mixed: bool) -> tuple[np.ndarray, np.ndarray]:
    if mixed:
        return _edge_ring_mixed(g, rng)
    # real rings are mostly the outermost die ring alone (median depth 1.0 die); some 2-3 dies deep
    if rng.random() < RING_THIN_P:  # edge distance 1 or sqrt(2): the 8-connected outermost ring
        width = rng.uniform(1.42, 1.95)
    else:
        width = 2.0 + min(rng.exponential(0.5), 1.5) + 0.01 * g.radius * rng.random()
    phase = rng.uniform(-np.pi, np.pi)
    if rng.random() < RING_ECCENTRIC_P:  # off-centre process: the ring is thicker on one side
        width = width + rng.uniform(0.5, 2.0) * 0.5 * (1.0 + np.cos(g.theta - phase))
    # real rings are one 8-connected component: a 1-die ring breaks at any surviving die, so ~all fail
    p_in = rng.uniform(0.8, 0.95) if rng.random() < RING_SPARSE_P else rng.uniform(0.97, 1.0)
    region = g.inside & (g.edge <= width)
    modulation = rng.uniform(0.0, 0.05)  # failure density varying slowly around the ring
    prob = p_in * (1.0 - modulation * 0.5 * (1.0 + np.cos(g.theta - phase - np.pi)))
    if rng.random() < RING_PARTIAL_P:  # partial coverage: 200-330 degrees
        gap = _ang_dist(g.theta, rng.uniform(-np.pi, np.pi)) < np.deg2rad(rng.uniform(15.0, 80.0))
        region &= ~gap
    prob = np.where(region, prob, 0.0)
    return prob, region


def _edge_ring_mixed(g: _Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A MixedWM38-style ring: 1-4 dies deep, nearly uniform, sometimes 240-340 degrees."""
    width = 1.2 + min(rng.exponential(0.5), 2.0) + 0.015 * g.radius * rng.random()
    p_in = rng.uniform(0.9, 1.0)
    region = g.inside & (g.edge <= width)
    modulation = rng.uniform(0.0, 0.15)
    phase = rng.uniform(-np.pi, np.pi)
    prob = p_in * (1.0 - modulation * 0.5 * (1.0 + np.cos(g.theta - phase)))
    if rng.random() < 0.12:
        gap = _ang_dist(g.theta, rng.uniform(-np.pi, np.pi)) < np.deg2rad(rng.uniform(10.0, 60.0))
        region &= ~gap
    return np.where(region, prob, 0.0), region


def _edge_loc(g: _Geometry, rng: np.random.Generator, mixed: bool) -> tuple[np.ndarray, np.ndarray]:
    centre = rng.uniform(-np.pi, np.pi)
    p_in = rng.uniform(0.75, 1.0)
    if rng.random() < (0.7 if mixed else 1.0 - EDGE_LOC_BLOB_P):  # an arc along the rim, a few dies deep
        if mixed:
            depth = 1.0 + rng.exponential(1.0) + rng.uniform(0.0, 0.1) * g.radius
        else:  # real Edge-Loc arcs are ~1.4 dies deep
            depth = 1.0 + rng.exponential(0.6) + rng.uniform(0.0, 0.06) * g.radius
        half = np.deg2rad(rng.uniform(18.0, 60.0 if mixed else EDGE_LOC_HALF_MAX))
        if not mixed and rng.random() < EDGE_LOC_SMALL_P:
            depth, half = rng.uniform(2.0, 3.5), np.deg2rad(rng.uniform(6.0, 18.0))
        dang = _ang_dist(g.theta, centre)
        region = g.inside & (g.edge <= depth) & (dang <= half)
        prob = p_in * _logistic((half - dang) / 0.06) * _logistic((depth + 0.5 - g.edge) / 0.5)
    else:  # a blob centred on the rim
        rad = rng.uniform(0.1, 0.25 if mixed else EDGE_LOC_BLOB_MAX)
        rc = rng.uniform(0.9, 1.0 + 0.4 * rad)
        d = np.sqrt((g.u - rc * np.cos(centre)) ** 2 + (g.v - rc * np.sin(centre)) ** 2)
        region = g.inside & (d <= rad)
        if not region.any():  # a tiny blob that missed the rim dies: take the dies nearest to its centre
            region = g.inside & (d <= d[g.inside].min() + 0.05)
        prob = p_in * _logistic((rad - d) / rng.uniform(0.015, 0.05))
    return np.where(g.inside, prob, 0.0), region


def _loc(g: _Geometry, rng: np.random.Generator, mixed: bool) -> tuple[np.ndarray, np.ndarray]:
    n_blobs = 1 if mixed else int(rng.choice([1, 2, 3], p=LOC_N_BLOBS_P))
    keep = np.ones_like(g.r)
    region = np.zeros(g.r.shape, bool)
    for _ in range(n_blobs):
        rad = rng.uniform(0.09, 0.26) if n_blobs == 1 else rng.uniform(0.06, 0.16)
        if not mixed and rng.random() < LOC_TINY_P:
            rad = rng.uniform(1.5, 3.0) / g.radius
        if not mixed and rng.random() < LOC_NEAR_RIM_P:  # near (not on) the rim, as real Loc often is
            rc = rng.uniform(max(0.25, 0.9 - rad), max(0.3, 0.98 - 0.6 * rad))
        else:
            rc = rng.uniform(0.18 if mixed else LOC_R_MIN, max(0.25, 0.92 - rad))
        ang = rng.uniform(-np.pi, np.pi)
        rot = rng.uniform(-np.pi, np.pi)
        ell = np.exp(rng.normal(0.0, 0.45 if not mixed else 0.3))  # some streaky, elongated blobs
        du, dv = g.u - rc * np.cos(ang), g.v - rc * np.sin(ang)
        a = (du * np.cos(rot) + dv * np.sin(rot)) * ell
        b = (-du * np.sin(rot) + dv * np.cos(rot)) / ell
        d = np.sqrt(a * a + b * b)
        if not mixed:  # an irregular outline: 2-4 lobes
            d = d * (1.0 + rng.uniform(0.0, LOC_LOBE_MAX) * np.cos(rng.integers(2, 5) * np.arctan2(b, a)
                                                                + rng.uniform(-np.pi, np.pi)))
        p_in = rng.uniform(0.6, 0.98) if mixed else rng.uniform(LOC_P_MIN, 1.0)  # real blobs are solid
        keep *= 1.0 - p_in * _logistic((rad - d) / rng.uniform(0.01, 0.04))
        region |= d <= rad
    return 1.0 - keep, region & g.inside


def _scratch(g: _Geometry, rng: np.random.Generator, mixed: bool) -> tuple[np.ndarray, np.ndarray]:
    h, w = g.r.shape
    rad = g.radius
    length = rng.uniform(0.8, 2.0) * rad if mixed else rng.uniform(0.4, 1.6) * rad
    short = not mixed and rng.random() < SCRATCH_SHORT_P
    if short:
        length = rng.uniform(0.3, 0.7) * rad
    step = 0.35
    t = np.arange(0.0, length, step)
    # start anywhere well inside (or, often in real maps, at the rim), heading roughly across the wafer
    r0, a0 = 0.75 * np.sqrt(rng.random()), rng.uniform(-np.pi, np.pi)
    if not mixed and rng.random() < SCRATCH_FROM_RIM_P:
        r0 = rng.uniform(0.8, 0.95)
    # head towards a point in the middle part so the line crosses the wafer instead of hugging its rim
    r1, a1 = 0.5 * np.sqrt(rng.random()), rng.uniform(-np.pi, np.pi)
    heading0 = np.arctan2((r1 * np.sin(a1) - r0 * np.sin(a0)) * h, (r1 * np.cos(a1) - r0 * np.cos(a0)) * w)
    heading0 += rng.normal(0.0, 0.35)
    curv = rng.normal(0.0, 0.6 if mixed else SCRATCH_CURV_SD) / rad  # gentle (radius of curvature > 1.5 R)
    if not mixed and rng.random() < SCRATCH_ARC_P:  # a clearly curved arc (radius of curvature ~ R)
        curv = rng.choice([-1.0, 1.0]) * rng.uniform(0.7, 1.4) / rad
    if not mixed and rng.random() < SCRATCH_ALONG_RIM_P:  # along the rim: tangential, straight or bent
        r0, turn = rng.uniform(0.65, 0.9), rng.choice([-1.0, 1.0])
        heading0 = np.arctan2(r0 * np.cos(a0) * h * turn, -r0 * np.sin(a0) * w * turn)
        curv = turn * rng.uniform(0.0, 1.0) / (r0 * rad)  # 1 / (r0 R): bends with the rim
    axis = not mixed and rng.random() < SCRATCH_AXIS_P
    if axis:  # along a die row or column, straight
        heading0, curv = np.round(heading0 / (np.pi / 2)) * (np.pi / 2), 0.0
    heading = heading0 + curv * t
    if not axis and rng.random() < (0.45 if mixed else SCRATCH_KINK_P):  # a polyline: 1-3 kinks, 10-40 deg
        kinks = np.sort(rng.uniform(0.15, 0.85, rng.integers(1, 4))) * length
        bends = np.deg2rad(rng.uniform(10.0, 40.0, len(kinks))) * rng.choice([-1.0, 1.0])
        heading = heading + np.concatenate([[0.0], np.cumsum(bends)])[np.searchsorted(kinks, t)]
    dx = np.concatenate([[0.0], np.cumsum(np.cos(heading[:-1]))]) * step
    dy = np.concatenate([[0.0], np.cumsum(np.sin(heading[:-1]))]) * step
    x = (w - 1) / 2 + r0 * np.cos(a0) * w / 2 + dx
    y = (h - 1) / 2 + r0 * np.sin(a0) * h / 2 + dy
    ii, jj = np.rint(y).astype(np.int64), np.rint(x).astype(np.int64)
    # gaps: drop some chunks of the line (drawn with low probability, still part of the region)
    # real scratches are broken into dashes and dots: short chunks, up to ~half of them missing
    chunk_len = max(rad * 0.15, 2.0) if mixed else max(rad * rng.uniform(*SCRATCH_DASH), 2.0)
    chunk = np.minimum((t / chunk_len).astype(np.int64), 10_000)
    solid = rng.random(chunk.max() + 1) > rng.uniform(0.0, 0.1 if mixed else SCRATCH_GAP_MAX)
    if short:
        solid[:] = True
    region = np.zeros((h, w), bool)
    drawn = np.zeros((h, w), bool)
    thick = rng.random() < ((0.3 if rad > 18 else 0.1) if mixed else (0.12 if rad > 18 else 0.04))
    offsets = [(0, 0)] + ([(1, 0), (0, 1)] if thick else [])
    for di, dj in offsets:
        a, b = ii + di, jj + dj
        ok = (a >= 0) & (a < h) & (b >= 0) & (b < w)
        region[a[ok], b[ok]] = True
        drawn[a[ok & solid[chunk]], b[ok & solid[chunk]]] = True
    region &= g.inside
    p_in = rng.uniform(0.85, 1.0) if mixed else rng.uniform(SCRATCH_P_MIN, 1.0)  # faint scratches too
    if short:
        p_in = rng.uniform(0.9, 1.0)
    return np.where(drawn & region, p_in, 0.0), region


_PATTERNS = {
    "Center": _center, "Donut": _donut, "Edge-Loc": _edge_loc, "Edge-Ring": _edge_ring,
    "Loc": _loc, "Scratch": _scratch,
}


def _background_rate(g: _Geometry, rng: np.random.Generator, mixed: bool) -> float:
    """Per-map background failure rate: log-normal, higher on small (few-die) wafers as in WM-811K."""
    if mixed:
        return float(np.clip(np.exp(rng.normal(np.log(0.08), 0.5)), 0.005, 0.3))
    # interior rate: median about 12% at radius 13 dies, 5% at 26, 2% at 50 (fitted to the real samples)
    median = 0.105 * (13.0 / max(g.radius, 11.0)) ** 1.3
    return float(np.clip(np.exp(rng.normal(np.log(median), 0.5)), 0.001, 0.3))


def _background_artefacts(g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    """Extra background failure probability seen on real maps of every class (and on ``none``).

    Short runs of failed dies on the outermost ring (edge die loss, 2-5 dies each), a few tiny clusters
    (2-6 dies) and, rarely, a faint periodic probe-card pattern (every k-th row/column site).
    """
    extra = np.zeros(g.r.shape, np.float32)
    if rng.random() < EDGE_LOSS_P:
        for _ in range(int(rng.integers(1, 5))):
            half = rng.uniform(1.0, 2.5) / max(g.radius, 1.0)
            run = (_ang_dist(g.theta, rng.uniform(-np.pi, np.pi)) < half) & (g.edge <= 1.0)
            extra = np.maximum(extra, np.where(run, rng.uniform(0.5, 0.95), 0.0))
    if rng.random() < SPECKLE_P:
        for _ in range(int(rng.integers(1, 4))):
            cu, cv = rng.uniform(-0.8, 0.8, 2)
            d = np.sqrt((g.u - cu) ** 2 + (g.v - cv) ** 2) * g.radius
            extra = np.maximum(extra, np.where(d <= rng.uniform(0.7, 1.2), rng.uniform(0.5, 0.9), 0.0))
    if rng.random() < PROBE_ARTEFACT_P:
        (h, w), (pi, pj) = g.r.shape, rng.integers(2, 5, 2)
        rows, cols = np.arange(h)[:, None] % pi, np.arange(w)[None, :] % pj
        site = (rows == rng.integers(pi)) & (cols == rng.integers(pj))
        extra = np.maximum(extra, np.where(site, rng.uniform(0.05, 0.2), 0.0))
    return np.where(g.inside, extra, 0.0).astype(np.float32)


def _one_map(types: tuple[str, ...], rng: np.random.Generator, mixed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Draw one map with the pattern ``types`` (empty = none); returns (map uint8, mask uint8)."""
    if mixed:
        g = _geometry(MIXED_SIZE, MIXED_SIZE, 0)
    else:
        h, w = _draw_shape(rng)
        g = _geometry(h, w, int(rng.integers(_N_VARIANTS)))
    shape = g.r.shape
    p_bg = _background_rate(g, rng, mixed)
    shape_k = 4.0 if mixed else BG_PATCH_SHAPE
    coarse = rng.gamma(shape_k, 1.0 / shape_k, (6, 6)).astype(np.float32)  # clustered background, mean 1
    # dies at the rim fail more often: the outermost ring about 2-5x the interior rate, as in WM-811K
    rim = 1.0 + np.float32(np.exp(rng.normal(np.log(1.0 if mixed else 2.5), 0.5))) * g.rim
    keep = 1.0 - np.minimum(p_bg * coarse[g.coarse_i, g.coarse_j] * rim, 0.3)  # background never a pattern
    if not mixed:
        keep = keep * (1.0 - _background_artefacts(g, rng))
    region = np.zeros(shape, bool)
    for t in types:
        if t in _PATTERNS:
            prob, reg = _PATTERNS[t](g, rng, mixed)
        elif t == "Random":
            lo, hi = (0.2, 0.5) if mixed else RANDOM_RATE
            prob = np.full(shape, rng.uniform(lo, hi), np.float32)
            if not mixed and rng.random() < RANDOM_PATCHY_P:  # strongly uneven: dense and sparse patches
                prob = np.minimum(prob * (0.35 + 1.3 * rng.random((6, 6)).astype(np.float32)
                                          [g.coarse_i, g.coarse_j]), 0.95)
            elif rng.random() < 0.5:  # mild large-scale density variation
                prob = prob * (0.7 + 0.6 * rng.random((6, 6)).astype(np.float32)[g.coarse_i, g.coarse_j])
            reg = g.inside
        elif t == "Near-full":
            prob = rng.uniform(0.84, 1.0) - rng.uniform(0.0, 0.12) * g.r  # slightly worse at the centre
            if rng.random() < 0.3:  # a thin band of surviving dies at the rim
                prob = np.where(g.edge <= rng.uniform(1.0, 2.5), prob * rng.uniform(0.2, 0.7), prob)
            reg = g.inside
        else:  # pragma: no cover - names are validated before drawing
            raise WaferlabError(f"unknown pattern type {t!r}")
        keep = keep * (1.0 - prob)
        region |= reg
    failed = rng.random(shape, dtype=np.float32) >= keep
    wafer = g.inside.astype(np.uint8)
    wafer[failed & g.inside] = 2
    mask = (region & g.inside).astype(np.uint8)
    if not mixed and rng.random() < 0.03:  # a few dies missing inside the wafer (about 2% of real maps)
        rows, cols = np.nonzero(g.edge > 2)
        if len(rows):
            k = int(rng.integers(len(rows)))
            dash = int(rng.integers(1, 5))
            wafer[rows[k], cols[k]:cols[k] + dash] = 0
            mask[rows[k], cols[k]:cols[k] + dash] = 0
    return wafer, mask


# --------------------------------------------------------------------------------------------- public


def _resolve_classes(classes, mixed: bool) -> list[str]:
    """Validate and canonicalise a class list (case-insensitive; mixtures in any order) or raise."""
    allowed = mixed_class_names() if mixed else WM811K_CLASSES
    if classes is None:
        return list(allowed)
    if isinstance(classes, str):
        classes = [c for c in classes.split(",")]
    lookup = {c.lower(): c for c in allowed}
    out: list[str] = []
    for raw in classes:
        name = str(raw).strip()
        key = name.lower()
        if mixed and "+" in key:
            parts = [lookup.get(p.strip().lower()) for p in key.split("+")]
            key = _join(parts).lower() if None not in parts and len(set(parts)) == len(parts) else key
        if key not in lookup:
            kind = "MixedWM38" if mixed else "WM-811K"
            raise WaferlabError(f"unknown {kind} class {name!r}; expected one of: {', '.join(allowed)}")
        if lookup[key] not in out:
            out.append(lookup[key])
    if not out:
        raise WaferlabError("no classes given")
    return out


def generate(n: int, seed: int = 0, classes=None, mixed: bool = False, progress: bool = False) -> WaferTable:
    """Draw ``n`` labelled synthetic maps (equal counts per class, shuffled) with true pattern masks.

    ``classes`` limits the classes (default all 9, or all 38 MixedWM38 classes when ``mixed``); the same
    seed always yields identical maps. Mixed maps are 52x52 with ``multi_hot`` over ``MIXED38_TYPES``.
    ``progress`` shows a progress bar on stderr.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise WaferlabError(f"number of maps must be a positive integer, got {n!r}")
    names = _resolve_classes(classes, mixed)
    rng = np.random.default_rng(seed)
    k = len(names)
    counts = np.full(k, n // k)
    counts[rng.choice(k, n % k, replace=False)] += 1
    labels = np.repeat(np.array(names, dtype=object), counts)
    labels = labels[rng.permutation(n)]
    n_train = int(round(TRAIN_FRACTION * n))
    split = np.array(["Test"] * n, dtype=object)
    split[rng.permutation(n)[:n_train]] = "Training"

    type_index = {t: i for i, t in enumerate(MIXED38_TYPES)}
    maps: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    multi_hot = np.zeros((n, len(MIXED38_TYPES)), np.uint8) if mixed else None
    rows = labels
    if progress:
        from tqdm import tqdm

        rows = tqdm(labels, desc="synthesising", unit="map", leave=False)
    for i, label in enumerate(rows):
        types = () if label == "none" else tuple(label.split("+")) if mixed else (label,)
        wafer, mask = _one_map(types, rng, mixed)
        maps.append(wafer)
        masks.append(mask)
        if multi_hot is not None:
            for t in types:
                multi_hot[i, type_index[t]] = 1
    rows = np.arange(n)
    return WaferTable(
        maps=maps, labels=labels, split=split,
        lot=np.array([f"synlot{i // LOT_SIZE + 1}" for i in rows], dtype=object),
        wafer_index=rows % LOT_SIZE + 1,
        source=f"synthetic(seed={seed}{', mixed' if mixed else ''})",
        multi_hot=multi_hot, multi_label_names=MIXED38_TYPES if mixed else (), masks=masks,
    )


def write_synthetic(out: str | os.PathLike[str], n: int, seed: int = 0, mixed: bool = False,
                    classes=None) -> dict:
    """Generate maps and write them: ``.pkl`` LSWMD layout, ``.npz`` safe format (MixedWM38 layout if mixed).

    Returns a summary with ``n_maps``, ``class_counts``, ``split_counts``, ``out`` and ``format``.
    """
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in (".pkl", ".npz"):
        raise WaferlabError(f"{path}: output must end in .pkl (LSWMD layout) or .npz, "
                            f"got {suffix or 'no suffix'!r}")
    if mixed and suffix != ".npz":
        raise WaferlabError(f"{path}: mixed maps are written in the MixedWM38 layout, use a .npz output")
    table = generate(n, seed=seed, classes=classes, mixed=mixed, progress=n >= 5000)
    if mixed:
        from waferlab.io import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, arr_0=np.stack(table.maps).astype(np.uint8),
                                arr_1=table.multi_hot.astype(np.int32))
        fmt = "mixedwm38"
    elif suffix == ".pkl":
        from waferlab.data.lswmd import write_lswmd

        write_lswmd(table, path)
        fmt = "lswmd"
    else:
        from waferlab.data.readers import write_safe

        write_safe(table, path)
        fmt = "safe"
    return {
        "out": str(path), "format": fmt, "n_maps": len(table), "seed": seed, "mixed": mixed,
        "class_counts": dict(sorted(Counter(table.labels.tolist()).items())),
        "split_counts": table.split_counts(),
    }
