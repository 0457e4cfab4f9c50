"""KLARF defect files (1.1 and 1.2 flat syntax, 1.8 nested ``Record``/``Field``/``List`` syntax) -> one map
per wafer: a die with at least one defect is failed, every other die of the wafer good.

Own reader. The maintained packages were tried on the three shipped files and do not serve:
**klarfio 0.9.1** (GPL-3.0) refuses 1.1, keeps only the last wafer of a multi-wafer 1.2 file (the
3-wafer sample came back as one) and fails on the 1.8 fixture (``get_defect_data`` raises on a typo in the
package); **klarf-reader 0.4.3** (MIT) reads 1.1 and 1.2 but not 1.8, raises bare ``Exception`` without a
line, and declares numba as a dependency. Both formats are simple token streams, so one small reader
covers all three versions and names the line in every error.

Rules: defects go to dies by XINDEX/YINDEX (without them, by XREL/YREL over DiePitch from DieOrigin).
The wafer's dies are the SampleTestPlan (1.8: every TestRecord's SampleTestPlanList) where the file has
one, else every die lying wholly inside the wafer (SampleSize diameter, DiePitch, SampleCenterLocation),
plus any die that has a defect. X runs right, Y up; orientation: see :mod:`waferlab.data.fab.common`.
Units: 1.1/1.2 positions in micrometres and SampleSize in millimetres; 1.8 all in the file's units.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from waferlab.data.fab.common import (
    FAILED,
    GOOD,
    NO_DIE,
    FabOptions,
    FabWafer,
    fab_error,
    grid_from_xy,
    note,
    side_from_angle,
    turn_mark_down,
)

_STATEMENT_END = re.compile(r'"[^"]*"|;')
_TOKEN_18 = re.compile(r'\s*("[^"]*"|[{},;]|[^\s{},;"]+)')
_BLOCK_END = re.compile(r'"[^"]*"|\}')
_VALUE_TOKEN = re.compile(r'"[^"]*"|[^\s,"]+')
_KEYWORD = re.compile(r"\s*(\S+)\s*")
_VALUE = re.compile(r'"([^"]*)"|([^\s"]+)')
_KEY, _OFFSET = 1 << 32, 1 << 30
_SIDES = {"DOWN": "down", "UP": "up", "LEFT": "left", "RIGHT": "right", "BOTTOM": "down", "TOP": "up"}


def sniff_klarf(head: bytes) -> bool:
    """True when ``head`` starts like a KLARF file (``FileVersion`` or ``Record FileRecord``)."""
    words = head.lstrip(b"\xef\xbb\xbf \t\r\n").split(None, 2)
    return bool(words) and (words[0] == b"FileVersion" or (words[0] == b"Record" and len(words) > 1
                                                           and words[1] == b"FileRecord"))


@dataclass
class _Wafer:
    """What one wafer needs from the file: defect columns, the die plan, geometry and ids."""

    line: int
    wafer_id: str
    lot: str = ""
    slot: int | None = None
    defects: dict[str, np.ndarray] | None = None
    plan: np.ndarray | None = None
    values: dict[str, list[str]] = field(default_factory=dict)
    micrometres: bool = True


class _Lines:
    """Line numbers of text positions (for error messages)."""

    def __init__(self, text: str) -> None:
        self.breaks = np.flatnonzero(np.frombuffer(text.encode("utf-8", "surrogateescape"), np.uint8) == 10)
        self.ascii = text.isascii()
        self.text = text

    def __call__(self, pos: int) -> int:
        if not self.ascii:
            return self.text.count("\n", 0, pos) + 1
        return int(np.searchsorted(self.breaks, pos)) + 1


def read_klarf(path: Path, options: FabOptions) -> list[FabWafer]:
    """Read every wafer of a KLARF file (``options`` does not apply: a defect fails its die)."""
    text = path.read_bytes().decode("latin-1")
    lines = _Lines(text)
    nested = text.lstrip("\ufeff \t\r\n").startswith("Record")
    wafers = _wafers_18(path, text, lines) if nested else _wafers_flat(path, text, lines)
    if not wafers:
        raise fab_error(path, "", "no wafer (no WaferID / WaferRecord) in the file")
    return [_wafer_map(path, w) for w in wafers]


# ---------------------------------------------------------------------------------------------------
# 1.1 / 1.2: statements ending in ';'


def _statements(text: str, lines: _Lines):
    """(keyword, rest of the statement, line) for each ';'-terminated statement (quotes respected)."""
    start = 0
    for m in _STATEMENT_END.finditer(text):
        if m.group() != ";":
            continue
        body = text[start:m.start()]
        word = _KEYWORD.match(body)
        if word:
            yield word.group(1), body[word.end():], lines(start + word.start(1))
        start = m.end()


def _wafers_flat(path: Path, text: str, lines: _Lines) -> list[_Wafer]:
    state: dict[str, tuple[str, int]] = {}
    wafers: list[_Wafer] = []
    current: _Wafer | None = None
    for keyword, rest, line in _statements(text, lines):
        if keyword == "WaferID":
            if current is not None:
                wafers.append(_finish_flat(path, current, state))
            current = _Wafer(line=line, wafer_id=_values(rest)[0] if _values(rest) else "")
            state.pop("DefectList", None)
        elif keyword == "EndOfFile":
            break
        state[keyword] = (rest, line)
    if current is not None:
        wafers.append(_finish_flat(path, current, state))
    return wafers


def _values(rest: str) -> list[str]:
    return [a if a or not b else b for a, b in _VALUE.findall(rest)]


def _finish_flat(path: Path, wafer: _Wafer, state: dict[str, tuple[str, int]]) -> _Wafer:
    for key in ("LotID", "Slot", "DiePitch", "DieOrigin", "SampleSize", "SampleCenterLocation",
                "OrientationMarkLocation"):
        if key in state:
            wafer.values[key] = _values(state[key][0])
    wafer.lot = (wafer.values.get("LotID") or [""])[0]
    slot = wafer.values.get("Slot")
    wafer.slot = int(slot[0]) if slot and slot[0].lstrip("-").isdigit() else None
    if "SampleTestPlan" in state:
        rest, line = state["SampleTestPlan"]
        wafer.plan = _plan(path, rest.split(), line)
    if "DefectList" not in state:
        raise fab_error(path, f"line {wafer.line}", f"wafer {wafer.wafer_id!r} has no DefectList")
    if "DefectRecordSpec" not in state:
        raise fab_error(path, f"line {state['DefectList'][1]}", "DefectList without a DefectRecordSpec")
    spec, spec_line = state["DefectRecordSpec"]
    names = spec.split()
    if not names or not names[0].isdigit() or int(names[0]) != len(names) - 1:
        raise fab_error(path, f"line {spec_line}", "DefectRecordSpec: the column count does not match the "
                                                   "names that follow")
    rest, line = state["DefectList"]
    wafer.defects = _defect_columns(path, names[1:], rest, line)
    return wafer


def _plan(path: Path, tokens: list[str], line: int) -> np.ndarray:
    """SampleTestPlan: a count, then that many XINDEX YINDEX pairs."""
    try:
        count = int(tokens[0])
        pairs = np.array(tokens[1:], dtype=np.int64).reshape(-1, 2)
    except (ValueError, IndexError):
        raise fab_error(path, f"line {line}",
                        "SampleTestPlan: expected a count and XINDEX YINDEX pairs") from None
    if len(pairs) != count:
        raise fab_error(path, f"line {line}", f"SampleTestPlan says {count} dies but lists {len(pairs)}")
    return pairs


def _defect_columns(path: Path, names: list[str], body: str, line: int) -> dict[str, np.ndarray]:
    """The numeric columns a map needs from a DefectList body.

    Without IMAGELIST the values are read as a stream, len(names) per defect. IMAGELIST has no fixed
    width (real 1.1 files write one token for an empty list, others put image entries on following
    lines), so then every line with at least the fixed columns starts a defect and shorter lines continue
    the previous defect's image list.
    """
    wanted = [n for n in ("XINDEX", "YINDEX", "XREL", "YREL") if n in names]
    if "IMAGELIST" in names and names[-1] != "IMAGELIST":
        raise fab_error(path, f"line {line}", "IMAGELIST must be the last DefectRecordSpec column")
    fixed = [n for n in names if n != "IMAGELIST"]
    if "IMAGELIST" not in names:
        tokens = body.split()
        rows = [tokens[i:i + len(fixed)] for i in range(0, len(tokens), len(fixed))]
    else:
        rows = []
        for k, text in enumerate(body.splitlines()):
            tokens = text.split()
            if len(tokens) >= len(fixed):
                rows.append(tokens[:len(fixed)])
            elif tokens and not rows:
                raise fab_error(path, f"line {line + k}", f"DefectList: {len(tokens)} values where a defect "
                                                          f"needs {len(fixed)}")
    if rows and len(rows[-1]) != len(fixed):
        raise fab_error(path, f"line {line}", f"DefectList: defect {len(rows)} has {len(rows[-1])} of "
                                              f"{len(fixed)} values (list cut short?)")
    table = np.array(rows, dtype=object).reshape(len(rows), len(fixed))
    return _numeric(path, line, {n: table[:, fixed.index(n)] for n in wanted})


def _numeric(path: Path, line: int, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, values in columns.items():
        try:
            out[name] = values.astype(np.float64)
        except ValueError:
            raise fab_error(path, f"line {line}",
                            f"DefectList column {name} has a non-numeric value") from None
    return out


# ---------------------------------------------------------------------------------------------------
# 1.8: Record / Field / List


@dataclass
class _Record:
    kind: str
    name: str
    line: int
    fields: dict[str, list[str]] = field(default_factory=dict)
    lists: dict[str, tuple[list[str], np.ndarray, int]] = field(default_factory=dict)
    children: list[_Record] = field(default_factory=list)


class _Tokens:
    """A lazy tokenizer over the 1.8 text; a List's Data block is cut out whole (fast for big lists)."""

    def __init__(self, path: Path, text: str, lines: _Lines) -> None:
        self.text, self.pos, self.path, self.lines = text, 0, path, lines
        self._next: tuple[str, int, int] | None = None

    def _scan(self) -> tuple[str, int, int]:
        if self._next is None:
            m = _TOKEN_18.match(self.text, self.pos)
            self._next = (m.group(1), m.start(1), m.end()) if m else ("", len(self.text), len(self.text))
        return self._next

    def peek(self) -> str:
        return self._scan()[0]

    def line(self) -> int:
        return self.lines(self._scan()[1])

    def take(self, expected: str | None = None) -> str:
        token, _, end = self._scan()
        if not token:
            raise fab_error(self.path, f"line {self.line()}", f"file ends inside a record (expected "
                                                              f"{expected or 'more'})")
        if expected is not None and token != expected:
            raise fab_error(self.path, f"line {self.line()}", f"expected {expected!r}, found {token!r}")
        self.pos, self._next = end, None
        return token

    def block(self) -> list[list[str]]:
        """The rows (';'-terminated) of a Data block up to its closing brace, which is consumed."""
        end = next((m for m in _BLOCK_END.finditer(self.text, self.pos) if m.group() == "}"), None)
        if end is None:
            raise fab_error(self.path, f"line {self.line()}", "Data block without its closing '}'")
        body = self.text[self.pos:end.start()]
        self.pos, self._next = end.end(), None
        if '"' not in body:
            rows = [r.split() for r in body.replace(",", " ").split(";")]
            return rows if rows[-1] else rows[:-1]
        out, start = [], 0
        for m in _STATEMENT_END.finditer(body):
            if m.group() == ";":
                out.append([_unquote(t) for t in _VALUE_TOKEN.findall(body[start:m.start()])])
                start = m.end()
        return out


