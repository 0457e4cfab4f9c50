"""Throughput of ``waferlab predict`` end to end against the bare model, and ONNX Runtime against torch eager.

Per model (random weights, calibrated on synthetic maps; speed does not depend on the weights' values):

* end to end: an LSWMD-layout pickle -> CSV through :func:`waferlab.deploy.predict.predict_file` (read,
  prepare, infer, unknown-pattern score, write), maps/s;
* bare forward: the model alone on the same maps already prepared and encoded (torch eager, no grad; every
  bare rate is the median of three passes);
* ONNX Runtime on the same prepared maps through the exported graph, and end to end with ``--backend onnx``;
* the int8 export (``waferlab export --quantize int8``, calibrated on the run's validation part) the same
  way, bare and end to end (``predict FILE.onnx``); ``--agreement DIR`` adds, per model, how far int8 moves
  the outputs of a TRAINED run (``DIR/MODEL`` exported with ``--quantize int8``: the held-out check in its
  metadata: top-1 agreement, max abs probability difference, macro-F1 of both, unknown-score Spearman);
* ``--batches B1,B2``: bare maps/s of torch, ONNX Runtime float32 and int8 at other batch sizes;
* OpenVINO on the same exported graph, bare (float32, and bfloat16 for information) and ``--backend
  openvino``, when ``openvino`` imports;
* start-up: the same call on a 1-map file (checks, opening the model/session, first-call warm-up), so the
  end-to-end rate once started is n / (whole call - start-up);
* ``--stages``: where predict's time goes, each stage alone on the same file: reading the source, preparing
  (resizing) the chunks, inference + unknown-pattern score, formatting + writing the CSV.

``--scale N,M`` also runs predict on N-row (and M-row) files in fresh processes and reports wall time and
peak resident memory, to show memory stays flat in the number of maps.

    python benchmarks/predict_throughput.py --n 1000 --threads 2 --stages --batches 16,64 --agreement DIR
    python benchmarks/predict_throughput.py --models spanet --n 0 --scale 50000,100000 --scale-model spanet
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_run(folder: Path, model: str, size: int) -> Path:
    """A finished, calibrated run with random weights (what predict needs)."""
    import torch

    from waferlab.data.cache import prepare
    from waferlab.data.readers import write_safe
    from waferlab.data.synth import generate
    from waferlab.data.table import WM811K_CLASSES
    from waferlab.deploy.ood import KNN_BANK, FitData
    from waferlab.deploy.trust import fit_trust
    from waferlab.engine.config import build_config
    from waferlab.engine.predict import PredictOptions, predict
    from waferlab.engine.run import Run
    from waferlab.models import create_model

    table = generate(180, seed=1)
    write_safe(table, folder / "cal.npz")
    cfg = build_config("default", {"model": model, "data": str(folder / "cal.npz"), "image_size": size,
                                   "out": str(folder / model)})
    run = Run.create(folder / model, overwrite=True)
    run.write_start(cfg, WM811K_CLASSES)
    torch.manual_seed(0)
    net = create_model(model, num_classes=9, in_chans=3).eval()
    run.write_weights(net)
    run.mark("finished")
    p = prepare(table, size)
    val = predict(net, p.maps, run.spec(), PredictOptions(device="cpu", features=True))
    # a full-size feature bank, as a run trained on WM-811K has (speed does not depend on its values)
    rng = np.random.default_rng(0)
    bank = FitData(np.zeros((KNN_BANK, 9), np.float32), rng.integers(0, 9, KNN_BANK),
                   rng.normal(size=(KNN_BANK, val.features.shape[1])).astype(np.float32),
                   p.maps[np.arange(KNN_BANK) % len(p.maps)])  # the descriptor bank of knn+wafer
    fit_trust(run, val, p.labels, train=bank, val_maps=p.maps)
    return run.path


def bare_torch(run_dir: Path, maps: np.ndarray, batch: int) -> float:
    """maps/s of the model's forward alone on prepared, encoded tensors."""
    import torch

    from waferlab.data.encode import encode
    from waferlab.engine.run import Run

    model = Run.open(run_dir).load_model("cpu")
    xs = [encode(torch.from_numpy(maps[i:i + batch]), "onehot") for i in range(0, len(maps), batch)]

    def one_pass() -> None:
        for x in xs:
            model(x)

    with torch.no_grad():
        model(xs[0])  # warm-up
        return median_rate(len(maps), one_pass)


#: Passes over the maps per bare rate (their median): one pass varied by 10-35 % between runs on this CPU.
BARE_PASSES = 3


