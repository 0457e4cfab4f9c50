"""STDF V4 and V4-2007 wafer-sort files (plain or ``.gz``, either byte order) -> one map per wafer.

Parser: our own record-level reader (:func:`_scan`: a walk over the 4-byte record headers in Python, then
numpy gathers of the fixed-offset PRR fields), reading only FAR, MIR, WCR, WIR, WRR and PRR. Measured
alternatives: **pystdf 1.4.0** (GPL-2.0, pure Python) took 1.8 s for the real 1,569-die ``lot2.stdf``
(60k records), far too slow for a 50,000-die wafer in under a second. **stdf-convert 0.3.0** (MIT, Rust)
read it in 13 ms and serves functionally, but it requires pyarrow (and Python >= 3.11), and with pyarrow
installed pandas 3 stores strings as Arrow arrays, so every DataFrame pickle (``data synth``, LSWMD
writes) then references ``pyarrow.lib`` and our restricted unpickler rightly refuses it: 22 existing
tests failed with it installed. The few records a map needs have fixed layouts, so a small reader is
the safer choice; it reads a 50k-die wafer in well under a second (``benchmarks/fab_formats.py``) and
names the record (counted from 0, with its type and byte offset) where a damaged file breaks.

Mapping: PRRs between a WIR and its WRR (per test head) form one wafer (a file without WIR gives one map
with a note); the die grid is the bounding box of PRR X_COORD/Y_COORD; a die tested again keeps its
last PRR (retests are often not flagged in PART_FLG); a die passes when its hard (or soft) bin is in the
pass bins; the bin itself is kept in ``WaferTable.bins``. Lot from MIR LOT_ID, wafer id from WIR/WRR.
V4-2007 adds record types (VUR, PSR, STR, ...) that the walk steps over; the records read are unchanged.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
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
    scan = _scan(path)
    if len(scan.prr) == 0:
        raise fab_error(path, "", "no PRR (part result) records: nothing to map (not a wafer-sort file?)")
    lot, (x_right, y_up, mark) = scan.lot, scan.axes
    cols = scan.prr_columns()
    groups, wafer_ids = _wafer_groups(path, scan, cols)
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


@dataclass
class _Scan:
    """Where the records a map needs are: PRR positions (with record numbers), WIR/WRR, lot and axes."""

    raw: bytes
    big: bool
    prr: list[tuple[int, int]] = field(default_factory=list)  # (record number, byte offset)
    wir: list[tuple[int, int, str]] = field(default_factory=list)  # (record number, head, wafer id)
    wrr: list[tuple[int, int, str]] = field(default_factory=list)
    lot: str = ""
    axes: tuple[bool, bool, str | None] = (True, False, None)

    def prr_columns(self) -> dict[str, np.ndarray]:
        """PRR fields at fixed offsets, gathered with numpy; a field the record left out reads as missing."""
        buf = np.frombuffer(self.raw, dtype=np.uint8)
        seq, pos = (np.array(v, dtype=np.int64) for v in zip(*self.prr))
        length = self._u16(buf, pos, np.full(len(pos), 2), 0)
        body = pos + 4

        def u16(offset: int, missing: int) -> np.ndarray:
            return self._u16(buf, body + offset, length, offset, missing)

        x, y = (np.where(v >= 0x8000, v - 0x10000, v) for v in (u16(9, 0x8000), u16(11, 0x8000)))  # I2
        return {"sequence_number": seq, "HEAD_NUM": buf[np.minimum(body, len(buf) - 1)].astype(np.int64),
                "HARD_BIN": u16(5, 65535), "SOFT_BIN": u16(7, 65535), "X_COORD": x, "Y_COORD": y}

    def _u16(self, buf: np.ndarray, at: np.ndarray, length: np.ndarray, offset: int,
             missing: int = 0) -> np.ndarray:
        there = length >= offset + 2 if offset else np.ones(len(at), bool)
        at = np.where(there, at, 0)
        hi, lo = (buf[at], buf[at + 1]) if self.big else (buf[at + 1], buf[at])
        return np.where(there, (hi.astype(np.int64) << 8) | lo, missing)


def _cn(raw: bytes, start: int, end: int) -> str:
    """An STDF Cn string at ``start`` within a record ending at ``end`` ("" when left out)."""
    if start >= end:
        return ""
    return raw[start + 1:min(start + 1 + raw[start], end)].decode("latin-1").strip()


def _walk(raw: bytes, big: bool,
          prr: list[tuple[int, int]]) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """Follow the record headers: PRRs go to ``prr`` as (record number, offset); returned are the MIR and
    wafer records as (number, offset, type, sub) and where (offset, record) the walk stopped. The hot loop
    of the reader: one type test per record on the common path."""
    hits: list[tuple[int, int, int, int]] = []
    keep, keep_prr = hits.append, prr.append
    n, pos, index = len(raw), 0, 0
    hi, lo = (0, 1) if big else (1, 0)
    while pos + 4 <= n:
        typ = raw[pos + 2]
        if typ < 6:
            if typ == 5:
                if raw[pos + 3] == 20:
                    keep_prr((index, pos))
            elif typ:
                keep((index, pos, typ, raw[pos + 3]))
        end = pos + 4 + (raw[pos + hi] << 8 | raw[pos + lo])
        if end > n:
            break
        pos = end
        index += 1
    return hits, pos, index


def _scan(path: Path) -> _Scan:
    """Walk every record header once; note the records a map needs. A record past the end is an error."""
    raw, gz_problem = _raw_bytes(path)
    scan = _Scan(raw, big=raw[:2] == b"\x00\x02")
    hits, pos, index = _walk(raw, scan.big, scan.prr)
    n = len(raw)
    if pos + 4 <= n:  # the walk stopped at a record that runs past the end of the file
        typ, sub = raw[pos + 2], raw[pos + 3]
        length = (raw[pos] << 8 | raw[pos + 1]) if scan.big else (raw[pos + 1] << 8 | raw[pos])
        what = f"cut short: {n - pos - 4} of its {length} bytes are there"
        raise fab_error(path, f"record {index} ({_NAMES.get((typ, sub), f'type {typ}/{sub}')} at byte {pos})",
                        what + (f" ({gz_problem})" if gz_problem else ""))
    if pos < n:
        raise fab_error(path, f"record {index} (at byte {pos})", f"cut short inside the record header "
                                                                 f"({n - pos} of 4 bytes)")
    if gz_problem:
        raise fab_error(path, f"after record {index - 1}", gz_problem)
    for number, at, typ, sub in hits:
        length = (raw[at] << 8 | raw[at + 1]) if scan.big else (raw[at + 1] << 8 | raw[at])
        end = at + 4 + length
        if typ == 2 and sub in (10, 20):
            (scan.wir if sub == 10 else scan.wrr).append((number, raw[at + 4] if length else 1,
                                                          _cn(raw, at + (10 if sub == 10 else 30), end)))
        elif typ == 2 and sub == 30 and length >= 20:
            flat, pos_x, pos_y = (chr(raw[at + 4 + k]).upper() for k in (13, 18, 19))
            scan.axes = (pos_x != "L", pos_y == "U", _FLAT_SIDE.get(flat))
        elif typ == 1 and sub == 10:
            scan.lot = _cn(raw, at + 19, end)
    return scan


def _wafer_groups(path: Path, scan: _Scan,
                  cols: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
    """PRR row indices per wafer (by WIR position and test head) and the wafer ids."""
    seq, head = cols["sequence_number"], cols["HEAD_NUM"]
    if not scan.wir:
        note(f"{path}: no WIR record: all {len(seq)} PRRs read as one wafer")
        return [np.arange(len(seq))], [scan.wrr[0][2] if scan.wrr else ""]
    w_seq, w_head = (np.array(v, dtype=np.int64) for v in list(zip(*scan.wir))[:2])
    ids = [wid for _, _, wid in scan.wir]
    wrr_ids = {(h, s): wid for s, h, wid in scan.wrr}
    owner = np.full(len(seq), -1, dtype=np.int64)
    for h in np.unique(w_head):
        mine = np.flatnonzero(w_head == h)
        on_head = (head == h) | (h == 255)
        pos = np.searchsorted(w_seq[mine], seq, side="right") - 1
        take = on_head & (pos >= 0)
        owner[take] = mine[pos[take]]
    if (owner < 0).any():
        note(f"{path}: {int((owner < 0).sum())} PRR(s) before any WIR on their head were left out")
    groups, names = [], []
    for k in range(len(ids)):
        rows = np.flatnonzero(owner == k)
        if len(rows) == 0:
            note(f"{path}: wafer {ids[k] or k + 1!r} (WIR record {int(w_seq[k])}) has no PRR; left out")
            continue
        groups.append(rows)
        names.append(ids[k] or _wrr_id_after(wrr_ids, int(w_head[k]), int(seq[rows[-1]])))
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