def _unquote(token: str) -> str:
    return token[1:-1] if token.startswith('"') and token.endswith('"') else token


def _record(tok: _Tokens) -> _Record:
    line = tok.line()
    tok.take("Record")
    kind = tok.take()
    name = _unquote(tok.take()) if tok.peek() != "{" else ""
    rec = _Record(kind, name, line)
    tok.take("{")
    while tok.peek() != "}":
        word = tok.peek()
        if word == "Record":
            rec.children.append(_record(tok))
        elif word == "Field":
            tok.take()
            key = tok.take()
            tok.take()  # the value count
            tok.take("{")
            values = []
            while tok.peek() != "}":
                value = tok.take()
                if value != ",":
                    values.append(_unquote(value))
            tok.take("}")
            rec.fields[key] = values
        elif word == "List":
            tok.take()
            key = tok.take()
            rec.lists[key] = _list(tok)
        else:
            raise fab_error(tok.path, f"line {tok.line()}", f"expected Record, Field or List, found {word!r}")
    tok.take("}")
    return rec


def _list(tok: _Tokens) -> tuple[list[str], np.ndarray, int]:
    tok.take("{")
    tok.take("Columns")
    tok.take()
    tok.take("{")
    columns, pending = [], []
    while tok.peek() != "}":
        token = tok.take()
        if token == ",":
            columns.append(pending[-1])
            pending = []
        else:
            pending.append(token)
    if pending:
        columns.append(pending[-1])
    tok.take("}")
    line = tok.line()
    tok.take("Data")
    declared = tok.take()
    tok.take("{")
    rows = tok.block()
    tok.take("}")
    if not declared.isdigit() or int(declared) != len(rows):
        raise fab_error(tok.path, f"line {line}", f"Data says {declared} rows but holds {len(rows)}")
    bad = next((k for k, r in enumerate(rows) if len(r) != len(columns)), None)
    if bad is not None:
        raise fab_error(tok.path, f"line {line}", f"Data row {bad} has {len(rows[bad])} values for "
                                                  f"{len(columns)} columns")
    table = np.array(list(itertools.chain.from_iterable(rows)), dtype=str).reshape(len(rows), len(columns))
    return columns, table, line


