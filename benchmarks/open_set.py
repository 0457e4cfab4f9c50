"""Open-set benchmark: how well each unknown-pattern score spots classes the model never saw.

For every fold, a model is trained (``waferlab.engine.train``, default recipe) WITHOUT the fold's held-out
classes; the scores are fitted on the run's validation part exactly as at the end of training
(:func:`waferlab.deploy.ood.fit_scorer`) and evaluated on the run's test part (known classes) against maps of
the held-out classes (unknown). Prints AUROC (unknown = positive) and FPR at 95 % TPR (the share of unknown
maps accepted when 95 % of known maps are accepted, i.e. at the threshold ``predict`` uses).

    python benchmarks/open_set.py                        # synthetic folds + the real samples (slow on CPU)
    python benchmarks/open_set.py --folds Donut+Scratch --no-real --n 1500 --epochs 4   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from waferlab.deploy.ood import METHODS
from waferlab.errors import WaferlabError

REAL_SOURCES = ("wm811k_mdjunayed_jpg32_45e5fc1/WM811k_Dataset",
                "wm811k_dm3_ntu_png96_56c3b1a/generated_images",
                "wm811k_marco_scatassi_png_0439f8b/Image_for_deploy",
                "wm811k_dm3_ntu_png_67f9ccf/generated_images",
                "wm811k_mohithmanjunath04_sample_197645f/LSWMD_sample.pkl")
DEFAULT_FOLDS = ("Donut+Scratch", "Center+Edge-Loc", "Random+Near-full")


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of an unknown map > score of a known map), ties counted half (Mann-Whitney U)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([known, unknown]))
    u = ranks[len(known):].sum() - len(unknown) * (len(unknown) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def fpr_at_95(known: np.ndarray, unknown: np.ndarray) -> float:
    """Share of unknown maps scored at or below the known maps' 95th percentile (accepted as known)."""
    return float((unknown <= np.quantile(known, 0.95, method="higher")).mean())


def _concat(parts: list) -> object:
    from dataclasses import replace

    first = parts[0]
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in
           ("maps", "labels", "split", "lot", "wafer_index", "orig_shape")}
    return replace(first, **cat, multi_hot=None, masks=None, source="real samples")


def build_data(kind: str, held: tuple[str, ...], n: int, size: int, folder: Path,
               seed: int) -> tuple[Path, object]:
    """(cache of the known classes, prepared maps of the held-out classes) for a fold."""
    from waferlab.data.cache import load_prepared, prepare, save_cache
    from waferlab.data.synth import generate
    from waferlab.data.table import WM811K_CLASSES

    if kind == "synthetic":
        known = [c for c in WM811K_CLASSES if c not in held]
        train = prepare(generate(n, seed=seed, classes=known), size)
        unknown = prepare(generate(max(200, n // 8), seed=seed + 1, classes=list(held)), size)
    else:
        root = Path(os.environ.get("WAFERLAB_SHARED_DATA", "/work/shared/data"))
        allp = _concat([load_prepared(root / s, size) for s in REAL_SOURCES])
        names = np.array(allp.class_names, dtype=object)[allp.labels]
        is_held = np.isin(names, list(held))
        train, unknown = allp.subset(~is_held & (allp.labels >= 0)), allp.subset(is_held)
    path = folder / f"{kind}_{'+'.join(held)}.npz"
    save_cache(train, path)
    return path, unknown


def run_fold(kind: str, held: tuple[str, ...], args: argparse.Namespace, folder: Path) -> dict:
    """Train without ``held``, then score the run's test part (known) and the held-out maps (unknown)."""
    from waferlab.deploy.ood import fit_scorer
    from waferlab.deploy.trust import fit_temperature
    from waferlab.engine.config import build_config
    from waferlab.engine.predict import PredictOptions, predict
    from waferlab.engine.run import Run
    from waferlab.engine.train import load_split_data, train

    data, unknown = build_data(kind, held, args.n, args.size, folder, args.seed)
    cfg = build_config("default", {"model": args.model, "data": str(data), "out": str(folder / f"run_{kind}"),
                                   "epochs": args.epochs, "image_size": args.size, "batch_size": 64,
                                   "progress": False, "seed": args.seed}, ["precise_bn_batches=5"])
    run = Run.open(train(cfg) or "")
    split = load_split_data(cfg)
    model, spec = run.load_model("cpu"), run.spec()
    opts = PredictOptions(device="cpu", batch_size=256, features=True)
    val = predict(model, split.data.maps[split.val], spec, opts)
    test = predict(model, split.data.maps[split.test], spec, opts)
    unk = predict(model, unknown.maps, spec, opts)
    y_val = split.data.labels[split.val]
    t = fit_temperature(val.logits, y_val)
    acc = float((test.probs.argmax(1) == split.data.labels[split.test]).mean())
    row = {"data": kind, "held_out": "+".join(held), "model": args.model, "size": args.size,
           "n_train": len(split.train), "n_val": len(split.val), "n_known_test": len(split.test),
           "n_unknown": len(unknown), "known_test_accuracy": round(acc, 4)}
    for method in METHODS:
        scorer, _ = fit_scorer(method, val.logits, y_val, val.features, t)
        s_known = scorer.score(test.logits, test.features)
        s_unk = scorer.score(unk.logits, unk.features)
        row[method] = {"auroc": round(auroc(s_known, s_unk), 4), "fpr95": round(fpr_at_95(s_known, s_unk), 4)}
    return row


def print_table(rows: list[dict]) -> None:
    cols = " | ".join(f"{m} AUROC / FPR95" for m in METHODS)
    print(f"| data | held out | n train | known acc | {cols} |")
    print("|" + "---|" * (4 + len(METHODS)))
    for r in rows:
        cells = " | ".join(f"{r[m]['auroc']:.3f} / {r[m]['fpr95']:.3f}" for m in METHODS)
        acc = r["known_test_accuracy"]
        print(f"| {r['data']} | {r['held_out']} | {r['n_train']} | {acc:.3f} | {cells} |")
    if rows:
        means = " | ".join(f"{np.mean([r[m]['auroc'] for r in rows]):.3f} / "
                           f"{np.mean([r[m]['fpr95'] for r in rows]):.3f}" for m in METHODS)
        print(f"| mean | | | | {means} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--n", type=int, default=2400, help="synthetic maps per fold (known classes)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", default=",".join(DEFAULT_FOLDS), help="comma-separated A+B held-out sets")
    parser.add_argument("--no-real", action="store_true", help="skip the fold on the real samples")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--keep", default=None, help="keep the runs (and data) in this folder")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("WAFERLAB_THREADS", "2")))
    rows = []
    jobs = [("synthetic", tuple(f.split("+"))) for f in args.folds.split(",") if f]
    if not args.no_real:
        jobs.append(("real", ("Donut", "Scratch")))
    for kind, held in jobs:
        with tempfile.TemporaryDirectory(prefix="waferlab_openset_") as tmp:
            folder = Path(args.keep) / f"{kind}_{'+'.join(held)}" if args.keep else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            try:
                rows.append(run_fold(kind, held, args, folder))
            except WaferlabError as exc:
                print(f"{kind} {'+'.join(held)}: skipped ({exc})", file=sys.stderr)
                continue
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
