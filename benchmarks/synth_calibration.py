"""Compare synthetic wafer maps with the real samples per class, time the generator, draw real vs synthetic.

Prints the calibration table (real vs synthetic median [IQR] per class and statistic; real = the
calibration part of ``waferlab.data.calibrate.split_real``, the held-out part is never used here), the
generator's speed in maps/s (9-class and mixed), and writes ``docs/synth_vs_real.png``: one row per
class, a few real maps on the left and synthetic maps on the right.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synth_calibration.py [--n-synth 1800] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from waferlab.data.calibrate import compare, format_comparison, load_real_samples, split_real, table_stats
from waferlab.data.synth import generate
from waferlab.data.table import WM811K_CLASSES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("WAFERLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def speed(n: int, mixed: bool, seed: int) -> tuple[float, float]:
    """Maps per second of ``generate`` by wall clock and by CPU time of this process (best of two runs).

    The CPU-time figure is what one core delivers; the wall-clock one drops when the machine is shared.
    """
    wall = cpu = 0.0
    for k in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        generate(n, seed=seed + k, mixed=mixed)
        wall = max(wall, n / (time.perf_counter() - t0))
        cpu = max(cpu, n / max(time.process_time() - c0, 1e-9))
    return wall, cpu


def figure(real, synth, path: Path, per_side: int, seed: int) -> None:
    """One row per class: ``per_side`` real maps, then ``per_side`` synthetic maps."""
    from waferlab.plotting import draw_wafer, save_figure, use_agg

    use_agg()
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    classes = [c for c in WM811K_CLASSES if (real.labels == c).any()]
    cols = 2 * per_side
    fig, axes = plt.subplots(len(classes), cols, figsize=(1.35 * cols + 0.6, 1.45 * len(classes)), dpi=110)
    for i, cls in enumerate(classes):
        for side, table in enumerate((real, synth)):
            rows = np.flatnonzero(table.labels == cls)
            pick = rng.choice(rows, min(per_side, len(rows)), replace=False)
            for j in range(per_side):
                ax = axes[i, side * per_side + j]
                if j < len(pick):
                    m = table.maps[pick[j]]
                    draw_wafer(ax, m, f"{'real' if side == 0 else 'synth'} {m.shape[0]}x{m.shape[1]}", 6)
                else:
                    ax.axis("off")
        axes[i, 0].set_ylabel(cls, fontsize=9)
    fig.suptitle("real WM-811K samples (left) vs waferlab synthetic maps (right)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder of real samples")
    ap.add_argument("--n-synth", type=int, default=1800, help="synthetic maps for the statistics")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", type=Path, default=REPO / "docs" / "synth_vs_real.png")
    ap.add_argument("--per-side", type=int, default=4, help="real and synthetic maps per class in the figure")
    ap.add_argument("--speed-n", type=int, default=3000, help="maps per timing run")
    args = ap.parse_args()

    real, held = split_real(load_real_samples(args.shared), seed=0)  # the held-out part is never looked at
    print(f"real samples (calibration part; {len(held)} held out for sim2real): {len(real)} maps "
          f"{real.class_counts()}")
    synth = generate(args.n_synth, seed=args.seed)
    cmp = compare(table_stats(real), table_stats(synth))
    print(format_comparison(cmp))
    by_class = cmp.groupby("class", sort=False)["agree"].agg(["sum", "count"])
    print("per class: " + ", ".join(f"{c} {int(r['sum'])}/{int(r['count'])}" for c, r in by_class.iterrows()))
    matched = compare(table_stats(real), table_stats(synth), match_sizes=True)  # the class's die counts
    print(f"at matched die counts: {int(matched['agree'].sum())}/{len(matched)} (class, statistic) pairs")
    off = matched[~matched["agree"]]  # what stays off once the sample's few products are matched
    if len(off):
        print("still off at matched die counts: " + ", ".join(
            f"{r['class']} {r['stat']} ({r['real_median']:.3g} real, {r['synth_median']:.3g} synthetic)"
            for _, r in off.iterrows()))
    for label, mixed in (("9 classes, WM-811K-like sizes", False), ("MixedWM38-style 52x52", True)):
        wall, cpu = speed(args.speed_n, mixed, args.seed)
        print(f"generator speed ({label}): {wall:.0f} maps/s wall clock, {cpu:.0f} maps/s per CPU core")
    figure(real, synth, args.figure, args.per_side, args.seed)
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