def _wafers_18(path: Path, text: str, lines: _Lines) -> list[_Wafer]:
    tok = _Tokens(path, text, lines)
    root = _record(tok)
    wafers = []
    for lot in (c for c in root.children if c.kind == "LotRecord"):
        for rec in (c for c in lot.children if c.kind == "WaferRecord"):
            wafers.append(_finish_18(path, root, lot, rec))
    return wafers


def _finish_18(path: Path, root: _Record, lot: _Record, rec: _Record) -> _Wafer:
    wafer = _Wafer(line=rec.line, wafer_id=rec.name, lot=lot.name, micrometres=False)
    for key in ("DiePitch", "DieOrigin", "SampleSize", "SampleCenterLocation", "OrientationMarkLocation",
                "SlotNumber"):
        for scope in (rec, lot, root):
            if key in scope.fields:
                wafer.values[key] = scope.fields[key]
                break
    slot = wafer.values.get("SlotNumber")
    wafer.slot = int(slot[0]) if slot and slot[0].lstrip("-").isdigit() else None
    plans = [t.lists["SampleTestPlanList"] for t in rec.children if "SampleTestPlanList" in t.lists]
    if plans:
        try:
            pairs = [table[:, [c.index("XINDEX"), c.index("YINDEX")]].astype(np.int64)
                     for c, table, _ in plans]
        except ValueError:
            raise fab_error(path, f"line {plans[0][2]}", "SampleTestPlanList needs integer XINDEX and YINDEX "
                                                         "columns") from None
        wafer.plan = np.concatenate(pairs)
    if "DefectList" not in rec.lists:
        raise fab_error(path, f"line {rec.line}", f"WaferRecord {rec.name!r} has no DefectList")
    columns, table, line = rec.lists["DefectList"]
    wanted = [n for n in ("XINDEX", "YINDEX", "XREL", "YREL") if n in columns]
    wafer.defects = _numeric(path, line, {n: table[:, columns.index(n)] for n in wanted})
    return wafer


