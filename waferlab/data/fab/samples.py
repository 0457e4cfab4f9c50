"""Small writers of the four fab formats, for tests and benchmarks (just the records a map needs).

They write what the readers must handle but the shipped samples do not show: little-endian STDF,
V4-2007 (a VUR record), several wafers, gzip, files without WIR, G85 with decimal or ASCII bins, TSK and
KLARF files of any size. Not general-purpose writers.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def round_wafer(n_dies: int, fail_fraction: float = 0.05, seed: int = 0) -> np.ndarray:
    """A round 0/1/2 wafer map with about ``n_dies`` dies and random failed dies."""
    radius = np.sqrt(n_dies / np.pi)
    side = int(np.ceil(2 * radius)) + 1
    yy, xx = np.mgrid[:side, :side] - (side - 1) / 2.0
    inside = xx ** 2 + yy ** 2 <= radius ** 2
    fail = np.random.default_rng(seed).random(inside.shape) < fail_fraction
    return np.where(inside, np.where(fail, 2, 1), 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# STDF


@dataclass
class StdfWafer:
    """Dies of one wafer in file order: coordinates and bins (a die may appear twice: a retest)."""

    wafer_id: str
    x: np.ndarray
    y: np.ndarray
    hard: np.ndarray
    soft: np.ndarray | None = None


def stdf_wafer_from_map(wafer_id: str, grid: np.ndarray, fail_bin: int = 5) -> StdfWafer:
    """PRRs for every die of a 0/1/2 map: X = column, Y = row (so POS_X R, POS_Y D), bin 1 or ``fail_bin``."""
    rows, cols = np.nonzero(grid)
    hard = np.where(grid[rows, cols] == 1, 1, fail_bin)
    return StdfWafer(wafer_id, cols.astype(np.int64), rows.astype(np.int64), hard)


def _cn(text: str) -> bytes:
    data = text.encode("latin-1")
    return bytes([len(data)]) + data


def _record(order: str, typ: int, sub: int, body: bytes) -> bytes:
    return struct.pack(order + "HBB", len(body), typ, sub) + body


def _parts(order: str, w: StdfWafer, tests_per_die: int) -> bytes:
    """PIR, optional PTRs and PRR for each die of a wafer, built as one numpy record array."""
    n = len(w.x)
    e = order
    fields = [("pir_len", e + "u2"), ("pir_typ", "u1"), ("pir_sub", "u1"), ("pir_head", "u1"),
              ("pir_site", "u1")]
    for t in range(tests_per_die):
        fields += [(f"t{t}_len", e + "u2"), (f"t{t}_typ", "u1"), (f"t{t}_sub", "u1"), (f"t{t}_num", e + "u4"),
                   (f"t{t}_head", "u1"), (f"t{t}_site", "u1"), (f"t{t}_tflg", "u1"), (f"t{t}_pflg", "u1"),
                   (f"t{t}_res", e + "f4"), (f"t{t}_txt", "u1"), (f"t{t}_alarm", "u1")]
    fields += [("len", e + "u2"), ("typ", "u1"), ("sub", "u1"), ("head", "u1"), ("site", "u1"), ("flg", "u1"),
               ("ntest", e + "u2"), ("hard", e + "u2"), ("soft", e + "u2"), ("x", e + "i2"), ("y", e + "i2"),
               ("time", e + "u4"), ("pid", "u1"), ("ptxt", "u1"), ("pfix", "u1")]
    rec = np.zeros(n, dtype=np.dtype(fields))
    rec["pir_len"], rec["pir_typ"], rec["pir_sub"], rec["pir_head"] = 2, 5, 10, 1
    rng = np.random.default_rng(len(w.x))
    for t in range(tests_per_die):
        rec[f"t{t}_len"], rec[f"t{t}_typ"], rec[f"t{t}_sub"] = 14, 15, 10
        rec[f"t{t}_num"], rec[f"t{t}_head"], rec[f"t{t}_res"] = 1000 + t, 1, rng.random(n)
    rec["len"], rec["typ"], rec["sub"], rec["head"], rec["ntest"] = 20, 5, 20, 1, tests_per_die
    rec["hard"] = w.hard
    rec["soft"] = w.hard if w.soft is None else w.soft
    rec["flg"] = np.where(np.asarray(w.hard) == 1, 0, 8)
    rec["x"], rec["y"] = w.x, w.y
    return rec.tobytes()


def write_stdf(path: str | Path, wafers: list[StdfWafer], *, lot: str = "LOT1", byte_order: str = "<",
               wir: bool = True, wcr: tuple[str, str, str] | None = ("D", "R", "D"), v2007: bool = False,
               tests_per_die: int = 0, gz: bool = False) -> Path:
    """Write an STDF V4 file (``byte_order`` '<' little or '>' big endian; ``wcr`` = flat, POS_X, POS_Y)."""
    o = byte_order
    out = [_record(o, 0, 10, bytes([2 if o == "<" else 1, 4]))]
    if v2007:
        out.append(_record(o, 0, 30, _cn("V4-2007")))
    mir = struct.pack(o + "IIB", 0, 0, 1) + b"P  " + struct.pack(o + "H", 0) + b" "
    mir += _cn(lot) + _cn("PART") + _cn("node") + _cn("tester") + _cn("job") + b"\x00" * 25
    out.append(_record(o, 1, 10, mir))
    if wcr is not None:
        flat, pos_x, pos_y = wcr
        out.append(_record(o, 2, 30, struct.pack(o + "fffBchhcc", 200.0, 5.0, 5.0, 3, flat.encode(), -32768,
                                                 -32768, pos_x.encode(), pos_y.encode())))
    for w in wafers:
        if wir:
            out.append(_record(o, 2, 10, struct.pack(o + "BBI", 1, 255, 0) + _cn(w.wafer_id)))
        out.append(_parts(o, w, tests_per_die))
        if wir:
            good = int((np.asarray(w.hard) == 1).sum())
            out.append(_record(o, 2, 20, struct.pack(o + "BBIIIIII", 1, 255, 0, len(w.x), 0, 0, good, 0)
                               + _cn(w.wafer_id) + b"\x00" * 5))
    out.append(_record(o, 1, 20, struct.pack(o + "I", 0) + b" " + b"\x00\x00"))
    data = b"".join(out)
    path = Path(path)
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    return path


# ---------------------------------------------------------------------------------------------------
# SEMI G85


def write_g85(path: str | Path, grids: list[np.ndarray], *, bin_type: str = "HexaDecimal",
              namespace: bool = True, fail_code: int = 0xDE, rows_attr: int | None = None,
              with_bins: bool = True) -> Path:
    """Write 0/1/2 maps as G85 (pass code 1, ``fail_code`` for failed dies; several maps under <Maps>)."""
    def code(value: int) -> str:
        if bin_type == "HexaDecimal":
            return f"{value:02X}"
        if bin_type == "Decimal":
            return f"{value:03d} "
        return chr(value)

    null = {"HexaDecimal": 0xFF, "Decimal": 255, "ASCII": ord(".")}[bin_type]
    fail = fail_code if bin_type != "ASCII" else ord("X")
    ok = 1 if bin_type != "ASCII" else ord("1")
    ns = ' xmlns="http://www.semi.org"' if namespace else ""
    maps = []
    for k, grid in enumerate(grids):
        values = np.where(grid == 0, null, np.where(grid == 1, ok, fail))
        rows = "\n".join(f"      <Row><![CDATA[{''.join(code(int(v)) for v in r).strip()}]]></Row>"
                         for r in values)
        n_ok, n_fail = int((grid == 1).sum()), int((grid == 2).sum())
        bins = (f'    <Bin BinCode="{code(ok).strip()}" BinQuality="Pass" BinCount="{n_ok}"/>\n'
                f'    <Bin BinCode="{code(fail).strip()}" BinQuality="Fail" BinCount="{n_fail}"/>\n'
                if with_bins else "")
        maps.append(f'<Map{ns} WaferId="W{k + 1:02d}" FormatRevision="SEMI G85-1101">\n'
                    f'  <Device BinType="{bin_type}" NullBin="{code(null).strip()}" LotId="LOT1" '
                    f'Rows="{rows_attr or grid.shape[0]}" Columns="{grid.shape[1]}" Orientation="0" '
                    f'OriginLocation="0">\n{bins}    <Data>\n{rows}\n    </Data>\n  </Device>\n</Map>')
    body = maps[0] if len(maps) == 1 else f"<Maps{ns}>\n" + "\n".join(maps) + "\n</Maps>"
    path = Path(path)
    path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# TSK


def write_tsk(path: str | Path, grid: np.ndarray, *, lot: str = "LOT1", wafer_id: str = "LOT1-01",
              slot: int = 1, flat: int = 180, totals: tuple[int, int, int] | None = None) -> Path:
    """Write a 0/1/2 map (as viewed) as a TSK map file; ``totals`` overrides the header's tested/pass/fail."""
    rows, cols = grid.shape
    h = bytearray(236)
    h[0:20] = b"operator".ljust(20)
    h[20:36] = b"DEVICE".ljust(16)
    struct.pack_into(">HHIIHBB", h, 36, 80, 1, 50000, 50000, flat, 0, 2)
    struct.pack_into(">HH", h, 52, cols, rows)
    h[60:81] = wafer_id.encode("latin-1")[:21].ljust(21, b"\x00")
    h[82:100] = lot.encode("latin-1")[:18].ljust(18, b" ")
    struct.pack_into(">HH", h, 100, 1, slot)
    h[104:106] = b"\x01\x02"
    tested, passed, failed = int((grid > 0).sum()), int((grid == 1).sum()), int((grid == 2).sum())
    struct.pack_into(">HHH", h, 210, *[t % 65536 for t in (totals or (tested, passed, failed))])
    struct.pack_into(">I", h, 216, 236)
    cells = np.zeros((rows, cols, 3), dtype=">u2")
    yy, xx = np.mgrid[:rows, :cols]
    result = np.where(grid == 1, 1, np.where(grid == 2, 2, 0)).astype(np.uint16)
    cells[..., 0] = (result << 14) | ((cols - 1 - xx) & 511)
    cells[..., 1] = (np.where(grid > 0, 1, 0).astype(np.uint16) << 14) | ((rows - 1 - yy) & 511)
    path = Path(path)
    path.write_bytes(bytes(h) + cells.tobytes() + b"\x00" * 172)
    return path


