"""Wafer-map augmentation: online (rot90/flips, small rotations, die-flip noise) and the study's offline
balancing by rotation. Every transform keeps the values in {0 no die, 1 good, 2 failed}.

Apply both to the TRAINING part only: augmenting before the split leaks rotated copies of a test map into
training (the attention study's augmented numbers carry that leak).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from waferlab.errors import WaferlabError


def _check_batch(maps: torch.Tensor) -> None:
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3 or maps.dtype != torch.uint8:
        shape = tuple(maps.shape) if hasattr(maps, "shape") else type(maps).__name__
        dtype = getattr(maps, "dtype", None)
        raise WaferlabError(f"augmentation needs a uint8 (N,H,W) tensor of wafer maps, got {dtype} {shape}")


def dihedral(maps: torch.Tensor, k: torch.Tensor, flip_v: torch.Tensor, flip_h: torch.Tensor) -> torch.Tensor:
    """Per-sample exact rot90 by ``k`` (0..3, counter-clockwise like ``torch.rot90``), then flips.

    ``k``, ``flip_v`` (up-down), ``flip_h`` (left-right) are (N,) tensors on the maps' device. Odd ``k``
    needs square maps.
    """
    n, h, w = maps.shape
    # one of 16 (k, flip_v, flip_h) combinations per sample; transform each group with rot90/flip views
    combo = ((k.long() % 4) * 4 + flip_v.long() * 2 + flip_h.long()).cpu()
    if h != w and bool(((combo // 4) % 2 == 1).any()):
        raise WaferlabError(f"a 90-degree rotation needs square maps, got {h}x{w}")
    out = maps.clone()
    for c in torch.unique(combo).tolist():
        if c == 0:
            continue
        idx = torch.nonzero(combo == c).flatten().to(maps.device)
        part = torch.rot90(maps.index_select(0, idx), c // 4, dims=(1, 2))
        if c & 2:
            part = part.flip(1)
        if c & 1:
            part = part.flip(2)
        out.index_copy_(0, idx, part)
    return out


def rotate_nearest(maps: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each map by its own angle (degrees, counter-clockwise) with nearest sampling; outside -> 0."""
    n, h, w = maps.shape
    theta = torch.deg2rad(degrees.to(device=maps.device, dtype=torch.float32))
    cos, sin = torch.cos(theta), torch.sin(theta)
    mat = torch.zeros(n, 2, 3, device=maps.device, dtype=torch.float32)
    # normalised coordinates: keep the rotation rigid for non-square maps
    mat[:, 0, 0] = cos
    mat[:, 0, 1] = -sin * h / w
    mat[:, 1, 0] = sin * w / h
    mat[:, 1, 1] = cos
    grid = F.affine_grid(mat, [n, 1, h, w], align_corners=False)
    out = F.grid_sample(maps.unsqueeze(1).to(torch.float32), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)
    return out.squeeze(1).round_().clamp_(0, 2).to(torch.uint8)


