"""STDF V4 and V4-2007 wafer-sort files (plain or ``.gz``, either byte order) -> one map per wafer.

Parser: **stdf-convert** (PyPI, MIT; Rust, built on rust-stdf), asked only for the FAR, MIR, WCR, WIR, WRR
and PRR tables. Why: it reads V4 and V4-2007, both byte orders and gzip itself, and is fast: the real
4.4 MB ``lot2.stdf.gz`` (60k records) in about 13 ms and a 50,000-die wafer well under a second
(``benchmarks/fab_formats.py``). **pystdf 1.4.0** (GPL-2.0, pure Python) was measured at 1.8 s for the
same 1,569-die file (over 100x slower), so it cannot meet the under-a-second budget for a 50k-die wafer;
a hand-written reader was not needed. The only own code is :func:`_locate_damage`, a short record-header
walk run after a failed parse, so that the error names the record where the file breaks.

Mapping: PRRs between a WIR and its WRR (per test head) form one wafer (a file without WIR gives one map
with a note); the die grid is the bounding box of PRR X_COORD/Y_COORD; a die tested again keeps its
last PRR (retests are often not flagged in PART_FLG); a die passes when its hard (or soft) bin is in the
pass bins; the bin itself is kept in ``WaferTable.bins``. Lot from MIR LOT_ID, wafer id from WIR/WRR.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from waferlab.data.fab.common import (
    DEFAULT_PASS_BINS,
    FAILED,
    GOOD,
    NO_DIE,
    FabOptions,
    FabWafer,
    fab_error,
    grid_from_xy,
    note,
    turn_mark_down,
)
from waferlab.errors import WaferlabError

_TABLES = ["FAR", "MIR", "WCR", "WIR", "WRR", "PRR"]
_MISSING_COORD = -32768
_FLAT_SIDE = {"D": "down", "U": "up", "L": "left", "R": "right"}
_NAMES = {(0, 10): "FAR", (0, 20): "ATR", (0, 30): "VUR", (1, 10): "MIR", (1, 20): "MRR", (1, 30): "PCR",
          (1, 40): "HBR", (1, 50): "SBR", (1, 60): "PMR", (1, 62): "PGR", (1, 63): "PLR", (1, 70): "RDR",
          (1, 80): "SDR", (1, 90): "PSR", (1, 91): "NMR", (1, 92): "CNR", (1, 93): "SSR", (1, 94): "CDR",
          (2, 10): "WIR", (2, 20): "WRR", (2, 30): "WCR", (5, 10): "PIR", (5, 20): "PRR", (10, 30): "TSR",
          (15, 10): "PTR", (15, 15): "MPR", (15, 20): "FTR", (15, 30): "STR", (20, 10): "BPS",
          (20, 20): "EPS", (50, 10): "GDR", (50, 30): "DTR"}


def sniff_stdf(head: bytes) -> bool:
    """True when ``head`` (the first, uncompressed bytes) starts with an STDF FAR record."""
    return len(head) >= 4 and head[:2] in (b"\x00\x02", b"\x02\x00") and head[2] == 0 and head[3] == 10


def read_head(path: Path, n: int = 8) -> bytes:
    """The first ``n`` bytes of a file, uncompressed when it is gzip."""
    with open(path, "rb") as fh:
        head = fh.read(n)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read(n)
        except (OSError, EOFError, zlib.error):
            return b""
    return head


def read_stdf(path: Path, options: FabOptions) -> list[FabWafer]:
    """Read every wafer of an STDF file (see the module docstring for the rules)."""
    head = read_head(path)
    if not sniff_stdf(head):
        raise fab_error(path, "record 0", f"not an STDF file: it does not start with a FAR record "
                                          f"(first bytes {head[:6].hex(' ') or 'none'})")
    if len(head) >= 6 and head[5] != 4:
        raise fab_error(path, "record 0 (FAR)", f"STDF version {head[5]} is not supported (only V4 and "
                                                "V4-2007)")
    tables = _parse(path)
    prr = tables.get("PRR")
    if prr is None or prr.num_rows == 0:
        raise fab_error(path, "", "no PRR (part result) records: nothing to map (not a wafer-sort file?)")
    lot = _first(tables, "MIR", "LOT_ID") or ""
    x_right, y_up, mark = _axes(tables)
    cols = _columns(prr, ["sequence_number", "HEAD_NUM", "HARD_BIN", "SOFT_BIN", "X_COORD", "Y_COORD"])
    groups, wafer_ids = _wafer_groups(path, tables, cols)
    pass_bins = np.array(options.pass_bins or DEFAULT_PASS_BINS)
    bins = cols["SOFT_BIN" if options.bin_kind == "soft" else "HARD_BIN"]
    wafers = []
    for rows, wafer_id in zip(groups, wafer_ids):
        rows = _with_coordinates(path, cols, rows, wafer_id)
        rows = _last_test(cols["X_COORD"][rows], cols["Y_COORD"][rows], rows)
        die_bins = bins[rows]
        if options.bin_kind == "soft" and (die_bins == 65535).any():
            seq = int(cols["sequence_number"][rows[np.flatnonzero(die_bins == 65535)[0]]])
            raise fab_error(path, f"record {seq} (PRR)", "SOFT_BIN is missing (65535); use --bin-kind hard")
        status = np.where(np.isin(die_bins, pass_bins), GOOD, FAILED).astype(np.uint8)
        grid, bin_grid = grid_from_xy(cols["X_COORD"][rows], cols["Y_COORD"][rows],
                                      [status, die_bins.astype(np.int32)], [NO_DIE, -1], x_right, y_up)
        wafers.append(FabWafer(map=turn_mark_down(grid, mark), bins=turn_mark_down(bin_grid, mark), lot=lot,
                               wafer_id=wafer_id))
    return wafers


def _parse(path: Path) -> dict:
    """stdf-convert's tables for the few record types needed; a parse failure names the broken record."""
    try:
        import stdf_convert
    except ImportError:
        raise WaferlabError(f"{path}: reading STDF needs the 'stdf-convert' package (Python >= 3.11): "
                            "pip install stdf-convert") from None
    try:
        return stdf_convert.tables(str(path), _TABLES)
    except stdf_convert.StdfError as exc:
        raise _locate_damage(path, str(exc)) from None
    except (OSError, EOFError, ValueError) as exc:
        raise _locate_damage(path, f"{type(exc).__name__}: {exc}") from None


