"""Faithfulness and localisation of CAM methods on briefly trained models (synthetic data, CPU or GPU).

Trains each model with the engine on synthetic maps (all 9 classes), then runs ``explain_runs`` on a
separate, held-out synthetic set whose pattern masks are known, prints the score table and per-class
pointing game, and writes the study's grid of one model to ``docs/explain_grid.png``.

    python benchmarks/explain_scores.py                       # resnet34, cbam, pan, spanet at 48 px
    python benchmarks/explain_scores.py --size 64 --epochs 5  # sharper CAMs, slower
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet34,cbam,pan,spanet")
    ap.add_argument("--methods", default="gradcam,gradcam++,layercam,xgradcam,eigencam")
    ap.add_argument("--n", type=int, default=2000, help="training maps")
    ap.add_argument("--n-test", type=int, default=450, help="held-out maps to explain")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--score-per-class", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--road-maps", type=int, default=16, help="maps per model scored with ROAD (slow)")
    ap.add_argument("--grid-model", default="pan", help="model whose study grid goes to --grid")
    ap.add_argument("--grid", default=str(REPO / "docs" / "explain_grid.png"))
    ap.add_argument("--work", default="/tmp/waferlab_explain_bench")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--retrain", action="store_true", help="train again even if a run exists")
    args = ap.parse_args()

    from waferlab.data.synth import write_synthetic
    from waferlab.engine.config import build_config
    from waferlab.engine.train import train
    from waferlab.explain.runner import explain_runs, format_scores

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_data, test_data = work / f"train_{args.n}.pkl", work / f"heldout_{args.n_test}.pkl"
    if not train_data.exists():
        write_synthetic(train_data, n=args.n, seed=0)
    if not test_data.exists():
        write_synthetic(test_data, n=args.n_test, seed=12345)

    runs, train_s = [], {}
    for name in args.models.split(","):
        run = work / f"{name}_{args.size}px_{args.epochs}ep"
        if args.retrain or not (run / "model.safetensors").exists():
            cfg = build_config(None, {"model": name, "data": str(train_data), "out": str(run),
                                      "epochs": args.epochs, "image_size": args.size,
                                      "batch_size": args.batch_size, "progress": False})
            t0 = time.perf_counter()
            train(cfg)
            train_s[name] = time.perf_counter() - t0
        runs.append(str(run))

    t0 = time.perf_counter()
    summary = explain_runs(runs, str(test_data), str(work / "explain"), methods=args.methods, per_class=1,
                           scores=True, batch_size=args.batch_size, device=args.device,
                           score_per_class=args.score_per_class, steps=args.steps,
                           road=args.road_maps > 0, road_maps=args.road_maps, progress=False)
    explain_s = time.perf_counter() - t0
    doc = summary["scores"]

    print(f"\n# CAM faithfulness and localisation: {args.size} px, {args.epochs} epochs on {args.n} "
          f"synthetic maps, scored on {args.score_per_class}/class held-out maps")
    print("(deletion AUC: lower is better; insertion AUC, ROAD, pointing game, IoU: higher is better; "
          "localisation on correctly classified maps only)\n")
    for name, entry in summary["runs"].items():
        s = entry["scores"]
        took = train_s.get(entry["model"])
        extra = f", trained in {took:.0f} s" if took is not None else ""
        print(f"{name}: accuracy on scored maps {s['accuracy']:.3f}, CAM layer {s['cam_layer_hw']}{extra}")
    print()
    print(format_scores(doc))
    print("\npointing game per class (hit rate / chance), correctly classified maps:")
    for model, s in doc["models"].items():
        for method in ("gradcam", "gradcam++"):
            if method not in s["methods"]:
                continue
            cells = []
            for cls, block in s["methods"][method]["per_class"].items():
                if block.get("pointing_game") is None or cls in ("none", "Random", "Near-full"):
                    continue
                cells.append(f"{cls} {block['pointing_game']:.2f}/{block['pointing_chance']:.2f}")
            print(f"  {model:<24} {method:<10} " + ", ".join(cells))
    print(f"\nexplain + scores: {explain_s:.0f} s for {len(runs)} models -> {work / 'explain'}")

    grid_run = next((r for r in summary["runs"] if r.startswith(args.grid_model)), None)
    if grid_run:
        from waferlab.io import atomic_path

        with atomic_path(args.grid) as tmp:
            shutil.copyfile(work / "explain" / grid_run / "study_grid.png", tmp)
        print(f"study grid of {grid_run} -> {args.grid}")
    (work / "summary.json").write_text(json.dumps({"train_s": train_s, "explain_s": explain_s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
