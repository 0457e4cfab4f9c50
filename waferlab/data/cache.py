"""The prepared cache: every map resized to one SxS grid (a :data:`RESIZE_RULES` rule, values kept 0/1/2),
in one pickle-free .npz that records the rule.

Training never touches the raw sources again: ``waferlab data prepare`` resizes once (vectorised per map
shape, fast enough for all 811k WM-811K maps) and the engine loads the cache with ``load_prepared``.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from waferlab.data.table import UNLABELED, WM811K_CLASSES, WaferTable
from waferlab.errors import WaferlabError

#: Key of the .npz member that marks a waferlab cache; it holds the metadata JSON as a 0-d string.
CACHE_MARKER = "__waferlab_cache__"
#: Version of the cache layout written by :func:`save_cache`.
CACHE_FORMAT = 1
#: Side length used when a source is prepared on the fly without an explicit size.
DEFAULT_SIZE = 64
_CHUNK = 8192  # maps resized per vectorised gather (bounds the temporary stack's memory)
_FAILKEEP_CELLS = 1 << 22  # source cells per failkeep block-sum pass (a few tens of MB of temporaries)

#: How a map is shrunk to SxS. ``nearest``: one source die per pixel (pixel centres), which drops most of
#: a 1-die scratch or thin ring on grids wider than ~1.5 S. ``failkeep``: the outline (no die) follows
#: nearest; a die pixel is failed when its source block holds at least as many failed dies as the block's
#: shorter side (a 1-die line crossing the block keeps it failed) or the middle die of a diagonal run of
#: three failed dies (a 45-degree line splits between blocks). Sparse noise (~10 % failed) gets no denser.
#: Both equal nearest when the grid is not larger than S (upsampling).
RESIZE_RULES: tuple[str, ...] = ("nearest", "failkeep")
#: The rule of a run or cache that does not record one (written before the rule existed).
LEGACY_RESIZE = "nearest"
#: The rule new runs use (the ``resize`` config key; chosen by benchmarks/sim2real.py on real maps).
DEFAULT_RESIZE = "failkeep"


@dataclass
class PreparedData:
    """Maps resized to ``size`` x ``size`` with integer labels and provenance, one row per map.

    ``labels`` index ``class_names`` (-1 = unlabeled); ``orig_shape`` keeps each map's shape before
    resizing; ``split`` is the source's own split tag; ``masks`` (true pattern regions) only for
    synthetic data; ``resize``: the rule that shrank the maps (:data:`RESIZE_RULES`).
    """

    maps: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    split: np.ndarray
    lot: np.ndarray
    wafer_index: np.ndarray
    orig_shape: np.ndarray
    size: int
    source: str = ""
    multi_hot: np.ndarray | None = None
    multi_label_names: tuple[str, ...] = ()
    masks: np.ndarray | None = None
    resize: str = LEGACY_RESIZE

    def __post_init__(self) -> None:
        check_resize(self.resize, self.source or "prepared data")
        self.class_names = tuple(self.class_names)
        self.multi_label_names = tuple(self.multi_label_names)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.split = np.asarray(self.split, dtype=object)
        self.lot = np.asarray(self.lot, dtype=object)
        self.wafer_index = np.asarray(self.wafer_index, dtype=np.int64)
        self.orig_shape = np.asarray(self.orig_shape, dtype=np.int32).reshape(-1, 2)
        n = len(self.maps)
        where = self.source or "prepared data"
        square = (self.size, self.size)
        if self.maps.ndim != 3 or self.maps.shape[1:] != square or self.maps.dtype != np.uint8:
            raise WaferlabError(f"{where}: maps must be uint8 (N,{self.size},{self.size}), "
                                f"got {self.maps.dtype} {self.maps.shape}")
        for name in ("labels", "split", "lot", "wafer_index", "orig_shape"):
            if len(getattr(self, name)) != n:
                raise WaferlabError(f"{where}: column {name!r} has {len(getattr(self, name))} rows, "
                                    f"expected {n}")
        if self.multi_hot is not None and len(self.multi_hot) != n:
            raise WaferlabError(f"{where}: {len(self.multi_hot)} multi-hot rows for {n} maps")
        if self.masks is not None and self.masks.shape != self.maps.shape:
            raise WaferlabError(f"{where}: masks {self.masks.shape} do not match maps {self.maps.shape}")
        if n and (self.labels.min() < -1 or self.labels.max() >= len(self.class_names)):
            raise WaferlabError(f"{where}: label ids must lie in -1..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.maps)

    def subset(self, idx: np.ndarray | Sequence[int]) -> PreparedData:
        """Rows ``idx`` (int array or boolean mask) as a new PreparedData (arrays are copied)."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        return replace(
            self,
            maps=self.maps[idx], labels=self.labels[idx], split=self.split[idx], lot=self.lot[idx],
            wafer_index=self.wafer_index[idx], orig_shape=self.orig_shape[idx],
            multi_hot=None if self.multi_hot is None else self.multi_hot[idx],
            masks=None if self.masks is None else self.masks[idx],
        )

    def class_counts(self) -> dict[str, int]:
        """Maps per class in ``class_names`` order (zeros included), then ``"unlabeled"`` if any."""
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.class_names))
        out = {name: int(c) for name, c in zip(self.class_names, counts)}
        n_unlabeled = int((self.labels < 0).sum())
        if n_unlabeled:
            out[UNLABELED] = n_unlabeled
        return out

    def require_multi_hot(self, where: str = "", what: str = "multi-label training") -> np.ndarray:
        """The (N, K) multi-hot rows over ``multi_label_names``; without them a one-line error naming
        ``where`` (default: the source)."""
        if self.multi_hot is None:
            raise WaferlabError(f"{where or self.source or 'data'}: {what} needs multi-hot labels "
                                "(a MixedWM38 .npz, 'waferlab data synth --mixed', "
                                "or images named mixed_<A>_<B>_<idx>.png)")
        return np.asarray(self.multi_hot)

    def label_names(self) -> np.ndarray:
        """Class name of every row (``"unlabeled"`` for -1), as an object array."""
        names = np.array([*self.class_names, UNLABELED], dtype=object)
        return names[np.where(self.labels < 0, len(self.class_names), self.labels)]


