"""Hand-made wafer maps shared by the transform tests (augmentation, test-time augmentation)."""

from __future__ import annotations

import numpy as np


def blob_wafers(n: int, size: int = 32, seed: int = 0, fail: float = 0.2,
                centre: tuple[tuple[float, float], tuple[float, float]] | None = None,
                r2: float = 16) -> np.ndarray:
    """uint8 round wafers with an off-centre blob of failures (squared radius ``r2``, centre drawn in the
    ``centre`` row/column ranges; default: the left half) over Bernoulli(``fail``) noise, so no symmetry of
    the square leaves a map unchanged."""
    g = np.random.default_rng(seed)
    (r0, r1), (c0, c1) = centre or ((4, size - 4), (4, size / 2))
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    inside = (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        blob = (yy - g.uniform(r0, r1)) ** 2 + (xx - g.uniform(c0, c1)) ** 2 < r2
        out[i] = np.where(inside, np.where(blob | (g.random((size, size)) < fail), 2, 1), 0)
    return out
