"""An LSWMD pickle read straight into a compact :class:`WaferTable`: no DataFrame, maps packed 2 bits a die.

``predict`` on the whole 811,457-row ``LSWMD.pkl`` must fit in a few GB. Unpickled the usual way, every row
becomes three numpy arrays (the map and two (1,1) label arrays) inside a pandas frame: about 2.6 KB a row,
and a file written by Python 3 at protocol 2 also keeps each map's bytes a second time in the unpickler's
memo (the text ``_codecs.encode`` is called with) until the load ends. Here the same restricted unpickler
(:class:`~waferlab.data.lswmd._LswmdUnpickler`: its allowlist is checked first, unchanged) resolves the few
classes of the LSWMD layout to small stand-ins instead: an array becomes an :class:`_ArrayStub`, a frame
and its block manager keep their state, and every 2-D uint8 array is handed, as it is unpickled, to a
:class:`MapStore` that packs the maps four dies to a byte in batches, so the text of a Python-2 map (which
nothing else holds) is freed at once. The table is then built from the stand-ins: maps stay packed
(:class:`PackedMaps`, decoded per access, i.e. per predict chunk), labels become plain strings, and every
column goes through the same checks, in the same order and words, as
:func:`~waferlab.data.lswmd.table_from_frame`.

A pickle in any other layout (other classes, masks, multi-hot columns), or one whose stand-ins numpy would
reject, is read by the full reader instead (:func:`read_lswmd_lean` returns None).
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import operator
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from waferlab.data.table import WaferTable
from waferlab.errors import WaferlabError


class NotLean(Exception):
    """The pickle is not in a layout the lean reader knows; read it with the full unpickler instead."""


class PackedMaps(Sequence):
    """2-D uint8 wafer maps kept in a :class:`MapStore` (or, for a map that needed converting, as an
    array); each access decodes one into a fresh writable array, like an unpickled one."""

    def __init__(self, store: MapStore, entries: list[Any], shapes: np.ndarray, fortran: np.ndarray) -> None:
        self._store, self._entries, self.shapes, self._fortran = store, entries, shapes, fortran

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        e = self._entries[i]
        if type(e) is not int:
            return e
        raw = self._store.raw(e)  # a fresh array, or the bytes of a batch kept as it came
        flat = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, np.uint8).copy()
        h, w = self.shapes[i]
        return flat.reshape((int(h), int(w)), order="F" if self._fortran[i] else "C")

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        """Bytes the maps take: the store's and those of maps kept as arrays."""
        return self._store.nbytes + sum(e.nbytes for e in self._entries if isinstance(e, np.ndarray))