# ---------------------------------------------------------------------------------------------------
# defects -> map


def _floats(path: Path, wafer: _Wafer, key: str, n: int) -> np.ndarray | None:
    values = wafer.values.get(key)
    if not values:
        return None
    try:
        out = np.array(values, dtype=np.float64)
    except ValueError:
        raise fab_error(path, f"line {wafer.line}", f"{key} {' '.join(values)!r} is not numeric") from None
    return out[:n] if len(out) >= n else None


def _defect_dies(path: Path, wafer: _Wafer) -> np.ndarray:
    """(N, 2) die index of each defect: XINDEX/YINDEX, else XREL/YREL over DiePitch."""
    d = wafer.defects or {}
    if "XINDEX" in d and "YINDEX" in d:
        return np.stack([d["XINDEX"], d["YINDEX"]], axis=1).astype(np.int64)
    pitch = _floats(path, wafer, "DiePitch", 2)
    if "XREL" in d and "YREL" in d and pitch is not None and (pitch > 0).all():
        origin = _floats(path, wafer, "DieOrigin", 2)
        origin = np.zeros(2) if origin is None else origin
        xy = np.stack([d["XREL"], d["YREL"]], axis=1)
        return np.floor((xy - origin) / pitch).astype(np.int64)
    raise fab_error(path, f"line {wafer.line}", f"wafer {wafer.wafer_id!r}: no die index for the defects "
                                                "(no XINDEX/YINDEX columns, nor XREL/YREL with a DiePitch)")