# ----------------------------------------------------------------------------------------------- resize


def check_resize(rule: object, where: str = "resize") -> str:
    """``rule`` when it is one of :data:`RESIZE_RULES`; otherwise a one-line error naming ``where``."""
    if rule not in RESIZE_RULES:
        raise WaferlabError(f"{where}: unknown resize rule {rule!r}; use one of {', '.join(RESIZE_RULES)}")
    return str(rule)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of every output index for a nearest resize (pixel centres; = torch ``nearest-exact``)."""
    idx = np.floor((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


@functools.lru_cache(maxsize=4096)
def block_bounds(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) source range of every output index along one axis for ``failkeep``.

    Shrinking: area boundaries ``floor(i * n_in / n_out)`` (the blocks tile the axis); otherwise the one
    nearest source index, so an upsampled axis behaves exactly like nearest.
    """
    if n_in <= n_out:
        start = nearest_indices(n_in, n_out)
        return _frozen(start), _frozen(start + 1)
    edges = np.arange(n_out + 1, dtype=np.int64) * n_in // n_out
    return _frozen(edges[:-1]), _frozen(edges[1:])


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a`` made read-only (a cached array must not be changed by a caller)."""
    a.flags.writeable = False
    return a


def failkeep_threshold(h: int, w: int, size: int | tuple[int, int]) -> np.ndarray:
    """(size, size) failed-die count at which a ``failkeep`` pixel is failed: its block's shorter side."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    rs, re_ = block_bounds(h, out_h)
    cs, ce = block_bounds(w, out_w)
    return np.minimum((re_ - rs)[:, None], (ce - cs)[None, :])


def diagonal_runs(hits: np.ndarray) -> np.ndarray:
    """Cells of a boolean (N,H,W) stack that are the middle of a diagonal run of three true cells."""
    down = hits[:, :-2, :-2] & hits[:, 2:, 2:]  # the two neighbours on the main diagonal
    up = hits[:, :-2, 2:] & hits[:, 2:, :-2]  # and on the anti-diagonal
    out = np.zeros_like(hits)
    np.logical_and(hits[:, 1:-1, 1:-1], down | up, out=out[:, 1:-1, 1:-1])
    return out


