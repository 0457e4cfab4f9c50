"""Model zoo benchmark: parameters, MACs, training images/s and inference maps/s per backend at 64 px.

Inference backends (eval mode, ``torch.inference_mode``, batch ``--batch``, 3 channels, 9 classes):

* ``eager``: the model as built (NCHW);
* ``channels_last``: model and input in channels_last memory format;
* ``compile``: ``torch.compile`` (inductor); its compile time is printed apart. Not in the default list:
  on a 2-core CPU it compiles for minutes per model;
* ``onnx``: ONNX export (opset 17) run by ONNX Runtime's CPU provider with every graph optimisation
  (it folds BatchNorm into convs and uses its blocked NCHWc layout).

When ``spanet`` is benchmarked, ``spanet+fused`` is added: ``waferlab.models.spanet.fuse_for_inference``
(BatchNorm folded, no Pad/Slice ops, the code SA in closed form, head as Linear layers). Training
throughput is forward + backward + SGD step in eager mode.

Noise: the CPU is shared, so each (model, backend) is timed ``--repeats`` times, the rounds interleaved
across models and backends, and the median maps/s is reported with the min-max range; the SP&A-Net /
ResNet34 ratios divide medians. Each thread count in ``--threads`` (default 1) is a separate table.

Threads on a shared CPU: with OpenMP's default active waiting, two torch threads on an oversubscribed
2-core machine ran SP&A-Net 7x slower than with passive waiting (every one of its ~300 small ops ends in a
thread rendezvous, and a spinning thread burns the time slice the other one needs). This script therefore
sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it) and turns ONNX Runtime's spinning off;
export ``OMP_WAIT_POLICY=ACTIVE`` to measure the default behaviour.

    python benchmarks/model_zoo.py                        # spanet (+fused) vs resnet34, 1 thread, ~2 minutes
    python benchmarks/model_zoo.py --threads 1,2 --models all --backends eager,onnx
    python benchmarks/model_zoo.py --backends eager,channels_last,compile,onnx --json zoo.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP: before the import

import argparse  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from waferlab.io import write_json  # noqa: E402
from waferlab.models import create_model, list_models, model_spec  # noqa: E402
from waferlab.models.profile import count_macs, count_params  # noqa: E402

PASSIVE = os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"

BACKENDS = ("eager", "channels_last", "compile", "onnx")
DEFAULT_BACKENDS = ("eager", "channels_last", "onnx")
FUSED = "spanet+fused"


def build(name: str) -> torch.nn.Module:
    """The model ``name`` (9 classes, 3 channels) in eval mode; ``spanet+fused`` is the fused SP&A-Net."""
    if name == FUSED:
        from waferlab.models.spanet import fuse_for_inference

        return fuse_for_inference(create_model("spanet", num_classes=9).eval())
    return create_model(name, num_classes=9, in_chans=3).eval()


def onnx_runner(model: torch.nn.Module, x: torch.Tensor, threads: int) -> Callable[[], object]:
    """An ONNX Runtime CPU session of ``model`` exported at ``x``'s shape; returns a zero-argument runner."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():  # shape-dependent Python branches are constants at a fixed export size
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if PASSIVE:  # ONNX Runtime's own thread pool: no spinning either
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def inference_runner(model: torch.nn.Module, backend: str, x: torch.Tensor,
                     threads: int) -> tuple[Callable[[], object], float]:
    """(runner, setup seconds) for one backend; setup includes export or compilation and one warm call."""
    start = time.perf_counter()
    if backend == "onnx":
        run = onnx_runner(model, x, threads)
    elif backend == "channels_last":
        net = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        run = lambda: net(xc)  # noqa: E731
    elif backend == "compile":
        net = torch.compile(copy.deepcopy(model))
        run = lambda: net(x)  # noqa: E731
    else:
        run = lambda: model(x)  # noqa: E731
    with torch.inference_mode():
        run()
    return run, time.perf_counter() - start


def train_step_runner(name: str, batch: int, size: int) -> Callable[[], None]:
    """One eager training step (forward + backward + SGD) of a fresh ``name`` on random data."""
    model = create_model(name, num_classes=9, in_chans=3).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 9, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(fn: Callable[[], object], inference: bool) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    if inference:
        with torch.inference_mode():
            fn()
    else:
        fn()
    return time.perf_counter() - start


