"""WM-811K ``LSWMD.pkl`` reader/writer (legacy and modern pandas pickles) and the tab-separated CSV export.

Security: **loading a pickle runs code from the file.** The unpickler here only resolves classes from
numpy, pandas and a few harmless builtins, which blocks the usual attacks, but that is a mitigation, not a
proof: only open pickles you trust, convert them once (``waferlab data convert``) and share the pickle-free
``.npz`` instead.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import json
import lzma
import math
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from waferlab.data.table import MIXED38_TYPES, UNLABELED, WM811K_CLASSES, WaferTable
from waferlab.errors import WaferlabError

#: Columns of the original file (``trianTestLabel`` is misspelt in WM-811K itself).
LSWMD_COLUMNS: tuple[str, ...] = ("waferMap", "dieSize", "lotName", "waferIndex", "trianTestLabel",
                                  "failureType")
#: Extra column written by :func:`write_lswmd` for synthetic maps: the true pattern region (uint8 0/1).
MASK_COLUMN = "patternMask"
#: Extra column written by :func:`write_lswmd` for mixed-type tables: one multi-hot row per map.
MULTI_HOT_COLUMN = "multiHot"
_SPLIT_COLUMNS = ("trianTestLabel", "trainTestLabel")
#: The columns a table is made of (besides ``waferIndex``): every other column is ignored.
_CELL_COLUMNS = ("waferMap", "failureType", *_SPLIT_COLUMNS, "lotName", MASK_COLUMN, MULTI_HOT_COLUMN)
_CHUNK = 20_000

# ----------------------------------------------------------------------------------------------------
# class names


def _alias_key(text: str) -> str:
    return re.sub(r"[\s_\-]+", "", text.strip().lower())


_ALIASES: dict[str, str] = {_alias_key(c): c for c in WM811K_CLASSES}
_ALIASES.update({
    "centre": "Center", "edgelocal": "Edge-Loc", "local": "Loc", "normal": "none",
    "nearfull": "Near-full",
})


def normalize_class(name: str) -> str | None:
    """WM-811K spelling of a class name or alias (``Edge Local`` -> ``Edge-Loc``), or None if unknown.

    Matching ignores case, spaces, hyphens and underscores; ``None``/``Normal`` mean ``none``.
    """
    return _ALIASES.get(_alias_key(name))


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _where(path: str | os.PathLike[str], row: int | None = None, field: str | None = None,
           index: object = None) -> str:
    out = str(path)
    if row is not None:
        out += f": row {row}"
        if index is not None and index != row:
            out += f" (index {index})"
    if field is not None:
        out += f", field {field!r}" if row is not None else f": field {field!r}"
    return out


def _bad(path: str | os.PathLike[str], msg: str, row: int | None = None, field: str | None = None,
         index: object = None) -> WaferlabError:
    return WaferlabError(f"{_where(path, row, field, index)}: {_one_line(msg)}")


# ----------------------------------------------------------------------------------------------------
# restricted, legacy-aware unpickling

# pandas 0.19 (Python 2) module paths -> where the objects live now.
_MODULE_RENAMES: tuple[tuple[str, str], ...] = (
    ("pandas.indexes", "pandas.core.indexes"),
    ("pandas.tseries.index", "pandas.core.indexes.datetimes"),
    ("pandas.tseries.period", "pandas.core.indexes.period"),
    ("pandas.tseries.tdi", "pandas.core.indexes.timedeltas"),
    ("pandas.sparse", "pandas.core.sparse"),
    ("pandas.tslib", "pandas._libs.tslibs"),
    ("pandas._period", "pandas._libs.tslibs.period"),
    ("pandas.lib", "pandas._libs.lib"),
)
_NAME_RENAMES: dict[tuple[str, str], tuple[str, str]] = {
    ("pandas.core.indexes.numeric", "Int64Index"): ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.numeric", "UInt64Index"): ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.numeric", "Float64Index"): ("pandas.core.indexes.base", "Index"),
    ("pandas.core.internals.blocks", "new_block"): ("pandas._libs.internals", "_unpickle_block"),
    ("pandas._libs.tslibs.nattype", "__nat_unpickle"): ("pandas._libs.tslibs.nattype", "_nat_unpickle"),
    ("pandas.core.arrays.sparse.dtype", "SparseDtype"): ("pandas.core.dtypes.dtypes", "SparseDtype"),
}
_SAFE_BUILTINS = frozenset({
    "slice", "set", "frozenset", "complex", "bytearray", "bytes", "object", "list", "dict", "tuple",
    "int", "float", "str", "bool", "range", "unicode", "long",
})
_ALLOWED_ROOTS = ("numpy", "pandas", "datetime", "collections", "decimal", "zoneinfo", "pytz", "dateutil")
_DENIED_PARTS = ("io", "testing", "util", "plotting", "f2py", "distutils", "ctypeslib", "npyio", "_pytest",
                 "compat", "api", "conftest", "tests", "random", "_sysconfig")
# pandas >= 3 stores text columns as pyarrow arrays when pyarrow is installed; their pickles rebuild them
# with these three (a type from its name, a buffer from bytes, an array from those), nothing else of pyarrow's
_PYARROW_NAMES = frozenset({"type_for_alias", "py_buffer", "_restore_array"})
_DENIED_NAMES = frozenset({"load", "loads", "read_pickle", "eval", "exec", "system", "open", "fromfile",
                           "memmap", "genfromtxt", "loadtxt", "read_csv", "save", "savez", "tofile",
                           "__import__", "getattr", "setattr"})


def _legacy_blockmanager_class() -> type:
    from pandas.core.internals import BlockManager

    class _LegacyBlockManager(BlockManager):
        """Stands in for ``BlockManager`` while unpickling: old pickles build it with no arguments."""

        def __new__(cls, *args: Any) -> Any:  # noqa: D102 - returns a real BlockManager
            if args:
                return BlockManager.__new__(BlockManager, *args)
            return BlockManager.__new__(BlockManager, (), [], False)

    return _LegacyBlockManager


class _LswmdUnpickler(pickle.Unpickler):
    """C-speed unpickler that maps pandas-0.19 module paths to today's and refuses unexpected globals."""

    def __init__(self, fh: IO[bytes], path: str) -> None:
        super().__init__(fh, encoding="latin1")
        self._path = path
        self._block_manager: type | None = None

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        for old, new in _MODULE_RENAMES:
            if module == old or module.startswith(old + "."):
                module = new + module[len(old):]
                break
        module, name = _NAME_RENAMES.get((module, name), (module, name))
        if module == "numpy.core" or module.startswith("numpy.core."):  # numpy 2 moved it to numpy._core
            module = _numpy_core() + module[len("numpy.core"):]
        if name == "BlockManager" and module in ("pandas.core.internals", "pandas.core.internals.managers"):
            if self._block_manager is None:
                self._block_manager = _legacy_blockmanager_class()
            return self._block_manager
        if not _allowed(module, name):
            raise WaferlabError(f"{self._path}: the pickle refers to {module}.{name}, which a wafer-map "
                                "DataFrame never needs; refusing to load it (untrusted pickle?)")
        if module == "pyarrow.lib" and name == "_restore_array":
            return functools.partial(_restore_arrow_array, self._path)
        return super().find_class(module, name)