@functools.lru_cache(maxsize=4096)
def _membership(n_in: int, n_out: int, dtype: type) -> np.ndarray:
    """(n_out, n_in) 0/1 matrix: row i marks the source range of output index i (``block_bounds``)."""
    start, end = block_bounds(n_in, n_out)
    idx = np.arange(n_in)
    return _frozen(((idx >= start[:, None]) & (idx < end[:, None])).astype(dtype))


def _failkeep(hits: np.ndarray, size: int) -> np.ndarray:
    """Boolean (N,size,size): the blocks that keep a failed die (or a mask cell) under ``failkeep``.

    The hit count and the diagonal-run count are summed in one pass: packed as ``hits + runs * M`` with
    ``M`` above any block's area, so ``sum % M`` and ``sum // M`` read them back exactly. The block sums are
    two small matrix products (exact: every partial sum is an integer below the float's 2**24 / 2**53).
    """
    n, h, w = hits.shape
    threshold = failkeep_threshold(h, w, size)
    (lo_r, hi_r), (lo_c, hi_c) = block_bounds(h, size), block_bounds(w, size)
    m = int((hi_r - lo_r).max() * (hi_c - lo_c).max()) + 1  # > the largest block's area
    dtype = np.float32 if m * (m + 1) < 2 ** 24 else np.float64  # a block's sum is below area * (m + 1)
    rows, cols = _membership(h, size, dtype), _membership(w, size, dtype).T
    keep = np.empty((n, size, size), dtype=bool)
    step = max(1, _FAILKEEP_CELLS // (h * w))  # bounds the float temporaries
    for start in range(0, n, step):
        part = hits[start:start + step]
        small = np.uint8 if m < 255 else np.int32  # pack in the narrowest type, convert once
        packed = (part.astype(small) + diagonal_runs(part).astype(small) * small(m)).astype(dtype)
        total = np.matmul(rows, packed @ cols).astype(np.int32 if dtype is np.float32 else np.int64)
        keep[start:start + step] = (total % m >= threshold) | (total >= m)
    return keep


def resize_stack(stack: np.ndarray, size: int, rule: str = LEGACY_RESIZE, mask: bool = False) -> np.ndarray:
    """Resize a uint8 (N,H,W) stack to (N,size,size) with ``rule`` (values stay 0/1/2).

    ``mask``: the stack is a 0/1 pattern mask; ``failkeep`` then keeps a pixel when its block holds at
    least the threshold's count of mask cells (the same test as failed dies, without an outline).
    """
    _, h, w = stack.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(stack)
    nearest = check_resize(rule) == "nearest" or (h <= size and w <= size)
    if not nearest and mask:  # a mask has no outline: its block counts alone decide
        return _failkeep(stack == 1, size).astype(np.uint8)
    rows = nearest_indices(h, size)
    cols = nearest_indices(w, size)
    # two axis-wise takes are several times faster than one 2-D fancy index
    near = np.take(np.take(stack, rows, axis=1), cols, axis=2)
    if nearest:
        return near
    keep = _failkeep(stack == 2, size)
    return np.where(near == 0, np.uint8(0), np.where(keep, np.uint8(2), np.uint8(1)))


def _class_vocabulary(labels: np.ndarray) -> tuple[str, ...]:
    names = {str(x) for x in labels.tolist()} - {UNLABELED}
    if names <= set(WM811K_CLASSES):
        return WM811K_CLASSES
    return tuple(sorted(names))


def prepare(table: WaferTable, size: int, progress: bool = False,
            resize: str = DEFAULT_RESIZE) -> PreparedData:
    """Resize every map (and mask) of ``table`` to ``size`` x ``size`` with the rule ``resize``.

    Maps are grouped by shape and each group is resized by one vectorised gather. Class names are the
    canonical WM-811K order when every label is a WM-811K name, otherwise the sorted label names.
    """
    if int(size) < 1:
        raise WaferlabError(f"--size must be a positive number of pixels, got {size}")
    size = int(size)
    check_resize(resize)
    n = len(table)
    where = table.source or "table"
    maps_out = np.empty((n, size, size), dtype=np.uint8)
    masks_out = np.empty((n, size, size), dtype=np.uint8) if table.masks is not None else None
    shapes = _map_shapes(table.maps, where)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"resize to {size}x{size}", unit="map")
    if n:
        key = shapes[:, 0] * (int(shapes[:, 1].max()) + 1) + shapes[:, 1]  # 1-D unique is much faster
        uniq, inverse = np.unique(key, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
        for g in range(len(uniq)):
            members = order[bounds[g]:bounds[g + 1]]
            for start in range(0, len(members), _CHUNK):
                chunk = members[start:start + _CHUNK]
                stack = np.stack([table.maps[i] for i in chunk])
                _check_values(stack, chunk, where)
                maps_out[chunk] = resize_stack(stack.astype(np.uint8, copy=False), size, resize)
                if masks_out is not None:
                    mstack = np.stack([np.asarray(table.masks[i]) for i in chunk])
                    mstack = mstack.astype(np.uint8, copy=False)
                    if mstack.shape != stack.shape:
                        raise WaferlabError(f"{where}: row {int(chunk[0])}: mask shape {mstack.shape[1:]} "
                                            f"differs from map shape {stack.shape[1:]}")
                    masks_out[chunk] = resize_stack(mstack, size, resize, mask=True)
                if bar is not None:
                    bar.update(len(chunk))
    if bar is not None:
        bar.close()
    class_names = _class_vocabulary(table.labels)
    lookup = {name: i for i, name in enumerate(class_names)}
    labels = np.array([lookup.get(str(x), -1) for x in table.labels.tolist()], dtype=np.int64)
    # a reader may record a shape from before its own decoding (e.g. an image's); otherwise the map's shape
    orig = table.orig_shape if len(table.orig_shape) == n else shapes
    return PreparedData(
        maps=maps_out, labels=labels, class_names=class_names, split=table.split.copy(),
        lot=table.lot.copy(), wafer_index=table.wafer_index.copy(), orig_shape=orig,
        size=size, source=table.source,
        multi_hot=None if table.multi_hot is None else np.asarray(table.multi_hot, dtype=np.uint8),
        multi_label_names=table.multi_label_names, masks=masks_out, resize=resize,
    )


def _map_shapes(maps: list[np.ndarray], where: str) -> np.ndarray:
    """(N,2) shapes of the maps; a map that is not a non-empty 2-D grid is an error naming its row."""
    shapes = [np.shape(m) for m in maps]
    arr = np.array([s if len(s) == 2 else (0, 0) for s in shapes], dtype=np.int64).reshape(-1, 2)
    bad = np.flatnonzero((arr == 0).any(1))
    if len(bad):
        i = int(bad[0])
        raise WaferlabError(f"{where}: row {i}: field 'waferMap' must be a non-empty 2-D grid, "
                            f"got shape {shapes[i]}")
    return arr


def _check_values(stack: np.ndarray, rows: np.ndarray, where: str) -> None:
    """Every die must be 0, 1 or 2; otherwise name the first offending row."""
    if stack.dtype.kind in "biu":
        if not stack.size or (stack.min() >= 0 and stack.max() <= 2):
            return
        bad = (stack < 0) | (stack > 2)
    else:
        bad = ~np.isin(stack, (0, 1, 2))
        if not bad.any():
            return
    row = int(rows[np.flatnonzero(bad.reshape(len(stack), -1).any(1))[0]])
    raise WaferlabError(f"{where}: row {row}: field 'waferMap' holds values other than 0/1/2 "
                        f"(0 no die, 1 good, 2 failed)")


def resize_prepared(p: PreparedData, size: int) -> PreparedData:
    """The same data at another side length (``p``'s own rule from the cached grid; original shapes kept)."""
    if size == p.size:
        return p
    out = np.empty((len(p), size, size), dtype=np.uint8)
    masks = None if p.masks is None else np.empty_like(out)
    for start in range(0, len(p), _CHUNK):
        sl = slice(start, start + _CHUNK)
        out[sl] = resize_stack(p.maps[sl], size, p.resize)
        if masks is not None:
            masks[sl] = resize_stack(p.masks[sl], size, p.resize, mask=True)
    return replace(p, maps=out, masks=masks, size=size)


# ----------------------------------------------------------------------------------------------- cache file
def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    strings = np.array([str(v) for v in values.tolist()] or [""], dtype=str)[: len(values)]
    vocab, codes = np.unique(strings, return_inverse=True)
    return vocab.astype(str), codes.reshape(-1).astype(np.int32)


def save_cache(p: PreparedData, path: str | os.PathLike[str]) -> None:
    """Write ``p`` as one uncompressed, pickle-free .npz, atomically (marker key + metadata JSON)."""
    from waferlab.io import atomic_open

    meta = {"format": CACHE_FORMAT, "size": p.size, "n_maps": len(p), "class_names": list(p.class_names),
            "multi_label_names": list(p.multi_label_names), "source": p.source, "resize": p.resize}
    split_vocab, split_codes = _codes(p.split)
    lot_vocab, lot_codes = _codes(p.lot)
    arrays: dict[str, np.ndarray] = {
        CACHE_MARKER: np.array(json.dumps(meta)),
        "maps": p.maps, "labels": p.labels, "orig_shape": p.orig_shape, "wafer_index": p.wafer_index,
        "split_vocab": split_vocab, "split_codes": split_codes,
        "lot_vocab": lot_vocab, "lot_codes": lot_codes,
    }
    if p.multi_hot is not None:
        arrays["multi_hot"] = np.asarray(p.multi_hot, dtype=np.uint8)
    if p.masks is not None:
        arrays["masks"] = p.masks
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)


