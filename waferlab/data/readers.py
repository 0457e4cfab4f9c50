"""One entry point, :func:`load_table`, for every wafer-map source; plus the pickle-free safe ``.npz`` format.

Sources: LSWMD pickles (loading a pickle runs code from the file, see :mod:`waferlab.data.lswmd`), the CSV
export, MixedWM38 ``.npz``, waferlab's safe ``.npz``, folders of images and fab files (STDF, SEMI G85, TSK,
KLARF: :mod:`waferlab.data.fab`). The file's content is checked
against its extension, so a mislabelled or corrupt file is a one-line :class:`WaferlabError`.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from waferlab.data.cache import CACHE_MARKER
from waferlab.data.fab import FabOptions, read_fab
from waferlab.data.fab import detect as detect_fab
from waferlab.data.lswmd import normalize_class, parse_label, read_lswmd, read_lswmd_csv
from waferlab.data.table import MIXED38_TYPES, UNLABELED, WaferTable
from waferlab.errors import WaferlabError

SAFE_MARKER = "__waferlab_safe__"
SAFE_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_LOSSY_FORMATS = ("JPEG", "WEBP", "MPO")
#: viridis at 0, 0.5 and 1: the colours of "no die", "good die" and "failed die" in most wafer figures.
VIRIDIS_LEVELS = np.array([(68, 1, 84), (33, 145, 140), (253, 231, 37)], dtype=np.float64)
#: In MixedWM38 file names written as ``mixed_<A>_<B>_<idx>.png`` the arr_1 columns were named with
#: Random and Scratch swapped (data.md S.2: every "Random" map shows a scratch line).
_MIXED_FILENAME_SWAP = {"Random": "Scratch", "Scratch": "Random"}
#: Mean RGB distance to the nearest viridis level above which an image is not taken for a wafer map
#: (the sample's lossy 32x32 JPEGs reach 97; uniformly random colours give about 119).
_MAX_MEAN_COLOUR_DISTANCE = 105.0

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x93NUMPY", "npy"),
)
_KIND_TEXT = {
    "pickle": "a pickle", "zip": "a zip/npz archive", "gzip": "gzip data", "bz2": "bzip2 data",
    "xz": "xz data", "png": "a PNG image", "jpeg": "a JPEG image", "gif": "a GIF image", "bmp": "a BMP image",
    "tiff": "a TIFF image", "webp": "a WebP image", "npy": "a .npy array", "text": "text",
    "binary": "unrecognised binary data", "empty": "empty",
}
_IMAGE_KINDS = ("png", "jpeg", "gif", "bmp", "tiff", "webp")
_EXPECTED: dict[str, tuple[str, ...]] = {
    ".pkl": ("pickle",), ".pickle": ("pickle",), ".npz": ("zip",), ".csv": ("text",), ".tsv": ("text",),
    ".txt": ("text",), ".png": ("png",), ".jpg": ("jpeg",), ".jpeg": ("jpeg",), ".gif": ("gif",),
    ".bmp": ("bmp",), ".tif": ("tiff",), ".tiff": ("tiff",), ".webp": ("webp",),
}
_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip"}


def sniff(path: str | os.PathLike[str]) -> str:
    """What a file really is, from its first bytes: ``pickle``, ``zip``, ``png``, ``jpeg``, ``text``, ..."""
    with open(path, "rb") as fh:
        head = fh.read(8192)
    if not head:
        return "empty"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if b"\x00" in head:
        return "binary"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a multi-byte character cut at the end of the sample is fine
            return "binary"
    return "text"


def load_table(path: str | os.PathLike[str], fab: FabOptions | None = None, lean: bool = False) -> WaferTable:
    """Read any supported source into a :class:`WaferTable` (maps at original size).

    ``.pkl``/``.pickle`` (optionally ``.gz``/``.zip``/...): LSWMD pickle (runs code from the file:
    trusted files only); ``.csv``/``.tsv``: CSV export; ``.npz``: MixedWM38 or waferlab safe; images;
    fab files (STDF, SEMI G85, TSK, KLARF; by extension or content, see :mod:`waferlab.data.fab`), made
    into pass/fail maps as ``fab`` says (default: STDF hard bin 1 passes). ``lean``: an LSWMD pickle or a
    safe ``.npz`` keeps its maps packed, 2 bits a die (see :mod:`waferlab.data.lean`; ``table.maps`` then
    decodes each map on access), for a reader that goes through them once, like ``predict``.
    """
    p = Path(path)
    if not p.exists():
        raise WaferlabError(f"{p}: no such file or directory")
    if p.is_dir():
        return read_image_folder(p)
    kind = _sniff_nonempty(p)
    suffixes = [s.lower() for s in p.suffixes[-2:]]
    ext = suffixes[-1] if suffixes else ""
    if ext in _COMPRESSED and len(suffixes) == 2 and suffixes[0] in (".pkl", ".pickle"):
        _expect(p, kind, (_COMPRESSED[ext],), "".join(suffixes))
        return read_lswmd(p, lean=lean)
    if ext not in _EXPECTED:
        fmt = detect_fab(p, kind)
        if fmt is not None:
            return read_fab(p, fmt, fab)
    if ext in _EXPECTED:
        _expect(p, kind, _EXPECTED[ext], ext)
    elif kind in ("binary", "npy", "gzip", "bz2", "xz"):
        raise WaferlabError(f"{p}: unsupported file ({_KIND_TEXT[kind]}); expected an LSWMD .pkl, a .csv "
                            "export, a .npz (MixedWM38 or waferlab safe), an image, a folder of images or a "
                            "fab file (STDF, SEMI G85, TSK, KLARF)")
    if kind == "pickle":
        return read_lswmd(p, lean=lean)
    if kind == "zip":
        return read_npz(p, lean=lean)
    if kind in _IMAGE_KINDS:
        return read_image_file(p)
    return read_lswmd_csv(p)


def _expect(p: Path, kind: str, allowed: tuple[str, ...], ext: str) -> None:
    if kind not in allowed:
        raise WaferlabError(f"{p}: the file is {_KIND_TEXT.get(kind, kind)}, not "
                            f"{' or '.join(_KIND_TEXT[a] for a in allowed)} as its extension {ext!r} says")


# ----------------------------------------------------------------------------------------------------
# npz: MixedWM38 and the safe format


def _open_npz(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise WaferlabError(f"{path}: corrupt or truncated npz archive ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _member(npz: Any, path: Path, key: str) -> np.ndarray:
    try:
        return npz[key]
    except KeyError:
        raise WaferlabError(f"{path}: npz has no array {key!r} (keys: {', '.join(npz.files)})") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise WaferlabError(f"{path}: field {key!r} holds pickled Python objects; refusing to load "
                                "them") from None
        raise WaferlabError(f"{path}: field {key!r} is corrupt ({_short(exc)})") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise WaferlabError(f"{path}: field {key!r} is corrupt or truncated ({_short(exc)})") from None


def read_npz(path: str | os.PathLike[str], lean: bool = False) -> WaferTable:
    """Read a MixedWM38 ``.npz`` (``arr_0``/``arr_1``) or a waferlab safe ``.npz``; reject prepared caches.
    ``lean``: a safe file's maps are read in batches and kept packed (see :func:`_read_safe_npz`)."""
    path = Path(path)
    with _open_npz(path) as npz:
        keys = set(npz.files)
        if CACHE_MARKER in keys:
            raise WaferlabError(f"{path}: this is a prepared cache (output of 'waferlab data prepare'), "
                                "not a source table; pass it where a cache is accepted, or use the original "
                                "source")
        if SAFE_MARKER in keys:
            return _read_safe_npz(npz, path, lean)
        if {"arr_0", "arr_1"} <= keys:
            return _read_mixed38_npz(npz, path)
        raise WaferlabError(f"{path}: npz has keys {sorted(keys)}; expected 'arr_0' and 'arr_1' (MixedWM38) "
                            f"or a waferlab safe file ({SAFE_MARKER!r})")