def _wafer_dies(path: Path, wafer: _Wafer) -> np.ndarray:
    """(M, 2) die indices of the wafer: its SampleTestPlan, else the dies wholly inside the wafer."""
    if wafer.plan is not None and len(wafer.plan):
        return wafer.plan
    pitch = _floats(path, wafer, "DiePitch", 2)
    size = _floats(path, wafer, "SampleSize", 2)
    if pitch is None or size is None or not (pitch > 0).all():
        raise fab_error(path, f"line {wafer.line}", f"wafer {wafer.wafer_id!r}: no SampleTestPlan, and no "
                                                    "SampleSize/DiePitch to lay out the die grid")
    radius = (size[1] * 1000.0 if wafer.micrometres else size[0]) / 2.0
    centre = _floats(path, wafer, "SampleCenterLocation", 2)
    origin = _floats(path, wafer, "DieOrigin", 2)
    centre = np.zeros(2) if centre is None else centre
    offset = -centre + (np.zeros(2) if origin is None else origin)
    n = int(np.ceil(radius / pitch.min())) + 2
    i, j = np.meshgrid(np.arange(-n - 1, n + 2), np.arange(-n - 1, n + 2), indexing="ij")
    x0, y0 = i * pitch[0] + offset[0], j * pitch[1] + offset[1]
    far_x = np.maximum(np.abs(x0), np.abs(x0 + pitch[0]))
    far_y = np.maximum(np.abs(y0), np.abs(y0 + pitch[1]))
    inside = far_x ** 2 + far_y ** 2 <= radius ** 2
    note(f"{path}: wafer {wafer.wafer_id!r} has no SampleTestPlan: {int(inside.sum())} dies wholly inside "
         f"the {2 * radius / (1000.0 if wafer.micrometres else 1e6):g} mm wafer taken as its die grid")
    return np.stack([i[inside], j[inside]], axis=1)


def _keys(xy: np.ndarray) -> np.ndarray:
    """One int64 per (x, y) die index, so sets of dies are 1-D (fast unique/isin)."""
    return (xy[:, 0].astype(np.int64) + _OFFSET) * _KEY + (xy[:, 1].astype(np.int64) + _OFFSET)


def _mark(wafer: _Wafer) -> str | None:
    value = (wafer.values.get("OrientationMarkLocation") or [""])[0].strip().upper()
    if value in _SIDES:
        return _SIDES[value]
    try:
        return side_from_angle(float(value), "down")
    except ValueError:
        return None


def _wafer_map(path: Path, wafer: _Wafer) -> FabWafer:
    defect_keys = _keys(_defect_dies(path, wafer))
    die_keys = np.unique(_keys(_wafer_dies(path, wafer)))
    every = np.union1d(die_keys, defect_keys)
    outside = len(every) - len(die_keys)
    if outside and wafer.plan is not None:
        note(f"{path}: wafer {wafer.wafer_id!r}: {outside} defect die(s) outside the SampleTestPlan added")
    status = np.where(np.isin(every, defect_keys), FAILED, GOOD).astype(np.uint8)
    x, y = every // _KEY - _OFFSET, every % _KEY - _OFFSET
    (grid,) = grid_from_xy(x, y, [status], [NO_DIE], x_right=True, y_up=True)
    return FabWafer(map=turn_mark_down(grid, _mark(wafer)), lot=wafer.lot, wafer_id=wafer.wafer_id,
                    slot=wafer.slot)