@dataclass(frozen=True)
class AugmentOptions:
    """The online augmentation's settings (the ``augment_options`` config mapping); validated on creation.

    Geometry: ``rot90``, ``flips``, ``max_rotation`` (degrees). Die noise: ``die_flip`` (each die
    good<->failed with this probability). Domain randomisation against the synthetic-to-real gap (off at 0):
    ``rescale`` (share of maps whose fail pattern is resampled through a coarser die grid of
    ``rescale_min``..size-1 dies a side, so lines get the thickness and densities of other grid sizes),
    ``background_fail`` (per map, good dies fail at a rate drawn from U(0, this)), ``fail_dropout`` (per map,
    failed dies turn good at a rate from U(0, this): faint, broken patterns) and ``edge_loss`` (per map, dies
    on the wafer's edge are removed at a rate from U(0, this)).
    """

    rot90: bool = True
    flips: bool = True
    max_rotation: float = 15.0
    die_flip: float = 0.01
    rescale: float = 0.0
    rescale_min: int = 16
    background_fail: float = 0.0
    fail_dropout: float = 0.0
    edge_loss: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low, high = _LIMITS.get(f.name, (None, None))
            kind = bool if f.type == "bool" else int if f.type == "int" else float
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and (kind is float or float(value).is_integer()))
            if not ok or (low is not None and value < low) or (high is not None and value > high):
                bounds = "true or false" if kind is bool else (
                    f"{'an integer' if kind is int else 'a number'} >= {low:g}"
                    + (f" and <= {high:g}" if high is not None else ""))
                raise WaferlabError(f"augment_options {f.name}: expected {bounds}, got {value!r}")

    @classmethod
    def parse(cls, values: Mapping[str, object], where: str = "config augment_options") -> AugmentOptions:
        """Options from a mapping; an unknown key is one line naming the allowed ones."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise WaferlabError(f"{where}: unknown option {unknown[0]!r} (allowed: {', '.join(names)})")
        try:
            return cls(**values)
        except WaferlabError as exc:
            raise WaferlabError(f"config {exc}") from None


#: Allowed ranges (low, high; None: open) of the numeric options; booleans need no entry.
_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "max_rotation": (0.0, None), "die_flip": (0.0, 1.0), "rescale": (0.0, 1.0), "rescale_min": (2, None),
    "background_fail": (0.0, 1.0), "fail_dropout": (0.0, 1.0), "edge_loss": (0.0, 1.0)}


def rescale_through_grid(maps: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """Resample each map's fail pattern through a coarser grid of ``grids[i]`` dies a side (0: unchanged).

    Down with ``failkeep`` (thin lines survive), back up with ``nearest``; the no-die outline is kept, so only
    the pattern's resolution changes (an intermediate no-die cell on the wafer becomes a good die).
    """
    from waferlab.data.encode import resize_maps

    n, h, w = maps.shape
    out = maps.clone()
    for g in torch.unique(grids).tolist():
        if g <= 0:
            continue
        idx = torch.nonzero(grids == g).flatten().to(maps.device)
        part = maps.index_select(0, idx)
        scale = g / max(h, w)
        coarse = resize_maps(part, (max(1, round(h * scale)), max(1, round(w * scale))), "failkeep")
        fails = resize_maps(coarse, (h, w), "nearest") == 2
        out.index_copy_(0, idx, torch.where(part == 0, part, 1 + fails.to(torch.uint8)))
    return out


def edge_dies(maps: torch.Tensor) -> torch.Tensor:
    """Bool (N,H,W): the dies with a 4-neighbour that is no die (or outside the grid)."""
    on = F.pad((maps > 0).to(torch.uint8), (1, 1, 1, 1))
    inner = on[:, :-2, 1:-1] & on[:, 2:, 1:-1] & on[:, 1:-1, :-2] & on[:, 1:-1, 2:]
    return (maps > 0) & (inner == 0)


class Augmenter(nn.Module):
    """Random wafer-map augmentation of uint8 (N,H,W) batches on any device; values stay in {0,1,2}.

    Per sample, in this order: rot90 by a random k (``rot90``), random up-down and left-right flips
    (``flips``), a rotation by U(-max_rotation, max_rotation) degrees with nearest sampling, the domain
    randomisation of :class:`AugmentOptions` (rescale, edge loss, background fails, fail dropout) and die-flip
    noise (each on-wafer die good<->failed with probability ``die_flip``). Identity in ``eval()`` mode.
    """

    def __init__(self, generator: torch.Generator | None = None, **options: object) -> None:
        super().__init__()
        self.options = AugmentOptions.parse(options, where="augmentation")
        self.generator = generator

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.options, f.name)}" for f in fields(self.options))

    def _rand(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Uniform [0,1) numbers on ``device`` from the generator (moved over if it lives elsewhere)."""
        gen = self.generator
        if gen is None:
            return torch.rand(shape, device=device)
        if gen.device == device:
            return torch.rand(shape, generator=gen, device=device)
        return torch.rand(shape, generator=gen, device=gen.device).to(device)

    def _per_map_rate(self, n: int, top: float, device: torch.device) -> torch.Tensor:
        """(N,1,1) rates drawn from U(0, top), one per map."""
        return (self._rand((n,), device) * top).view(n, 1, 1)

    def _geometry(self, maps: torch.Tensor) -> torch.Tensor:
        o, (n, h, w), dev = self.options, maps.shape, maps.device
        out = maps
        if o.rot90 or o.flips:
            u = self._rand((n, 3), dev)
            if o.rot90:
                k = (u[:, 0] * (4 if h == w else 2)).long().clamp_(max=3)
                k = k if h == w else k * 2  # non-square maps: 0 or 180 degrees only
            else:
                k = torch.zeros(n, dtype=torch.long, device=dev)
            flip_v = (u[:, 1] < 0.5) if o.flips else torch.zeros(n, dtype=torch.bool, device=dev)
            flip_h = (u[:, 2] < 0.5) if o.flips else torch.zeros(n, dtype=torch.bool, device=dev)
            out = dihedral(out, k, flip_v, flip_h)
        if o.max_rotation > 0:
            angles = (self._rand((n,), dev) * 2.0 - 1.0) * o.max_rotation
            out = rotate_nearest(out, angles)
        return out

    def _domain(self, out: torch.Tensor) -> torch.Tensor:
        """The domain randomisation options, each skipped when 0."""
        o, (n, h, w), dev = self.options, out.shape, out.device
        top = min(h, w) - 1
        if o.rescale > 0 and o.rescale_min <= top:
            u = self._rand((n, 2), dev)
            span = top - o.rescale_min
            grids = o.rescale_min + (u[:, 0] * (span + 1)).long().clamp_(max=span)
            out = rescale_through_grid(out, torch.where(u[:, 1] < o.rescale, grids, torch.zeros_like(grids)))
        if o.edge_loss > 0:
            drop = edge_dies(out) & (self._rand((n, h, w), dev) < self._per_map_rate(n, o.edge_loss, dev))
            out = torch.where(drop, torch.zeros_like(out), out)
        if o.background_fail > 0:
            fail = (out == 1) & (self._rand((n, h, w), dev) < self._per_map_rate(n, o.background_fail, dev))
            out = torch.where(fail, torch.full_like(out, 2), out)
        if o.fail_dropout > 0:
            keep = (out == 2) & (self._rand((n, h, w), dev) < self._per_map_rate(n, o.fail_dropout, dev))
            out = torch.where(keep, torch.ones_like(out), out)
        return out

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Augment a uint8 (N,H,W) batch (returns a new tensor; the input is left untouched)."""
        _check_batch(maps)
        if not self.training or maps.shape[0] == 0:
            return maps
        out = self._domain(self._geometry(maps))
        if self.options.die_flip > 0:
            flip = (out > 0) & (self._rand(tuple(out.shape), out.device) < self.options.die_flip)
            out = torch.where(flip, 3 - out, out)
        return out if out is not maps else maps.clone()


# ------------------------------------------------------------------------------------- offline balancing
def _rotate_numpy(maps: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Nearest rotation of square (K,S,S) maps about the centre, one angle per map; outside -> 0."""
    k, s, _ = maps.shape
    c = (s - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(s) - c, np.arange(s) - c, indexing="ij")
    t = np.deg2rad(degrees)[:, None, None]
    # inverse map: output pixel (y, x) samples the input at R(-theta) (y, x)
    src_x = np.cos(t) * xx - np.sin(t) * yy + c
    src_y = np.sin(t) * xx + np.cos(t) * yy + c
    sx = np.floor(src_x + 0.5).astype(np.int64)
    sy = np.floor(src_y + 0.5).astype(np.int64)
    inside = (sx >= 0) & (sx < s) & (sy >= 0) & (sy < s)
    flat = maps.reshape(k, s * s)
    gathered = np.take_along_axis(flat, (np.clip(sy, 0, s - 1) * s + np.clip(sx, 0, s - 1)).reshape(k, -1), 1)
    return np.where(inside.reshape(k, -1), gathered, 0).reshape(k, s, s).astype(np.uint8)