def median_rate(n: int, one_pass: Callable[[], object]) -> float:
    """maps/s of ``one_pass`` over ``n`` maps: the median of :data:`BARE_PASSES` timed passes."""
    rates = []
    for _ in range(BARE_PASSES):
        t0 = time.perf_counter()
        one_pass()
        rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates))


def bare_onnx(onnx: Path, maps: np.ndarray, batch: int, threads: int | None = None) -> float:
    from waferlab.deploy.export import open_session, run_session

    session, _ = open_session(onnx, threads)
    run_session(session, maps[:batch], batch)
    return median_rate(len(maps), lambda: run_session(session, maps, batch))


def bare_openvino(onnx: Path, maps: np.ndarray, batch: int, threads: int, precision: str = "f32"
                  ) -> float | None:
    """maps/s of OpenVINO's CPU plugin on the exported graph (None when openvino is not installed); f32 is
    what ``--backend openvino`` runs (bf16, OpenVINO's default on AMX CPUs, breaks the 1e-4 parity)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    compiled = core.compile_model(str(onnx), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                    "INFERENCE_PRECISION_HINT": precision,
                                                    "PERFORMANCE_HINT": "LATENCY"})
    compiled({"maps": maps[:batch]})

    def one_pass() -> None:
        for s in range(0, len(maps), batch):
            compiled({"maps": np.ascontiguousarray(maps[s:s + batch])})

    return median_rate(len(maps), one_pass)


def stages(run_dir: Path, src: Path, out: Path, batch: int) -> dict:
    """Seconds of each predict stage run alone (same code as predict, without the overlap)."""
    from waferlab.data.cache import prepare
    from waferlab.data.readers import load_table
    from waferlab.deploy.export import Contract
    from waferlab.deploy.predict import BackendSpec, RowWriter, _chunk, open_backend, rows_frame
    from waferlab.deploy.trust import load_trust
    from waferlab.engine.run import Run

    run = Run.open(run_dir)
    contract = Contract.of(run.spec(), load_trust(run), run.info.model_name)
    t = {}
    t0 = time.perf_counter()
    table = load_table(src)
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    chunks = [_chunk(np.arange(s, min(s + 4096, len(table))), prepare(table.subset(np.arange(s, min(
        s + 4096, len(table)))), contract.image_size)) for s in range(0, len(table), 4096)]
    t["prepare"] = time.perf_counter() - t0
    backend = open_backend(BackendSpec(str(run_dir), "torch", "cpu", batch))
    t0 = time.perf_counter()
    results = [backend.infer(c.maps) for c in chunks]
    t["infer"] = time.perf_counter() - t0
    writer = RowWriter(out, "csv")
    t0 = time.perf_counter()
    for c, (probs, ood) in zip(chunks, results):
        writer.write(rows_frame(c, probs, ood, contract))
    writer.close()
    t["write"] = time.perf_counter() - t0
    return t


def end_to_end(run_dir: Path, src: Path, out: Path, backend: str, batch: int) -> float:
    """Seconds of one whole ``predict_file`` call (checks, start-up, every map)."""
    from waferlab.deploy.predict import PredictJob, predict_file

    t0 = time.perf_counter()
    predict_file(PredictJob(run=str(run_dir), data=str(src), out=str(out), backend=backend,
                            batch_size=batch, devices=1, device="cpu", progress=False))
    return time.perf_counter() - t0


def e2e_rates(run_dir: Path, src: Path, one: Path, out: Path, backend: str, batch: int, n: int
              ) -> tuple[float, float, float]:
    """(maps/s of the whole call, start-up seconds = the call on a 1-map file, maps/s once started)."""
    whole = end_to_end(run_dir, src, out, backend, batch)
    startup = end_to_end(run_dir, one, out, backend, batch)
    return n / whole, startup, n / max(whole - startup, 1e-9)


def write_source(path: Path, rows: int) -> None:
    """An LSWMD-layout pickle with realistic map sizes (benchmarks/data_scale.py's generator)."""
    from data_scale import generate

    generate(path, rows)


def throughput(args: argparse.Namespace, folder: Path) -> list[dict]:
    from waferlab.data.cache import prepare
    from waferlab.data.readers import load_table
    from waferlab.deploy.export import export_run
    from waferlab.deploy.quantize import QuantizeOptions

    src, one = folder / f"lswmd_{args.n}.pkl", folder / "lswmd_1.pkl"
    write_source(src, args.n)
    write_source(one, 1)
    maps = prepare(load_table(src), args.size).maps
    rows = []
    for model in args.models.split(","):
        run = make_run(folder, model, args.size)
        onnx = export_run(run)
        int8 = export_run(run, quantize=QuantizeOptions("int8"))
        r = {"model": model, "size": args.size, "maps": args.n, "threads": args.threads, "batch": args.batch}
        r["bare_torch"] = bare_torch(run, maps, args.batch)
        r["e2e_torch"], r["startup_torch"], r["steady_torch"] = e2e_rates(
            run, src, one, folder / "out.csv", "torch", args.batch, args.n)
        r["bare_onnx"] = bare_onnx(onnx, maps, args.batch, args.threads)
        r["e2e_onnx"], r["startup_onnx"], r["steady_onnx"] = e2e_rates(
            run, src, one, folder / "out.csv", "onnx", args.batch, args.n)
        r["bare_int8"] = bare_onnx(int8, maps, args.batch, args.threads)
        r["e2e_int8"], r["startup_int8"], r["steady_int8"] = e2e_rates(
            int8, src, one, folder / "out.csv", "onnx", args.batch, args.n)
        r["batches"] = {b: {"torch": bare_torch(run, maps, b), "onnx": bare_onnx(onnx, maps, b, args.threads),
                            "int8": bare_onnx(int8, maps, b, args.threads)} for b in args.batch_sizes}
        r["bare_openvino"] = bare_openvino(onnx, maps, args.batch, args.threads)
        r["bare_openvino_bf16"] = bare_openvino(onnx, maps, args.batch, args.threads, "bf16")
        if r["bare_openvino"] is not None:
            r["e2e_openvino"], r["startup_openvino"], r["steady_openvino"] = e2e_rates(
                run, src, one, folder / "out.csv", "openvino", args.batch, args.n)
        if args.stages:
            r["stages"] = stages(run, src, folder / "out.csv", args.batch)
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    return rows


def scale(args: argparse.Namespace, folder: Path) -> list[dict]:
    """predict on N-row files, each in a fresh process: wall time and peak RSS."""
    run = make_run(folder, args.scale_model, args.size)
    out = []
    for n in [int(v) for v in args.scale.split(",")]:
        src = folder / f"scale_{n}.pkl"
        write_source(src, n)
        cmd = [sys.executable, __file__, "--child", str(run), str(src), str(folder / "scale.csv"),
               "--batch", str(args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"scale run failed: {proc.stderr[-2000:]}")
        r = {"maps": n, "model": args.scale_model, "size": args.size, **json.loads(line[-1][7:]),
             "file_mb": round(src.stat().st_size / 2**20)}
        out.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
        src.unlink()
    return out


def child(args: argparse.Namespace) -> None:
    from waferlab.deploy.predict import PredictJob, predict_file

    run, src, dst = args.child
    t0 = time.perf_counter()
    s = predict_file(PredictJob(run=run, data=src, out=dst, batch_size=args.batch, devices=1, device="cpu",
                                progress=False))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
    print("RESULT " + json.dumps({"wall_s": round(wall, 1), "maps_per_s": round(s["maps"] / wall, 1),
                                  "peak_rss_gb": round(peak, 2)}), flush=True)


BACKEND_NAMES = {"torch": "torch", "onnx": "onnx", "int8": "onnx int8", "openvino": "openvino"}


def print_throughput(rows: list[dict]) -> None:
    """Per model and backend: bare maps/s, predict end to end (whole call, and once started), start-up."""
    print("| model | px | maps | threads | backend | bare maps/s | vs torch bare | predict e2e maps/s | "
          "e2e / bare | start-up s | e2e once started maps/s | started / bare |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for b in ("torch", "onnx", "int8", "openvino"):
            if r.get(f"bare_{b}") is None:
                continue
            bare = r[f"bare_{b}"]
            print(f"| {r['model']} | {r['size']} | {r['maps']} | {r['threads']} | {BACKEND_NAMES[b]} | "
                  f"{bare:.0f} | {bare / r['bare_torch']:.2f}x | {r[f'e2e_{b}']:.0f} | "
                  f"{r[f'e2e_{b}'] / bare:.2f} | {r[f'startup_{b}']:.1f} | {r[f'steady_{b}']:.0f} | "
                  f"{r[f'steady_{b}'] / bare:.2f} |")
    bf16 = [r for r in rows if r.get("bare_openvino_bf16")]
    if bf16:
        print("\nOpenVINO in bfloat16 (not offered: outside the 1e-4 parity): " + ", ".join(
            f"{r['model']} {r['bare_openvino_bf16']:.0f} maps/s "
            f"({r['bare_openvino_bf16'] / r['bare_torch']:.2f}x torch)" for r in bf16))
    sized = [r for r in rows if r.get("batches")]
    if sized:
        print("\n| model | batch | torch maps/s | onnx fp32 maps/s | fp32 / torch | onnx int8 maps/s | "
              "int8 / torch |")
        print("|---|---|---|---|---|---|---|")
        for r in sized:
            for b, v in sorted({r.get("batch", 256): {"torch": r["bare_torch"], "onnx": r["bare_onnx"],
                                                      "int8": r["bare_int8"]}, **r["batches"]}.items()):
                print(f"| {r['model']} | {b} | {v['torch']:.0f} | {v['onnx']:.0f} | "
                      f"{v['onnx'] / v['torch']:.2f}x | {v['int8']:.0f} | {v['int8'] / v['torch']:.2f}x |")
    staged = [r for r in rows if "stages" in r]
    if staged:
        print("\n| model | read s | prepare s | infer + score s | format + write CSV s | sum s |")
        print("|---|---|---|---|---|---|")
        for r in staged:
            st = r["stages"]
            print(f"| {r['model']} | {st['read']:.2f} | {st['prepare']:.2f} | {st['infer']:.2f} | "
                  f"{st['write']:.2f} | {sum(st.values()):.2f} |")


def agreement(folder: Path, models: list[str], rows: list[dict]) -> None:
    """Print the held-out check in the int8 exports of trained runs ``folder/MODEL`` (what
    ``waferlab export --quantize int8`` measured on each run's test part) next to the int8 speed."""
    from waferlab.deploy.export import export_name, open_session

    speed = {r["model"]: r for r in rows}
    print("\n| model (trained run) | calibrated on | held-out maps | top-1 agreement | max abs prob diff | "
          "macro-F1 fp32 | macro-F1 int8 | unknown-score Spearman | unknown-flag agreement | "
          "defect-flag agreement | defect recall fp32 / int8 | int8 bare vs torch | int8 e2e maps/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in models:
        path = folder / model / "exports" / export_name("int8")
        if not path.is_file():
            print(f"| {model} | (no {path}) |" + " |" * 11)
            continue
        c = open_session(path, optimize=False)[1]
        k, r = c.quantization_check or {}, speed.get(model, {})
        rate = (f"{r['bare_int8'] / r['bare_torch']:.2f}x | {r['e2e_int8']:.0f}" if r else "- | -")
        print(f"| {model} | {c.calibration_source} | {k.get('maps')} | {k.get('top1_agreement', 0):.4f} | "
              f"{k.get('max_abs_prob_diff', 0):.4f} | {k.get('macro_f1_fp32', 0):.4f} | "
              f"{k.get('macro_f1_int8', 0):.4f} | {k.get('unknown_score_spearman', 0):.4f} | "
              f"{k.get('unknown_flag_agreement', 0):.4f} | {k.get('defect_flag_agreement', 0):.4f} | "
              f"{_num(k, 'defect_recall_fp32')} / {_num(k, 'defect_recall_int8')} | {rate} |")


def _num(check: dict, key: str) -> str:
    return f"{check[key]:.4f}" if check.get(key) is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet34,cbam,spanet")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=2000, help="maps of the throughput file (0: skip)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("WAFERLAB_THREADS", "2")))
    parser.add_argument("--stages", action="store_true", help="also time each predict stage alone")
    parser.add_argument("--batches", default="", help="other batch sizes for the bare rates, e.g. 16,64")
    parser.add_argument("--agreement", default=None, metavar="DIR",
                        help="trained runs DIR/MODEL exported with --quantize int8: print their held-out "
                             "check")
    parser.add_argument("--scale", default="", help="comma-separated row counts for the memory/scale runs")
    parser.add_argument("--scale-model", default="spanet")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batches.split(",") if b]
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="waferlab_predict_bench_") as tmp:
        if args.n:
            rows = throughput(args, Path(tmp))
            print_throughput(rows)
        if args.agreement:
            agreement(Path(args.agreement), args.models.split(","), rows if args.n else [])
        if args.scale:
            rows = scale(args, Path(tmp))
            print("\n| maps | model | px | file MB | wall s | maps/s | peak RSS GB |")
            print("|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['maps']} | {r['model']} | {r['size']} | {r['file_mb']} | {r['wall_s']} | "
                      f"{r['maps_per_s']} | {r['peak_rss_gb']} |")


if __name__ == "__main__":
    main()