def _read_mixed38_npz(npz: Any, path: Path) -> WaferTable:
    maps = _member(npz, path, "arr_0")
    hot = _member(npz, path, "arr_1")
    if maps.ndim != 3 or maps.shape[1] == 0 or maps.shape[2] == 0:
        raise WaferlabError(f"{path}: field 'arr_0' has shape {maps.shape}, expected (N, H, W) wafer maps")
    if hot.ndim != 2 or hot.shape[1] != len(MIXED38_TYPES):
        raise WaferlabError(f"{path}: field 'arr_1' has shape {hot.shape}, expected "
                            f"(N, {len(MIXED38_TYPES)}) multi-hot labels")
    if len(hot) != len(maps):
        raise WaferlabError(f"{path}: field 'arr_1' has {len(hot)} label rows for {len(maps)} maps "
                            "in 'arr_0'")
    maps = _check_map_block(maps, path, "arr_0", 2)
    if hot.dtype.kind not in "biuf" or not np.isin(hot, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(hot, (0, 1)).all(axis=1))[0]) if hot.dtype.kind in "biuf" else 0
        raise WaferlabError(f"{path}: row {row}, field 'arr_1': multi-hot labels must be 0 or 1")
    hot = hot.astype(np.uint8)
    uniq, inverse = np.unique(hot, axis=0, return_inverse=True)
    names = np.array(["+".join(t for t, on in zip(MIXED38_TYPES, row) if on) or "none" for row in uniq],
                     dtype=object)
    n = len(maps)
    return WaferTable(maps=list(maps), labels=names[inverse.ravel()], split=np.full(n, "", dtype=object),
                      lot=np.full(n, "", dtype=object), wafer_index=np.arange(n), source=str(path),
                      multi_hot=hot, multi_label_names=MIXED38_TYPES)