# ---------------------------------------------------------------------------------------------------
# KLARF


def _klarf_dies(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(plan, defect dies) in KLARF indices (X right, Y up) of a 0/1/2 map with the notch down."""
    rows, cols = np.nonzero(grid)
    xy = np.stack([cols, grid.shape[0] - 1 - rows], axis=1).astype(np.int64)
    return xy, xy[grid[rows, cols] == 2]


def write_klarf(path: str | Path, grids: list[np.ndarray], *, version: str = "1.2", pitch: float = 5000.0,
                plan: bool = True) -> Path:
    """Write 0/1/2 maps as KLARF (one defect per failed die), flat 1.2 or nested 1.8 syntax."""
    path = Path(path)
    if version == "1.8":
        path.write_text(_klarf18(grids, pitch))
        return path
    out = ['FileVersion 1 2;', 'LotID "LOT1";', 'SampleSize 1 300;', 'OrientationMarkLocation DOWN;',
           f'DiePitch {pitch:e} {pitch:e};', 'DieOrigin 0.0 0.0;']
    for k, grid in enumerate(grids):
        dies, defects = _klarf_dies(grid)
        out += [f'WaferID "W{k + 1:02d}";', f"Slot {k + 1};", "SampleCenterLocation 0.0 0.0;"]
        if plan:
            out.append(f"SampleTestPlan {len(dies)}\n" + "\n".join(f" {x} {y}" for x, y in dies) + ";")
        out.append("DefectRecordSpec 6 DEFECTID XREL YREL XINDEX YINDEX IMAGECOUNT;")
        rows = [f" {i + 1} 10.0 20.0 {x} {y} 0" for i, (x, y) in enumerate(defects)]
        out.append("DefectList" + ("\n" + "\n".join(rows) if rows else "") + ";")
    out.append("EndOfFile;")
    path.write_text("\n".join(out) + "\n")
    return path


def _klarf18(grids: list[np.ndarray], pitch: float) -> str:
    out = ['Record FileRecord "1.8"\n{', '  Record LotRecord "LOT1"\n  {']
    for k, grid in enumerate(grids):
        dies, defects = _klarf_dies(grid)
        rows = "\n".join(f"        {i + 1} 10 20 {x} {y} ;" for i, (x, y) in enumerate(defects))
        plan = "\n".join(f"          {x} {y} ;" for x, y in dies)
        out.append(f'    Record WaferRecord "W{k + 1:02d}"\n    {{\n      Field SlotNumber 1 {{{k + 1}}}\n'
                   f'      List DefectList\n      {{\n        Columns 5 {{ int32 DEFECTID, int32 XREL, '
                   f'int32 YREL, int32 XINDEX, int32 YINDEX }}\n        Data {len(defects)}\n        {{\n'
                   f'{rows}\n        }}\n      }}\n      Record TestRecord "1"\n      {{\n'
                   f'        List SampleTestPlanList\n        {{\n          Columns 2 {{ int32 XINDEX, '
                   f'int32 YINDEX }}\n          Data {len(dies)}\n          {{\n{plan}\n          }}\n'
                   f'        }}\n      }}\n    }}')
    out.append(f'    Field DiePitch 2 {{{int(pitch)}, {int(pitch)}}}\n'
               '    Field OrientationMarkLocation 1 {0}\n  }\n}\nEndOfFile;\n')
    return "\n".join(out)
