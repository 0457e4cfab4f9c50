"""The part every fab-format reader shares: options, errors, the canonical orientation and the table.

**Orientation.** Every reader returns maps in one orientation: the wafer's notch or flat **down** and X
increasing to the **right**, as a person looks at the wafer's front side. Each format says where its mark
is and which way its axes run; the reader builds the grid in the file's own axes and then turns it with
:func:`turn_mark_down`:

* STDF: WCR ``POS_X`` (``R``/``L``) and ``POS_Y`` (``U``/``D``) give the axes, ``WF_FLAT`` the mark side;
  unknown axes are taken as X right, Y down (row order); an unknown flat leaves the grid as it is.
* SEMI G85: rows are listed as the map is viewed; ``Orientation`` is the mark's angle, clockwise from
  the bottom (0 down, 90 left, 180 up, 270 right).
* TSK: dies are stored row by row as viewed; the header's flat direction is clockwise from the top
  (0 up, 90 right, 180 down, 270 left: the sample's 180 is the usual flat-down setup).
* KLARF: XINDEX to the right, YINDEX up; ``OrientationMarkLocation`` ``DOWN``/``UP``/``LEFT``/``RIGHT``
  (1.1, 1.2) or an angle (1.8, read like G85's).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waferlab.data.table import UNLABELED, WaferTable
from waferlab.errors import WaferlabError

#: Which bin decides pass/fail in STDF (PRR HARD_BIN or SOFT_BIN).
BIN_KINDS: tuple[str, ...] = ("hard", "soft")
#: Bins that pass when nothing else is said (STDF; G85 files without bin definitions).
DEFAULT_PASS_BINS: tuple[int, ...] = (1,)
#: Sides of the wafer a notch or flat can be on, in the order of :func:`turn_mark_down`'s quarter turns.
MARK_SIDES: tuple[str, ...] = ("down", "right", "up", "left")
NO_DIE, GOOD, FAILED = 0, 1, 2


@dataclass(frozen=True)
class FabOptions:
    """How fab files become 0/1/2 maps: the bins that pass (``None``: the format's default) and, for
    STDF, which bin (``hard`` or ``soft``) is compared with them."""

    pass_bins: tuple[int, ...] | None = None
    bin_kind: str = "hard"

    def __post_init__(self) -> None:
        if self.bin_kind not in BIN_KINDS:
            raise WaferlabError(f"unknown bin kind {self.bin_kind!r}; choose one of {', '.join(BIN_KINDS)}")


def parse_pass_bins(text: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``; bins are integers 0..65535 (the range of an STDF bin)."""
    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        bins = tuple(sorted({int(t) for t in parts}))
    except ValueError:
        raise WaferlabError(f"--pass-bins {text!r}: expected comma-separated integers such as 1,2") from None
    if not bins or min(bins) < 0 or max(bins) > 65535:
        raise WaferlabError(f"--pass-bins {text!r}: expected comma-separated integers 0..65535")
    return bins


def _pass_bins_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_pass_bins(text)
    except WaferlabError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bins 0..65535 such as 1,2, "
                                         f"got {text!r}") from None


