"""``waferlab demo``: the ``demo`` study on synthetic maps (4 models x 2 seeds, explanations, report).

The README's main job in one command: generate labelled synthetic maps, run the study preset ``demo``
(resnet34, cbam, pan, spanet; 2 seeds) as ``waferlab study run`` would, print the summary table and the path
of report.html. Sized to finish in under 10 minutes on a 2-core CPU; started again it continues.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: Defaults: synthetic maps, epochs per cell, map side (overriding the preset's), parallel cells.
DEMO_N, DEMO_EPOCHS, DEMO_SIZE = 1200, 4, 32
#: Two single-threaded cells use 2 cores better than one two-threaded cell at 32 px (and overlap start-up).
DEMO_WORKERS = min(2, os.cpu_count() or 1)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``waferlab demo`` to the top-level parser."""
    p = sub.add_parser(
        "demo",
        help="a small study on synthetic maps: 4 models x 2 seeds, report.html (under 10 min on CPU)",
        description="Generate labelled synthetic wafer maps and run the 'demo' study on them: resnet34, cbam "
        "and pan on the default recipe and spanet on its own, 2 seeds each, GradCAM/GradCAM++ "
        "explanations, and the study report (OUT/report/report.html). Prints the summary table. "
        "Started again on the same OUT it skips what is done.",
    )
    p.add_argument("--out", default="waferlab-demo", help="output folder (default: waferlab-demo)")
    p.add_argument("--n", type=int, default=DEMO_N, help=f"number of synthetic maps (default {DEMO_N})")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help=f"epochs per cell (default {DEMO_EPOCHS})")
    p.add_argument(
        "--image-size", type=int, default=DEMO_SIZE, help=f"map side length in pixels (default {DEMO_SIZE})"
    )
    p.add_argument("--workers", type=int, default=DEMO_WORKERS,
                   help=f"cells side by side, CPU threads divided between them (default {DEMO_WORKERS})")
    p.set_defaults(func=_demo)


def prepare_demo_data(out: Path, n: int, image_size: int, progress: bool = True) -> Path:
    """Synthetic maps (OUT/synthetic.npz) and their cache at ``image_size``; kept when already there."""
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.readers import load_table
    from waferlab.data.synth import write_synthetic

    out.mkdir(parents=True, exist_ok=True)
    source = out / f"synthetic_{n}.npz"
    cache = out / f"synthetic_{n}_{image_size}px.npz"
    if not cache.is_file():
        print(f"waferlab demo: generating {n} synthetic maps -> {source}", file=sys.stderr)
        write_synthetic(source, n=n, seed=0)
        save_cache(prepare(load_table(source), image_size, progress=progress), cache)
    return cache


def run_demo(
    out: str | Path,
    n: int = DEMO_N,
    epochs: int = DEMO_EPOCHS,
    image_size: int = DEMO_SIZE,
    workers: int = DEMO_WORKERS,
    progress: bool = True,
) -> Path:
    """Run the demo study into ``out``; returns the path of its report.html."""
    from waferlab.errors import WaferlabError
    from waferlab.study.runner import StudyOptions, run_study
    from waferlab.study.spec import load_spec

    if n < 90:
        raise WaferlabError(f"demo --n must be >= 90 (10 per class), got {n}")
    out = Path(out)
    cache = prepare_demo_data(out, n, image_size, progress)
    spec = load_spec("demo")
    spec.overrides.update({"epochs": epochs, "image_size": image_size})
    result = run_study(spec, StudyOptions(out=out, data=str(cache), workers=workers, progress=progress))
    return result["report"]


def _demo(args: argparse.Namespace) -> int:
    from waferlab.errors import WaferlabError
    from waferlab.study.report import summary_text

    checks = (
        ("--epochs", args.epochs, 1),
        ("--image-size", args.image_size, 32),
        ("--workers", args.workers, 1),
    )
    for name, value, low in checks:
        if value < low:
            raise WaferlabError(f"demo {name} must be >= {low}, got {value}")
    report = run_demo(
        args.out, n=args.n, epochs=args.epochs, image_size=args.image_size, workers=args.workers
    )
    print(
        "\nSynthetic maps are easier than real WM-811K: these numbers show the pipeline works, not how the "
        "models rank on real data.\n"
    )
    print(summary_text(report))
    print(f"\nreport: {report}")
    return 0