class MapStore:
    """Wafer maps packed four to a byte (2 bits a die: 0, 1, 2), in batches of :data:`BATCH` maps.

    The lean unpickler hands every 2-D uint8 array to :meth:`add` as it is unpickled, so a Python-2
    pickle's text of a map (which nothing else holds) is freed at once: the maps of WM-811K take a quarter
    of their bytes. A batch holding any value above 2 stays as it came (the table check reports the row).
    A safe ``.npz`` is streamed into it a batch at a time (:meth:`extend`).
    """

    BATCH = 4096

    def __init__(self) -> None:
        self._pending: list[Any] = []
        self._batches: list[tuple[Any, np.ndarray]] = []  # (packed bytes or the raw list, map offsets)
        self._unpacked: tuple[int, np.ndarray | None] = (-1, None)  # (batch, its dies), see raw()

    def __len__(self) -> int:
        if self._batches:  # every batch but the last is full
            return (len(self._batches) - 1) * self.BATCH + len(self._batches[-1][1]) - 1 + len(self._pending)
        return len(self._pending)

    def add(self, raw: Any) -> int:
        """Keep ``raw`` (a map's bytes or latin1 text); its handle for :meth:`raw`."""
        self._pending.append(raw)
        if len(self._pending) == self.BATCH:
            self.flush()
        return len(self) - 1

    def flush(self) -> None:
        """Pack the pending maps (the last batch may be short)."""
        raws, self._pending = self._pending, []
        if not raws:
            return
        offsets = np.zeros(len(raws) + 1, np.int64)
        np.cumsum([len(r) for r in raws], out=offsets[1:])
        if all(type(r) is str for r in raws):
            joined = "".join(raws).encode("latin1")
        else:
            joined = b"".join([r.encode("latin1") if type(r) is str else bytes(r) for r in raws])
        if joined and int(np.frombuffer(joined, np.uint8).max()) > 2:
            self._batches.append((raws, offsets))
        else:
            self._batches.append((_pack(joined), offsets))

    def extend(self, dies: bytes, offsets: np.ndarray) -> int:
        """Keep a whole batch at once (at most :data:`BATCH` maps, values checked to be 0/1/2 by the
        caller): ``dies`` holds the maps back to back, map k at ``offsets[k]:offsets[k + 1]``; the handle of
        the first. Only after full batches."""
        if self._pending or len(offsets) - 1 > self.BATCH or len(self) % self.BATCH:
            raise ValueError("MapStore.extend: after full batches only, at most BATCH maps")
        first = len(self)
        self._batches.append((_pack(dies), np.asarray(offsets, np.int64) - int(offsets[0])))
        return first

    def raw(self, handle: int) -> Any:
        """The map's dies (a fresh uint8 array; bytes for a batch kept as it came). The last batch used is
        kept unpacked, so reading maps in order unpacks each batch once."""
        b, k = divmod(handle, self.BATCH)
        data, offsets = self._batches[b]
        if type(data) is list:
            r = data[k]
            return r.encode("latin1") if type(r) is str else r
        cached = self._unpacked
        if cached[0] != b:
            cached = self._unpacked = (b, _UNPACK[np.frombuffer(data, np.uint8)].view(np.uint8))
        return cached[1][offsets[k]:offsets[k + 1]].copy()

    @property
    def nbytes(self) -> int:
        """Bytes held: packed batches, and the raw text/bytes of a batch kept as it came."""
        return sum(len(d) if type(d) is bytes else sum(len(r) for r in d) for d, _ in self._batches)

    def is_checked(self, handle: int) -> bool:
        """The map is packed, so every value is 0, 1 or 2."""
        return type(self._batches[handle // self.BATCH][0]) is bytes


def _pack(dies: bytes) -> bytes:
    """Dies of value 0..3, four to a byte (d0 | d1 << 2 | d2 << 4 | d3 << 6)."""
    words = np.frombuffer(dies + bytes(-len(dies) % 4), "<u4")  # dies d0..d3 in bytes 0..3 of a word
    packed, shifted = words.copy(), np.empty_like(words)
    for bits in (6, 12, 18):
        packed |= np.right_shift(words, bits, out=shifted)
    return packed.astype(np.uint8).tobytes()  # the low byte of each word


# byte -> its 4 dies, as the bytes of one little-endian uint32 (a 1-D lookup: faster than a (256, 4) one)
_UNPACK = ((np.arange(256)[:, None] >> np.array([0, 2, 4, 6])) & 3).astype(np.uint8).view("<u4").ravel()
_STORE = threading.local()  # the MapStore of the lean load in progress in this thread


# ---------------------------------------------------------------------------------------------- stand-ins
class _ArrayStub:
    """Stands in for a numpy array while unpickling: its shape, dtype, order and raw data, as pickled
    (checked when used: :meth:`array` hands them to numpy, which checks them as it always does)."""

    __slots__ = ("shape", "dtype", "fortran", "raw")

    def __setstate__(self, state: tuple) -> None:
        if len(state) == 5:  # (version, shape, dtype, is_fortran, data); very old numpy omits the version
            _, shape, self.dtype, self.fortran, self.raw = state
        else:
            shape, self.dtype, self.fortran, self.raw = state
        self.shape = _SHAPES.setdefault(shape, shape)
        if type(self.dtype) is _UINT8_CLASS and self.is_packed_map():
            self.raw = _STORE.maps.add(self.raw)  # an int handle from now on

    def is_packed_map(self) -> bool:
        """A 2-D uint8 map whose raw data can be kept as it is (or already is, in the store)."""
        raw, shape, dtype = self.raw, self.shape, self.dtype
        return (isinstance(dtype, np.dtype) and dtype.char == "B"
                and len(shape) == 2 and type(shape[0]) is int and type(shape[1]) is int
                and (type(raw) is int or type(raw) in _RAW_TYPES and len(raw) == shape[0] * shape[1] > 0))

    def array(self) -> np.ndarray:
        """The real array, built by numpy exactly as the full unpickler would."""
        if type(self.raw) is list:
            if self.dtype != object:
                raise NotLean("a list of values for a non-object array")
            out = np.empty(len(self.raw), dtype=self.dtype)
            for i, v in enumerate(self.raw):
                out[i] = materialize(v)
            return out.reshape(self.shape)
        raw = self.raw if type(self.raw) is not int else bytes(_STORE.maps.raw(self.raw))
        a = np.ndarray.__new__(np.ndarray, (0,), "b")
        a.__setstate__((1, self.shape, self.dtype, self.fortran, raw))
        return a


class _BufferStub(_ArrayStub):
    """An array pickled at protocol 5 (``_frombuffer``)."""

    __slots__ = ()

    def array(self) -> np.ndarray:
        """numpy's own ``_frombuffer``."""
        raw = self.raw if type(self.raw) is not int else bytearray(_STORE.maps.raw(self.raw))
        flat = np.frombuffer(raw, dtype=self.dtype)
        return flat.reshape(self.shape, order="F" if self.fortran else "C")


_SHAPES: dict[tuple, tuple] = {}  # one tuple per distinct shape, shared by every stub
_UINT8_CLASS = type(np.dtype(np.uint8))  # numpy >= 1.20: one class per dtype
_RAW_TYPES = (str, bytes, bytearray)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if cls is not np.ndarray:
        raise NotLean(f"array subclass {cls!r}")
    return _ArrayStub()


def _frombuffer(buf: Any, dtype: np.dtype, shape: tuple, order: str, axis_order: Any = None) -> _ArrayStub:
    """numpy's protocol-5 array constructor (the buffer came in band as bytes or bytearray)."""
    if type(buf) not in (bytes, bytearray) or order not in ("C", "F") or axis_order is not None:
        raise NotLean("out-of-band pickle buffer or a non-contiguous array")
    stub = _BufferStub()
    stub.__setstate__((tuple(shape), dtype, order == "F", buf))
    return stub


def _latin1_text(text: str, encoding: str) -> Any:
    """``_codecs.encode(text, 'latin1')``: how Python 3 pickles bytes at protocol 2. The stand-ins take the
    latin1 text itself (the very object the memo holds) instead of a second copy as bytes."""
    if encoding != "latin1":
        return codecs.encode(text, encoding)
    return text


class _FrameStub:
    """A DataFrame: its state (the block manager, and attrs in pandas >= 1)."""

    __slots__ = ("state",)

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ManagerStub:
    """A BlockManager: built with no arguments and a state (pandas 0.19) or from (blocks, axes) (today)."""

    __slots__ = ("args", "state")

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _unpickle_block(values: Any, placement: Any, ndim: int = 2) -> tuple:
    return values, placement


def _new_index(cls: type, d: dict) -> tuple:
    return cls, d


def materialize(x: Any) -> Any:
    """``x`` with stand-in arrays made real (cells other than maps are few and small)."""
    return x.array() if isinstance(x, _ArrayStub) else x


# ---------------------------------------------------------------------------------------------- unpickler
def _substitutes() -> dict[int, Any]:
    """id(the real object find_class resolved) -> its stand-in; anything else is not the LSWMD layout."""
    import copyreg

    import pandas as pd
    from pandas._libs.internals import _unpickle_block as real_unpickle_block
    from pandas.core.indexes.base import _new_Index
    from pandas.core.internals import BlockManager

    core = np._core if hasattr(np, "_core") else np.core  # type: ignore[attr-defined]
    subs: dict[int, Any] = {
        id(core.multiarray._reconstruct): _reconstruct,
        id(core.numeric._frombuffer): _frombuffer,
        id(codecs.encode): _latin1_text,
        id(pd.DataFrame): _FrameStub,
        id(BlockManager): _ManagerStub,
        id(real_unpickle_block): _unpickle_block,
        id(_new_Index): _new_index,
    }
    for keep in (np.ndarray, np.dtype, core.multiarray.scalar, pd.Index, pd.RangeIndex, slice, bytes,
                 copyreg.__newobj__):
        subs[id(keep)] = keep
    return subs


def _lean_unpickler(fh: IO[bytes], path: str) -> Any:
    from waferlab.data.lswmd import _LswmdUnpickler

    class _LeanUnpickler(_LswmdUnpickler):
        subs = _substitutes()

        def find_class(self, module: str, name: str) -> Any:
            obj = super().find_class(module, name)  # the allowlist and renames, unchanged
            if name == "BlockManager":  # the legacy stand-in class of the full unpickler
                return _ManagerStub
            sub = self.subs.get(id(obj))
            if sub is None:
                raise NotLean(f"{module}.{name}")
            return sub

    return _LeanUnpickler(fh, path)


def _load(path: str | os.PathLike[str]) -> _FrameStub:
    """The stand-in frame of an LSWMD pickle (protocol 2-5), its maps in ``_STORE.maps`` (a
    :class:`MapStore` the caller sets up), or :class:`NotLean`. The cyclic garbage
    collector is paused meanwhile: it would rescan the millions of new stand-ins, none of them garbage,
    again and again (that doubles the load time of the full file)."""
    from waferlab.data.lswmd import load_pickle

    with _gc_paused():
        return load_pickle(path, unpickler=_lean_unpickler)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------------------------------------- the table
def _axis(x: Any) -> list[Any] | range:
    if type(x) is not tuple or len(x) != 2 or not isinstance(x[1], dict):
        raise NotLean("axis is not an Index")
    cls, d = x
    if "data" in d:
        return materialize(d["data"]).tolist()
    if {"start", "stop", "step"} <= set(d):
        return range(d["start"], d["stop"], d["step"])
    raise NotLean(f"index {cls}")


def _columns(frame: _FrameStub) -> tuple[list[str], list[Any] | range, dict[str, Any]]:
    """(column names, row index, name -> the column's cells) of a stand-in frame."""
    state = frame.state if type(frame) is _FrameStub else None
    mgr = state.get("_mgr", state.get("_data")) if isinstance(state, dict) else None
    if type(mgr) is not _ManagerStub:
        raise NotLean("not a DataFrame with a BlockManager")
    st = getattr(mgr, "state", None)
    if st is not None:  # pandas 0.14.1 - 0.x: state = (axes, values, items, {"0.14.1": ...})
        if not (type(st) is tuple and len(st) >= 4 and isinstance(st[3], dict) and "0.14.1" in st[3]):
            raise NotLean("BlockManager state")
        axes = st[3]["0.14.1"]["axes"]
        blocks = [(b["values"], b["mgr_locs"]) for b in st[3]["0.14.1"]["blocks"]]
    else:  # today: BlockManager(blocks, axes[, verify_integrity])
        blocks, axes = list(mgr.args[0]), mgr.args[1]
    names, index = [str(c) for c in _axis(axes[0])], _axis(axes[1])
    n = len(index)
    cells: dict[str, Any] = {}
    for values, locs in blocks:
        locs = list(range(len(names))[locs]) if type(locs) is slice else materialize(locs).tolist()
        if not isinstance(values, _ArrayStub) or values.shape != (len(locs), n):
            raise NotLean("block values")
        if type(values.raw) is list:  # object block: its cells, in C order
            for j, loc in enumerate(locs):
                cells[names[loc]] = values.raw[j * n:(j + 1) * n]
        else:
            arr = values.array()
            for j, loc in enumerate(locs):
                cells[names[loc]] = arr[j]
    return names, index, cells


def packed_maps(cells: Sequence[Any], path: Path, index: Sequence[Any]) -> PackedMaps:
    """The map column kept packed, checked in the order and words of
    :func:`~waferlab.data.lswmd._validate_maps` (per chunk: conversions first, then the value range)."""
    from waferlab.data.lswmd import _CHUNK, _bad, _convert_map, _levels

    store: MapStore = _STORE.maps
    n = len(cells)
    entries: list[Any] = [None] * n
    shapes: list[tuple[int, int]] = [(0, 0)] * n
    fortran: list[bool] = [False] * n
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        for i in range(start, stop):
            c = cells[i]
            if isinstance(c, _ArrayStub) and type(c.raw) is int:
                entries[i], shapes[i], fortran[i] = c.raw, c.shape, bool(c.fortran)
            else:
                m = materialize(c)
                ok = type(m) is np.ndarray and m.dtype.char == "B" and m.ndim == 2 and m.size
                entries[i] = m if ok else _convert_map(m, path, i, index[i], "waferMap")
                shapes[i] = entries[i].shape
        for i in range(start, stop):
            e = entries[i]
            if type(e) is not int:
                high = int(e.max())
            else:  # a packed batch holds only 0/1/2; another one is checked map by map
                high = 0 if store.is_checked(e) else int(np.frombuffer(store.raw(e), np.uint8).max())
            if high > 2:
                raise _bad(path, f"value {high} outside {_levels(2)}", i, "waferMap", index[i])
    return PackedMaps(store, entries, np.array(shapes, np.int32).reshape(n, 2), np.array(fortran, bool))


def _label_cells(cells: list[Any]) -> list[Any]:
    """Label cells with each (1,1) / empty stand-in array replaced by its text, as ``_cell_texts`` reads a
    real one (its only item when that is a ``str``, ``""`` when empty); equal arrays are decoded once."""
    seen: dict[tuple, Any] = {}
    out = []
    for c in cells:
        if isinstance(c, _ArrayStub) and type(c.raw) is not list:
            key = (bytes(c.raw) if type(c.raw) is bytearray else c.raw, c.dtype.str, c.shape, c.fortran)
            value = seen.get(key)
            if value is None:
                a = c.array()
                one = a.item(0) if a.size == 1 else None
                value = seen[key] = "" if a.size == 0 else (one if type(one) is str else a)
            c = value
        else:
            c = materialize(c)
        out.append(c)
    return out


def read_lswmd_lean(path: str | os.PathLike[str]) -> WaferTable | None:
    """An LSWMD pickle as a :class:`WaferTable` whose maps stay packed (:class:`PackedMaps`), with the same
    rows, labels and errors as :func:`~waferlab.data.lswmd.read_lswmd`; None when the file's layout is not
    one the stand-ins know (anything failing while loading counts: the full reader repeats or reports it)."""
    path = Path(path)
    _STORE.maps = MapStore()
    try:
        return _read(path)
    finally:
        del _STORE.maps
        _SHAPES.clear()


def _read(path: Path) -> WaferTable | None:
    from waferlab.data.lswmd import MASK_COLUMN, MULTI_HOT_COLUMN, check_columns

    try:
        frame = _load(path)
        _STORE.maps.flush()
        names, index, cells = _columns(frame)
        if MASK_COLUMN in names or MULTI_HOT_COLUMN in names or frame.state.get("attrs"):
            raise NotLean("mask / multi-hot columns")
    except Exception:  # noqa: BLE001 - NotLean, or an error the full reader will report in its own words
        return None
    del frame
    check_columns(names, path)
    try:
        with _gc_paused():
            return _table(cells, index, path)
    except WaferlabError:  # a bad cell: the same check and words as the full reader's
        raise
    except Exception:  # noqa: BLE001 - a stand-in numpy rejects: the full reader reports it in its words
        return None


def _table(cells: dict[str, Any], index: Sequence[Any], path: Path) -> WaferTable:
    from waferlab.data.lswmd import table_from_cells

    maps = packed_maps(cells.pop("waferMap"), path, index)
    for key in ("failureType", "trianTestLabel", "trainTestLabel"):
        if key in cells:
            cells[key] = _label_cells(cells[key])
    if "lotName" in cells:
        cells["lotName"] = [materialize(c) for c in cells["lotName"]]
    if "waferIndex" in cells:
        import pandas as pd

        wi = cells["waferIndex"]
        cells["waferIndex"] = pd.Series(wi if isinstance(wi, np.ndarray) else [materialize(c) for c in wi])
    return table_from_cells(cells, maps, len(index), index, path, orig_shape=maps.shapes)
