"""TSK (Tokyo Seimitsu / Accretech prober) binary map files -> one pass/fail map.

Own reader (numpy): no maintained Python package reads TSK maps. The layout is the one documented by
larvata/tsk-parser and bangbang93/tsk-file.kt: a 236-byte big-endian header, then 6 bytes (three
big-endian words) per die cell, row by row, as the map is viewed. Per cell: word 1 bits 15-14 the test
result (0 not tested, 1 pass, 2 and 3 fail); word 2 bits 15-14 the die property (0 skip, 1 probed,
2 mark); word 3 bits 5-0 the category (the bin, kept in ``WaferTable.bins``). Only probed dies are dies
of the map; skip and mark cells are "no die". The header's tested/pass/fail totals must equal the counts
from the cells (they are 16-bit, so compared modulo 65536). Orientation: see
:mod:`waferlab.data.fab.common` (flat direction clockwise from the top).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waferlab.data.fab.common import (
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

HEADER_SIZE = 236
CELL_SIZE = 6
_MAX_SIDE = 4096


@dataclass
class _Header:
    """The header fields the reader uses (byte offsets from the A-PM-90A map-file layout)."""

    names: bytes
    wafer_size: int
    flat: int
    version: int
    cols: int
    rows: int
    wafer_id: str
    lot: str
    slot: int
    totals: tuple[int, int, int]
    address: int

    @classmethod
    def parse(cls, raw: bytes) -> _Header:
        def text(a: int, b: int) -> str:
            return raw[a:b].replace(b"\x00", b" ").decode("latin-1").strip()

        address = struct.unpack_from(">I", raw, 216)[0]
        return cls(names=raw[0:36], wafer_size=struct.unpack_from(">H", raw, 36)[0],
                   flat=struct.unpack_from(">H", raw, 48)[0], version=raw[51],
                   cols=struct.unpack_from(">H", raw, 52)[0], rows=struct.unpack_from(">H", raw, 54)[0],
                   wafer_id=text(60, 81), lot=text(82, 100), slot=struct.unpack_from(">H", raw, 102)[0],
                   totals=struct.unpack_from(">HHH", raw, 210), address=address or HEADER_SIZE)

    def plausible(self) -> bool:
        """Printable operator/device names and field values in range: a TSK header, not other binary."""
        printable = all(c in (0, 9) or 32 <= c < 127 for c in self.names)
        sizes = 0 < self.cols <= _MAX_SIDE and 0 < self.rows <= _MAX_SIDE and 0 < self.wafer_size <= 3000
        return (printable and sizes and self.version <= 4 and self.flat < 360
                and HEADER_SIZE <= self.address < (1 << 24))


def sniff_tsk(head: bytes) -> bool:
    """True when ``head`` (at least 236 bytes) has a plausible TSK map header."""
    return len(head) >= HEADER_SIZE and _Header.parse(head).plausible()


def read_tsk(path: Path, options: FabOptions) -> list[FabWafer]:
    """Read a TSK map (pass/fail per die; ``options`` does not apply: the file says pass or fail)."""
    raw = path.read_bytes()
    if not sniff_tsk(raw[:HEADER_SIZE]):
        if len(raw) < HEADER_SIZE:
            raise fab_error(path, "header", f"cut short: {len(raw)} of the {HEADER_SIZE} header bytes")
        raise fab_error(path, "header", "not a TSK map file (implausible header fields)")
    h = _Header.parse(raw)
    rows, cols, start = h.rows, h.cols, h.address
    need = start + rows * cols * CELL_SIZE
    if len(raw) < need:
        have = max(0, len(raw) - start) // (CELL_SIZE * cols)
        raise fab_error(path, f"die row {have}", f"cut short: the header says {cols} x {rows} die cells "
                                                 f"({need} bytes from byte {start}), the file has {len(raw)} "
                                                 f"bytes (rows 0..{have - 1} complete)")
    words = np.frombuffer(raw, dtype=">u2", count=rows * cols * 3, offset=start).reshape(rows, cols, 3)
    result = words[..., 0] >> 14
    probed = (words[..., 1] >> 14) == 1
    status = np.where(probed, np.where(result == 1, GOOD, np.where(result >= 2, FAILED, NO_DIE)), NO_DIE)
    untested = int((probed & (result == 0)).sum())
    if untested:
        note(f"{path}: {untested} probed die(s) without a test result taken as no die")
    counts = (int(probed.sum()) - untested, int((status == GOOD).sum()), int((status == FAILED).sum()))
    if tuple(c % 65536 for c in counts) != h.totals:
        raise fab_error(path, "header", f"totals tested/pass/fail {'/'.join(map(str, h.totals))} disagree "
                                        f"with the die cells ({'/'.join(map(str, counts))})")
    # int32 before the -1: a Python -1 beside uint16 cells is truncated to 65535 (numpy 2) or raises (2.5)
    bins = np.where(status > 0, (words[..., 2] & 63).astype(np.int32), -1)
    mark = side_from_angle(h.flat, "up")
    return [FabWafer(map=turn_mark_down(status.astype(np.uint8), mark), bins=turn_mark_down(bins, mark),
                     lot=h.lot, wafer_id=h.wafer_id, slot=h.slot or None)]