def _restore_arrow_array(path: str, data: Any) -> Any:
    """pyarrow's ``_restore_array``, then a full validation: the offsets and lengths come from the file, and
    an array whose offsets point outside its buffers would read memory it does not own."""
    from pyarrow import lib

    array = lib._restore_array(data)
    try:
        array.validate(full=True)
    except (lib.ArrowException, ValueError) as exc:
        raise WaferlabError(f"{path}: a text column's pyarrow array is malformed ({exc})") from None
    return array


def _numpy_core() -> str:
    return "numpy._core" if hasattr(np, "_core") else "numpy.core"


def _allowed(module: str, name: str) -> bool:
    if name in _DENIED_NAMES:
        return False
    if module == "builtins":
        return name in _SAFE_BUILTINS
    if module == "copyreg":
        return name in ("_reconstructor", "__newobj__", "__newobj_ex__")
    if module == "_codecs":
        return name == "encode"
    if module == "pyarrow.lib":
        return name in _PYARROW_NAMES
    parts = module.split(".")
    return parts[0] in _ALLOWED_ROOTS and not any(p in _DENIED_PARTS for p in parts[1:])


def _open_maybe_compressed(path: Path, fh: IO[bytes]) -> IO[bytes]:
    """A stream of the pickle inside ``fh``: plain, gzip, bz2, xz or a one-member zip (``LSWMD.pkl.zip``)."""
    head = fh.read(6)
    fh.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=fh)  # type: ignore[return-value]
    if head[:3] == b"BZh":
        return bz2.BZ2File(fh)  # type: ignore[return-value]
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(fh)  # type: ignore[return-value]
    if head[:4] == b"PK\x03\x04":
        zf = zipfile.ZipFile(fh)
        members = [m for m in zf.namelist() if not m.endswith("/")]
        pickles = [m for m in members if m.lower().endswith((".pkl", ".pickle"))] or members
        if len(pickles) != 1:
            raise WaferlabError(f"{path}: zip archive holds {len(members)} files; expected one pickle "
                                "(an .npz belongs in a file named *.npz)")
        return zf.open(pickles[0])  # type: ignore[return-value]
    return fh


