"""The wafer descriptors as first written (round 7, before the speed-up of issue #13's deploy speed): a
frozen reference for tests/test_descriptors.py, which checks that :mod:`waferlab.deploy.descriptors` still
gives the same numbers. Not used by waferlab itself."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# the settings as they were (frozen here, so that the reference does not follow a change to the module)
RING_EDGES = (0.0, 0.2, 0.4, 0.6, 0.75, 0.9, 1.0, np.inf)
RADON_ANGLES = 24
RADON_MIN_DIES = 5
CHUNK = 1024


@lru_cache(maxsize=8)
def radon_matrix(size: int) -> tuple[object, int]:
    """(sparse (bins, pixels) 0/1 matrix of the projection of each pixel at every angle, bins per angle):
    pixel (y, x) falls in bin round(x cos a + y sin a) of angle a, coordinates from the grid centre."""
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
    mat = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                            shape=(RADON_ANGLES * nb, size * size))
    return mat, nb


def reference_descriptors(maps: np.ndarray) -> np.ndarray:
    """(N, 18) float32 descriptors (:data:`DESCRIPTOR_NAMES`) of uint8 maps (N, S, S) in {0, 1, 2}; a wafer
    without fails (or without dies) is all zeros."""
    maps = np.asarray(maps)
    out = np.zeros((len(maps), 18), np.float32)
    for s in range(0, len(maps), CHUNK):
        out[s:s + CHUNK] = _describe(maps[s:s + CHUNK])
    return out


def _describe(maps: np.ndarray) -> np.ndarray:
    n, size, _ = maps.shape
    die = (maps > 0).reshape(n, -1).astype(np.float32)
    fail = (maps == 2).reshape(n, -1).astype(np.float32)
    cnt = die.sum(1)
    safe = np.maximum(cnt, 1)
    grid = np.arange(size, dtype=np.float32)
    d2 = die.reshape(n, size, size)
    cy, cx = d2.sum(2) @ grid / safe, d2.sum(1) @ grid / safe
    geometry = (cy, cx, np.sqrt(safe / np.pi))
    return np.concatenate([(fail.sum(1) / safe)[:, None], _rings(die, fail, grid, geometry),
                           _clustered_radon(maps, die, safe), _components(maps == 2, cnt, geometry)], 1)


def _rings(die: np.ndarray, fail: np.ndarray, grid: np.ndarray, geometry: tuple[np.ndarray, ...]
           ) -> np.ndarray:
    """Failed share of each ring of :data:`RING_EDGES` (a ring without dies: the wafer's failed share)."""
    cy, cx, radius = geometry
    n, rings, size = len(die), len(RING_EDGES) - 1, len(grid)
    r2 = ((grid[None, :, None] - cy[:, None, None]) ** 2 + (grid[None, None, :] - cx[:, None, None]) ** 2) / (
        radius ** 2)[:, None, None]
    ring = np.zeros((n, size, size), np.int64)
    for edge in RING_EDGES[1:-1]:
        ring += r2 >= np.float32(edge) ** 2
    idx = (ring.reshape(n, -1) + rings * np.arange(n)[:, None]).ravel()
    d = np.bincount(idx, die.ravel(), n * rings).reshape(n, rings)
    f = np.bincount(idx, fail.ravel(), n * rings).reshape(n, rings)
    rate = fail.sum(1, keepdims=True) / np.maximum(die.sum(1, keepdims=True), 1)
    return np.where(d > 0, f / np.maximum(d, 1), rate)


def clustered_fails(maps: np.ndarray) -> np.ndarray:
    """(N, S, S) bool: failed dies with at least 2 failed 8-neighbours (a line or blob, not random noise)."""
    fail = np.pad((maps == 2).astype(np.uint8), ((0, 0), (1, 1), (1, 1)))
    size = maps.shape[1]
    nb = sum(fail[:, dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3))
    return (maps == 2) & (nb >= 3)  # the die itself + 2 neighbours


def _clustered_radon(maps: np.ndarray, die: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    n, size, _ = maps.shape
    cl = clustered_fails(maps).reshape(n, -1).astype(np.float32)
    mat, nb = radon_matrix(size)
    proj = mat @ np.ascontiguousarray(np.concatenate([cl, die]).T)  # (bins, 2N)
    pf, pd = (np.ascontiguousarray(p.T).reshape(n, RADON_ANGLES, nb) for p in (proj[:, :n], proj[:, n:]))
    rate = (cl.sum(1) / cnt)[:, None, None]
    ok = pd >= RADON_MIN_DIES
    excess = np.where(ok, (pf - rate * pd) / np.sqrt(pd * rate * (1 - rate) + 1), 0).max(2)
    share = np.where(ok, pf / np.maximum(pd, 1), 0).max(2)
    best = excess.argmax(1)
    top = excess[np.arange(n), best]
    orth = excess[np.arange(n), (best + RADON_ANGLES // 2) % RADON_ANGLES]
    return np.stack([rate[:, 0, 0], top, top - np.median(excess, 1), share.max(1), top - orth], 1)


def _components(fail: np.ndarray, cnt: np.ndarray, geometry: tuple[np.ndarray, ...]) -> np.ndarray:
    """Connected components of the fails of every map, labelled in one call (a 3-D structure that connects
    nothing across maps): largest one's share, centroid radius, elongation; top-3 share; log(1 + count)."""
    from scipy import ndimage

    n = len(fail)
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    lab, total = ndimage.label(fail, structure=structure)
    out = np.zeros((n, 5), np.float64)
    if total == 0:
        return out
    where = np.flatnonzero(lab)
    lbl = lab.ravel()[where]
    m, rem = np.divmod(where, fail.shape[1] * fail.shape[2])
    y, x = np.divmod(rem, fail.shape[2])
    y, x = y.astype(np.float64), x.astype(np.float64)
    sums = [np.bincount(lbl, w, total + 1)[1:] for w in (None, y, x, y * y, x * x, y * x)]
    size, sy, sx, syy, sxx, sxy = sums
    owner = np.zeros(total, np.int64)
    owner[lbl - 1] = m
    order = np.lexsort((-size, owner))  # by map, largest component first
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    rank = np.arange(total) - np.maximum.accumulate(np.where(first, np.arange(total), 0))
    big = order[first]  # each map's largest component
    bm = owner[big]
    nb = size[big]
    my, mx = sy[big] / nb, sx[big] / nb
    cy, cx, radius = geometry
    denom = np.maximum(nb - 1, 1)
    vyy, vxx, vxy = (syy[big] - nb * my * my) / denom, (sxx[big] - nb * mx * mx) / denom, \
        (sxy[big] - nb * my * mx) / denom
    small = nb <= 2  # too few dies for a covariance: isotropic
    vyy, vxx, vxy = np.where(small, 1, vyy), np.where(small, 1, vxx), np.where(small, 0, vxy)
    half = np.sqrt(np.maximum((vyy - vxx) ** 2 / 4 + vxy ** 2, 0))
    lo, hi = (vyy + vxx) / 2 - half + 1e-3, (vyy + vxx) / 2 + half + 1e-3
    count = np.bincount(owner, minlength=n).astype(np.float64)  # components per map
    top = order[rank < 3]  # rank: position within its map's group of the sorted order
    top3 = np.bincount(owner[top], size[top], n)
    fail_dies = fail.reshape(n, -1).sum(1)
    out[bm, 0] = nb / np.maximum(cnt[bm], 1)
    out[bm, 1] = np.hypot(my - cy[bm], mx - cx[bm]) / radius[bm]
    out[bm, 2] = 0.5 * np.log(np.maximum(hi, 1e-3) / np.maximum(lo, 1e-3))
    out[:, 3] = top3 / np.maximum(fail_dies, 1)
    out[:, 4] = np.log1p(count)
    return out
