"""Synthetic-to-real table: synthetic-only vs real-only vs synthetic pre-training + real fine-tuning.

The real labelled samples of ``shared/data`` (LSWMD sample pickle, dm3 PNGs, sub100 CSV; original grids)
are split per class by ``waferlab.data.calibrate.split_real`` into a calibration part (what generator
tuning and real-map training may see) and a held-out part (never seen by either). Three runs, all through
the ``waferlab`` CLI:

* synthetic only: ``--n`` generated maps (this tree's generator);
* real only: the calibration part (a few hundred maps);
* synthetic + fine-tuning: ``--init`` the synthetic run, then train on the calibration part.

Each is evaluated with ``waferlab evaluate`` on the held-out part; the table gives per-class recall,
macro-F1, the smallest per-class recall, ECE, the largest confusions, and the commands that reproduce it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sim2real.py --n 6000 --model cbam --image-size 48 \\
        --epochs 3 --out runs/sim2real
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("WAFERLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
COMMANDS: list[str] = []


def _cli(*args: str) -> float:
    """Run ``python -m waferlab.cli ARGS`` with this tree first on the path; returns wall seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    COMMANDS.append("waferlab " + shlex.join(args))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "waferlab.cli", *args], check=True, env=env)
    return time.perf_counter() - t0


def write_real(shared: Path, out: Path, seed: int) -> tuple[Path, Path, dict, dict]:
    """The calibration and held-out parts of the real maps as safe ``.npz`` files, and their class counts."""
    from waferlab.data.calibrate import load_real_samples, split_real
    from waferlab.data.readers import write_safe

    calib, held = split_real(load_real_samples(shared), seed=seed)
    paths = out / "real_calib.npz", out / "real_heldout.npz"
    write_safe(calib, paths[0])
    write_safe(held, paths[1])
    return paths[0], paths[1], calib.class_counts(), held.class_counts()


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
    lines.append(f"min per-class recall {min_recall(metrics):.3f}")
    for true, pred, count, share in top_confusions(metrics, k=8):
        lines.append(f"  {true:>10} -> {pred:<10} {count:>4} ({share:.0%} of {true})")
    return "\n".join(lines)


def min_recall(metrics: dict) -> float:
    """The smallest recall over the classes present."""
    return min(metrics["per_class"][c]["recall"] for c in metrics["class_names"]
               if metrics["per_class"][c]["support"])


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per class (recall on the held-out part), one column per training source."""
    names = list(results)
    first = next(iter(results.values()))
    head = "| class | held-out maps | " + " | ".join(names) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(names)]
    for c in first["class_names"]:
        support = first["per_class"][c]["support"]
        if support:
            cells = " | ".join(f"{results[n]['per_class'][c]['recall']:.3f}" for n in names)
            lines.append(f"| {c} recall | {support} | {cells} |")
    for label, fn in (("**macro-F1**", lambda m: m["macro_f1"]), ("min class recall", min_recall),
                      ("accuracy", lambda m: m["accuracy"]), ("ECE", lambda m: m["ece"])):
        lines.append(f"| {label} | {first['n']} | " + " | ".join(f"{fn(results[n]):.3f}" for n in names)
                     + " |")
    return "\n".join(lines)


@dataclass
class Plan:
    """The three runs' settings (from the command line)."""

    model: str
    image_size: int
    seed: int
    epochs: int
    real_epochs: int
    ft_epochs: int
    ft_lr: float


def _train(plan: Plan, data: Path, out: Path, epochs: int, *extra: str) -> float:
    if (out / "metrics.json").is_file():  # reuse a finished run (delete it to retrain)
        return 0.0
    return _cli("train", "--model", plan.model, "--data", str(data), "--out", str(out), "--epochs",
                str(epochs), "--image-size", str(plan.image_size), "--seed", str(plan.seed), "--no-progress",
                "--overwrite", *extra)


def run_all(plan: Plan, synth: Path, calib: Path, held: Path, out: Path) -> dict[str, dict]:
    """Train the three runs (reusing finished ones), evaluate each on the held-out part."""
    runs = {"synthetic only": out / "synth_only", "real only": out / "real_only",
            "synthetic + fine-tune": out / "synth_ft"}
    walls = {"synthetic only": _train(plan, synth, runs["synthetic only"], plan.epochs),
             "real only": _train(plan, calib, runs["real only"], plan.real_epochs,
                                 "--set", "fractions=[0.8, 0.2, 0.0]")}
    walls["synthetic + fine-tune"] = _train(plan, calib, runs["synthetic + fine-tune"], plan.ft_epochs,
                                            "--init", str(runs["synthetic only"]), "--set",
                                            "fractions=[0.8, 0.2, 0.0]", "--set", f"lr={plan.ft_lr}",
                                            "--set", "warmup_epochs=0")
    results = {}
    for name, run in runs.items():
        _cli("evaluate", str(run), "--data", str(held), "--out", str(run / "eval_heldout"), "--no-progress")
        results[name] = json.loads((run / "eval_heldout" / "metrics.json").read_text())
        print(f"\n{name} (train {walls[name]:.0f} s) on the held-out real maps:\n{summarise(results[name])}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder of real samples")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "sim2real", help="work folder")
    ap.add_argument("--n", type=int, default=6000, help="synthetic training maps")
    ap.add_argument("--seed", type=int, default=0, help="generator, split and training seed")
    ap.add_argument("--model", default="cbam")
    ap.add_argument("--epochs", type=int, default=3, help="epochs on the synthetic maps")
    ap.add_argument("--real-epochs", type=int, default=30, help="epochs of the real-only run")
    ap.add_argument("--ft-epochs", type=int, default=10, help="fine-tuning epochs on the real maps")
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning learning rate")
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--synth", type=Path, default=None, help="reuse this synthetic file, do not generate")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    calib, held, n_calib, n_held = write_real(args.shared, args.out, args.seed)
    print(f"real calibration part: {sum(n_calib.values())} maps {n_calib}\n"
          f"real held-out part: {sum(n_held.values())} maps {n_held}", flush=True)
    synth = args.synth
    if synth is None:
        synth = args.out / "synth.npz"
        if not synth.is_file():
            _cli("data", "synth", "--n", str(args.n), "--out", str(synth), "--seed", str(args.seed))
    plan = Plan(args.model, args.image_size, args.seed, args.epochs, args.real_epochs, args.ft_epochs,
                args.ft_lr)
    results = run_all(plan, synth, calib, held, args.out)
    print(f"\n{args.model} at {args.image_size} px; synthetic: {args.n} maps, {args.epochs} epochs; real: "
          f"{sum(n_calib.values())} calibration-part maps; recall on {sum(n_held.values())} held-out maps")
    print(table(results))
    print("\ncommands (python -m waferlab.cli ...):")
    print("\n".join(f"  {c}" for c in COMMANDS))


if __name__ == "__main__":
    main()