def _check_map_block(arr: np.ndarray, path: Path, field: str, allowed_max: int,
                     offsets: np.ndarray | None = None, first_row: int = 0) -> np.ndarray:
    """Range-check a block of maps at once; the error names the first bad row (the block's first row being
    ``first_row`` of the file). Returns uint8."""
    if arr.dtype.kind not in "biuf":
        raise WaferlabError(f"{path}: field {field!r} has dtype {arr.dtype}, expected integers "
                            f"0..{allowed_max}")
    if arr.size == 0:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "biu" and 0 <= arr.min() and arr.max() <= allowed_max:  # the common case, fast
        return arr if arr.dtype == np.uint8 else arr.astype(np.uint8)
    flat = arr.reshape(len(arr), -1) if offsets is None else arr
    bad = ~np.isfinite(flat) if arr.dtype.kind == "f" else None
    if bad is None or not bad.any():
        bad = (flat < 0) | (flat > allowed_max)
        if arr.dtype.kind == "f":
            bad |= flat != np.round(flat)
    if bad.any():
        if offsets is None:
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            value = flat[row][bad[row]][0]
        else:
            pos = int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(offsets, pos, side="right") - 1)
            value = flat[pos]
        what = "NaN or infinity" if not np.isfinite(value) else f"value {value:g} outside 0..{allowed_max}"
        raise WaferlabError(f"{path}: row {first_row + row}, field {field!r}: {what}")
    return arr if arr.dtype == np.uint8 else arr.astype(np.uint8)


