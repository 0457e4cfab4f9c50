"""Synthetic-to-real check: train on synthetic maps only, evaluate on the pooled real labelled maps.

Generates ``--n`` synthetic maps with this tree's generator, trains a model on them through the
``waferlab train`` CLI, writes the real labelled samples of ``shared/data`` (LSWMD sample pickle, dm3
PNGs, sub100 CSV; original grids) to one safe ``.npz`` and evaluates the run on it with
``waferlab evaluate``. Prints per-class recall, macro-F1, ECE, the largest confusions and wall times.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sim2real.py --n 6000 --model cbam --image-size 48 \\
        --epochs 3 --out runs/sim2real
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("WAFERLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def _cli(*args: str) -> float:
    """Run ``python -m waferlab.cli ARGS`` with this tree first on the path; returns wall seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "waferlab.cli", *args], check=True, env=env)
    return time.perf_counter() - t0


def write_real(shared: Path, out: Path) -> dict:
    """The pooled real labelled maps as a safe ``.npz`` (original grids); returns the class counts."""
    from waferlab.data.calibrate import load_real_samples
    from waferlab.data.readers import write_safe

    real = load_real_samples(shared)
    write_safe(real, out)
    return real.class_counts()


def summarise(metrics: dict) -> str:
    """Per-class recall / F1 / support, the headline numbers and the largest confusions, as text."""
    from waferlab.engine.metrics import top_confusions

    lines = [f"{'class':<10} {'recall':>7} {'f1':>7} {'support':>8}"]
    for name in metrics["class_names"]:
        pc = metrics["per_class"][name]
        if not pc["support"]:
            continue
        lines.append(f"{name:<10} {pc['recall']:>7.3f} {pc['f1']:>7.3f} {pc['support']:>8d}")
    lines.append(f"macro-F1 {metrics['macro_f1']:.3f}  balanced acc {metrics['balanced_accuracy']:.3f}  "
                 f"accuracy {metrics['accuracy']:.3f}  ECE {metrics['ece']:.3f}  n={metrics['n']}")
    min_rec = min(metrics["per_class"][c]["recall"] for c in metrics["class_names"]
                  if metrics["per_class"][c]["support"])
    lines.append(f"min per-class recall {min_rec:.3f}")
    for true, pred, count, share in top_confusions(metrics, k=8):
        lines.append(f"  {true:>10} -> {pred:<10} {count:>4} ({share:.0%} of {true})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder of real samples")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "sim2real", help="work folder")
    ap.add_argument("--n", type=int, default=6000, help="synthetic training maps")
    ap.add_argument("--seed", type=int, default=0, help="generator and training seed")
    ap.add_argument("--model", default="cbam")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--synth", type=Path, default=None, help="reuse this synthetic file, do not generate")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    real_path = args.out / "real_pooled.npz"
    counts = write_real(args.shared, real_path)
    print(f"real pooled: {sum(counts.values())} maps {counts}", flush=True)
    synth = args.synth
    t_gen = 0.0
    if synth is None:
        synth = args.out / "synth.npz"
        t_gen = _cli("data", "synth", "--n", str(args.n), "--out", str(synth), "--seed", str(args.seed))
    run = args.out / "run"
    t_train = _cli("train", "--model", args.model, "--data", str(synth), "--out", str(run), "--epochs",
                   str(args.epochs), "--image-size", str(args.image_size), "--seed", str(args.seed),
                   "--no-progress")
    t_eval = _cli("evaluate", str(run), "--data", str(real_path), "--out", str(run / "eval_real"))
    synth_test = json.loads((run / "metrics.json").read_text())
    metrics = json.loads((run / "eval_real" / "metrics.json").read_text())
    print(f"\n{args.model}, {args.n} synthetic maps (seed {args.seed}), {args.epochs} epochs at "
          f"{args.image_size} px; synthetic test macro-F1 {synth_test['macro_f1']:.3f}")
    print("real pooled maps:")
    print(summarise(metrics))
    print(f"wall: generate {t_gen:.0f} s, train {t_train:.0f} s, evaluate {t_eval:.0f} s")


if __name__ == "__main__":
    main()
