"""SEMI G85 XML map files (``<Map>`` root, or several under ``<Maps>``; with or without the semi.org
namespace) -> one map per ``<Device>``.

Parser: the standard library's expat (the XML parser under ElementTree), with our own small handler so
that an error can name the line of the offending ``<Row>``. The PyPI package **g85 0.7** (GPL-3.0) was
tried and does not serve: it expects a ``<Maps>`` root and returned no map for either shipped example
(both have the G85-1101 ``<Map>`` root), and it splits hexadecimal rows into single characters instead
of two-digit codes.

Rules: bin codes are read in the Device's ``BinType`` (``HexaDecimal``: fixed-width codes as wide as
``NullBin``, or space-separated; ``Decimal``: space-separated, or fixed width; ``ASCII``: one character
per die). ``NullBin`` is "no die". A die passes when its bin's ``BinQuality`` is ``Pass``; a file without
``<Bin>`` definitions falls back to ``--pass-bins`` (default 1, compared as numbers). The row count must
match ``Rows`` and every row ``Columns``. Bins are kept as integers (hex and decimal values, ASCII code
points), -1 for no die. Orientation: see :mod:`waferlab.data.fab.common`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

import numpy as np

from waferlab.data.fab.common import (
    DEFAULT_PASS_BINS,
    FAILED,
    GOOD,
    NO_DIE,
    FabOptions,
    FabWafer,
    fab_error,
    note,
    side_from_angle,
    turn_mark_down,
)
from waferlab.errors import WaferlabError

#: G85 BinType values this reader decodes, and the base of their codes (0: one character per die).
BIN_TYPES: dict[str, int] = {"hexadecimal": 16, "decimal": 10, "ascii": 0}


def sniff_g85(head: bytes) -> bool:
    """True when ``head`` looks like a G85 XML map (an XML document whose root is Map or Maps)."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text.startswith(b"<"):
        return False
    return re.search(rb"<(?:\w+:)?Maps?[\s>]", text[:4096]) is not None


@dataclass
class _Device:
    line: int
    attrs: dict[str, str]
    map_attrs: dict[str, str]
    bins: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    rows: list[tuple[int, str]] = field(default_factory=list)


class _Handler:
    """Collects every Device with its Bin definitions and Row texts (with their line numbers)."""

    def __init__(self, parser: expat.XMLParserType) -> None:
        self.parser = parser
        self.devices: list[_Device] = []
        self.map_attrs: dict[str, str] = {}
        self.root: str | None = None
        self.row_text: list[str] | None = None
        self.row_line = 0

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        name = tag.rsplit("}", 1)[-1]
        line = self.parser.CurrentLineNumber
        if self.root is None:
            self.root = name
        if name == "Map":
            self.map_attrs = {k.rsplit("}", 1)[-1]: v for k, v in attrs.items()}
        elif name == "Device":
            self.devices.append(_Device(line, {k.rsplit("}", 1)[-1]: v for k, v in attrs.items()},
                                        dict(self.map_attrs)))
        elif name == "Bin" and self.devices:
            self.devices[-1].bins.append((line, {k.rsplit("}", 1)[-1]: v for k, v in attrs.items()}))
        elif name == "Row":
            self.row_text, self.row_line = [], line

    def text(self, data: str) -> None:
        if self.row_text is not None:
            self.row_text.append(data)

    def end(self, tag: str) -> None:
        if tag.rsplit("}", 1)[-1] == "Row" and self.row_text is not None:
            if self.devices:
                self.devices[-1].rows.append((self.row_line, "".join(self.row_text)))
            self.row_text = None


def read_g85(path: Path, options: FabOptions) -> list[FabWafer]:
    """Read every Device of a G85 file as one wafer map."""
    parser = expat.ParserCreate(namespace_separator="}")
    handler = _Handler(parser)
    parser.StartElementHandler = handler.start
    parser.EndElementHandler = handler.end
    parser.CharacterDataHandler = handler.text
    try:
        with open(path, "rb") as fh:
            parser.ParseFile(fh)
    except expat.ExpatError as exc:
        raise fab_error(path, f"line {exc.lineno}",
                        f"not well-formed XML ({expat.ErrorString(exc.code)})") from None
    if handler.root not in ("Map", "Maps"):
        raise fab_error(path, "line 1",
                        f"not a SEMI G85 map: the root element is <{handler.root}>, not <Map>")
    if not handler.devices:
        raise fab_error(path, "", "no <Device> element: no map in the file")
    return [_device_map(path, d, options) for d in handler.devices]


def _attr(path: Path, device: _Device, name: str) -> str:
    for key, value in device.attrs.items():
        if key.lower() == name.lower():
            return value.strip()
    raise fab_error(path, f"line {device.line}", f"<Device> has no {name} attribute")


def _optional(attrs: dict[str, str], name: str) -> str | None:
    return next((v.strip() for k, v in attrs.items() if k.lower() == name.lower()), None)