def write_safe(table: WaferTable, path: str | os.PathLike[str]) -> None:
    """Write ``table`` atomically as a pickle-free ``.npz`` (one flat uint8 buffer + shapes/offsets).

    Strings are stored as unicode arrays, so :func:`read_safe` loads it with ``allow_pickle=False``.
    """
    from waferlab.io import atomic_open

    n = len(table)
    shapes = np.array([m.shape for m in table.maps], dtype=np.int64).reshape(n, 2)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(shapes[:, 0] * shapes[:, 1], out=offsets[1:])
    flat = (np.concatenate([np.asarray(m, dtype=np.uint8).ravel() for m in table.maps]) if n
            else np.zeros(0, np.uint8))
    arrays: dict[str, np.ndarray] = {
        SAFE_MARKER: np.array(SAFE_VERSION, dtype=np.int64),
        "maps": flat,
        "shapes": shapes,
        "offsets": offsets,
        "labels": _unicode(table.labels),
        "split": _unicode(table.split),
        "lot": _unicode(table.lot),
        "wafer_index": np.asarray(table.wafer_index, dtype=np.int64),
        "orig_shape": np.asarray(table.orig_shape, dtype=np.int32).reshape(n, 2),
        "source": np.array(str(table.source)),
    }
    if table.masks is not None:
        for i, (m, k) in enumerate(zip(table.maps, table.masks)):
            if np.shape(k) != m.shape:
                raise WaferlabError(f"{path}: row {i}, field 'masks': shape {np.shape(k)} differs from the "
                                    f"map's {m.shape}")
        arrays["masks"] = (np.concatenate([np.asarray(k, dtype=np.uint8).ravel() for k in table.masks]) if n
                           else np.zeros(0, np.uint8))
    if table.bins is not None:  # fab files: the bin per die, -1 where there is no die
        for i, (m, b) in enumerate(zip(table.maps, table.bins)):
            if np.shape(b) != m.shape:
                raise WaferlabError(f"{path}: row {i}, field 'bins': shape {np.shape(b)} differs from the "
                                    f"map's {m.shape}")
        arrays["bins"] = (np.concatenate([np.asarray(b, dtype=np.int32).ravel() for b in table.bins]) if n
                          else np.zeros(0, np.int32))
    if table.wafer_id is not None:
        arrays["wafer_id"] = _unicode(table.wafer_id)
    if table.multi_hot is not None:
        arrays["multi_hot"] = np.asarray(table.multi_hot, dtype=np.uint8)
        arrays["multi_label_names"] = _unicode(np.asarray(table.multi_label_names, dtype=object))
    with atomic_open(path, "wb") as fh:
        _savez_fast(fh, arrays)


