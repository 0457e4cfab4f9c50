"""Classic wafer-map descriptors (the WM-811K paper's families: regional density, Radon, geometry), computed
on the model's input map: the ``wafer`` part of the ``knn+wafer`` unknown-pattern score (:mod:`.ood`).

A network trained without Scratches sees a held-out Scratch as ``none`` (a thin line weighs little against
random background fails); these 18 numbers see the line (Radon on the clustered fails) and the connected
component it forms. Connected components cannot be expressed as ONNX ops, so this part is numpy (scipy):
an exported file stores its statistics in the metadata and ``waferlab predict`` adds it (README "Deploy").

Speed (predict computes them for every map): what depends on the die mask alone (centroid, ring of every
pixel, dies per ring, the dies' Radon projection) is computed once per distinct mask of a chunk (maps of one
product share their outline), the per-map work touches the failed pixels only where it can, and the Radon
projections are one int16 sparse product per block of maps. One function per family below.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from waferlab.errors import WaferlabError

#: The descriptors' columns, in order: failed share of the wafer's dies; failed share in 7 rings of radius r
#: (distance to the die centroid over the wafer radius sqrt(dies / pi)); a Radon transform (24 angles) of the
#: clustered fails (failed dies with >= 2 failed 8-neighbours): their share of dies, the largest line excess
#: (binomial z of a projection bin), that minus its median over angles, the best line's failed share, best
#: minus orthogonal angle; the fails' connected components (8-connectivity): largest one's share of dies,
#: its centroid radius / R, its log elongation, the top 3's share of the fails, log(1 + count).
DESCRIPTOR_NAMES: tuple[str, ...] = (
    "fail_share", "ring_0.0", "ring_0.2", "ring_0.4", "ring_0.6", "ring_0.75", "ring_0.9", "ring_1.0",
    "clustered_share", "line_excess", "line_excess_over_median", "line_fail_share", "line_anisotropy",
    "comp_share", "comp_radius", "comp_elongation", "comp_top3_share", "comp_log_count")
#: Ring edges of the radial profile (r = radius / wafer radius; the last ring takes the edge dies beyond 1).
RING_EDGES = (0.0, 0.2, 0.4, 0.6, 0.75, 0.9, 1.0, np.inf)
RINGS = len(RING_EDGES) - 1
RADON_ANGLES = 24
#: A Radon bin counts only when it crosses at least this many dies (short chords are noise).
RADON_MIN_DIES = 5
#: Maps described at once (bounds the memory of the (maps, pixels) arrays; the masks are shared within one).
CHUNK = 1024
#: Maps projected and scored at once (their int16 pixel columns and bins stay in cache).
RADON_BLOCK = 128
#: Maps transposed at once into those columns (numpy transposes a whole block of bytes 3-4x slower).
TRANSPOSE_BLOCK = 8


@lru_cache(maxsize=8)
def radon_matrix(size: int) -> tuple[object, int]:
    """(sparse (bins, pixels) int16 0/1 matrix of the projection of each pixel at every angle, bins per
    angle): pixel (y, x) falls in bin round(x cos a + y sin a) of angle a, coordinates from the grid centre.
    The end bins of every angle stay empty (no pixel reaches them)."""
    from scipy import sparse

    c = (size - 1) / 2
    y, x = np.mgrid[:size, :size]
    y, x = (y - c).ravel(), (x - c).ravel()
    off = int(np.ceil(size * np.sqrt(2) / 2)) + 1
    nb = 2 * off + 1
    angles = np.arange(RADON_ANGLES) * np.pi / RADON_ANGLES
    rows = (np.arange(RADON_ANGLES)[:, None] * nb + np.round(
        np.cos(angles)[:, None] * x[None] + np.sin(angles)[:, None] * y[None]).astype(np.int64) + off).ravel()
    cols = np.tile(np.arange(size * size), RADON_ANGLES)
    mat = sparse.csr_matrix((np.ones(len(rows), np.int16), (rows, cols)),
                            shape=(RADON_ANGLES * nb, size * size))
    return mat, nb


def radon_project(images: np.ndarray) -> np.ndarray:
    """(bins, K) int16 Radon projections (:func:`radon_matrix`) of K bool images (K, S*S): exact counts.
    numpy only (no torch op: predict runs this in its reader thread beside the inference's OpenMP threads)."""
    k, pixels = images.shape
    mat, _ = radon_matrix(int(round(np.sqrt(pixels))))
    out = np.empty((mat.shape[0], k), np.int16)
    for s in range(0, k, RADON_BLOCK):
        block = images[s:s + RADON_BLOCK]
        cols = np.empty((pixels, len(block)), np.int16)  # the product wants pixel-major columns
        for t in range(0, len(block), TRANSPOSE_BLOCK):
            cols[:, t:t + TRANSPOSE_BLOCK] = block[t:t + TRANSPOSE_BLOCK].T
        out[:, s:s + len(block)] = mat @ cols
    return out


def wafer_descriptors(maps: np.ndarray) -> np.ndarray:
    """(N, 18) float32 descriptors (:data:`DESCRIPTOR_NAMES`) of uint8 maps (N, S, S) in {0, 1, 2}; a wafer
    without fails (or without dies) is all zeros."""
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        raise WaferlabError(f"wafer descriptors: expected square maps (N, S, S), got {maps.shape}")
    out = np.zeros((len(maps), len(DESCRIPTOR_NAMES)), np.float32)
    for s in range(0, len(maps), CHUNK):
        out[s:s + CHUNK] = _describe(maps[s:s + CHUNK])
    return out


def _describe(maps: np.ndarray) -> np.ndarray:
    fail = maps == 2
    outlines = Outlines.of(maps > 0)
    fails = FailedDies.of(fail)
    share = fails.count.astype(np.float32) / outlines.safe[outlines.inverse]
    return np.concatenate([share[:, None], _rings(outlines, fails, share), _clustered_radon(fail, outlines),
                           _components(fail, fails, outlines)], 1)


@dataclass
class Outlines:
    """The distinct die masks of a chunk of maps (maps of one product share one) and what depends on the
    mask alone, computed once per mask: geometry, ring of every pixel, dies per ring."""

    masks: np.ndarray  # (U, S*S) bool
    inverse: np.ndarray  # (N,) the mask of each map
    dies: np.ndarray  # (U,) float32 die count
    centre: tuple[np.ndarray, np.ndarray]  # (U,) float32 die centroid row, column
    ring: np.ndarray  # (U, S*S) int8 ring (:data:`RING_EDGES`) of each pixel
    ring_dies: np.ndarray  # (U, RINGS) dies per ring

    @classmethod
    def of(cls, die: np.ndarray) -> Outlines:
        """The distinct masks of ``die`` (N, S, S) bool (found by their packed bytes) and their statistics."""
        n, size, _ = die.shape
        packed = np.packbits(die.reshape(n, -1), axis=1)
        _, first, inverse = np.unique(packed.view(f"V{packed.shape[1]}").ravel(), return_index=True,
                                      return_inverse=True)
        masks = die.reshape(n, -1)[first]
        dies = np.count_nonzero(masks, axis=1).astype(np.float32)
        safe = np.maximum(dies, 1)
        m2, grid = masks.reshape(-1, size, size), np.arange(size)
        centre = (((np.count_nonzero(m2, axis=2) @ grid).astype(np.float32) / safe),
                  ((np.count_nonzero(m2, axis=1) @ grid).astype(np.float32) / safe))
        ring = _ring_of_pixels(size, centre, np.sqrt(safe / np.pi))
        in_ring = np.where(masks, ring, np.int8(RINGS))  # RINGS: no die
        ring_dies = np.stack([np.count_nonzero(in_ring == r, axis=1) for r in range(RINGS)], 1)
        return cls(masks, inverse.ravel(), dies, centre, ring, ring_dies)

    @property
    def safe(self) -> np.ndarray:
        """(U,) float32 max(dies, 1): the denominator of the shares."""
        return np.maximum(self.dies, 1)

    def geometry(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per map: (centroid row, centroid column, wafer radius sqrt(max(dies, 1) / pi)), float32."""
        return (self.centre[0][self.inverse], self.centre[1][self.inverse],
                np.sqrt(self.safe / np.pi)[self.inverse])


@dataclass
class FailedDies:
    """The failed pixels of a chunk of maps, in raster order (map by map)."""

    flat: np.ndarray  # (K,) index of each in the chunk's (N, S, S) arrays
    map: np.ndarray  # (K,) map of each
    pixel: np.ndarray  # (K,) flat pixel (y * S + x) of each
    count: np.ndarray  # (N,) failed dies per map

    @classmethod
    def of(cls, fail: np.ndarray) -> FailedDies:
        """The failed pixels of ``fail`` (N, S, S) bool."""
        n, size, _ = fail.shape
        flat, pixels = np.flatnonzero(fail), size * size
        m = flat // pixels
        return cls(flat, m, flat - m * pixels, np.bincount(m, minlength=n))


# ------------------------------------------------------------------------------------------------ rings
def _ring_of_pixels(size: int, centre: tuple[np.ndarray, np.ndarray], radius: np.ndarray) -> np.ndarray:
    """(U, S*S) int8 ring of :data:`RING_EDGES` of every pixel: the edges (squared) at or below r^2, the
    squared distance to the centroid over the squared radius (float32)."""
    grid = np.arange(size, dtype=np.float32)
    dy2 = (grid[None, :] - centre[0][:, None]) ** 2
    dx2 = (grid[None, :] - centre[1][:, None]) ** 2
    r2 = ((dy2[:, :, None] + dx2[:, None, :]) / (radius ** 2)[:, None, None]).reshape(len(radius), -1)
    ring = np.zeros(r2.shape, np.int8)
    for edge in RING_EDGES[1:-1]:
        ring += (r2 >= np.float32(edge) ** 2).view(np.int8)
    return ring


def _rings(outlines: Outlines, fails: FailedDies, share: np.ndarray) -> np.ndarray:
    """Failed share of each ring of :data:`RING_EDGES` (a ring without dies: the wafer's failed ``share``)."""
    n = len(outlines.inverse)
    ring = outlines.ring[outlines.inverse[fails.map], fails.pixel]
    f = np.bincount(fails.map * RINGS + ring, minlength=n * RINGS).reshape(n, RINGS).astype(np.float64)
    d = outlines.ring_dies[outlines.inverse].astype(np.float64)
    return np.where(d > 0, f / np.maximum(d, 1), share[:, None])


# ------------------------------------------------------------------------------------------------ Radon
def clustered_fails(maps: np.ndarray) -> np.ndarray:
    """(N, S, S) bool: failed dies with at least 2 failed 8-neighbours (a line or blob, not random noise)."""
    return _clustered(np.asarray(maps) == 2)


def _clustered(fail: np.ndarray) -> np.ndarray:
    """:func:`clustered_fails` of the failed dies ``fail`` (N, S, S) bool: 3x3 counts as two 1x3 sums."""
    f = np.pad(fail.view(np.uint8), ((0, 0), (1, 1), (1, 1)))
    rows = f[:, :, :-2] + f[:, :, 1:-1]
    rows += f[:, :, 2:]
    nb = rows[:, :-2] + rows[:, 1:-1]
    nb += rows[:, 2:]
    return fail & (nb >= 3)  # the die itself + 2 neighbours


def _clustered_radon(fail: np.ndarray, outlines: Outlines) -> np.ndarray:
    """The Radon family of the clustered fails: their share of dies, then from each bin's binomial z (excess
    over the expectation from the die projection of the map's outline): largest, largest minus its median
    over angles, largest failed share of a bin, best minus orthogonal angle. A map without clustered fails
    scores 0 throughout, so only the others (and their outlines, once each) are projected."""
    n, size, _ = fail.shape
    cl = _clustered(fail).reshape(n, -1)
    ncl = np.count_nonzero(cl, axis=1)
    rate = ncl.astype(np.float32) / outlines.safe[outlines.inverse]
    excess = np.zeros((n, RADON_ANGLES), np.float32)
    share = np.zeros(n, np.float32)
    some = np.flatnonzero(ncl)
    if len(some):
        _, nb = radon_matrix(size)
        outline, of_map = np.unique(outlines.inverse[some], return_inverse=True)  # those maps' outlines
        pd = radon_project(outlines.masks[outline]).reshape(RADON_ANGLES, nb, -1)  # once per outline
        used = np.flatnonzero((pd >= RADON_MIN_DIES).any(axis=(0, 2)))  # other bins score 0 for every map
        bins = slice(used[0], used[-1] + 1) if len(used) else slice(0, 0)
        pd = pd[:, bins]
        for s in range(0, len(some), RADON_BLOCK):
            b = some[s:s + RADON_BLOCK]
            pf = radon_project(cl[b]).reshape(RADON_ANGLES, nb, -1)[:, bins]
            excess[b], share[b] = _line_stats(pf, pd[:, :, of_map.ravel()[s:s + RADON_BLOCK]], rate[b])
    best = excess.argmax(1)
    top = excess[np.arange(n), best]
    orth = excess[np.arange(n), (best + RADON_ANGLES // 2) % RADON_ANGLES]
    return np.stack([rate, top, top - np.median(excess, 1), share, top - orth], 1)


def _line_stats(pf: np.ndarray, pd: np.ndarray, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(largest binomial z of a bin per angle (B, angles), largest failed share of a bin (B,)) from the
    clustered-fail and die projections (angles, bins, B) int16 and the clustered rate (B,) float32. A bin
    crossing fewer than RADON_MIN_DIES dies scores 0, as do the empty end bins of every angle (not given)."""
    bad = pd < RADON_MIN_DIES
    pd = pd.astype(np.float32)
    spread = pd * rate
    z = pf - spread
    spread *= 1 - rate
    spread += 1
    z /= np.sqrt(spread, out=spread)
    z[bad] = 0
    excess = z.max(1, initial=0)
    share = np.divide(pf, np.maximum(pd, 1, out=pd), dtype=np.float32)
    share[bad] = 0
    share = share.max((0, 1), initial=0)
    return excess.T, share


# ------------------------------------------------------------------------------------------------ components
def _components(fail: np.ndarray, fails: FailedDies, outlines: Outlines) -> np.ndarray:
    """Connected components of the fails of every map, labelled in one call (a 3-D structure that connects
    nothing across maps): largest one's share, centroid radius, elongation; top-3 share; log(1 + count)."""
    from scipy import ndimage

    n, size, _ = fail.shape
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    lab, total = ndimage.label(fail, structure=structure)
    out = np.zeros((n, 5), np.float64)
    if total == 0:
        return out
    lbl = lab.ravel()[fails.flat]
    sizes = np.bincount(lbl, minlength=total + 1)[1:]
    owner = np.zeros(total, np.int64)
    owner[lbl - 1] = fails.map
    order = np.lexsort((-sizes, owner))  # by map, largest component first
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    rank = np.arange(total) - np.maximum.accumulate(np.where(first, np.arange(total), 0))
    big = order[first]  # each map's largest component (by map, ascending)
    bm, nb = owner[big], sizes[big]
    keep = np.zeros(total + 1, bool)
    keep[big + 1] = True
    sel = keep[lbl]
    my, mx, vyy, vxx, vxy = _moments(fails.map[sel], fails.pixel[sel], nb, size)
    cy, cx, radius = outlines.geometry()
    half = np.sqrt(np.maximum((vyy - vxx) ** 2 / 4 + vxy ** 2, 0))
    lo, hi = (vyy + vxx) / 2 - half + 1e-3, (vyy + vxx) / 2 + half + 1e-3
    count = np.bincount(owner, minlength=n).astype(np.float64)  # components per map
    top = order[rank < 3]  # rank: position within its map's group of the sorted order
    top3 = np.bincount(owner[top], sizes[top], n)
    out[bm, 0] = nb / np.maximum(outlines.dies[outlines.inverse][bm], 1)
    out[bm, 1] = np.hypot(my - cy[bm], mx - cx[bm]) / radius[bm]
    out[bm, 2] = 0.5 * np.log(np.maximum(hi, 1e-3) / np.maximum(lo, 1e-3))
    out[:, 3] = top3 / np.maximum(fails.count, 1)
    out[:, 4] = np.log1p(count)
    return out


def _moments(m: np.ndarray, pixel: np.ndarray, nb: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """Centroid (row, column) and covariance (yy, xx, yx) of one component per map, from its pixels (their
    maps ``m``, ascending, and flat pixels) and sizes ``nb`` (one per map present); a component of <= 2 dies
    is isotropic. The sums are exact (int64)."""
    y = pixel // size
    x = pixel - y * size
    starts = np.flatnonzero(np.r_[True, m[1:] != m[:-1]])
    sy, sx, syy, sxx, sxy = (np.add.reduceat(v, starts).astype(np.float64)
                             for v in (y, x, y * y, x * x, y * x))
    my, mx = sy / nb, sx / nb
    denom = np.maximum(nb - 1, 1)
    vyy, vxx, vxy = (syy - nb * my * my) / denom, (sxx - nb * mx * mx) / denom, (sxy - nb * my * mx) / denom
    small = nb <= 2  # too few dies for a covariance: isotropic
    return my, mx, np.where(small, 1, vyy), np.where(small, 1, vxx), np.where(small, 0, vxy)
