"""``waferlab demo``: synthetic maps -> train resnet34, cbam and spanet briefly -> evaluate -> compare.

The README's main job in one command; with the defaults it runs in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

#: (model, config preset) trained by the demo: the study's baseline, one attention model, SP&A-Net.
DEMO_MODELS: tuple[tuple[str, str], ...] = (
    ("resnet34", "default"), ("cbam", "default"), ("spanet", "spanet"))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``waferlab demo`` to the top-level parser."""
    p = sub.add_parser(
        "demo", help="train and compare three models on synthetic maps (a few minutes on CPU)",
        description="Generate labelled synthetic wafer maps, train resnet34, cbam (attention) and spanet "
                    "briefly with the same split, evaluate each on the held-out test part and print a "
                    "comparison table (also written to OUT/summary.md).")
    p.add_argument("--out", default="waferlab-demo", help="output folder (default: waferlab-demo)")
    p.add_argument("--n", type=int, default=1800, help="number of synthetic maps (default 1800)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per model (default 4)")
    p.add_argument("--image-size", type=int, default=32, help="map side length in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, split and training (default 0)")
    p.set_defaults(func=_demo)


def run_demo(out: str | Path, n: int = 1800, epochs: int = 4, image_size: int = 32, seed: int = 0,
             progress: bool = True) -> str:
    """Run the demo into ``out``; returns the Markdown summary (also written to ``out/summary.md``)."""
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.readers import load_table
    from waferlab.data.synth import write_synthetic
    from waferlab.engine.config import build_config
    from waferlab.engine.report import markdown_table
    from waferlab.engine.train import train
    from waferlab.errors import WaferlabError
    from waferlab.io import write_text

    if n < 90:
        raise WaferlabError(f"demo needs at least 90 maps (10 per class), got --n {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = out / "synthetic.pkl"
    print(f"waferlab demo: generating {n} synthetic maps -> {source}", file=sys.stderr)
    write_synthetic(source, n=n, seed=seed)
    cache = out / f"synthetic_{image_size}.npz"
    save_cache(prepare(load_table(source), image_size, progress=progress), cache)
    rows = []
    for model, preset in DEMO_MODELS:
        cfg = build_config(preset, {"model": model, "data": str(cache), "out": str(out / model),
                                    "epochs": epochs, "image_size": image_size, "seed": seed,
                                    "batch_size": 64, "progress": progress})
        start = time.perf_counter()
        run = train(cfg)
        seconds = time.perf_counter() - start
        m = json.loads((Path(run) / "metrics.json").read_text(encoding="utf-8"))
        rows.append([model, preset, m["macro_f1"], m["accuracy"], m["balanced_accuracy"], m["n"], seconds])
    rows.sort(key=lambda r: -r[2])
    table = markdown_table(rows, ["model", "recipe", "macro-F1", "accuracy", "balanced accuracy", "test maps",
                                  "train s"], align=["l", "l", "r", "r", "r", "r", "r"])
    summary = (f"# waferlab demo\n\n{n} synthetic maps (9 classes), {image_size} px one-hot, stratified "
               f"70/15/15 split (seed {seed}), {epochs} epochs per model; metrics on the held-out test "
               f"part.\n"
               f"Synthetic maps are easier than real WM-811K: these numbers show the pipeline works, not how "
               f"the models rank on real data.\n\n{table}\n\nRun folders: "
               + ", ".join(f"`{model}/`" for model, _ in DEMO_MODELS) + " (report.md, curves.png, confusion "
               "matrices each).\n")
    write_text(out / "summary.md", summary)
    return summary


def _demo(args: argparse.Namespace) -> int:
    from waferlab.errors import WaferlabError

    checks = (("--n", args.n, 90), ("--epochs", args.epochs, 1), ("--image-size", args.image_size, 32))
    for name, value, low in checks:
        if value < low:
            raise WaferlabError(f"demo {name} must be >= {low}, got {value}")
    summary = run_demo(args.out, n=args.n, epochs=args.epochs, image_size=args.image_size, seed=args.seed)
    print(summary)
    return 0