def measure(names: list[str], backends: list[str], threads: int, args: argparse.Namespace) -> list[dict]:
    """One row per model at ``threads`` threads: params, MACs, train img/s and maps/s per backend."""
    torch.set_num_threads(threads)
    x = torch.rand(args.batch, 3, args.size, args.size)
    rows, jobs = [], []  # jobs: (row, key, runner, is_inference)
    for name in tqdm(names, desc=f"setup ({threads} thr)", unit="model"):
        model = build(name)
        source = "spanet" if name == FUSED else name
        row = {"name": name, "family": model_spec(source).family, "params": count_params(build(source)),
               "macs": count_macs(model, args.size), "setup_s": {}, "samples": {}}
        if name != FUSED and not args.no_train:
            step = train_step_runner(name, args.batch, args.size)
            step()
            jobs.append((row, "train", step, False))
        for backend in backends:
            run, setup = inference_runner(model, backend, x, threads)
            row["setup_s"][backend] = round(setup, 1)
            jobs.append((row, backend, run, True))
        rows.append(row)
    for _ in tqdm(range(args.repeats), desc=f"rounds ({threads} thr)", unit="round"):
        for row, key, fn, inference in jobs:
            row["samples"].setdefault(key, []).append(args.batch / timed(fn, inference))
    for row in rows:
        row["median"] = {k: statistics.median(v) for k, v in row["samples"].items()}
    return rows


def print_table(rows: list[dict], backends: list[str], threads: int, args: argparse.Namespace) -> None:
    """The per-model table and the SP&A-Net / ResNet34 ratio per backend."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{args.size} px, batch {args.batch}, {threads} thread(s), OMP_WAIT_POLICY="
          f"{os.environ['OMP_WAIT_POLICY']}, load average {load:.1f}; median maps/s (min-max) over rounds")
    cols = ["train"] + backends
    print(f"{'model':<22}{'params M':>9}{'MACs M':>8}" + "".join(f"{c:>22}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            s = r["samples"].get(c)
            cells.append(f"{r['median'][c]:>8.1f} ({min(s):.0f}-{max(s):.0f})" if s else "-")
        head = f"{r['name']:<22}{r['params'] / 1e6:>9.3f}{r['macs'] / 1e6:>8.1f}"
        print(head + "".join(f"{c:>22}" for c in cells))
    by = {r["name"]: r["median"] for r in rows}
    if "resnet34" in by and ("spanet" in by or FUSED in by):
        spa = [by[n] for n in ("spanet", FUSED) if n in by]
        ratio = {b: max(s.get(b, 0) for s in spa) / by["resnet34"][b] for b in backends}
        best = max(max(s.get(b, 0) for b in backends) for s in spa) / max(by["resnet34"][b] for b in backends)
        print("SP&A-Net / ResNet34 inference ratio: " + ", ".join(f"{b} {v:.1f}x" for b, v in ratio.items())
              + f"; best vs best {best:.1f}x")
    for r in rows:
        if "compile" in r["setup_s"]:
            print(f"compile time {r['name']}: {r['setup_s']['compile']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="spanet,resnet34",
                        help="comma-separated names, or 'all' for every registered model")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help=f"comma-separated subset of {','.join(BACKENDS)} (default: without compile)")
    parser.add_argument("--threads", default="1", help="comma-separated torch/ORT thread counts (default 1)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per model and backend")
    parser.add_argument("--no-train", action="store_true", help="skip the training-throughput column")
    parser.add_argument("--json", default=None, help="also write every sample to this JSON file")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    names = list_models() if args.models == "all" else args.models.split(",")
    for name in names:
        model_spec(name)  # a clear error for an unknown name before any work
    if "spanet" in names:
        names.insert(names.index("spanet") + 1, FUSED)
    torch.manual_seed(0)
    results = {}
    for threads in (int(t) for t in args.threads.split(",")):
        rows = measure(names, backends, threads, args)
        print_table(rows, backends, threads, args)
        results[str(threads)] = rows
    if args.json:
        write_json(args.json, {"batch": args.batch, "size": args.size, "backends": backends,
                               "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "torch": torch.__version__,
                               "results": results})
        print(json.dumps({"written": args.json}))


if __name__ == "__main__":
    main()
