"""Read speed of the fab formats (maps/s) on files of 25 wafers this script writes, and the real samples.

Writes, in a temporary folder, 25 round wafers of about 50,000 dies (the TSK sample's size) in each format:
one little-endian STDF file (PIR, ``--tests`` PTRs and a PRR per die), one G85 file (25 maps under
<Maps>), 25 TSK files (TSK holds one wafer per file), one KLARF 1.2 and one KLARF 1.8 file (sample plan
and one defect per failed die). Each is read through ``load_table`` (best of ``--repeat``); then the real
samples are timed, and ``--figure`` draws one real sample of each format (``docs/fab_formats.png``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fab_formats.py [--dies 50000] [--wafers 25] [--tests 10] \\
        [--figure docs/fab_formats.png]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from waferlab.data.fab import samples
from waferlab.data.readers import load_table

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WAFERLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL = {
    "STDF (lot2.stdf.gz, real)": "stdf_noonchen_rust-stdf_ce9dfe4/lot2.stdf.gz",
    "STDF (a595.stdf, real)": "stdf_stephensonb_stdflib_ec18666/a595.stdf",
    "SEMI G85 (ALL.xml)": "g85_fronzbot_wafer-view_f6f3c2f/SEMI_G85_1101_ALL.xml",
    "TSK (real, 49,631 dies)": "tsk_larvata_tsk-parser_d9016f0/001.QR2352-D5U278-CP-1",
    "KLARF 1.1 (real)": "klarf_michaelhotaling_klarfkit_056a11e/CPS3TwithoutReview.001",
    "KLARF 1.2 (real, 3 wafers)": "klarf_impro02_wafermap-clustering_f809851/QUU_NUU.000",
    "KLARF 1.8 (fixture)": "klarf_btrapp_jklarfreader_373eec3/simple18.klarf",
}
FIGURE = {"STDF": REAL["STDF (lot2.stdf.gz, real)"], "SEMI G85": REAL["SEMI G85 (ALL.xml)"],
          "TSK": REAL["TSK (real, 49,631 dies)"], "KLARF": REAL["KLARF 1.1 (real)"]}


def timed(paths: list[Path], repeat: int) -> tuple[float, float, int]:
    """Best wall and CPU time over ``repeat`` runs of reading every path, and the number of maps read.

    The CPU time is what one core delivers; the wall time grows when the machine is shared.
    """
    wall = cpu = float("inf")
    n = 0
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        with contextlib.redirect_stderr(io.StringIO()):  # the readers' notes
            n = sum(len(load_table(p)) for p in paths)
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu, n


def write_files(folder: Path, dies: int, wafers: int, tests: int) -> dict[str, list[Path]]:
    """The benchmark files: one list of paths per format."""
    grids = [samples.round_wafer(dies, seed=k) for k in range(wafers)]
    stdf = samples.write_stdf(folder / "lot.stdf", [samples.stdf_wafer_from_map(f"W{k:02d}", g)
                                                    for k, g in enumerate(grids)], tests_per_die=tests)
    return {
        f"STDF ({tests} PTR/die)": [stdf],
        "SEMI G85": [samples.write_g85(folder / "maps.xml", grids)],
        "TSK (1 file/wafer)": [samples.write_tsk(folder / f"w{k:02d}.tsk", g) for k, g in enumerate(grids)],
        "KLARF 1.2": [samples.write_klarf(folder / "lot.klarf", grids)],
        "KLARF 1.8": [samples.write_klarf(folder / "lot18.klarf", grids, version="1.8")],
    }


def draw(png: Path) -> None:
    """One real sample per format, side by side, as ``load_table`` returns it (notch/flat down)."""
    from waferlab.plotting import draw_wafer, save_figure, use_agg

    use_agg()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FIGURE), figsize=(3.2 * len(FIGURE), 3.6), dpi=110)
    for ax, (name, rel) in zip(axes, FIGURE.items()):
        with contextlib.redirect_stderr(io.StringIO()):
            table = load_table(SHARED / rel)
        m = table.maps[0]
        title = (f"{name}: {Path(rel).name}\n{m.shape[0]}x{m.shape[1]}, {int((m > 0).sum()):,} dies, "
                 f"{int((m == 2).sum()):,} failed")
        draw_wafer(ax, m, title=title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dies", type=int, default=50000, help="dies per wafer (default 50000)")
    parser.add_argument("--wafers", type=int, default=25, help="wafers per benchmark file (default 25)")
    parser.add_argument("--tests", type=int, default=10, help="PTR records per die in the STDF (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N reads (default 3)")
    parser.add_argument("--figure", default=None, help="write the four-format figure to this PNG")
    args = parser.parse_args()
    load_table(SHARED / REAL["STDF (a595.stdf, real)"])  # import pyarrow etc. once, outside the timings
    print(f"{args.wafers} wafers of ~{args.dies:,} dies each, read with load_table (best of {args.repeat})")
    print(f"{'format':<24}{'file MB':>9}{'wall s':>9}{'maps/s':>9}{'ms/wafer':>10}{'CPU maps/s':>12}"
          f"{'CPU ms/wafer':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, paths in write_files(Path(tmp), args.dies, args.wafers, args.tests).items():
            wall, cpu, n = timed(paths, args.repeat)
            mb = sum(p.stat().st_size for p in paths) / 1e6
            print(f"{name:<24}{mb:>9.1f}{wall:>9.2f}{n / wall:>9.1f}{1000 * wall / n:>10.1f}{n / cpu:>12.1f}"
                  f"{1000 * cpu / n:>14.1f}")
    print("\nreal samples")
    print(f"{'file':<28}{'maps':>6}{'dies':>9}{'wall ms':>9}{'CPU ms':>9}")
    for name, rel in REAL.items():
        wall, cpu, n = timed([SHARED / rel], args.repeat)
        with contextlib.redirect_stderr(io.StringIO()):
            dies = sum(int(np.count_nonzero(m)) for m in load_table(SHARED / rel).maps)
        print(f"{name:<28}{n:>6}{dies:>9,}{1000 * wall:>9.1f}{1000 * cpu:>9.1f}")
    if args.figure:
        draw(Path(args.figure))
        print(f"\nwrote {args.figure}")


if __name__ == "__main__":
    main()