_DIHEDRAL7 = [(1, False), (2, False), (3, False), (0, True), (1, True), (2, True), (3, True)]


def _dihedral_numpy(maps: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(maps, k, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def balance_by_rotation(maps: np.ndarray, labels: np.ndarray, targets: Mapping[int, int], seed: int = 0,
                        max_rotation: float = 15.0, return_source: bool = False):
    """Raise each class in ``targets`` (label -> wanted count) to that count with rotated copies.

    Copies cycle through the originals; the first 7 rounds use the 7 non-identity dihedral transforms,
    later rounds a random dihedral transform plus a rotation of up to ``max_rotation`` degrees. Apply
    to the TRAINING part only (the study balanced before splitting, leaking copies into its test set).
    Returns ``(maps, labels)`` with the copies appended (plus each row's source index if ``return_source``).
    """
    maps = np.asarray(maps)
    labels = np.asarray(labels)
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2] or maps.dtype != np.uint8:
        raise WaferlabError(f"balancing by rotation needs square uint8 (N,S,S) maps, "
                            f"got {maps.dtype} {maps.shape}")
    if len(labels) != len(maps):
        raise WaferlabError(f"balancing by rotation: {len(labels)} labels for {len(maps)} maps")
    rng = np.random.default_rng(seed)
    new_maps: list[np.ndarray] = [maps]
    new_labels: list[np.ndarray] = [labels]
    sources: list[np.ndarray] = [np.arange(len(maps))]
    for cls, want in targets.items():
        members = np.flatnonzero(labels == cls)
        extra = int(want) - len(members)
        if extra <= 0 or len(members) == 0:
            continue
        members = members[rng.permutation(len(members))]
        for rnd in range(math.ceil(extra / len(members))):
            take = members[: min(len(members), extra - rnd * len(members))]
            batch = maps[take]
            if rnd < len(_DIHEDRAL7):
                batch = _dihedral_numpy(batch, *_DIHEDRAL7[rnd])
            else:
                ks = rng.integers(0, 4, len(take))
                flips = rng.random(len(take)) < 0.5
                for kk in range(4):
                    for fl in (False, True):
                        sel = (ks == kk) & (flips == fl)
                        if sel.any():
                            batch[sel] = _dihedral_numpy(batch[sel], kk, fl)
                angles = rng.uniform(-max_rotation, max_rotation, len(take))
                # at least 1 degree, so that no copy is a plain duplicate
                angles = np.where(np.abs(angles) < 1.0, np.copysign(1.0, angles), angles)
                batch = _rotate_numpy(batch, angles)
            new_maps.append(batch)
            new_labels.append(np.full(len(take), cls, dtype=labels.dtype))
            sources.append(take)
    out_maps, out_labels = np.concatenate(new_maps), np.concatenate(new_labels)
    if return_source:
        return out_maps, out_labels, np.concatenate(sources)
    return out_maps, out_labels
