"""``waferlab data ...`` subcommands: synth, convert, prepare, inspect."""

from __future__ import annotations

import argparse
import json
import sys

from waferlab.data.cache import DEFAULT_RESIZE, RESIZE_RULES
from waferlab.data.fab.common import add_fab_arguments, options_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group to the top-level parser."""
    data = sub.add_parser("data", help="generate, convert, prepare and inspect wafer-map data",
                          description="Generate, convert, prepare and inspect wafer-map data.")
    data.set_defaults(parser=data)
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=type(data))

    p = dsub.add_parser("synth", help="generate synthetic wafer maps in the LSWMD layout",
                        description="Generate labelled synthetic wafer maps (all 9 WM-811K classes) and "
                                    "write them in the LSWMD.pkl layout, with each map's true pattern mask.")
    p.add_argument("--n", type=int, required=True, help="number of maps")
    p.add_argument("--out", required=True,
                   help="output file (.pkl: LSWMD layout; .npz: safe waferlab format)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--mixed", action="store_true", help="MixedWM38-style mixtures (52x52, multi-hot labels)")
    p.add_argument("--classes", default=None,
                   help="comma-separated subset of classes to draw (default: all 9, equally often)")
    p.set_defaults(func=_synth)

    p = dsub.add_parser("convert", help="convert any source to the safe (pickle-free) waferlab format",
                        description="Read any supported source (LSWMD.pkl, CSV export, MixedWM38 npz, image "
                                    "folder, STDF/G85/TSK/KLARF fab file) and write it, maps at original "
                                    "size, to a pickle-free .npz. "
                                    "Loading a pickle runs code from the file: convert once, share the .npz.")
    p.add_argument("src", help="source file or folder")
    p.add_argument("--out", required=True, help="output .npz")
    add_fab_arguments(p)
    p.set_defaults(func=_convert)

    p = dsub.add_parser("prepare", help="resize every map to SxS into a compact, pickle-free cache",
                        description="Resize every map to SxS (nearest; original shape kept) and write a "
                                    "compact cache with class names, split tags and lots.")
    p.add_argument("src", help="source file or folder")
    p.add_argument("--size", type=int, default=64, help="side length in dies/pixels (default 64)")
    p.add_argument("--resize", choices=RESIZE_RULES, default=DEFAULT_RESIZE,
                   help=f"how larger grids are shrunk (default {DEFAULT_RESIZE}); a run uses a cache only "
                        "when its 'resize' config key matches")
    p.add_argument("--out", required=True, help="output cache file (.npz)")
    add_fab_arguments(p)
    p.set_defaults(func=_prepare)

    p = dsub.add_parser("inspect", help="count maps, classes, splits and map sizes",
                        description="Summarise a source or cache: map count, class counts, split counts, "
                                    "map-size distribution; optionally a figure of example maps per class.")
    p.add_argument("src", help="source file, folder or cache")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--figure", default=None, help="save a PNG grid of example maps per class")
    p.add_argument("--per-class", type=int, default=6, help="examples per class in the figure (default 6)")
    add_fab_arguments(p)
    p.set_defaults(func=_inspect)


def _synth(args: argparse.Namespace) -> int:
    from waferlab.data.synth import write_synthetic

    summary = write_synthetic(args.out, n=args.n, seed=args.seed, mixed=args.mixed,
                              classes=args.classes.split(",") if args.classes else None)
    print(f"wrote {summary['n_maps']} synthetic maps to {args.out}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from waferlab.data.readers import load_table, write_safe

    table = load_table(args.src, options_from_args(args))
    write_safe(table, args.out)
    print(f"wrote {len(table)} maps to {args.out}", file=sys.stderr)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.readers import load_table

    prepared = prepare(load_table(args.src, options_from_args(args)), size=args.size, progress=True,
                       resize=args.resize)
    save_cache(prepared, args.out)
    print(f"wrote {len(prepared)} maps at {args.size}x{args.size} ({args.resize}) to {args.out}",
          file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from waferlab.data.inspect import format_summary, inspect_source, plot_examples

    summary, data = inspect_source(args.src, options_from_args(args))
    if args.figure:
        plot_examples(data, args.figure, per_class=args.per_class)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0
