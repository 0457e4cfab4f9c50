"""``waferlab explain``: CAM figures, faithfulness and localisation scores of trained runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``explain`` command to the top-level parser."""
    from waferlab.explain.methods import METHODS

    p = sub.add_parser(
        "explain", help="CAM figures and faithfulness/localisation scores of trained runs",
        description="Explain one or more trained runs on the same wafer maps with pytorch-grad-cam: "
                    "the study's grid (first correctly classified map per class, GradCAM and GradCAM++), "
                    "one overlay figure per selected map, a comparison grid when several runs are given, "
                    "and with --json a scores.json of deletion/insertion AUCs (failed dies turned good / "
                    "put back in CAM order, against a random order, with bootstrap intervals), ROAD, the "
                    "fail-mass lift (CAM mass on failed dies over their share of the wafer; needs no mask), "
                    "and on synthetic maps with pattern masks the pointing game, IoU and mass inside the "
                    "pattern. Treat --data as held-out maps (or use --test-part).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory written by 'waferlab train' "
                   "(repeat to compare models)")
    p.add_argument("--data", required=True, help="maps to explain: any source or a prepared cache")
    p.add_argument("--out", required=True, help="output directory for figures and scores.json")
    p.add_argument("--methods", default="gradcam,gradcam++",
                   help=f"comma-separated CAM methods: {', '.join(METHODS)} (default gradcam,gradcam++)")
    p.add_argument("--per-class", type=int, default=1,
                   help="overlay figures for the first K maps of every class (default 1)")
    p.add_argument("--maps", default=None, metavar="INDEXES",
                   help="comma-separated map indexes to draw and score instead of --per-class")
    p.add_argument("--json", action="store_true",
                   help="compute faithfulness and localisation scores and write OUT/scores.json")
    p.add_argument("--batch-size", type=int, default=32, help="maps per CAM batch (default 32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--test-part", action="store_true",
                   help="--data is the run's own training data: use only the test part of the run's split")
    p.add_argument("--score-per-class", type=int, default=50,
                   help="with --json and no --maps: score the first N maps of every class (default 50)")
    p.add_argument("--steps", type=int, default=20,
                   help="points on the deletion/insertion curves (default 20)")
    p.add_argument("--no-road", action="store_true", help="skip the (slower) ROAD score")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_explain)


def _explain(args: argparse.Namespace) -> int:
    import json
    import sys

    from waferlab.explain.runner import ExplainSettings, explain_runs, format_scores, parse_indexes

    settings = ExplainSettings(
        methods=args.methods, per_class=args.per_class, map_indexes=parse_indexes(args.maps),
        scores=args.json,
        batch_size=args.batch_size, device=args.device, test_part=args.test_part,
        score_per_class=args.score_per_class, steps=args.steps, road=not args.no_road,
        progress=not args.no_progress)
    settings.check()  # fail fast, before any model is loaded
    summary = explain_runs(args.run_dirs, args.data, args.out, settings)
    for name, entry in summary["runs"].items():
        for line in entry.get("notes", []):
            print(f"waferlab: note: {name}: {line}", file=sys.stderr)
    if args.json:
        print(format_scores(summary["scores"]))
    print(json.dumps({"out": summary["out"], "files": len(summary["files"])}) if args.json else
          f"wrote {len(summary['files'])} files to {summary['out']}", file=sys.stderr)
    return 0