def _savez_fast(fh: Any, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` at zlib level 1: about 10x faster on wafer maps, nearly as small."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as zf:
        for key, arr in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)


def _unicode(values: np.ndarray) -> np.ndarray:
    out = np.array([str(v) for v in np.asarray(values, dtype=object).tolist()], dtype=str)
    return out if out.size else np.zeros(0, dtype="<U1")


def read_safe(path: str | os.PathLike[str]) -> WaferTable:
    """Read a file written by :func:`write_safe` (``allow_pickle=False``; everything is validated)."""
    path = Path(path)
    with _open_npz(path) as npz:
        if SAFE_MARKER not in npz.files:
            raise WaferlabError(f"{path}: not a waferlab safe file (no {SAFE_MARKER!r} marker)")
        return _read_safe_npz(npz, path)


def _read_safe_npz(npz: Any, path: Path, lean: bool = False) -> WaferTable:
    """The table of a safe file. ``lean`` (a plain file: uint8 maps, no masks or bins): the maps are read
    in batches straight from the archive and kept packed (:class:`~waferlab.data.lean.MapStore`), never
    as one buffer; the checks and their words are the same."""
    version = _member(npz, path, SAFE_MARKER)
    if version.shape != () or int(version) != SAFE_VERSION:
        raise WaferlabError(f"{path}: safe-format version {version.tolist()} is not supported "
                            f"(this waferlab reads version {SAFE_VERSION})")
    header = _npy_header(npz, "maps") if lean and not {"masks", "bins"} & set(npz.files) else None
    flat = header if header is not None else _member(npz, path, "maps")
    shapes = _member(npz, path, "shapes")
    offsets = _member(npz, path, "offsets")
    if shapes.ndim != 2 or shapes.shape[1] != 2 or shapes.dtype.kind not in "iu":
        raise WaferlabError(f"{path}: field 'shapes' has shape {shapes.shape}, expected (N, 2) integers")
    n = len(shapes)
    sizes = shapes[:, 0].astype(np.int64) * shapes[:, 1]
    if n and (shapes.min() <= 0):
        row = int(np.flatnonzero((shapes <= 0).any(axis=1))[0])
        raise WaferlabError(f"{path}: row {row}, field 'shapes': empty map shape {tuple(shapes[row])}")
    if (flat.ndim != 1 or offsets.shape != (n + 1,) or offsets[0] != 0
            or not np.array_equal(np.diff(offsets), sizes) or offsets[-1] != flat.size):
        raise WaferlabError(f"{path}: fields 'maps'/'shapes'/'offsets' disagree (corrupt file)")
    if header is not None:
        packed = _packed_safe_maps(npz, path, offsets, shapes)
        if packed is None:  # the archive could not be streamed: read it whole, as usual
            return _read_safe_npz(npz, path)
    else:
        flat = _check_map_block(flat, path, "maps", 2, offsets)
    columns = _safe_text_columns(npz, path, n)
    wafer_index = _member(npz, path, "wafer_index")
    orig_shape = _member(npz, path, "orig_shape")
    if wafer_index.shape != (n,) or orig_shape.shape != (n, 2):
        raise WaferlabError(f"{path}: fields 'wafer_index'/'orig_shape' do not have {n} rows")
    if header is not None:
        maps, map_shapes = packed, shapes  # (N, 2) rows reshape as the shape tuples do
    else:
        map_shapes = [(int(h), int(w)) for h, w in shapes.tolist()]
        maps = [flat[offsets[i]:offsets[i + 1]].reshape(map_shapes[i]) for i in range(n)]
    masks = None
    if "masks" in npz.files:
        mflat = _member(npz, path, "masks")
        if mflat.shape != flat.shape:
            raise WaferlabError(f"{path}: field 'masks' has {mflat.size} values, expected {flat.size}")
        mflat = _check_map_block(mflat, path, "masks", 1, offsets)
        masks = [mflat[offsets[i]:offsets[i + 1]].reshape(maps[i].shape) for i in range(n)]
    multi_hot, names = _safe_multi_hot(npz, path, n)
    bins, wafer_id = _read_fab_columns(npz, path, offsets, map_shapes)
    source = _member(npz, path, "source") if "source" in npz.files else np.array(str(path))
    return WaferTable(maps=maps, labels=columns["labels"], split=columns["split"], lot=columns["lot"],
                      wafer_index=wafer_index.astype(np.int64), source=str(source.tolist()) or str(path),
                      multi_hot=multi_hot, multi_label_names=names, masks=masks,
                      orig_shape=orig_shape.astype(np.int32), bins=bins, wafer_id=wafer_id)


def _safe_text_columns(npz: Any, path: Path, n: int) -> dict[str, np.ndarray]:
    """A safe file's labels, split and lot columns: n strings each, every label one the readers know."""
    columns = {}
    for key in ("labels", "split", "lot"):
        col = _member(npz, path, key)
        if col.shape != (n,) or (n and col.dtype.kind != "U"):
            raise WaferlabError(f"{path}: field {key!r} has shape {col.shape} and dtype {col.dtype}, "
                                f"expected {n} strings")
        columns[key] = col.astype(object)
    for value in np.unique(columns["labels"]).tolist() if n else []:
        try:
            parse_label(value)
        except ValueError as exc:
            row = int(np.flatnonzero(columns["labels"] == value)[0])
            raise WaferlabError(f"{path}: row {row}, field 'labels': {exc}") from None
    return columns


def _safe_multi_hot(npz: Any, path: Path, n: int) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """A safe file's optional multi-hot labels (0/1, one row per map) and their names."""
    if "multi_hot" not in npz.files:
        return None, ()
    multi_hot = _member(npz, path, "multi_hot")
    names = tuple(_member(npz, path, "multi_label_names").tolist())
    if multi_hot.shape != (n, len(names)):
        raise WaferlabError(f"{path}: field 'multi_hot' has shape {multi_hot.shape}, expected "
                            f"({n}, {len(names)})")
    return _check_map_block(multi_hot, path, "multi_hot", 1), names


def _npy_header(npz: Any, key: str) -> Any:
    """(shape, size, ndim) of a plain 1-D uint8 member, read from its header only; None otherwise."""
    from types import SimpleNamespace

    try:
        with npz.zip.open(f"{key}.npy") as fp:
            shape, fortran, dtype = _read_npy_header(fp)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    if dtype != np.uint8 or len(shape) != 1:
        return None
    return SimpleNamespace(shape=shape, size=int(shape[0]), ndim=1)


def _read_npy_header(fp: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f"npy format version {version}")


def _packed_safe_maps(npz: Any, path: Path, offsets: np.ndarray, shapes: np.ndarray) -> Any:
    """The maps of a safe file, read batch by batch and packed; :func:`_check_map_block` on each batch, in
    order. None when the member cannot be streamed."""
    from waferlab.data.lean import MapStore, PackedMaps

    n, store = len(shapes), MapStore()
    try:
        with npz.zip.open("maps.npy") as fp:
            _read_npy_header(fp)
            for start in range(0, n, store.BATCH):
                stop = min(start + store.BATCH, n)
                dies = fp.read(int(offsets[stop] - offsets[start]))
                if len(dies) != offsets[stop] - offsets[start]:
                    return None
                batch = offsets[start:stop + 1] - offsets[start]
                _check_map_block(np.frombuffer(dies, np.uint8), path, "maps", 2, batch, first_row=start)
                store.extend(dies, batch)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    return PackedMaps(store, range(n), shapes.astype(np.int32), np.zeros(n, bool))


def _read_fab_columns(npz: Any, path: Path, offsets: np.ndarray,
                      shapes: Any) -> tuple[list[np.ndarray] | None, np.ndarray | None]:
    """The optional fab-file columns of a safe file: per-die bins (int32) and wafer id strings."""
    n = len(shapes)
    bins = wafer_id = None
    if "bins" in npz.files:
        flat = _member(npz, path, "bins")
        if flat.ndim != 1 or flat.dtype.kind not in "iu" or flat.size != offsets[-1]:
            raise WaferlabError(f"{path}: field 'bins' has shape {flat.shape} and dtype {flat.dtype}, "
                                f"expected {int(offsets[-1])} integers")
        flat = flat.astype(np.int32, copy=False)
        bins = [flat[offsets[i]:offsets[i + 1]].reshape(shapes[i]) for i in range(n)]
    if "wafer_id" in npz.files:
        wafer_id = _member(npz, path, "wafer_id")
        if wafer_id.shape != (n,) or (n and wafer_id.dtype.kind != "U"):
            raise WaferlabError(f"{path}: field 'wafer_id' has shape {wafer_id.shape}, expected {n} strings")
        wafer_id = wafer_id.astype(object)
    return bins, wafer_id


# ----------------------------------------------------------------------------------------------------
# images


def class_from_filename(stem: str) -> tuple[str | None, tuple[str, ...] | None]:
    """(label, mixed parts or None) named in an image file name; (None, None) if it names no class.

    ``<n>_<Class>``, ``wm811k_<Class>_<idx>`` and ``mixed_<A>_<B>_<idx>`` (where, as in the MixedWM38
    sample, "Random" means Scratch and vice versa); class aliases as in :func:`normalize_class`.
    """
    tokens = [t for t in re.split(r"[_\s]+", stem) if t]
    mixed = bool(tokens) and tokens[0].lower() in ("mixed", "mixedwm38")
    if tokens and tokens[0].lower() in ("mixed", "mixedwm38", "wm811k"):
        tokens = tokens[1:]
    found: list[str] = []
    i = 0
    while i < len(tokens):
        pair = normalize_class(tokens[i] + tokens[i + 1]) if i + 1 < len(tokens) else None
        if pair is not None:
            found.append(pair)
            i += 2
            continue
        single = normalize_class(tokens[i]) if not tokens[i].isdigit() else None
        if single is not None:
            found.append(single)
        i += 1
    if not found:
        return None, None
    if mixed:
        found = [_MIXED_FILENAME_SWAP.get(c, c) for c in found]
    if not mixed and len(found) == 1:
        return found[0], None
    kinds = [c for c in found if c != "none"]
    if "none" in found and kinds:
        return None, None  # "none" together with a defect type is contradictory
    order = tuple(t for t in MIXED38_TYPES if t in kinds)
    return ("+".join(order) or "none"), order


def decode_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a wafer-map image to a uint8 0/1/2 map at file size.

    Grayscale 0/127/255 -> round(px/127.5) (values 0/1/2 stored directly are kept); colour maps with three
    colours -> viridis levels or luminance order, exactly; lossy JPEG -> nearest viridis level, approximately.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            fmt = im.format or ""
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA")
            if im.mode in ("1", "L", "I", "I;16", "F"):
                gray = np.asarray(im.convert("L") if im.mode != "L" else im)
                alpha = None
                rgb = None
            elif im.mode == "LA":
                arr = np.asarray(im)
                gray, alpha, rgb = arr[..., 0], arr[..., 1], None
            else:
                arr = np.asarray(im.convert("RGBA"))
                rgb, alpha, gray = arr[..., :3], arr[..., 3], None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error, EOFError) as exc:
        raise WaferlabError(f"{path}: corrupt, truncated or unreadable image ({_short(exc)})") from None
    lossy = fmt in _LOSSY_FORMATS
    if gray is None and rgb is not None and (rgb == rgb[..., :1]).all():
        gray = rgb[..., 0]
    if gray is not None:
        out = _decode_gray(np.asarray(gray), lossy, path)
    else:
        out = _decode_colour(np.asarray(rgb), lossy, path)
    if alpha is not None and (np.asarray(alpha) < 128).any():
        out = np.where(np.asarray(alpha) < 128, 0, out).astype(np.uint8)
    if out.ndim != 2 or out.size == 0:
        raise WaferlabError(f"{path}: image has no pixels")
    return np.ascontiguousarray(out, dtype=np.uint8)


def _decode_gray(gray: np.ndarray, lossy: bool, path: Path) -> np.ndarray:
    if not lossy and gray.max() <= 2:
        return gray.astype(np.uint8)  # the map's own values saved as pixels
    levels = np.rint(gray.astype(np.float32) / 127.5)
    if not lossy:
        off = np.abs(gray.astype(np.float32) - levels * 127.5)
        if off.max() > 8:
            raise WaferlabError(f"{path}: grayscale values are not the 3 levels 0/127/255 of a wafer map "
                                f"(pixel value {int(gray.ravel()[int(np.argmax(off))])})")
    return levels.astype(np.uint8)


def _decode_colour(rgb: np.ndarray, lossy: bool, path: Path) -> np.ndarray:
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    uniq, inverse = np.unique(packed.ravel(), return_inverse=True)
    colours = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.float64)
    dist = np.linalg.norm(colours[:, None, :] - VIRIDIS_LEVELS[None, :, :], axis=2)
    nearest = dist.argmin(axis=1)
    if not lossy and len(uniq) <= 3:
        if dist.min(axis=1).max() < 40 and len(set(nearest.tolist())) == len(uniq):
            level = nearest
        elif len(uniq) == 3:  # another colour map: order the three colours by luminance
            lum = colours @ np.array([0.299, 0.587, 0.114])
            level = np.argsort(np.argsort(lum))
        else:
            raise WaferlabError(f"{path}: cannot tell which of its {len(uniq)} colours mean no die / good / "
                                "failed (not viridis)")
    else:
        counts = np.bincount(inverse.ravel(), minlength=len(uniq))
        mean = float((dist.min(axis=1) * counts).sum() / counts.sum())
        if mean > _MAX_MEAN_COLOUR_DISTANCE:
            raise WaferlabError(f"{path}: colours do not look like a viridis wafer map (mean distance "
                                f"{mean:.0f} to the nearest viridis level)")
        level = nearest
    return level[inverse].reshape(packed.shape).astype(np.uint8)


def _sniff_nonempty(path: Path) -> str:
    """The file's kind by its first bytes; an unreadable or empty file is a one-line user error."""
    try:
        kind = sniff(path)
    except OSError as exc:
        raise WaferlabError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if kind == "empty":
        raise WaferlabError(f"{path}: file is empty")
    return kind


def _check_image_magic(path: Path) -> None:
    ext = path.suffix.lower()
    kind = _sniff_nonempty(path)
    _expect(path, kind, _EXPECTED.get(ext, _IMAGE_KINDS), ext)


def read_image_file(path: str | os.PathLike[str]) -> WaferTable:
    """One image as a one-row table; the class comes from the file name or folder, else ``unlabeled``."""
    path = Path(path)
    _check_image_magic(path)
    label, parts = class_from_filename(path.stem)
    if label is None:
        try:
            label, parts = parse_label(path.parent.name)
        except ValueError:
            label, parts = UNLABELED, None
    m = decode_image(path)
    return _image_table([m], [label], [parts], [path], str(path))


def _image_files(folder: Path) -> list[tuple[Path, str | None, tuple[str, ...] | None]]:
    """(file, label, parts) of images directly in ``folder`` or one level down, in a stable order."""
    def natural(p: Path) -> list[Any]:
        return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]

    found = []
    try:
        entries = sorted(folder.iterdir(), key=natural)
    except OSError as exc:
        raise WaferlabError(f"{folder}: cannot list folder ({exc.strerror or exc})") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            try:
                folder_label: tuple[str | None, tuple[str, ...] | None] = parse_label(entry.name)
                if folder_label[0] == UNLABELED:
                    folder_label = (None, None)
            except ValueError:
                folder_label = (None, None)
            for f in sorted(entry.iterdir(), key=natural):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                    found.append((f, *folder_label))
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            found.append((entry, None, None))
    return found


def read_image_folder(path: str | os.PathLike[str], progress: bool | None = None) -> WaferTable:
    """Read a folder of wafer-map images: one sub-folder per class, or the class in each file name.

    Class aliases are normalised to WM-811K spelling; mixture names give a multi-hot table. ``progress``
    None shows a bar for large folders when stderr is a terminal.
    """
    import sys

    from tqdm import tqdm

    path = Path(path)
    files = _image_files(path)
    if progress is None:
        progress = len(files) > 2000 and sys.stderr.isatty()
    if not files:
        raise WaferlabError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its "
                            "sub-folders")
    maps, labels, parts, paths = [], [], [], []
    for f, label, part in tqdm(files, desc="images", disable=not progress, leave=False):
        if label is None:
            label, part = class_from_filename(f.stem)
        if label is None:
            raise WaferlabError(f"{f}: no class in the folder name {f.parent.name!r} or the file name "
                                "(expected <Class>/<file>, <n>_<Class>.png, wm811k_<Class>_<idx>.png or "
                                "mixed_<A>_<B>_<idx>.png)")
        _check_image_magic(f)
        maps.append(decode_image(f))
        labels.append(label)
        parts.append(part)
        paths.append(f)
    return _image_table(maps, labels, parts, paths, str(path))


def _image_table(maps: list[np.ndarray], labels: list[str], parts: list[tuple[str, ...] | None],
                 paths: list[Path], source: str) -> WaferTable:
    n = len(maps)
    multi_hot = None
    if any(p is not None for p in parts):
        col = {t: j for j, t in enumerate(MIXED38_TYPES)}
        multi_hot = np.zeros((n, len(MIXED38_TYPES)), dtype=np.uint8)
        for i, (lab, p) in enumerate(zip(labels, parts)):
            for t in p if p is not None else ((lab,) if lab in col else ()):
                multi_hot[i, col[t]] = 1
    index = []
    for p in paths:
        digits = re.findall(r"\d+", p.stem)
        index.append(int(digits[-1]) if digits else -1)
    return WaferTable(maps=maps, labels=np.array(labels, dtype=object), split=np.full(n, "", dtype=object),
                      lot=np.full(n, "", dtype=object), wafer_index=np.array(index, dtype=np.int64),
                      source=source, multi_hot=multi_hot,
                      multi_label_names=MIXED38_TYPES if multi_hot is not None else ())
