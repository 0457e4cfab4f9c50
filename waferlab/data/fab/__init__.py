"""Fab file formats -> wafer maps: STDF V4/V4-2007, SEMI G85 XML, TSK prober maps and KLARF defect files.

One module per format (each says which parser it uses and why), :mod:`.common` for what they share
(options, orientation, the table). :func:`detect` tells from a file's name and first bytes which format it
is; :func:`read_fab` reads it into a :class:`~waferlab.data.table.WaferTable` with one unlabeled row per
wafer. ``waferlab.data.readers.load_table`` calls both, so every command reads these files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from waferlab.data.fab.common import (
    BIN_KINDS,
    FabOptions,
    FabWafer,
    add_fab_arguments,
    options_from_args,
    parse_pass_bins,
)
from waferlab.data.table import WaferTable
from waferlab.errors import WaferlabError


@dataclass(frozen=True)
class FabFormat:
    """A fab format: its name in messages, its file extensions, how to recognise and how to read it."""

    title: str
    extensions: tuple[str, ...]
    sniff: Callable[[bytes], bool]
    read: Callable[[Path, FabOptions], list[FabWafer]]
    head_size: int = 4096


def _formats() -> dict[str, FabFormat]:
    from waferlab.data.fab import g85, klarf, stdf, tsk

    return {
        "stdf": FabFormat("STDF", (".stdf", ".std"), stdf.sniff_stdf, stdf.read_stdf),
        "g85": FabFormat("SEMI G85 XML", (".xml",), g85.sniff_g85, g85.read_g85),
        "tsk": FabFormat("TSK map", (".tsk",), tsk.sniff_tsk, tsk.read_tsk, head_size=tsk.HEADER_SIZE),
        "klarf": FabFormat("KLARF", (".klarf", ".klf", ".kla"), klarf.sniff_klarf, klarf.read_klarf),
    }


#: The fab formats by name (declared once; extensions, sniffing and readers all come from here).
FORMATS: dict[str, FabFormat] = _formats()
#: Every extension that names a fab format (``.gz`` after an STDF extension is allowed too).
EXTENSIONS: tuple[str, ...] = tuple(e for f in FORMATS.values() for e in f.extensions)


def _head(path: Path, size: int) -> bytes:
    from waferlab.data.fab.stdf import read_head

    return read_head(path, size)


def detect(path: str | Path, kind: str) -> str | None:
    """The fab format of ``path`` (``kind`` is what ``readers.sniff`` saw), or None if it is none of them.

    A fab extension (``.stdf``, ``.std``, ``.stdf.gz``, ``.xml``, ``.tsk``, ``.klarf``, ...) decides the
    format even when the content disagrees, so that the reader can say what is wrong with the file.
    """
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    for name, fmt in FORMATS.items():
        if ext in fmt.extensions:
            return name
    if kind not in ("text", "binary", "gzip"):
        return None
    heads: dict[int, bytes] = {}
    for name, fmt in FORMATS.items():
        if kind == "gzip" and name != "stdf":
            continue
        head = heads.setdefault(fmt.head_size, _head(path, fmt.head_size))
        if fmt.sniff(head):
            return name
    return None


def read_fab(path: str | Path, fmt: str, options: FabOptions | None = None) -> WaferTable:
    """Read a fab file of format ``fmt`` (a key of :data:`FORMATS`) into an unlabeled table."""
    from waferlab.data.fab.common import to_table

    path = Path(path)
    try:
        spec = FORMATS[fmt]
    except KeyError:
        raise WaferlabError(f"unknown fab format {fmt!r}; choose one of {', '.join(FORMATS)}") from None
    try:
        wafers = spec.read(path, options or FabOptions())
    except OSError as exc:
        raise WaferlabError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return to_table(wafers, path)


__all__ = ["BIN_KINDS", "EXTENSIONS", "FORMATS", "FabFormat", "FabOptions", "add_fab_arguments", "detect",
           "options_from_args", "parse_pass_bins", "read_fab"]
