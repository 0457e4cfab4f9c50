"""Scale check of the data path on a full-size (811,457-row) LSWMD-layout pickle.

Generates the pickle quickly from a small pool of realistic maps (perturbed per row, so every row is its own
array as in the real file), written as pandas 0.19 under Python 2 wrote the original (``--layout``), then
measures, each step in a fresh subprocess: ``load_table`` time and peak RSS, the same for the lean reader
predict uses (``load_lean``), ``prepare(size=64)`` time and peak RSS, and the pickle-free round trip
(``write_safe`` / ``read_safe``).

    python benchmarks/data_scale.py                 # full size (needs ~4 GB free RAM and a few minutes)
    python benchmarks/data_scale.py --rows 50000    # quick
    python benchmarks/data_scale.py --steps generate,load,load_lean --layout protocol2   # a Python-3 file
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL_ROWS = 811_457
UNLABELED_FRACTION = 638_507 / 811_457  # 78.7 % of LSWMD has no label
# labelled WM-811K class totals (data.md section 2)
CLASS_TOTALS = {"Center": 4294, "Donut": 555, "Edge-Loc": 5189, "Edge-Ring": 9680, "Loc": 3593,
                "Near-full": 149, "Random": 866, "Scratch": 1193, "none": 147431}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _pool(rng: np.random.Generator, n: int = 600) -> list[np.ndarray]:
    """Wafer-shaped maps of realistic sizes: mostly small (25-40 dies a side), a tail up to ~100."""
    pool = []
    for _ in range(n):
        u = rng.random()
        lo, hi = (25, 41) if u < 0.6 else (41, 66) if u < 0.9 else (66, 101)
        h = int(rng.integers(lo, hi))
        w = max(20, h + int(rng.integers(-4, 5)))
        yy, xx = np.mgrid[:h, :w]
        inside = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2 <= 1
        m = inside.astype(np.uint8) + (inside & (rng.random((h, w)) < rng.uniform(0.02, 0.3)))
        pool.append(m.astype(np.uint8))
    return pool


#: How the generated pickle is written: "py2" as pandas 0.19 under Python 2 wrote the original LSWMD.pkl
#: (waferlab.data.py2pickle: its opcodes, module paths and memo), or by today's pickler at a protocol.
LAYOUTS = ("py2", "protocol2", "protocol4", "protocol5")


def generate(path: Path, rows: int, seed: int = 0, layout: str = "py2") -> dict:
    """Write an LSWMD-layout pickle of ``rows`` maps (nested label arrays, ~79 % unlabelled).

    ``py2`` by default: the original file's layout. ``protocol2`` (today's pickler at protocol 2) has the
    same protocol but not the same memo: it keeps every map a second time while loading.
    """
    from tqdm import tqdm

    from waferlab.data.lswmd import write_lswmd
    from waferlab.data.table import UNLABELED, WaferTable

    rng = np.random.default_rng(seed)
    pool = _pool(rng)
    names = list(CLASS_TOTALS)
    p = np.array([CLASS_TOTALS[c] for c in names], dtype=np.float64)
    labelled = rng.random(rows) >= UNLABELED_FRACTION
    labels = np.full(rows, UNLABELED, dtype=object)
    labels[labelled] = np.array(names, dtype=object)[rng.choice(len(names), labelled.sum(), p=p / p.sum())]
    split = np.where(labelled, np.where(rng.random(rows) < 0.31, "Training", "Test"), "").astype(object)
    which = rng.integers(0, len(pool), rows)
    maps = []
    for i in tqdm(range(rows), desc="maps", unit="map", mininterval=2):
        m = pool[which[i]].copy()
        flat = m.reshape(-1)
        k = rng.integers(0, flat.size, 4)
        flat[k] = np.where(flat[k] > 0, 3 - flat[k], 0)  # flip a few good/failed dies
        maps.append(m.T.copy().T)  # Fortran-ordered, like the maps in the real LSWMD.pkl
    lots = np.array([f"lot{i // 25 + 1}" for i in range(rows)], dtype=object)
    table = WaferTable(maps=maps, labels=labels, split=split, lot=lots, wafer_index=np.arange(rows) % 25 + 1,
                       source="synthetic-scale")
    if layout == "py2":
        from waferlab.data.lswmd import frame_from_table
        from waferlab.data.py2pickle import write_py2

        write_py2(frame_from_table(table), path)
    else:
        write_lswmd(table, path, protocol=int(layout.removeprefix("protocol")))
    return {"rows": rows, "labelled": int(labelled.sum()), "file_mb": round(path.stat().st_size / 2**20, 1)}


def step_load(path: Path) -> dict:
    from waferlab.data.readers import load_table

    t0 = time.perf_counter()
    table = load_table(path)
    return {"rows": len(table), "load_s": round(time.perf_counter() - t0, 1), "classes": table.class_counts()}


def step_load_lean(path: Path) -> dict:
    """``load_table(lean=True)``, what predict reads: the maps stay the pickled bytes (waferlab.data.lean)."""
    from waferlab.data.readers import load_table

    t0 = time.perf_counter()
    table = load_table(path, lean=True)
    return {"rows": len(table), "load_s": round(time.perf_counter() - t0, 1),
            "maps": type(table.maps).__name__}


def step_prepare(path: Path, size: int) -> dict:
    from waferlab.data.readers import load_table

    t0 = time.perf_counter()
    table = load_table(path)
    t1 = time.perf_counter()
    try:
        from waferlab.data.cache import prepare
    except ImportError:
        return {"load_s": round(t1 - t0, 1), "prepare": "waferlab.data.cache.prepare not available yet"}
    p = prepare(table, size=size)
    return {"load_s": round(t1 - t0, 1), "prepare_s": round(time.perf_counter() - t1, 1),
            "prepared_shape": list(p.maps.shape), "prepared_mb": round(p.maps.nbytes / 2**20, 1)}


def step_write_safe(path: Path, out: Path) -> dict:
    from waferlab.data.readers import load_table, write_safe

    table = load_table(path)
    t0 = time.perf_counter()
    write_safe(table, out)
    return {"write_safe_s": round(time.perf_counter() - t0, 1),
            "safe_mb": round(out.stat().st_size / 2**20, 1)}


def step_read_safe(out: Path) -> dict:
    from waferlab.data.readers import read_safe

    t0 = time.perf_counter()
    table = read_safe(out)
    return {"rows": len(table), "read_safe_s": round(time.perf_counter() - t0, 1)}


def _child(args: argparse.Namespace) -> None:
    path, out = Path(args.path), Path(args.path).with_suffix(".safe.npz")
    t0 = time.perf_counter()
    if args.step == "generate":
        result = generate(path, args.rows, args.seed, args.layout)
    elif args.step == "load":
        result = step_load(path)
    elif args.step == "load_lean":
        result = step_load_lean(path)
    elif args.step == "prepare":
        result = step_prepare(path, args.size)
    elif args.step == "write_safe":
        result = step_write_safe(path, out)
    else:
        result = step_read_safe(out)
    result.update(step=args.step, wall_s=round(time.perf_counter() - t0, 1),
                  peak_rss_mb=round(_peak_rss_mb()))
    print("RESULT " + json.dumps(result), flush=True)


def _run_step(step: str, path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--path", str(path), "--rows", str(args.rows),
           "--size", str(args.size), "--seed", str(args.seed), "--layout", args.layout]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"step {step} failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS, help=f"rows to generate (default {FULL_ROWS})")
    parser.add_argument("--size", type=int, default=64, help="prepare size (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="py2",
                        help="how the generated pickle is written (default py2, as the original LSWMD.pkl)")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--steps", default="generate,load,load_lean,prepare,write_safe,read_safe",
                        help="comma-separated steps to run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.step = args.child
        _child(args)
        return
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="waferlab_scale_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"LSWMD_{args.rows}.pkl"
    try:
        for step in args.steps.split(","):
            result = _run_step(step, path, args)
            print(json.dumps(result), flush=True)
    finally:
        if not args.keep:
            for f in (path, path.with_suffix(".safe.npz")):
                if f.exists():
                    f.unlink()
            if not args.dir:
                folder.rmdir()


if __name__ == "__main__":
    main()
