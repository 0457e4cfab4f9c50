"""Speed of the wafer descriptors alone (the ``wafer`` part of the ``knn+wafer`` unknown-pattern score), one
thread: maps/s of :func:`waferlab.deploy.descriptors.wafer_descriptors` and of its first implementation
(``tests/descriptors_reference.py``) on the same maps, and the largest difference between the two.

Maps: ``synthetic`` (the generator, seed 0), ``lswmd`` (the LSWMD-layout pickle of
``benchmarks/predict_throughput.py``: realistic sizes and outlines, random fails) and ``real`` (the 180 real
WM-811K maps of ../shared/data or $WAFERLAB_SHARED_DATA, when present), each prepared at every size (default
resize rule).

    python benchmarks/descriptor_speed.py --n 2000 --sizes 64,32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
SHARED_DATA = Path(os.environ.get("WAFERLAB_SHARED_DATA", HERE.parent.parent / "shared" / "data"))  # as tests
REAL = SHARED_DATA / "wm811k_mohithmanjunath04_sample_197645f" / "LSWMD_sample.pkl"


def tables(n: int, folder: Path) -> dict:
    from data_scale import generate as lswmd

    from waferlab.data.readers import load_table
    from waferlab.data.synth import generate

    lswmd(folder / "lswmd.pkl", n)
    out = {"synthetic": generate(n, seed=0), "lswmd": load_table(folder / "lswmd.pkl")}
    if REAL.is_file():
        out["real"] = load_table(REAL)
    return out


def rate(fn, maps: np.ndarray, repeats: int) -> float:
    """maps/s of ``fn(maps)``: the best of ``repeats`` calls after a warm-up."""
    fn(maps[:8])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(maps)
        best = min(best, time.perf_counter() - t0)
    return len(maps) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="synthetic and LSWMD-layout maps")
    parser.add_argument("--sizes", default="64,32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from descriptors_reference import reference_descriptors

    from waferlab.data.cache import prepare
    from waferlab.deploy.descriptors import Outlines, wafer_descriptors

    print("| maps | px | n | distinct outlines / 1,024 | first implementation maps/s | now maps/s | "
          "speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="waferlab_descriptors_") as tmp:
        for name, table in tables(args.n, Path(tmp)).items():
            for size in [int(s) for s in args.sizes.split(",")]:
                maps = prepare(table, size).maps
                distinct = len(Outlines.of(maps[:1024] > 0).masks)
                before = rate(reference_descriptors, maps, args.repeats)
                after = rate(wafer_descriptors, maps, args.repeats)
                diff = np.abs(wafer_descriptors(maps) - reference_descriptors(maps)).max()
                print(f"| {name} | {size} | {len(maps)} | {distinct} / {min(len(maps), 1024)} | "
                      f"{before:,.0f} | {after:,.0f} | {after / before:.1f}x | {diff:.1g} |", flush=True)


if __name__ == "__main__":
    main()