def add_fab_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--pass-bins`` and ``--bin-kind`` (how fab files become pass/fail maps) to a data command."""
    group = parser.add_argument_group("fab files (STDF, SEMI G85, TSK, KLARF)")
    group.add_argument("--pass-bins", type=_pass_bins_arg, default=None, metavar="BINS",
                       help="comma-separated bins that pass, e.g. 1,2 (default: bin 1 for STDF; a G85 file's "
                            "own Pass bins)")
    group.add_argument("--bin-kind", choices=BIN_KINDS, default="hard",
                       help="STDF: compare the PRR's hard or soft bin with --pass-bins (default hard)")


def options_from_args(args: argparse.Namespace) -> FabOptions:
    """The :class:`FabOptions` given on a command line built with :func:`add_fab_arguments`."""
    return FabOptions(pass_bins=getattr(args, "pass_bins", None), bin_kind=getattr(args, "bin_kind", "hard"))


def fab_error(path: str | Path, where: str, message: str) -> WaferlabError:
    """``FILE: WHERE: MESSAGE`` (WHERE names the record or line) as the one user-facing exception."""
    return WaferlabError(f"{path}: {where}: {message}" if where else f"{path}: {message}")


def note(message: str) -> None:
    """A one-line note on stderr about something read but not taken at face value."""
    print(f"waferlab: note: {message}", file=sys.stderr)


def side_from_angle(angle: float, zero: str, clockwise: bool = True) -> str:
    """The mark side for an angle in degrees measured from side ``zero`` (rounded to quarter turns)."""
    quarter = int(round(float(angle) / 90.0)) % 4
    # MARK_SIDES runs down -> right -> up -> left, i.e. counter-clockwise as seen on the map.
    step = -quarter if clockwise else quarter
    return MARK_SIDES[(MARK_SIDES.index(zero) + step) % 4]


def turn_mark_down(grid: np.ndarray, mark: str | None) -> np.ndarray:
    """Turn a map (as viewed) so that its notch/flat, now on side ``mark``, ends at the bottom."""
    if mark is None or mark == "down":
        return grid
    k = {"right": -1, "up": 2, "left": 1}[mark]  # np.rot90 k=1 turns counter-clockwise: left -> down
    return np.ascontiguousarray(np.rot90(grid, k))


def grid_from_xy(x: np.ndarray, y: np.ndarray, layers: list[np.ndarray], fill: list[int],
                 x_right: bool = True, y_up: bool = False) -> list[np.ndarray]:
    """Scatter per-die values onto the bounding box of the die coordinates, as viewed.

    ``x_right``/``y_up`` say which way the file's X and Y increase on the viewed wafer; each layer is
    filled with its ``fill`` value where there is no die. Returns one 2-D array per layer.
    """
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    x0, x1, y0, y1 = int(x.min()), int(x.max()), int(y.min()), int(y.max())
    cols = (x - x0) if x_right else (x1 - x)
    rows = (y1 - y) if y_up else (y - y0)
    shape = (y1 - y0 + 1, x1 - x0 + 1)
    out = []
    for values, value_fill in zip(layers, fill):
        grid = np.full(shape, value_fill, dtype=np.asarray(values).dtype)
        grid[rows, cols] = values
        out.append(grid)
    return out


@dataclass
class FabWafer:
    """One wafer read from a fab file: its 0/1/2 map (canonical orientation), bins and ids."""

    map: np.ndarray
    lot: str
    wafer_id: str
    slot: int | None = None
    bins: np.ndarray | None = None


def wafer_number(wafer_id: str, fallback: int) -> int:
    """A wafer's number for ``wafer_index``: the id's last digits (``GAL-LOT-02`` -> 2), else ``fallback``."""
    digits = re.findall(r"\d+", wafer_id or "")
    return int(digits[-1][-9:]) if digits else fallback


def to_table(wafers: list[FabWafer], source: str | Path) -> WaferTable:
    """The wafers of one fab file as an unlabeled :class:`WaferTable` (bins kept if every wafer has them)."""
    n = len(wafers)
    index = [w.slot if w.slot is not None else wafer_number(w.wafer_id, i + 1) for i, w in enumerate(wafers)]
    keep_bins = n > 0 and all(w.bins is not None for w in wafers)
    return WaferTable(
        maps=[np.ascontiguousarray(w.map, dtype=np.uint8) for w in wafers],
        labels=np.full(n, UNLABELED, dtype=object),
        split=np.full(n, "", dtype=object),
        lot=np.array([w.lot for w in wafers], dtype=object),
        wafer_index=np.array(index, dtype=np.int64),
        source=str(source),
        bins=[np.ascontiguousarray(w.bins, dtype=np.int32) for w in wafers] if keep_bins else None,
        wafer_id=np.array([w.wafer_id for w in wafers], dtype=object),
    )
