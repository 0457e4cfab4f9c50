"""Synthetic-to-real table: synthetic-only vs real-only vs synthetic pre-training + real fine-tuning.

The real labelled samples of ``shared/data`` (LSWMD sample pickle, dm3 PNGs, sub100 CSV; original grids)
are split per class by ``waferlab.data.calibrate.split_real`` into a calibration part (what generator
tuning and real-map training may see) and a held-out part (never seen by either). Three runs, all through
the ``waferlab`` CLI:

* synthetic only: ``--n`` generated maps (this tree's generator);
* real only: the calibration part (a few hundred maps);
* synthetic + fine-tuning: ``--init`` the synthetic run, then train on the calibration part, optionally with
  a share of the synthetic maps mixed into every epoch (``--ft-synth``: against forgetting).

Each is evaluated with ``waferlab evaluate`` on the held-out part; the table gives per-class recall,
macro-F1, the smallest per-class recall, ECE, the largest confusions, and the commands that reproduce it.
With several ``--seeds`` every run (generator, training) is repeated per seed and the table gives the mean
and the range over seeds, and one more column per run gives the seeds' runs as one model (the ensemble: mean
probability; with ``--eval-calib`` its calibration-part summary is printed too, so the ensemble is
chosen by the same rule as one run); the real split stays ``--split-seed`` (the calibration part is what the
generator was tuned on, so it must not move). ``--resize`` sets the rule that shrinks the maps (the
``resize`` config key) for all three runs; their evaluations follow the runs' rule.

    for s in 0 1 2; do OMP_NUM_THREADS=1 python benchmarks/sim2real.py --n 20000 --model cbam \\
        --image-size 48 --epochs 6 --seeds $s --synth-set "fractions=[0.85, 0.15, 0.0]" --ft-synth 0.1 \\
        --ft-real-weight 3 --ft-epochs 5 --ft-lr 3e-4 --resize failkeep --out runs/sim2real & done; wait
    python benchmarks/sim2real.py ... --seeds 0 1 2      # the same options: the table from the finished runs

Measured (62 min of synthetic training per seed, three side by side on a 2-core CPU): held-out macro-F1
synthetic only 0.787, real only 0.742, synthetic + fine-tune 0.817 (better than both in every seed). The
best synthetic-only recipe adds ``--synth-set "balance_targets={Loc: 3800}"``, ``--image-size 64`` and
``--tta`` (round 15, on a GPU: calibration part 0.831, held-out 0.802 with every class's recall >= 0.6, the
issue-14 goal; ``sim2real_gpu.sh`` runs such a round). ``--runs "synthetic only" --eval-calib`` is how a
change is judged: on the calibration part, never on the held-out one. The README's "Synthetic wafers" has
the tables; docs/synth_to_real.md has every experiment behind them.
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
RUNS = ("synthetic only", "real only", "synthetic + fine-tune")  # the table's columns, in order


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


def _cell(values: list[float]) -> str:
    """``mean`` of one seed, ``mean (lo-hi)`` of several."""
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.2f}-{max(values):.2f})"


def table(results: dict[str, list[dict]], part: str = "held-out") -> str:
    """Markdown: one row per class (recall on ``part`` of the real maps), one column per training source.

    ``results`` maps a source name to one metrics dict per seed; cells are the mean (and range) over seeds.
    """
    names = list(results)
    first = results[names[0]][0]
    head = f"| class | {part} maps | " + " | ".join(names) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(names)]
    for c in first["class_names"]:
        support = first["per_class"][c]["support"]
        if support:
            cells = " | ".join(_cell([m["per_class"][c]["recall"] for m in results[n]]) for n in names)
            lines.append(f"| {c} recall | {support} | {cells} |")
    for label, fn in (("**macro-F1**", lambda m: m["macro_f1"]), ("min class recall", min_recall),
                      ("accuracy", lambda m: m["accuracy"]), ("ECE", lambda m: m["ece"])):
        lines.append(f"| {label} | {first['n']} | " + " | ".join(_cell([fn(m) for m in results[n]])
                                                               for n in names) + " |")
    return "\n".join(lines)


@dataclass
class Plan:
    """The three runs' settings (from the command line)."""

    model: str
    image_size: int
    epochs: int
    real_epochs: int
    ft_epochs: int
    ft_lr: float
    ft_synth: float
    ft_real_weight: float
    synth_set: tuple[str, ...]
    resize: str
    runs: tuple[str, ...] = RUNS
    eval_calib: bool = False
    tta: bool = False  # evaluate with test-time augmentation (the 8 dihedral views; ``evaluate --tta``)
    val_real: bool = False  # the synthetic run validates on the calibration part (``train --val-data``)