def _device_map(path: Path, device: _Device, options: FabOptions) -> FabWafer:
    bin_type = _attr(path, device, "BinType")
    base = BIN_TYPES.get(bin_type.lower())
    if base is None:
        raise fab_error(path, f"line {device.line}", f"BinType {bin_type!r} is not supported (one of "
                                                     "HexaDecimal, Decimal, ASCII)")
    null = _attr(path, device, "NullBin")
    n_rows, n_cols = (_int_attr(path, device, name) for name in ("Rows", "Columns"))
    if len(device.rows) != n_rows:
        where = device.rows[-1][0] if device.rows else device.line
        raise fab_error(path, f"line {where}", f"the map has {len(device.rows)} <Row> elements but its "
                                               f"<Device> (line {device.line}) says Rows=\"{n_rows}\"")
    width = len(null) if base else 1
    cells: list[str] = []
    for r, (line, text) in enumerate(device.rows):
        row = _split_row(text, width)
        if len(row) != n_cols:
            raise fab_error(path, f"line {line}", f"row {r} has {len(row)} dies, the <Device> says "
                                                  f"Columns=\"{n_cols}\"")
        cells += row
    # a map has few distinct codes: decode each once (the line in an error is that of its first row)
    uniq, inverse = np.unique(np.array(cells, dtype=str), return_inverse=True)
    values = np.array([_cell_code(path, device, cells, n_cols, c, base) for c in uniq.tolist()],
                      dtype=np.int64)
    codes = values[inverse].reshape(n_rows, n_cols)
    null_code = _code(path, device.line, null, base)
    die = codes != null_code
    passing = _pass_codes(path, device, base, options)
    status = np.where(die, np.where(np.isin(codes, passing), GOOD, FAILED), NO_DIE).astype(np.uint8)
    _check_counts(path, device, base, codes[die])
    orientation = _optional(device.attrs, "Orientation")
    mark = side_from_angle(float(orientation), "down") if orientation not in (None, "") else None
    bins = np.where(die, codes, -1).astype(np.int32)
    wafer_id = _optional(device.map_attrs, "WaferId") or _optional(device.map_attrs, "SubstrateId") or ""
    return FabWafer(map=turn_mark_down(status, mark), bins=turn_mark_down(bins, mark), wafer_id=wafer_id,
                    lot=_optional(device.attrs, "LotId") or "")


def _int_attr(path: Path, device: _Device, name: str) -> int:
    text = _attr(path, device, name)
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise fab_error(path, f"line {device.line}", f"<Device> attribute {name}={text!r} is not a positive "
                                                     "integer")
    return value


def _split_row(text: str, width: int) -> list[str]:
    text = text.strip()
    if any(c.isspace() for c in text):
        return text.split()
    return [text[i:i + width] for i in range(0, len(text), width)]


def _cell_code(path: Path, device: _Device, cells: list[str], n_cols: int, cell: str, base: int) -> int:
    """A map cell's code; an undecodable one is reported at the line of the first row that has it."""
    try:
        return _code(path, 0, cell, base)
    except WaferlabError:
        return _code(path, device.rows[cells.index(cell) // n_cols][0], cell, base)


def _code(path: Path, line: int, cell: str, base: int) -> int:
    if base == 0:
        return ord(cell)
    try:
        return int(cell, base)
    except ValueError:
        kind = "hexadecimal" if base == 16 else "decimal"
        raise fab_error(path, f"line {line}", f"bin code {cell!r} is not {kind}") from None


def _pass_codes(path: Path, device: _Device, base: int, options: FabOptions) -> np.ndarray:
    """Codes whose BinQuality is Pass; without Bin definitions, ``--pass-bins`` (default 1)."""
    if not device.bins:
        bins = options.pass_bins or DEFAULT_PASS_BINS
        note(f"{path}: no <Bin> definitions: bins {', '.join(map(str, bins))} taken as passing")
        if base == 0:
            return np.array([ord(str(b)) for b in bins if 0 <= b <= 9])
        return np.array(bins)
    codes = []
    for line, attrs in device.bins:
        code, quality = _optional(attrs, "BinCode"), (_optional(attrs, "BinQuality") or "").lower()
        if code is None:
            raise fab_error(path, f"line {line}", "<Bin> has no BinCode attribute")
        if quality == "pass":
            codes.append(_code(path, line, code, base))
    return np.array(codes, dtype=np.int64)


def _check_counts(path: Path, device: _Device, base: int, die_codes: np.ndarray) -> None:
    """Compare each Bin's BinCount with the dies counted (a note, since writers often leave it stale)."""
    uniq, counts = np.unique(die_codes, return_counts=True)
    found = dict(zip(uniq.tolist(), counts.tolist()))
    for line, attrs in device.bins:
        declared = _optional(attrs, "BinCount")
        code = _optional(attrs, "BinCode")
        if declared and declared.isdigit() and code is not None:
            counted = found.get(_code(path, line, code, base), 0)
            if counted != int(declared):
                note(f"{path}: line {line}: bin {code} has BinCount {declared} but {counted} dies in the map")