def _first(tables: dict, name: str, column: str) -> str | None:
    table = tables.get(name)
    if table is None or table.num_rows == 0 or column not in table.column_names:
        return None
    value = table.column(column)[0].as_py()
    return None if value is None else str(value).strip()


def _axes(tables: dict) -> tuple[bool, bool, str | None]:
    """(X increases to the right, Y increases upward, flat side) from the WCR; unknown: right, down, none."""
    pos_x = (_first(tables, "WCR", "POS_X") or "").upper()
    pos_y = (_first(tables, "WCR", "POS_Y") or "").upper()
    flat = (_first(tables, "WCR", "WF_FLAT") or "").upper()
    return pos_x != "L", pos_y == "U", _FLAT_SIDE.get(flat)


def _columns(table, names: list[str]) -> dict[str, np.ndarray]:
    """Integer numpy columns of an Arrow table; a field the record left out reads as STDF's 'missing'."""
    import pyarrow.compute as pc

    out = {}
    for name in names:
        column = table.column(name)
        if column.null_count:
            fill = _MISSING_COORD if name in ("X_COORD", "Y_COORD") else 65535
            column = pc.fill_null(column, fill)
        out[name] = column.to_numpy().astype(np.int64)
    return out


def _wafer_groups(path: Path, tables: dict,
                  cols: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
    """PRR row indices per wafer (by WIR position and test head) and the wafer ids."""
    seq, head = cols["sequence_number"], cols["HEAD_NUM"]
    wir = tables.get("WIR")
    if wir is None or wir.num_rows == 0:
        wrr_id = _first(tables, "WRR", "WAFER_ID") or ""
        note(f"{path}: no WIR record: all {len(seq)} PRRs read as one wafer")
        return [np.arange(len(seq))], [wrr_id]
    w = _columns(wir, ["sequence_number", "HEAD_NUM"])
    ids = [str(v or "").strip() for v in wir.column("WAFER_ID").to_pylist()]
    wrr = tables.get("WRR")
    wrr_ids = {}
    if wrr is not None and wrr.num_rows:
        r = _columns(wrr, ["sequence_number", "HEAD_NUM"])
        for s, h, wid in zip(r["sequence_number"], r["HEAD_NUM"], wrr.column("WAFER_ID").to_pylist()):
            wrr_ids[(int(h), int(s))] = str(wid or "").strip()
    owner = np.full(len(seq), -1, dtype=np.int64)
    for h in np.unique(w["HEAD_NUM"]):
        mine = np.flatnonzero(w["HEAD_NUM"] == h)
        on_head = (head == h) | (h == 255)
        pos = np.searchsorted(w["sequence_number"][mine], seq, side="right") - 1
        take = on_head & (pos >= 0)
        owner[take] = mine[pos[take]]
    if (owner < 0).any():
        note(f"{path}: {int((owner < 0).sum())} PRR(s) before any WIR on their head were left out")
    groups, names = [], []
    for k in range(len(ids)):
        rows = np.flatnonzero(owner == k)
        if len(rows) == 0:
            note(f"{path}: wafer {ids[k] or k + 1!r} (WIR record {int(w['sequence_number'][k])}) has no PRR; "
                 "left out")
            continue
        groups.append(rows)
        names.append(ids[k] or _wrr_id_after(wrr_ids, int(w["HEAD_NUM"][k]), int(seq[rows[-1]])))
    if not groups:
        raise fab_error(path, "", "no PRR lies inside a WIR ... WRR wafer")
    return groups, names


def _wrr_id_after(wrr_ids: dict[tuple[int, int], str], head: int, seq: int) -> str:
    after = sorted(s for (h, s) in wrr_ids if h in (head, 255) and s > seq)
    return wrr_ids.get((head, after[0]), "") if after else ""


def _with_coordinates(path: Path, cols: dict[str, np.ndarray], rows: np.ndarray, wafer_id: str) -> np.ndarray:
    """The PRRs that carry die coordinates; none at all is an error (a PRR without X/Y cannot be mapped)."""
    has = (cols["X_COORD"][rows] != _MISSING_COORD) & (cols["Y_COORD"][rows] != _MISSING_COORD)
    if not has.any():
        seq = int(cols["sequence_number"][rows[0]])
        raise fab_error(path, f"record {seq} (PRR)", f"no die coordinates (X_COORD/Y_COORD missing) on any "
                                                     f"of the {len(rows)} PRRs of wafer {wafer_id!r}")
    if not has.all():
        note(f"{path}: {int((~has).sum())} PRR(s) of wafer {wafer_id!r} without die coordinates left out")
    return rows[has]


def _last_test(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Of PRRs at the same die (X, Y), keep the last one in file order."""
    key = (x - x.min()) * (int(y.max() - y.min()) + 1) + (y - y.min())
    _, first_from_end = np.unique(key[::-1], return_index=True)
    keep = np.sort(len(key) - 1 - first_from_end)
    return rows[keep]


def _raw_bytes(path: Path) -> tuple[bytes, str]:
    """The file's (uncompressed) bytes, and a note when a gzip stream stops early."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data, ""
    out = zlib.decompressobj(wbits=31)
    try:
        raw = out.decompress(data)
    except zlib.error as exc:
        return b"", f"corrupt gzip data ({exc})"
    return raw, "" if out.eof else "the gzip stream is cut short"


def _locate_damage(path: Path, reason: str) -> WaferlabError:
    """Walk the record headers to name the record where the file breaks (run only after a failed parse)."""
    raw, gz_problem = _raw_bytes(path)
    if not raw:
        return fab_error(path, "", gz_problem or f"cannot read STDF ({reason})")
    order = ">" if raw[:2] == b"\x00\x02" else "<"
    pos, index = 0, 0
    while pos + 4 <= len(raw):
        length = struct.unpack_from(order + "H", raw, pos)[0]
        name = _NAMES.get((raw[pos + 2], raw[pos + 3]), f"type {raw[pos + 2]}/{raw[pos + 3]}")
        if pos + 4 + length > len(raw):
            what = f"cut short: {len(raw) - pos - 4} of its {length} bytes are there"
            if gz_problem:
                what += f" ({gz_problem})"
            return fab_error(path, f"record {index} ({name} at byte {pos})", what)
        pos += 4 + length
        index += 1
    if pos < len(raw):
        return fab_error(path, f"record {index} (at byte {pos})", f"cut short inside the record header "
                                                                 f"({len(raw) - pos} of 4 bytes)")
    where = f"after record {index - 1}" if index else ""
    return fab_error(path, where, gz_problem or f"stdf-convert could not read it ({reason})")
