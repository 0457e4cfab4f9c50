"""Writes an LSWMD-layout DataFrame the way pandas 0.19 under Python 2 pickled WM-811K's ``LSWMD.pkl``.

For tests and benchmarks (the real file is 2 GB and cannot be shipped): protocol 2, Python-2 ``str``
opcodes (``BINSTRING``) for bytes and ASCII text, the old module paths (``pandas.indexes.base``,
``pandas.core.internals.BlockManager`` built with no arguments, ``numpy.core.multiarray``) and the
``0.14.1`` BlockManager state. Its memory profile matches the real file's only if its memo does too:
Python 2's cPickle files an object in the memo only when something else also holds it (``put``: refcount
>= 2), so an array (a list item) is memoized, while the temporaries of its ``__reduce__`` (the state tuple,
the shape, the raw data string) never are. Python 3's pickler memoizes all of them, and at protocol 2 writes
bytes as ``_codecs.encode(text, 'latin1')``, so a file it writes keeps every map twice while loading.
"""

from __future__ import annotations

import copyreg
import os
import pickle
import struct
import types
from typing import IO, Any

import numpy as np

#: Today's (module, name) of what the stream refers to -> what pandas 0.19 / numpy 1.x wrote.
_PY2_NAMES: dict[tuple[str, str], tuple[str, str]] = {
    ("pandas", "DataFrame"): ("pandas.core.frame", "DataFrame"),
    ("pandas.core.frame", "DataFrame"): ("pandas.core.frame", "DataFrame"),
    ("pandas.core.internals.managers", "BlockManager"): ("pandas.core.internals", "BlockManager"),
    ("pandas.core.indexes.base", "_new_Index"): ("pandas.indexes.base", "_new_Index"),
    ("pandas", "Index"): ("pandas.indexes.base", "Index"),
    ("pandas.core.indexes.base", "Index"): ("pandas.indexes.base", "Index"),
    ("pandas", "RangeIndex"): ("pandas.indexes.range", "RangeIndex"),
    ("pandas.core.indexes.range", "RangeIndex"): ("pandas.indexes.range", "RangeIndex"),
}


class Int64Index:
    """Stands in for pandas 0.19's ``Int64Index`` (gone from pandas 2) in the written stream."""


class _LegacyManager:
    def __init__(self, state: tuple) -> None:
        self.state = state


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined, misc]
    """The pure-Python pickler, writing what cPickle (Python 2, protocol 2) wrote for a pandas 0.19 frame."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def __init__(self, fh: IO[bytes]) -> None:
        super().__init__(fh, protocol=2)

    def save_raw(self, obj: bytes) -> None:
        """A Python-2 ``str`` holding bytes (an array's raw data): never memoized, as cPickle did."""
        self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj if len(obj) < 256
                   else pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)

    def save_text(self, obj: str) -> None:
        if obj.isascii():
            self.save_raw(obj.encode("ascii"))
            self.memoize(obj)
        else:
            pickle._Pickler.save_str(self, obj)  # type: ignore[attr-defined]

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module, name = getattr(obj, "__module__", None) or "", name or obj.__qualname__
        if obj is Int64Index:
            module, name = "pandas.indexes.numeric", "Int64Index"
        elif module == "numpy._core" or module.startswith("numpy._core."):
            module = "numpy.core" + module[len("numpy._core"):]
        module, name = _PY2_NAMES.get((module, name), (module, name))
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)

    def _temporary(self, obj: Any) -> None:
        """Write a __reduce__ temporary the way cPickle did: tuples and the data list unmemoized."""
        if type(obj) is tuple:
            if len(obj) <= 3:
                for item in obj:
                    self._temporary(item)
                self.write(pickle._tuplesize2code[len(obj)])  # type: ignore[attr-defined]
            else:
                self.write(pickle.MARK)
                for item in obj:
                    self._temporary(item)
                self.write(pickle.TUPLE)
        elif type(obj) is list:
            self.write(pickle.EMPTY_LIST)
            self._batch_appends(obj)  # type: ignore[attr-defined]
        elif type(obj) is bytes:
            self.save_raw(obj)
        else:
            self.save(obj)

    def save_ndarray(self, obj: np.ndarray) -> None:
        func, args, state = obj.__reduce__()
        self.save(func)
        self._temporary(args)
        self.write(pickle.REDUCE)
        self.memoize(obj)
        self._temporary(state)
        self.write(pickle.BUILD)

    def save_manager(self, obj: _LegacyManager) -> None:
        from pandas.core.internals import BlockManager

        self.save(BlockManager)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.save(obj.state)
        self.write(pickle.BUILD)

    dispatch[bytes] = save_raw
    dispatch[str] = save_text
    dispatch[np.ndarray] = save_ndarray
    dispatch[_LegacyManager] = save_manager
    dispatch[types.FunctionType] = save_global

    def reducer_override(self, obj: Any) -> Any:
        import pandas as pd
        from pandas.core.indexes.base import _new_Index

        if isinstance(obj, pd.DataFrame):
            return copyreg.__newobj__, (pd.DataFrame,), {"_data": _legacy_manager(obj), "_typ": "dataframe",
                                                         "_metadata": []}
        if isinstance(obj, pd.RangeIndex):
            return _new_Index, (pd.RangeIndex, {"start": obj.start, "stop": obj.stop, "step": obj.step,
                                                "name": obj.name})
        if isinstance(obj, pd.Index):
            if obj.dtype.kind in "iu":
                return _new_Index, (Int64Index, {"data": np.asarray(obj, np.int64), "name": obj.name})
            return _new_Index, (pd.Index, {"data": np.asarray(obj, dtype=object), "name": obj.name})
        return NotImplemented


def _legacy_manager(df: Any) -> _LegacyManager:
    """pandas 0.19's BlockManager state of ``df``: one object block, one float64 block (numbers)."""
    n = len(df)
    num = [i for i, c in enumerate(df.columns) if df[c].dtype.kind in "fiu"]
    blocks = []
    for locs, dtype in (([i for i in range(df.shape[1]) if i not in num], object), (num, np.float64)):
        if not locs:
            continue
        values = np.empty((len(locs), n), dtype=dtype)
        for j, i in enumerate(locs):
            values[j] = df.iloc[:, i].to_numpy(dtype=dtype)
        blocks.append({"values": values, "mgr_locs": np.asarray(locs, dtype=np.int64)})
    axes = [df.columns, df.index]
    return _LegacyManager((axes, [b["values"] for b in blocks], [df.columns[b["mgr_locs"]] for b in blocks],
                           {"0.14.1": {"axes": axes, "blocks": blocks}}))


def dump_py2(df: Any, fh: IO[bytes]) -> None:
    """Pickle the DataFrame ``df`` into ``fh`` as pandas 0.19 under Python 2 wrote ``LSWMD.pkl``."""
    Py2Pickler(fh).dump(df)


def write_py2(df: Any, path: str | os.PathLike[str]) -> None:
    """:func:`dump_py2` into ``path``, atomically."""
    from waferlab.io import atomic_open

    with atomic_open(path, "wb") as fh:
        dump_py2(df, fh)