def _train(plan: Plan, data: list[str], out: Path, epochs: int, seed: int, *extra: str) -> float:
    sources = [a for d in data for a in ("--data", d)]
    args = ("train", "--model", plan.model, *sources, "--out", str(out), "--epochs", str(epochs),
            "--image-size", str(plan.image_size), "--seed", str(seed), "--no-progress", "--overwrite",
            "--set", f"resize={plan.resize}", *extra)
    if (out / "metrics.json").is_file():  # reuse a finished run (delete it to retrain)
        COMMANDS.append("(reused) waferlab " + shlex.join(args))
        return 0.0
    return _cli(*args)


def _sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def _fine_tune(plan: Plan, synth: Path, calib: Path, init: Path, out: Path, seed: int) -> float:
    """Fine-tune the synthetic run on the calibration part (optionally with a share of synthetic maps)."""
    real = f"{calib}:{plan.ft_real_weight:g}" if plan.ft_real_weight != 1 else str(calib)
    ft_data = [real] + ([f"{synth}:{plan.ft_synth:g}"] if plan.ft_synth > 0 else [])
    # synthetic maps mixed in: validation would be mostly synthetic; train on all real maps, keep the last
    ft_split = "fractions=[1.0, 0.0, 0.0]" if plan.ft_synth > 0 else "fractions=[0.8, 0.2, 0.0]"
    own = (ft_split, f"lr={plan.ft_lr}", "warmup_epochs=0")
    keys = {p.split("=", 1)[0].strip() for p in own}  # the synthetic run's own split etc. would be overridden
    kept = [p for p in plan.synth_set if p.split("=", 1)[0].strip() not in keys]
    return _train(plan, ft_data, out, plan.ft_epochs, seed, "--init", str(init), *_sets(*kept, *own))


def _evaluate(run: Path, data: Path, name: str, tta: bool = False) -> dict:
    """``waferlab evaluate`` of a run on one real part (reused when done; ``tta``: with ``--tta``, in its own
    folder); its metrics."""
    out = run / (f"eval_{name}_tta" if tta else f"eval_{name}")
    if not (out / "metrics.json").is_file():
        _cli("evaluate", str(run), "--data", str(data), "--out", str(out), "--no-progress",
             *(["--tta"] if tta else []))
    return json.loads((out / "metrics.json").read_text())


def run_dirs(plan: Plan, out: Path) -> dict[str, Path]:
    """One seed's run folders, by run name."""
    suffix = "_valreal" if plan.val_real else ""
    return dict(zip(RUNS, (out / f"synth_only{suffix}", out / "real_only", out / f"synth_ft{suffix}")))


def ensemble(runs: list[Path], data: Path, tta: bool) -> dict:
    """Metrics of the seeds' runs as one model: the mean of their probabilities (each computed as
    ``waferlab evaluate`` computes it) on every labelled map of ``data``."""
    import numpy as np

    from waferlab.engine.evaluate import labelled_maps
    from waferlab.engine.metrics import compute_metrics
    from waferlab.engine.predict import PredictOptions, predict_probs
    from waferlab.engine.run import Run

    opened = [Run.open(r) for r in runs]
    info = opened[0].info
    labelled = labelled_maps(info, data, "evaluate")
    opts = PredictOptions(batch_size=256, progress=False, tta=tta)
    probs = [predict_probs(r.load_model(), labelled.maps, r.spec(), opts) for r in opened]
    return compute_metrics(labelled.labels, np.mean(probs, axis=0), info.class_names)


def run_seed(plan: Plan, parts: dict[str, Path], synth: Path, out: Path, seed: int
             ) -> tuple[dict[str, dict], dict[str, dict]]:
    """Train the chosen runs of one seed (reusing finished ones), evaluate each on the held-out part.

    With ``plan.eval_calib`` each run is also evaluated on the calibration part (what generator tuning may
    look at) and that summary printed. Returns the held-out and the calibration-part metrics by run name.
    """
    dirs = run_dirs(plan, out)
    val = ("--val-data", str(parts["calib"])) if plan.val_real else ()
    train = {"synthetic only": lambda: _train(plan, [str(synth)], dirs["synthetic only"], plan.epochs, seed,
                                              *val, *_sets(*plan.synth_set)),
             "real only": lambda: _train(plan, [str(parts["calib"])], dirs["real only"], plan.real_epochs,
                                         seed, *_sets("fractions=[0.8, 0.2, 0.0]")),
             "synthetic + fine-tune": lambda: _fine_tune(plan, synth, parts["calib"], dirs["synthetic only"],
                                                         dirs["synthetic + fine-tune"], seed)}
    results, calib = {}, {}
    for name in plan.runs:
        wall = train[name]()
        results[name] = _evaluate(dirs[name], parts["held"], "heldout", plan.tta)
        print(f"\nseed {seed}, {name} (train {wall:.0f} s) on the held-out real maps:\n"
              f"{summarise(results[name])}", flush=True)
        if plan.eval_calib and name != "real only":  # the real-only run trained on the calibration part
            calib[name] = _evaluate(dirs[name], parts["calib"], "calib", plan.tta)
            print(f"seed {seed}, {name} on the calibration part (tuning only, not the result):\n"
                  f"{summarise(calib[name])}", flush=True)
    return results, calib


