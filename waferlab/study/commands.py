"""``waferlab study run`` and ``waferlab study report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``study run`` and ``study report`` to the top-level parser."""
    from waferlab.study.spec import study_preset_names

    presets = ", ".join(study_preset_names())
    p = sub.add_parser(
        "study",
        help="run an experiment matrix of training runs and report on it",
        description="A study is the product of axes (models, seeds, any config key) over a base "
        "config: every cell is an ordinary run directory. 'run' trains the cells "
        "(resumable, in parallel) and writes the report; 'report' (re)writes it "
        f"from whatever runs exist. Study presets: {presets}.",
    )
    ss = p.add_subparsers(dest="study_command", metavar="SUBCOMMAND", parser_class=type(p))
    p.set_defaults(func=None, parser=p)

    r = ss.add_parser(
        "run",
        help="train every cell of a study (skipping finished ones), explain, report",
        description="Train every cell as 'waferlab train' subprocess into OUT/runs/<cell>: "
        "finished cells are skipped, a cell with a checkpoint resumes, a failing cell "
        "is recorded and the others go on. Then 'waferlab explain' on one seed of "
        "every model (when the spec asks) and the report in OUT/report. "
        f"Presets: {presets}.",
    )
    r.add_argument("spec", metavar="SPEC", help=f"a study YAML file or a preset name ({presets})")
    r.add_argument(
        "--data", help="data for every cell (overrides the spec's; e.g. your LSWMD.pkl or a cache)"
    )
    r.add_argument("--out", required=True, help="study folder")
    r.add_argument(
        "--workers",
        type=int,
        default=1,
        help="cells side by side: one per GPU (CUDA_VISIBLE_DEVICES) or CPU threads divided (default 1)",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cells and what would be done, building every cell's model once (a misspelt "
        "option fails here); train nothing",
    )
    r.add_argument(
        "--emit-commands",
        action="store_true",
        help="print one self-contained 'waferlab train' command per unfinished cell (for a "
        "cluster scheduler) and write OUT/study.yaml for 'study report'; train nothing",
    )
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="merge into the spec's 'set:' for every cell (axis and vary values still win), e.g. "
        "--set epochs=1 --set image_size=32 for a quick run; repeatable",
    )
    r.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="GLOB",
        help="run (or list, or emit) only the cells whose name matches a shell pattern, e.g. "
        "'spanet__*' or '*__seed-0'; comma-separated or repeated; the report shows the rest as not started",
    )
    r.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each finished cell's checkpoints/ (Lightning's, for resuming or extending it with "
        "'waferlab train --resume'); by default they are deleted, model.safetensors holds the weights",
    )
    r.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    r.add_argument("--no-progress", action="store_true", help="no progress output")
    r.set_defaults(func=_run)

    q = ss.add_parser(
        "report",
        help="write report.html/.md, runs.csv and summary.csv of a study folder",
        description="Merge whatever finished run directories the study folder has (from "
        "'study run' or from '--emit-commands' run elsewhere) into the report.",
    )
    q.add_argument("study_dir", metavar="DIR", help="study folder (holds study.yaml and runs/)")
    q.add_argument("--out", default=None, help="report folder (default: DIR/report)")
    q.add_argument("--no-progress", action="store_true", help="no progress output")
    q.set_defaults(func=_report)


def _run(args: argparse.Namespace) -> int:
    from waferlab.errors import WaferlabError
    from waferlab.study.report import summary_text
    from waferlab.study.runner import StudyOptions, run_study
    from waferlab.study.spec import load_spec

    if args.dry_run and args.emit_commands:
        raise WaferlabError("--dry-run and --emit-commands: choose one")
    spec = load_spec(args.spec, args.set)
    opts = StudyOptions(
        out=Path(args.out),
        data=args.data,
        workers=args.workers,
        dry_run=args.dry_run,
        emit_commands=args.emit_commands,
        progress=not args.no_progress,
        report=not args.no_report,
        only=args.only,
        keep_checkpoints=args.keep_checkpoints,
    )
    result = run_study(spec, opts)
    if "text" in result:
        sys.stdout.write(result["text"])
        return 0
    if result.get("report"):
        print(summary_text(result["report"]))
        print(f"\nreport: {result['report']}")
    if result["failed"]:
        print(
            f"waferlab study: {len(result['failed'])} cell(s) failed: {', '.join(result['failed'])} "
            f"(errors in {Path(args.out) / 'cells.json'}, logs in {Path(args.out) / 'logs'})",
            file=sys.stderr,
        )
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from waferlab.study.report import summary_text, write_report

    path = write_report(args.study_dir, args.out, progress=not args.no_progress)
    print(summary_text(path))
    print(f"\nreport: {path}")
    return 0
