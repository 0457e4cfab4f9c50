"""Are the explanations right? The issue-11 goal table for every seed model x GradCAM / GradCAM++.

Trains each model with the engine (a preset, default ``default``) on synthetic maps of all 9 classes,
then scores its CAMs on separate held-out synthetic maps of the six localised classes (Center, Donut,
Edge-Loc, Edge-Ring, Loc, Scratch), whose true pattern regions are known:

* pointing game per class and its mean over the six classes (goal: mean >= 0.85, every class >= 0.7),
  against chance (the region's share of the wafer);
* IoU of the top-k CAM pixels (k = the region's area) with the region, against chance (goal: >= 2x);
* deletion / insertion AUC (failed dies turned good / put back in CAM order) minus the random die
  order's, with a paired bootstrap 95% interval (goal: deletion below, insertion above, interval
  excluding zero);
* the fail-mass lift (CAM mass on failed dies / their share of the wafer; 1 = uniform), which needs no
  mask; with ``--real`` also per class on every real labelled map in ``$WAFERLAB_SHARED_DATA``.

Localisation uses correctly classified maps only (the explained class is the true one). Models with an
``output_stride`` option are trained at ``--output-stride`` (default 8: an 8x8 CAM layer at 64 px); the
default preset's ``failpool`` head is used unless ``--set head=linear``. Results (table, rows, wall times)
go to ``<work>/goal_table_<models>.json``.

    python benchmarks/explain_scores.py                                   # nine models, 64 px, default preset
    python benchmarks/explain_scores.py --n 600 --epochs 2 --size 48 --score-per-class 10 --steps 5 \
        --set precise_bn_batches=4                                        # CPU-sized (issue 11's table)
    python benchmarks/explain_scores.py --models resnet34,pan --set head=linear   # the plain GAP heads
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEED_MODELS = (
    "resnet34",
    "danet",
    "cbam",
    "pan",
    "cbam_da",
    "pan_da",
    "pan_inverse",
    "pan_dualinverse",
    "spanet",
)
LOCALISED = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Scratch")
#: Real labelled samples in shared/data (README there): folder -> source inside it.
REAL_SOURCES = (
    "wm811k_mohithmanjunath04_sample_197645f/LSWMD_sample.pkl",
    "wm811k_caslabai_sub100/sub100_WM-811K.csv",
    "wm811k_dm3_ntu_png_67f9ccf/generated_images",
    "wm811k_dm3_ntu_png96_56c3b1a/generated_images",
    "wm811k_marco_scatassi_png_0439f8b/Image_for_deploy",
    "wm811k_mdjunayed_jpg32_45e5fc1/WM811k_Dataset",
    "gowwi07_wafermap_ai_png224_e3cf70a/samples_wm811k",
)
GOAL = {"pointing_mean": 0.85, "pointing_min": 0.7, "iou_ratio": 2.0}
#: Seed models with an ``output_stride`` option (PAN and PAN_DA explain their last GAU at stride 4 already).
STRIDE_OPTION = ("resnet34", "danet", "cbam", "cbam_da", "pan_inverse", "pan_dualinverse", "spanet")


def _train(name: str, args: argparse.Namespace, data: Path, work: Path) -> tuple[Path, float | None]:
    """Train (or reuse) one run with the preset; returns the run dir and the training wall time."""
    from waferlab.engine.config import build_config
    from waferlab.engine.train import train

    sets = list(args.set)
    if args.output_stride and name in STRIDE_OPTION:
        sets.append(f"model_options.output_stride={args.output_stride}")
    tag = "_".join(s.replace("model_options.", "").replace("=", "") for s in sets) or "preset"
    run = work / f"{name}_{args.size}px_{args.epochs}ep_{args.n}maps_{args.preset}_{tag}"
    if not args.retrain and (run / "model.safetensors").exists():
        return run, None
    if run.exists():
        shutil.rmtree(run)
    cfg = build_config(
        args.preset,
        {
            "model": name,
            "data": str(data),
            "out": str(run),
            "epochs": args.epochs,
            "image_size": args.size,
            "batch_size": args.batch_size,
            "progress": False,
        },
        sets=sets,
    )
    t0 = time.perf_counter()
    train(cfg)
    return run, time.perf_counter() - t0


def _row(model: str, method: str, s: dict) -> dict:
    """The goal figures of one model and method from its ``scores.json`` block."""
    block = s["methods"][method]
    pc = block["per_class"]
    point = {
        c: pc[c]["pointing_game"] for c in LOCALISED if c in pc and pc[c].get("pointing_game") is not None
    }
    o = block["overall"]
    return {
        "model": model,
        "method": method,
        "accuracy": s["accuracy"],
        "cam_hw": s["cam_layer_hw"],
        "pointing_per_class": point,
        "pointing_mean": float(np.mean(list(point.values()))) if point else None,
        "pointing_min": min(point.values()) if point else None,
        "pointing_chance": o.get("pointing_chance"),
        "iou_k": o.get("iou_k"),
        "iou_k_chance": o.get("iou_k_chance"),
        "mass_inside": o.get("mass_inside"),
        "fail_mass_lift": o.get("fail_mass_lift"),
        "deletion": block["deletion_auc_vs_random"]["overall"],
        "insertion": block["insertion_auc_vs_random"]["overall"],
        "deletion_auc": o["deletion_auc"],
        "insertion_auc": o["insertion_auc"],
        "random_deletion_auc": s["random_order"]["overall"]["deletion_auc"],
        "random_insertion_auc": s["random_order"]["overall"]["insertion_auc"],
    }


def _verdict(r: dict) -> str:
    ok = []
    ok.append(
        r["pointing_mean"] is not None
        and r["pointing_mean"] >= GOAL["pointing_mean"]
        and len(r["pointing_per_class"]) == len(LOCALISED)
        and r["pointing_min"] >= GOAL["pointing_min"]
    )
    ok.append(bool(r["iou_k"] and r["iou_k_chance"] and r["iou_k"] >= GOAL["iou_ratio"] * r["iou_k_chance"]))
    ok.append(r["deletion"]["ci_high"] is not None and r["deletion"]["ci_high"] < 0)
    ok.append(r["insertion"]["ci_low"] is not None and r["insertion"]["ci_low"] > 0)
    return "".join("P" if x else "-" for x in ok)


def f(v: float | None, w: int = 4, p: int = 2) -> str:
    return f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"


def _ci(d: dict) -> str:
    return "-" if d["mean"] is None else f"{d['mean']:+.3f}[{d['ci_low']:+.3f},{d['ci_high']:+.3f}]"


def print_goal_table(rows: list[dict]) -> None:
    """The goal table: one line per model and method, then pointing per class."""
    print(
        f"{'model':<16} {'method':<12} {'acc':>4} {'CAM':>5} {'point':>5} {'min':>4} {'chnc':>4} "
        f"{'IoU_k':>5} "
        f"{'chnc':>4} {'x':>4} {'del-rnd [95% CI]':>24} {'ins-rnd [95% CI]':>24} {'lift':>4} {'goal':>4}"
    )
    for r in rows:
        ratio = (
            r["iou_k"] / r["iou_k_chance"] if r["iou_k"] is not None and r["iou_k_chance"] else float("nan")
        )
        print(
            f"{r['model']:<16} {r['method']:<12} {r['accuracy']:>4.2f} {'x'.join(map(str, r['cam_hw'])):>5} "
            f"{f(r['pointing_mean'], 5)} {f(r['pointing_min'])} {f(r['pointing_chance'])} {f(r['iou_k'], 5)} "
            f"{f(r['iou_k_chance'])} {ratio:>4.1f} {_ci(r['deletion']):>24} {_ci(r['insertion']):>24} "
            f"{f(r['fail_mass_lift'])} {_verdict(r):>4}"
        )
    print(
        "goal column: P/- for pointing (mean >= 0.85, every class >= 0.7), IoU_k >= 2x chance, deletion "
        "below random (CI < 0), insertion above random (CI > 0)"
    )
    print("\npointing game per class (correctly classified held-out maps):")
    for r in rows:
        cells = ", ".join(f"{c} {v:.2f}" for c, v in r["pointing_per_class"].items())
        print(f"  {r['model']:<16} {r['method']:<12} {cells}")


def real_lift(runs: list[Path], methods: list[str], batch_size: int) -> dict:
    """Fail-mass lift per class on every real labelled map of shared/data (CAM of the predicted class)."""
    from waferlab.data.cache import load_prepared
    from waferlab.engine.run import Run
    from waferlab.explain.cam import compute_cams
    from waferlab.explain.localization import fail_mass_lift

    root = Path(os.environ.get("WAFERLAB_SHARED_DATA", "/work/shared/data"))
    out: dict = {}
    for run_dir in runs:
        run = Run.open(run_dir)
        spec, model = run.spec(), run.load_model()
        lifts: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
        for src in REAL_SOURCES:
            if not (root / src).exists():
                continue
            data = load_prepared(str(root / src), spec.image_size, resize=spec.resize)
            names = np.asarray([*data.class_names, "?"])[np.asarray(data.labels)]
            keep = names != "?"
            res = compute_cams(model, data.maps[keep], spec, methods, batch_size=batch_size)
            for m in methods:
                for cls, v in zip(names[keep], fail_mass_lift(res.cams[m], data.maps[keep]), strict=True):
                    if np.isfinite(v):
                        lifts[m].setdefault(str(cls), []).append(float(v))
        out[run.info.model_name] = {
            m: {c: (float(np.mean(v)), len(v)) for c, v in sorted(d.items())} for m, d in lifts.items()
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SEED_MODELS))
    ap.add_argument("--methods", default="gradcam,gradcam++")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--output-stride", type=int, default=8,
                    help=f"model_options.output_stride for {', '.join(STRIDE_OPTION)} (0: the model's own)")
    ap.add_argument("--n", type=int, default=2000, help="synthetic training maps (all 9 classes)")
    ap.add_argument("--n-test", type=int, default=300, help="held-out maps of the six localised classes")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--score-per-class", type=int, default=40)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--real", action="store_true", help="also the fail-mass lift on the real labelled maps")
    ap.add_argument("--grid-model", default="pan", help="model whose study grid goes to --grid")
    ap.add_argument("--grid", default=str(REPO / "docs" / "explain_grid.png"))
    ap.add_argument("--work", default="/tmp/waferlab_explain_bench")
    ap.add_argument("--retrain", action="store_true", help="train again even if a run exists")
    args = ap.parse_args()

    from waferlab.data.synth import write_synthetic
    from waferlab.explain.runner import ExplainSettings, explain_runs

    t_all = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_data, test_data = work / f"train_{args.n}.npz", work / f"heldout_localised_{args.n_test}.npz"
    if not train_data.exists():
        write_synthetic(train_data, n=args.n, seed=0)
    if not test_data.exists():
        write_synthetic(test_data, n=args.n_test, seed=12345, classes=list(LOCALISED))
    methods = args.methods.split(",")
    runs, train_s = [], {}
    for name in args.models.split(","):
        run, took = _train(name, args, train_data, work)
        runs.append(run)
        if took is not None:
            train_s[name] = took

    t0 = time.perf_counter()
    settings = ExplainSettings(
        methods=methods,
        per_class=1,
        scores=True,
        batch_size=args.batch_size,
        score_per_class=args.score_per_class,
        steps=args.steps,
        road=False,
        progress=False,
    )
    summary = explain_runs([str(r) for r in runs], str(test_data), str(work / "explain"), settings)
    explain_s = time.perf_counter() - t0
    rows = [_row(e["model"], m, e["scores"]) for e in summary["runs"].values() for m in methods]
    print(
        f"\n# CAM goal table: preset {args.preset} {' '.join(args.set)} output_stride "
        f"{args.output_stride or 'own'} (where the model has the option), {args.size} px, "
        f"{args.epochs} epochs "
        f"on {args.n} synthetic maps; scored on up to {args.score_per_class}/class of {args.n_test} held-out "
        f"maps of the six localised classes"
    )
    for name, took in train_s.items():
        print(f"  trained {name} in {took:.0f} s")
    print()
    print_goal_table(rows)
    print(f"\nexplain + scores: {explain_s:.0f} s for {len(runs)} models -> {work / 'explain'}")
    doc = {"rows": rows, "train_s": train_s, "explain_s": explain_s, "args": vars(args)}
    if args.real:
        t0 = time.perf_counter()
        doc["real_fail_mass_lift"] = lift = real_lift(runs, methods, args.batch_size)
        print(
            f"\nfail-mass lift on the real labelled maps of shared/data (mean per class, maps), "
            f"{time.perf_counter() - t0:.0f} s:"
        )
        for model, per in lift.items():
            for m, cells in per.items():
                print(
                    f"  {model:<16} {m:<12} " + ", ".join(f"{c} {v:.2f} ({n})" for c, (v, n) in cells.items())
                )
    grid_run = next((r for r in summary["runs"] if r.startswith(args.grid_model)), None)
    if grid_run:
        from waferlab.io import atomic_path

        with atomic_path(args.grid) as tmp:
            shutil.copyfile(work / "explain" / grid_run / "study_grid.png", tmp)
        print(f"study grid of {grid_run} -> {args.grid}")
    tag = "_".join(args.models.split(",")) if len(args.models.split(",")) < len(SEED_MODELS) else "all"
    heads = "_".join(s.replace("=", "-") for s in args.set if s.startswith("head="))
    out_json = work / f"goal_table_{tag}{'_' + heads if heads else ''}.json"
    doc["wall_s"] = time.perf_counter() - t_all
    out_json.write_text(json.dumps(doc, indent=1, default=str))
    print(f"total wall time {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