def main() -> None:
    from waferlab.data.cache import DEFAULT_RESIZE, RESIZE_RULES
    from waferlab.engine.predict import TTA_HELP

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder of real samples")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "sim2real", help="work folder")
    ap.add_argument("--n", type=int, default=6000, help="synthetic training maps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="generator and training seeds")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the real calibration/held-out split")
    ap.add_argument("--model", default="cbam")
    ap.add_argument("--epochs", type=int, default=3, help="epochs on the synthetic maps")
    ap.add_argument("--real-epochs", type=int, default=30, help="epochs of the real-only run")
    ap.add_argument("--ft-epochs", type=int, default=10, help="fine-tuning epochs on the real maps")
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning learning rate")
    ap.add_argument("--ft-synth", type=float, default=0.0,
                    help="share of the synthetic maps mixed into each fine-tuning epoch (0: real maps only)")
    ap.add_argument("--ft-real-weight", type=float, default=1.0,
                    help="sampling weight of the real maps in fine-tuning (each epoch sees them this often)")
    ap.add_argument("--synth-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for the synthetic run and fine-tuning (e.g. a loss option); repeatable")
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--resize", choices=RESIZE_RULES, default=DEFAULT_RESIZE,
                    help="rule that shrinks the maps to the image size, for every run")
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), metavar="RUN",
                    help="which runs to train (fine-tuning needs the synthetic run): "
                    + ", ".join(map(repr, RUNS)))
    ap.add_argument("--eval-calib", action="store_true",
                    help="also evaluate on the calibration part and print it (for generator tuning)")
    ap.add_argument("--tta", action="store_true", help="evaluate with --tta: " + TTA_HELP)
    ap.add_argument("--val-real", action="store_true",
                    help="the synthetic run validates on the real calibration part (train --val-data: best "
                    "epoch, calibration and thresholds chosen on real maps; still trained on synthetic only)")
    args = ap.parse_args()
    if "synthetic + fine-tune" in args.runs and "synthetic only" not in args.runs:
        ap.error("--runs: 'synthetic + fine-tune' starts from the 'synthetic only' run; list both")

    args.out.mkdir(parents=True, exist_ok=True)
    calib, held, n_calib, n_held = write_real(args.shared, args.out, args.split_seed)
    print(f"real calibration part: {sum(n_calib.values())} maps {n_calib}\n"
          f"real held-out part: {sum(n_held.values())} maps {n_held}", flush=True)
    plan = Plan(args.model, args.image_size, args.epochs, args.real_epochs, args.ft_epochs, args.ft_lr,
                args.ft_synth, args.ft_real_weight, tuple(args.synth_set), args.resize,
                tuple(r for r in RUNS if r in args.runs), args.eval_calib, args.tta, args.val_real)
    results: dict[str, list[dict]] = {}
    calib_results: dict[str, list[dict]] = {}  # the calibration part: what judges a change (--eval-calib)
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        synth = out / "synth.npz"
        if not synth.is_file():
            _cli("data", "synth", "--n", str(args.n), "--out", str(synth), "--seed", str(seed))
        held_m, calib_m = run_seed(plan, {"calib": calib, "held": held}, synth, out, seed)
        for name, metrics in held_m.items():
            results.setdefault(name, []).append(metrics)
        for name, metrics in calib_m.items():
            calib_results.setdefault(name, []).append(metrics)
    if len(args.seeds) > 1:  # the seeds' runs as one model (mean probability)
        for name in plan.runs:
            dirs = [run_dirs(plan, args.out / f"seed{seed}")[name] for seed in args.seeds]
            results[f"{name}: ensemble"] = [ensemble(dirs, held, plan.tta)]
            if plan.eval_calib and name != "real only":  # what would choose the ensemble, as for one run
                print(f"\n{name}: ensemble on the calibration part (tuning only, not the result):\n"
                      f"{summarise(ensemble(dirs, calib, plan.tta))}", flush=True)
    print(f"\n{args.model} at {args.image_size} px ({args.resize}); synthetic: {args.n} maps, "
          f"{args.epochs} epochs{'; test-time augmentation' if args.tta else ''}"
          f"{'; validated on the calibration part (--val-data)' if args.val_real else ''}; real: "
          f"{sum(n_calib.values())} calibration-part maps; recall on {sum(n_held.values())} held-out maps; "
          f"seeds {' '.join(map(str, args.seeds))} (mean, range over seeds)")
    if calib_results:  # the cells a change is judged by (the seeds' mean on the calibration part)
        print(f"\ncalibration part ({sum(n_calib.values())} maps; judges a change, not the result):")
        print(table(calib_results, "calibration"))
        print()
    print(table(results))
    print("\ncommands (python -m waferlab.cli ...):")
    print("\n".join(f"  {c}" for c in COMMANDS))


if __name__ == "__main__":
    main()