def is_cache(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a file written by :func:`save_cache` (checked without loading it)."""
    try:
        if not Path(path).is_file() or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return f"{CACHE_MARKER}.npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def load_cache(path: str | os.PathLike[str]) -> PreparedData:
    """Read a cache written by :func:`save_cache`, never unpickling; a foreign/corrupt file is an error."""
    path = Path(path)
    if not path.is_file():
        raise WaferlabError(f"{path}: cache file not found")
    if not is_cache(path):
        raise WaferlabError(f"{path}: not a waferlab cache (no {CACHE_MARKER!r} entry); "
                            f"make one with 'waferlab data prepare'")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z[CACHE_MARKER][()]))
            if int(meta.get("format", 0)) > CACHE_FORMAT:
                raise WaferlabError(f"{path}: cache format {meta.get('format')} is newer than this waferlab "
                                    f"reads ({CACHE_FORMAT}); upgrade waferlab or prepare the cache again")
            arrays = {key: z[key] for key in z.files if key != CACHE_MARKER}
    except WaferlabError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise WaferlabError(f"{path}: corrupt waferlab cache ({type(exc).__name__}: {exc}); "
                            f"prepare it again") from None
    missing = {"maps", "labels", "orig_shape", "wafer_index", "split_vocab", "split_codes",
               "lot_vocab", "lot_codes"} - set(arrays)
    if missing:
        raise WaferlabError(f"{path}: corrupt waferlab cache (missing {', '.join(sorted(missing))})")
    try:
        split = arrays["split_vocab"].astype(object)[arrays["split_codes"]]
        lot = arrays["lot_vocab"].astype(object)[arrays["lot_codes"]]
        return PreparedData(
            maps=arrays["maps"], labels=arrays["labels"], class_names=tuple(meta["class_names"]),
            split=split, lot=lot, wafer_index=arrays["wafer_index"], orig_shape=arrays["orig_shape"],
            size=int(meta["size"]), source=str(meta.get("source", "")),
            multi_hot=arrays.get("multi_hot"), multi_label_names=tuple(meta.get("multi_label_names", ())),
            masks=arrays.get("masks"), resize=str(meta.get("resize", LEGACY_RESIZE)),
        )
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise WaferlabError(f"{path}: corrupt waferlab cache ({type(exc).__name__}: {exc})") from None


def load_prepared(src: str | os.PathLike[str], size: int | None = None, progress: bool = False,
                  resize: str = DEFAULT_RESIZE) -> PreparedData:
    """Data at ``size`` x ``size`` shrunk with the rule ``resize``, from a cache or any source.

    A non-cache source is read with ``waferlab.data.readers.load_table`` and prepared on the fly
    (size defaults to 64 there; for a cache, ``None`` keeps the cached size). A cache prepared with
    another rule is an error, never used silently (its maps were shrunk differently).
    """
    check_resize(resize)
    if is_cache(src):
        p = load_cache(src)
        if p.resize != resize:
            raise WaferlabError(f"{src}: cache prepared with resize {p.resize!r}, but {resize!r} is asked "
                                f"for; prepare it again with 'waferlab data prepare --resize {resize}'")
        return p if size is None else resize_prepared(p, int(size))
    from waferlab.data.readers import load_table

    return prepare(load_table(src), DEFAULT_SIZE if size is None else int(size), progress=progress,
                   resize=resize)