def load_pickle(path: str | os.PathLike[str], unpickler: Any = None) -> Any:
    """Unpickle ``path`` with the legacy-pandas aliases (Python-2 ``latin1`` strings included).

    Loading a pickle runs code from the file; only numpy/pandas classes are resolved, but trust the source.
    ``unpickler(stream, path)`` may replace :class:`_LswmdUnpickler` by a subclass of it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            stream = _open_maybe_compressed(path, raw)
            head = stream.read(2)
            if not head:
                raise WaferlabError(f"{path}: file is empty")
            if head[:1] != b"\x80" or not 2 <= head[1] <= 5:
                raise WaferlabError(f"{path}: not a pickle (no pickle protocol 2-5 header)")
            stream.seek(0)
            return (unpickler or _LswmdUnpickler)(stream, str(path)).load()  # type: ignore[arg-type]
    except WaferlabError:
        raise
    except (EOFError, pickle.UnpicklingError) as exc:
        raise WaferlabError(f"{path}: truncated or corrupt pickle ({_one_line(exc) or type(exc).__name__})"
                            ) from None
    except (ModuleNotFoundError, AttributeError) as exc:
        raise WaferlabError(f"{path}: the pickle needs {_one_line(exc)}; it was written by a library "
                            "version this reader does not know") from None
    except MemoryError:
        raise WaferlabError(f"{path}: corrupt pickle, or out of memory while unpickling it") from None
    except (zipfile.BadZipFile, OSError, lzma.LZMAError, ValueError, TypeError, KeyError, IndexError,
            UnicodeDecodeError, NotImplementedError) as exc:
        raise WaferlabError(f"{path}: corrupt pickle ({type(exc).__name__}: {_one_line(exc)})") from None


# ----------------------------------------------------------------------------------------------------
# cell parsing


def _text_label(text: str) -> str:
    """The label inside a text cell such as ``[['Center']]``, ``[[none]]``, ``[]`` or ``Center``."""
    return text.strip().strip("[]").strip().strip("'\"").strip()


def _scalar_of(value: Any) -> Any:
    """The one scalar of a nested label cell: ndarray/list (possibly empty), bytes, NaN or None."""
    while True:
        if isinstance(value, np.ndarray):
            if value.size == 0:
                return ""
            if value.size > 1:
                raise ValueError(f"label array has {value.size} entries, expected one")
            value = value.item(0)
        elif isinstance(value, (list, tuple)):
            if len(value) == 0:
                return ""
            if len(value) > 1:
                raise ValueError(f"label list has {len(value)} entries, expected one")
            value = value[0]
        elif isinstance(value, bytes):
            return value.decode("latin1")
        elif value is None:
            return ""
        elif isinstance(value, float) and math.isnan(value):
            return ""
        elif isinstance(value, (str, np.str_)):
            return str(value)
        else:
            raise ValueError(f"unexpected {type(value).__name__} {value!r}")


def parse_label(text: str) -> tuple[str, tuple[str, ...] | None]:
    """(WM-811K label, mixed-type parts or None) of a label string; raises ValueError if unknown.

    Empty text means unlabelled; ``A+B`` is a MixedWM38-style mixture of known types.
    """
    text = _text_label(text)
    if not text or text.lower() in (UNLABELED, "nan"):
        return UNLABELED, None
    if "+" in text:
        parts = [normalize_class(p) for p in text.split("+")]
        if any(p is None or p == "none" for p in parts):
            raise ValueError(f"unknown label {text!r}")
        order = [t for t in MIXED38_TYPES if t in parts]
        return "+".join(order), tuple(order)
    name = normalize_class(text)
    if name is None:
        raise ValueError(f"unknown label {text!r} (expected one of {', '.join(WM811K_CLASSES)})")
    return name, None


def _cell_texts(cells: Sequence[Any], path: Path, field: str, index: Sequence[Any]) -> list[str]:
    """The text inside each label cell (nested array, plain string, NaN/None -> ``""``), fast path first."""
    out: list[str] = []
    append = out.append
    ndarray = np.ndarray
    for i, cell in enumerate(cells):
        kind = type(cell)
        if kind is ndarray:
            size = cell.size
            if size == 0:
                append("")
                continue
            if size == 1:
                value = cell.item(0)
                if type(value) is str:
                    append(value)
                    continue
        elif kind is str:
            append(cell)
            continue
        try:
            append(_scalar_of(cell))
        except ValueError as exc:
            raise _bad(path, str(exc), i, field, index[i]) from None
    return out


def _labels_from_cells(cells: Sequence[Any], path: Path, field: str, index: Sequence[Any]
                       ) -> tuple[np.ndarray, list[tuple[str, ...] | None]]:
    texts = _cell_texts(cells, path, field, index)
    lookup: dict[str, tuple[str, tuple[str, ...] | None]] = {}
    for value in set(texts):
        try:
            lookup[value] = parse_label(value)
        except ValueError as exc:
            row = texts.index(value)
            raise _bad(path, str(exc), row, field, index[row]) from None
    labels = np.array([lookup[v][0] for v in texts] if texts else [], dtype=object)
    if any(p is not None for _, p in lookup.values()):
        return labels, [lookup[v][1] for v in texts]
    return labels, [None] * len(texts)


_SPLITS = {"training": "Training", "train": "Training", "test": "Test"}


def _splits_from_cells(cells: Sequence[Any], path: Path, field: str, index: Sequence[Any]) -> np.ndarray:
    texts = _cell_texts(cells, path, field, index)
    lookup = {}
    for value in set(texts):
        text = _text_label(value)
        lookup[value] = _SPLITS.get(text.lower(), text)
    return np.array([lookup[v] for v in texts] if texts else [], dtype=object)


def _validate_maps(cells: Sequence[Any], path: Path, index: Sequence[Any], field: str = "waferMap",
                   allowed_max: int = 2) -> list[np.ndarray]:
    """Return 2-D uint8 maps (uint8 cells are kept as they are, never copied); the value range is checked
    once per chunk on a concatenation, and only a failing chunk is searched for the bad row."""
    maps: list[np.ndarray] = list(cells)
    ndarray = np.ndarray
    for start in range(0, len(maps), _CHUNK):
        stop = min(start + _CHUNK, len(maps))
        for i in range(start, stop):
            m = maps[i]
            if not (type(m) is ndarray and m.dtype.char == "B" and m.ndim == 2 and m.size):
                maps[i] = _convert_map(m, path, i, index[i], field, allowed_max)
        chunk = maps[start:stop]
        if chunk and int(np.concatenate([m.ravel(order="K") for m in chunk]).max()) > allowed_max:
            for i in range(start, stop):
                high = int(maps[i].max())
                if high > allowed_max:
                    raise _bad(path, f"value {high} outside {_levels(allowed_max)}",
                               i, field, index[i])
    return maps


def _levels(allowed_max: int) -> str:
    return "{" + ", ".join(map(str, range(allowed_max + 1))) + "}"


def _convert_map(m: Any, path: Path, row: int, index: Any, field: str, allowed_max: int = 2) -> np.ndarray:
    """Check and convert one non-uint8 map cell (nested list, int/float array) to a 2-D uint8 array."""
    if m is None or isinstance(m, float) and math.isnan(m):
        raise _bad(path, "missing map", row, field, index)
    if isinstance(m, str):
        raise _bad(path, "map is text, not a 2-D array", row, field, index)
    try:
        arr = np.asarray(m)
    except ValueError as exc:
        raise _bad(path, f"not a rectangular 2-D array ({exc})", row, field, index) from None
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise _bad(path, "map holds non-numeric values", row, field, index) from None
    if arr.ndim != 2:
        raise _bad(path, f"map has {arr.ndim} dimension(s), expected 2", row, field, index)
    if arr.size == 0:
        raise _bad(path, f"map is empty (shape {arr.shape})", row, field, index)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iuf":
        raise _bad(path, f"map has dtype {arr.dtype}, expected integers 0/1/2", row, field, index)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise _bad(path, "map contains NaN or infinity", row, field, index)
        if not (arr == np.round(arr)).all():
            raise _bad(path, "map contains non-integer values", row, field, index)
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > allowed_max:
        bad = lo if lo < 0 else hi
        raise _bad(path, f"value {bad:g} outside {_levels(allowed_max)}",
                   row, field, index)
    return arr.astype(np.uint8)


def _multi_hot_from_parts(labels: np.ndarray, parts: list[tuple[str, ...] | None]) -> np.ndarray | None:
    """Multi-hot rows over MIXED38_TYPES when any label is a mixture ``A+B``; None otherwise."""
    if not any(p is not None for p in parts):
        return None
    col = {t: j for j, t in enumerate(MIXED38_TYPES)}
    out = np.zeros((len(labels), len(MIXED38_TYPES)), dtype=np.uint8)
    for i, (lab, p) in enumerate(zip(labels, parts)):
        for t in p or ((lab,) if lab in col else ()):
            out[i, col[t]] = 1
    return out


# ----------------------------------------------------------------------------------------------------
# LSWMD pickle


def read_lswmd(path: str | os.PathLike[str], lean: bool = False) -> WaferTable:
    """Read a WM-811K ``LSWMD.pkl`` (pandas 0.19/Python 2 or modern pandas) into a :class:`WaferTable`.

    Handles nested label arrays (``[['Center']]``, empty for unlabelled), plain-string/NaN labels,
    ``trianTestLabel`` or ``trainTestLabel``, float ``waferIndex``, extra columns (ignored, except
    ``patternMask`` -> ``masks`` and ``multiHot``). Loading a pickle runs code: use trusted files only.
    ``lean``: keep the maps packed (:mod:`waferlab.data.lean`, a third of the memory; ``table.maps`` is
    then a sequence decoding each map on access), when the file's layout allows it.
    """
    import pandas as pd

    path = Path(path)
    if lean:
        from waferlab.data.lean import read_lswmd_lean

        table = read_lswmd_lean(path)
        if table is not None:
            return table
    obj = load_pickle(path)
    if not isinstance(obj, pd.DataFrame):
        raise WaferlabError(f"{path}: the pickle holds a {type(obj).__name__}, not a pandas DataFrame "
                            "in the LSWMD layout")
    return table_from_frame(obj, path)


def table_from_frame(df: Any, path: str | os.PathLike[str]) -> WaferTable:
    """Validate an LSWMD-layout DataFrame (one row per wafer) and turn it into a :class:`WaferTable`."""
    import pandas as pd

    path = Path(path)
    columns = [str(c) for c in df.columns]
    check_columns(columns, path)
    df = df.set_axis(columns, axis=1)
    n = len(df)
    index = df.index.tolist() if not isinstance(df.index, pd.RangeIndex) else range(n)
    cells: dict[str, Any] = {c: df[c].tolist() for c in columns if c in _CELL_COLUMNS}
    if "waferIndex" in df.columns:
        cells["waferIndex"] = df["waferIndex"]
    maps = _validate_maps(cells.pop("waferMap"), path, index)
    return table_from_cells(cells, maps, n, index, path, df.attrs)


def check_columns(columns: list[str], path: Path) -> None:
    """Column names are unique and include the map and the label."""
    if len(set(columns)) != len(columns):
        dup = sorted(c for c in set(columns) if columns.count(c) > 1)
        raise WaferlabError(f"{path}: duplicate column names {dup}")
    for need in ("waferMap", "failureType"):
        if need not in columns:
            raise WaferlabError(f"{path}: missing column {need!r} (columns: {', '.join(columns) or 'none'})")


def table_from_cells(cells: dict[str, Any], maps: Sequence[np.ndarray], n: int, index: Sequence[Any],
                     path: Path, attrs: dict | None = None, orig_shape: np.ndarray | None = None
                     ) -> WaferTable:
    """The table of checked ``maps`` and the other LSWMD columns (name -> cells; ``waferIndex`` a Series)."""
    import pandas as pd

    labels, parts = _labels_from_cells(cells["failureType"], path, "failureType", index)
    split_col = next((c for c in _SPLIT_COLUMNS if c in cells), None)
    split = (_splits_from_cells(cells[split_col], path, split_col, index) if split_col
             else np.full(n, "", dtype=object))
    if "lotName" in cells:
        lot = np.array(["" if v is None or isinstance(v, float) and math.isnan(v) else
                        (v.decode("latin1") if isinstance(v, bytes) else str(v))
                        for v in cells["lotName"]], dtype=object)
    else:
        lot = np.full(n, "", dtype=object)
    if "waferIndex" in cells:
        wi = pd.to_numeric(cells["waferIndex"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        wafer_index = np.where(np.isfinite(wi), wi, -1).astype(np.int64)
    else:
        wafer_index = np.full(n, -1, dtype=np.int64)

    masks = None
    if MASK_COLUMN in cells:
        masks = _validate_maps(cells[MASK_COLUMN], path, index, MASK_COLUMN, allowed_max=1)
        for i, (m, k) in enumerate(zip(maps, masks)):
            if m.shape != k.shape:
                raise _bad(path, f"mask shape {k.shape} differs from map shape {m.shape}", i, MASK_COLUMN,
                           index[i])

    multi_hot = _multi_hot_from_parts(labels, parts)
    names: tuple[str, ...] = MIXED38_TYPES if multi_hot is not None else ()
    if MULTI_HOT_COLUMN in cells:
        names = tuple((attrs or {}).get("multi_label_names", MIXED38_TYPES))
        multi_hot = _multi_hot_column(cells[MULTI_HOT_COLUMN], len(names), path, index)
    extra = {} if orig_shape is None else {"orig_shape": orig_shape}
    return WaferTable(maps=maps, labels=labels, split=split, lot=lot,  # type: ignore[arg-type]
                      wafer_index=wafer_index, source=str(path), multi_hot=multi_hot, multi_label_names=names,
                      masks=masks, **extra)


def _multi_hot_column(cells: list[Any], k: int, path: Path, index: Sequence[Any]) -> np.ndarray:
    out = np.zeros((len(cells), k), dtype=np.uint8)
    for i, cell in enumerate(cells):
        try:
            row = np.asarray(cell, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise _bad(path, "multi-hot row is not numeric", i, MULTI_HOT_COLUMN, index[i]) from None
        if row.size != k or not np.isin(row, (0, 1)).all():
            raise _bad(path, f"multi-hot row must be {k} values of 0/1", i, MULTI_HOT_COLUMN, index[i])
        out[i] = row
    return out


def _nested(value: str) -> np.ndarray:
    return np.array([[value]]) if value else np.zeros((0, 0))


def frame_from_table(table: WaferTable):  # -> pandas.DataFrame
    """The LSWMD-layout DataFrame of ``table`` (nested label arrays, empty (0,0) arrays if unlabelled)."""
    import pandas as pd

    n = len(table)
    cache: dict[str, np.ndarray] = {}

    def nested(v: str) -> np.ndarray:
        # a fresh array per row, like the original file (rows must not share one mutable array)
        if v not in cache:
            cache[v] = _nested(v)
        return cache[v].copy()

    def col(values: Iterable[Any]) -> np.ndarray:
        out = np.empty(n, dtype=object)
        for i, v in enumerate(values):
            out[i] = v
        return out

    labels = ["" if lab == UNLABELED else str(lab) for lab in table.labels.tolist()]
    data: dict[str, Any] = {
        "waferMap": col(table.maps),
        "dieSize": np.array([float(np.count_nonzero(m)) for m in table.maps], dtype=np.float64),
        "lotName": col(str(v) for v in table.lot.tolist()),
        "waferIndex": table.wafer_index.astype(np.float64),
        "trianTestLabel": col(nested(str(s)) for s in table.split.tolist()),
        "failureType": col(nested(v) for v in labels),
    }
    if table.masks is not None:
        data[MASK_COLUMN] = col(np.ascontiguousarray(m, dtype=np.uint8) for m in table.masks)
    if table.multi_hot is not None:
        data[MULTI_HOT_COLUMN] = col(np.asarray(r, dtype=np.uint8) for r in table.multi_hot)
    frame = pd.DataFrame(data, index=pd.RangeIndex(n))
    for name in ("waferMap", "lotName", "trianTestLabel", "failureType"):
        frame[name] = frame[name].astype(object)
    # pandas >= 3 with pyarrow installed backs string labels with Arrow arrays, whose pickle calls pyarrow
    # (which the restricted unpickler rightly refuses): keep the column labels a plain object Index.
    frame.columns = pd.Index(list(frame.columns), dtype=object)
    if table.multi_hot is not None:
        frame.attrs["multi_label_names"] = list(table.multi_label_names)
    return frame


def write_lswmd(table: WaferTable, path: str | os.PathLike[str], protocol: int = 4) -> None:
    """Write ``table`` atomically as an LSWMD-layout pandas pickle (masks in a ``patternMask`` column).

    ``dieSize`` is the number of dies (non-zero cells); the misspelt ``trianTestLabel`` is kept on purpose.
    Protocol 4 loads fastest (numpy's protocol-5 buffers are slower for many small arrays); ``protocol=2``
    gives the opcode mix of the original Python-2 file.
    """
    from waferlab.io import atomic_open

    frame = frame_from_table(table)
    with atomic_open(path, "wb") as fh:
        pickle.dump(frame, fh, protocol=protocol)


# ----------------------------------------------------------------------------------------------------
# CSV export


def read_lswmd_csv(path: str | os.PathLike[str]) -> WaferTable:
    """Read the CSV export of LSWMD (tab- or comma-separated; maps as JSON nested lists, labels as text).

    Labels look like ``[[none]]``, ``[['Center']]`` or ``[]`` (unlabelled); the first column may be the
    original row index.
    """
    import pandas as pd

    path = Path(path)
    with open(path, "rb") as fh:
        first = fh.readline(1 << 20)
    if b"\x00" in first:
        raise WaferlabError(f"{path}: binary data, not a CSV text file")
    try:
        header = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise WaferlabError(f"{path}: not UTF-8 text, not a CSV export") from None
    if not header.strip():
        raise WaferlabError(f"{path}: file is empty (no header line)")
    sep = "\t" if "\t" in header else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise WaferlabError(f"{path}: malformed CSV ({_one_line(exc)})") from None
    first_col = str(df.columns[0]) if len(df.columns) else ""
    if first_col == "" or first_col.startswith("Unnamed"):
        index = df.iloc[:, 0].tolist()
        df = df.iloc[:, 1:]
    else:
        index = list(range(len(df)))
    for need in ("waferMap", "failureType"):
        if need not in df.columns:
            have = ", ".join(map(str, df.columns))
            raise WaferlabError(f"{path}: missing column {need!r} (columns: {have})")
    cells: list[Any] = []
    for i, text in enumerate(df["waferMap"].tolist()):
        try:
            cells.append(json.loads(text))
        except (json.JSONDecodeError, TypeError) as exc:
            raise _bad(path, f"map is not a JSON nested list ({exc.msg if hasattr(exc, 'msg') else exc})",
                       i, "waferMap", _csv_index(index[i])) from None
    frame = pd.DataFrame({"waferMap": pd.Series(cells, dtype=object)})
    for name in df.columns:
        if name != "waferMap":
            frame[name] = df[name].to_numpy(dtype=object)
    frame.index = pd.Index([_csv_index(v) for v in index])
    return table_from_frame(frame, path)


def _csv_index(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value
