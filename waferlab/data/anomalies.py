"""Generic synthetic anomalies for outlier exposure: failed-die patterns that are NOT any WM-811K class.

Outlier exposure (Hendrycks et al. 2019) trains the classifier to give maps unlike every known class a flat
softmax, so the unknown-pattern scores separate them better. The anomalies here are generic shapes and
textures drawn with torch's random numbers on each map's own die layout (its no-die / die mask is kept,
every die is reset to good): a periodic lattice of failed blocks (a reticle-like repeat), a sector from the
centre, one to three axis-aligned rectangles, and thresholded low-frequency noise (irregular patches), each
with a light random background of failed dies. Deliberately absent: rings, single lines, dense uniform
noise, edge bands and full maps (Donut, Scratch, Random, Edge-Ring, Near-full), so that an open-set
measurement with those classes held out does not train on a look-alike of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: The generic pattern kinds, in the order of their index in :func:`paint_anomalies`.
ANOMALY_KINDS: tuple[str, ...] = ("lattice", "sector", "rectangles", "patches")
GOOD, FAILED = 1, 2


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _lattice(n: int, s: int, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    """Blocks of side p at period 2p..3p in both directions (random p, phase)."""
    p = torch.randint(1, max(2, s // 10) + 1, (n, 1, 1), generator=gen, device=dev)
    period = p * torch.randint(2, 4, (n, 1, 1), generator=gen, device=dev)
    oy, ox = (torch.randint(0, s, (2, n, 1, 1), generator=gen, device=dev))
    ii = torch.arange(s, device=dev)
    return (((ii[None, :, None] + oy) % period) < p) & (((ii[None, None, :] + ox) % period) < p)


def _sector(n: int, u: torch.Tensor, v: torch.Tensor, gen: torch.Generator, dev: torch.device
            ) -> torch.Tensor:
    """A wedge from the centre: angle width 40-120 degrees, reaching 60-100 % of the radius."""
    start = _uniform(n, -math.pi, math.pi, gen, dev)[:, None, None]
    width = _uniform(n, math.radians(40), math.radians(120), gen, dev)[:, None, None]
    reach = _uniform(n, 0.6, 1.0, gen, dev)[:, None, None]
    theta = torch.remainder(torch.atan2(v, u)[None] - start, 2 * math.pi)
    return (theta < width) & ((u ** 2 + v ** 2).sqrt()[None] < reach)


def _rectangles(n: int, u: torch.Tensor, v: torch.Tensor, gen: torch.Generator, dev: torch.device
                ) -> torch.Tensor:
    """One to three axis-aligned rectangles, sides 15-60 % of the diameter."""
    out = torch.zeros((n, *u.shape), dtype=torch.bool, device=dev)
    count = torch.randint(1, 4, (n,), generator=gen, device=dev)
    for j in range(3):
        cy, cx = _uniform(n, -0.7, 0.7, gen, dev), _uniform(n, -0.7, 0.7, gen, dev)
        hy, hx = _uniform(n, 0.15, 0.6, gen, dev), _uniform(n, 0.15, 0.6, gen, dev)
        box = ((v[None] - cy[:, None, None]).abs() < hy[:, None, None]) & (
            (u[None] - cx[:, None, None]).abs() < hx[:, None, None])
        out |= box & (count > j)[:, None, None]
    return out


def _patches(n: int, mask: torch.Tensor, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    """Low-frequency noise (a 4x4..7x7 grid, bilinear up-sampled) above its 65-85th percentile on the dies."""
    grid = int(torch.randint(4, 8, (1,), generator=gen, device=dev))
    noise = torch.rand((n, 1, grid, grid), generator=gen, device=dev)
    field = F.interpolate(noise, size=tuple(mask.shape[1:]), mode="bilinear", align_corners=False)[:, 0]
    q = _uniform(n, 0.65, 0.85, gen, dev)
    masked = torch.where(mask, field, torch.full_like(field, float("nan"))).flatten(1)
    level = torch.stack([torch.nanquantile(row, qi) for row, qi in zip(masked, q)])
    return field > level[:, None, None]


def paint_anomalies(maps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(N, S, S) uint8 maps -> generic anomalies on the same die layouts (one random kind per map)."""
    n, h, w = maps.shape
    dev = maps.device
    s = max(h, w)
    mask = maps > 0
    if n == 0:
        return maps.clone()
    ii = (torch.arange(s, device=dev, dtype=torch.float32) + 0.5) / s * 2 - 1
    v, u = torch.meshgrid(ii[:h], ii[:w], indexing="ij")
    shapes = torch.stack([_lattice(n, s, gen, dev)[:, :h, :w], _sector(n, u, v, gen, dev),
                          _rectangles(n, u, v, gen, dev), _patches(n, mask, gen, dev)])
    kind = torch.randint(0, len(ANOMALY_KINDS), (n,), generator=gen, device=dev)
    pattern = shapes[kind, torch.arange(n, device=dev)]
    density = _uniform(n, 0.6, 1.0, gen, dev)[:, None, None]
    background = _uniform(n, 0.0, 0.04, gen, dev)[:, None, None]
    r = torch.rand((n, h, w), generator=gen, device=dev)
    failed = (pattern & (r < density)) | (~pattern & (r < background))
    out = torch.where(failed, FAILED, GOOD).to(torch.uint8)
    return torch.where(mask, out, torch.zeros_like(out))
