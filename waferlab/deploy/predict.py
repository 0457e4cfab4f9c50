"""``waferlab predict``: a run (or an exported ONNX file) over any wafer-map source, streamed in chunks.

The source is read once (a pickle must be loaded whole, but an LSWMD pickle's maps stay packed, 2 bits a
die, see :mod:`waferlab.data.lean`); each chunk of maps is then prepared (shrunk to the run's size with
the run's resize rule), inferred, scored and written, so memory beyond the raw table stays flat. Three stages
overlap: a reader thread prepares the next chunks (and, for a ``knn+wafer`` score on a GPU, computes their
maps' wafer descriptors) and a writer thread formats and writes the previous ones while the main thread infers
(numpy, torch and the file writes release the GIL for most of their work).
Output: one row per map (.csv, .parquet or .jsonl, written atomically), optionally a self-contained HTML
gallery. With several devices one worker process per device infers chunks while the parent reads, prepares
and writes in order.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from waferlab.data.cache import LEGACY_RESIZE
from waferlab.errors import WaferlabError

OUTPUT_FORMATS: dict[str, str] = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}
#: torch: the run directory; onnx: the exported file with onnxruntime; openvino: the same file compiled by
#: OpenVINO's CPU plugin (optional: ``pip install 'waferlab[openvino]'``; faster on Intel CPUs, see README).
BACKENDS = ("torch", "onnx", "openvino")
ONNX_BACKENDS = ("onnx", "openvino")
#: Calibrated top probability below which a map counts as low-confidence (gallery, summary).
LOW_CONFIDENCE = 0.5
#: Chunks a background stage may run ahead of (or behind) inference: bounds the memory of the overlap.
PIPELINE_DEPTH = 2
#: Output columns in order (identity, prediction, top 3, operating point, unknown pattern, truth).
COLUMNS = ("row", "lot", "wafer", "pred_class", "prob", "top2_class", "top2_prob", "top3_class", "top3_prob",
           "p_none", "defect", "unknown_score", "unknown", "true_label")


@dataclass
class PredictJob:
    """One ``predict`` call: run (directory or .onnx), source, output file and how to run it."""

    run: str
    data: str
    out: str
    backend: str | None = None  # None: onnx for an .onnx file, torch for a run directory
    gallery: str | None = None
    batch_size: int = 256
    chunk_size: int = 4096
    devices: int | None = None  # None: every CUDA device (torch backend), else 1
    device: str | None = None  # torch device for one process ("cpu", "cuda:0"); None = auto
    progress: bool = True
    tta: bool = False  # test-time augmentation (torch backend only: the exported graph sees one view)
    autocast: str = "auto"  # the torch backend's precision (engine.predict.AUTOCAST_POLICIES)


@dataclass
class Chunk:
    """Prepared maps of consecutive source rows with their identity and true labels."""

    rows: np.ndarray
    maps: np.ndarray
    lot: np.ndarray
    wafer: np.ndarray
    labels: np.ndarray  # class names, "" where unlabelled
    descriptors: np.ndarray | None = None  # the maps' wafer descriptors, when the unknown-pattern score reads
    # them (knn+wafer): computed by the reader thread (:func:`with_descriptors`), overlapping inference


# ------------------------------------------------------------------------------------------------ checks
def output_format(path: str | Path) -> str:
    """csv / parquet / jsonl from the file's extension; another extension is a one-line error."""
    import importlib.util

    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise WaferlabError(f"{path}: unsupported output extension {Path(path).suffix or '(none)'!r}; "
                            f"use one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise WaferlabError(f"{path}: writing .parquet needs pyarrow (pip install 'waferlab[parquet]'); "
                            f"or write .csv / .jsonl")
    return fmt


def check_writable(path: str | Path) -> None:
    """Fail early (one line, nothing created) when ``path`` cannot be written."""
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise WaferlabError(f"{path}: cannot write the output: it is a directory")
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise WaferlabError(f"{path}: cannot write the output: {anc} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".waferlab-check-", dir=anc)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise WaferlabError(f"{path}: cannot write the output ({exc.strerror or exc})") from None


# ------------------------------------------------------------------------------------------------ backends
@dataclass(frozen=True)
class BackendSpec:
    """How a (worker) process opens the model: picklable, so it can travel to a spawned process."""

    run: str
    backend: str
    device: str | None
    batch_size: int
    threads: int | None = None
    tta: bool = False
    autocast: str = "auto"


class TorchBackend:
    """The run's model through the engine's one prediction function, plus the unknown-pattern scorer."""

    def __init__(self, spec: BackendSpec) -> None:
        from waferlab.deploy.export import Contract
        from waferlab.deploy.trust import load_trust
        from waferlab.engine.run import Run

        run = Run.open(spec.run)
        self.trust = load_trust(run)
        self.contract = Contract.of(run.spec(), self.trust, run.info.model_name)
        self.model = run.load_model("cpu")
        self.spec = spec

    def infer(self, maps: np.ndarray, descriptors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated probs, unknown scores) of ``maps``; ``descriptors``: their wafer descriptors computed
        ahead (:func:`with_descriptors`), else the scorer computes what it needs here."""
        from waferlab.engine.predict import PredictOptions, input_maps, predict

        opts = PredictOptions(device=self.spec.device, batch_size=self.spec.batch_size,
                              temperature=self.trust.temperature, features=self.trust.scorer.needs_features,
                              tta=self.spec.tta, autocast=self.spec.autocast)
        pred = predict(self.model, maps, self.contract.spec, opts)
        seen = (input_maps(maps, self.contract.spec) if self.trust.scorer.needs_maps and descriptors is None
                else None)
        return pred.probs, self.trust.scorer.score(pred.logits, pred.features, seen, descriptors)


class OnnxBackend:
    """An exported file run by onnxruntime (the contract comes from the file's metadata)."""

    def __init__(self, spec: BackendSpec, session: Any = None) -> None:
        from waferlab.deploy.export import open_session, read_contract

        path = onnx_path(spec.run)
        self.session = session or open_session(path, spec.threads)[0]
        self.contract = read_contract(path, self.session)
        self.spec = spec

    def infer(self, maps: np.ndarray, descriptors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`TorchBackend.infer`."""
        from waferlab.deploy.export import run_session

        _, probs, ood = run_session(self.session, maps, self.spec.batch_size, self.contract, descriptors)
        return probs, ood


class OpenVinoBackend:
    """An exported file compiled by OpenVINO for the CPU, in full float32 precision (its default on CPUs
    with AMX/AVX512-BF16 would be bfloat16, beyond the parity tolerance)."""

    def __init__(self, spec: BackendSpec) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise WaferlabError("--backend openvino needs the openvino package (pip install "
                                "'waferlab[openvino]'); or use --backend onnx") from None
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if spec.threads:
            config["INFERENCE_NUM_THREADS"] = spec.threads
        from waferlab.deploy.export import contract_of_file

        path = onnx_path(spec.run)
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.outputs = (self.compiled.output("probs"), self.compiled.output("ood_score"))
        self.contract = contract_of_file(path)
        self.spec = spec

    def infer(self, maps: np.ndarray, descriptors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`TorchBackend.infer`."""
        probs, ood = [], []
        for start in range(0, len(maps), self.spec.batch_size):
            res = self.compiled({"maps": np.ascontiguousarray(maps[start:start + self.spec.batch_size])})
            probs.append(res[self.outputs[0]])
            ood.append(res[self.outputs[1]])
        if not probs:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
        from waferlab.deploy.export import finish_ood

        return np.concatenate(probs), finish_ood(self.contract, maps, np.concatenate(ood), descriptors)


def onnx_path(run: str | Path) -> Path:
    """The ONNX file of ``run``: the path itself when it is a file, else ``RUN/exports/model.onnx``."""
    from waferlab.deploy.export import export_name

    p = Path(run)
    return p if p.suffix.lower() == ".onnx" else p / "exports" / export_name()


def open_backend(spec: BackendSpec, session: Any = None) -> TorchBackend | OnnxBackend | OpenVinoBackend:
    """The model of ``spec``; an ONNX ``session`` already opened (by :func:`resolve_backend`) is reused."""
    if spec.backend == "openvino":
        return OpenVinoBackend(spec)
    return OnnxBackend(spec, session) if spec.backend == "onnx" else TorchBackend(spec)


def resolve_backend(job: PredictJob) -> tuple[str, Any, Any]:
    """(backend, contract, ONNX session or None) after every check on the run/ONNX file, before any data is
    read; the session is reused by a single-process predict (opening one costs seconds)."""
    from waferlab.deploy.export import Contract, open_session
    from waferlab.deploy.trust import load_trust
    from waferlab.engine.run import Run

    is_file = Path(job.run).suffix.lower() == ".onnx"
    backend = job.backend or ("onnx" if is_file else "torch")
    if backend not in BACKENDS:
        raise WaferlabError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if job.tta and backend != "torch":
        raise WaferlabError(f"--tta: test-time augmentation runs with --backend torch on the run directory "
                            f"(the exported graph sees one view of each map), not --backend {backend}")
    if job.autocast == "bf16" and backend != "torch":
        raise WaferlabError(f"--autocast bf16: the torch backend's precision; --backend {backend} runs the "
                            f"exported float32 graph")
    if is_file:
        if backend not in ONNX_BACKENDS:
            raise WaferlabError(f"{job.run}: an ONNX file runs with --backend onnx or openvino (the torch "
                                f"backend needs the run directory)")
        session, contract = open_session(job.run, _process_threads(), optimize=backend == "onnx")
        return backend, contract, session if backend == "onnx" else None
    run = Run.open(job.run)
    if run.spec().task == "multilabel":  # before load_trust: its "calibrate first" advice does not apply
        raise WaferlabError(f"{job.run}: a multilabel run; predict serves single-label runs only (no "
                            f"calibration, operating point or unknown-pattern score for multi-hot labels); "
                            f"use 'waferlab evaluate' (it applies the run's label_thresholds.json) or "
                            f"waferlab.engine.predict.predict")
    trust = load_trust(run)
    if backend == "torch":
        return backend, Contract.of(run.spec(), trust, run.info.model_name), None
    path = onnx_path(job.run)
    if not path.is_file():
        raise WaferlabError(f"{path}: missing; run 'waferlab export {job.run} --format onnx' first")
    session, contract = open_session(path, _process_threads(), optimize=backend == "onnx")
    if contract.fingerprint != trust.fingerprint:
        raise WaferlabError(f"{path}: field 'fingerprint': {contract.fingerprint!r} is not this run's "
                            f"({trust.fingerprint!r}): exported from another run or before the run was "
                            f"recalibrated; export it again")
    return backend, contract, session if backend == "onnx" else None


# ------------------------------------------------------------------------------------------------ pipeline
T = TypeVar("T")
_END = object()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first (a consumer that gave up must not block us forever)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def prefetch(items: Iterator[T], depth: int = PIPELINE_DEPTH) -> Iterator[T]:
    """The items of ``items``, produced by a background thread up to ``depth`` ahead (reading and
    preparing the next chunks overlaps inference); an exception there is raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if not _put(q, (item, None), stop):
                    return
            _put(q, (_END, None), stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            _put(q, (_END, exc), stop)

    thread = threading.Thread(target=work, name="waferlab-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


class BackgroundWriter:
    """Runs ``write(item)`` for every submitted item in one background thread, in order; ``close`` waits
    for the rest and re-raises the first error (after which later items are dropped)."""

    def __init__(self, write: Callable[[Any], None], depth: int = PIPELINE_DEPTH) -> None:
        self._write, self._error = write, None
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="waferlab-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._q.get()) is not _END:
            if self._error is None:
                try:
                    self._write(item)
                except BaseException as exc:  # noqa: BLE001 - re-raised by submit/close
                    self._error = exc

    def submit(self, item: Any) -> None:
        if self._error is not None:
            raise self._error
        _put(self._q, item, self._stop)

    def close(self) -> None:
        """Write what is queued, stop the thread; raise the first write error, if any."""
        self._q.put(_END)
        self._thread.join()
        if self._error is not None:
            raise self._error


# ------------------------------------------------------------------------------------------------ reading
def iter_chunks(src: str | Path, size: int, chunk_size: int, progress: bool,
                resize: str = LEGACY_RESIZE) -> tuple[int, Iterator[Chunk]]:
    """(number of maps, chunks of maps shrunk with ``resize``) from any source the readers take, or a
    prepared cache (which must have been prepared with ``resize``)."""
    from waferlab.data.cache import is_cache, load_prepared, prepare, resize_prepared
    from waferlab.data.readers import load_table

    if not Path(src).exists():
        raise WaferlabError(f"{src}: no such file or directory")
    if is_cache(src):
        p = load_prepared(src, None, resize=resize)

        def from_cache() -> Iterator[Chunk]:
            for start in range(0, len(p), chunk_size):
                rows = np.arange(start, min(start + chunk_size, len(p)))
                yield _chunk(rows, resize_prepared(p.subset(rows), size))
        return len(p), from_cache()
    if progress:
        print(f"waferlab: reading {src} ...", file=sys.stderr)
    table = load_table(src, lean=True)  # an LSWMD pickle's maps stay packed until their chunk

    def from_table() -> Iterator[Chunk]:
        for start in range(0, len(table), chunk_size):
            rows = np.arange(start, min(start + chunk_size, len(table)))
            yield _chunk(rows, prepare(table.subset(rows), size, resize=resize))
    return len(table), from_table()


def with_descriptors(chunks: Iterator[Chunk], contract: Any) -> Iterator[Chunk]:
    """The chunks (their maps at the contract's size: what the network sees) with the maps' wafer
    descriptors when the contract's unknown-pattern score reads them (``knn+wafer``), computed as the chunks
    are drawn, so in the reader thread of :func:`prefetch` (overlapping inference; numpy only, no torch op
    beside the inference's OpenMP threads); else the chunks as they are."""
    if contract.wafer_part is None:
        return chunks
    from waferlab.deploy.descriptors import wafer_descriptors

    return (replace(c, descriptors=wafer_descriptors(c.maps)) for c in chunks)


def descriptors_ahead(job: PredictJob, backend: str, session: Any = None) -> bool:
    """Whether the reader thread computes the chunks' wafer descriptors (:func:`with_descriptors`): when
    the network runs on a GPU, which they then overlap. On the CPU the inference's threads hold every core
    and a busy thread beside their OpenMP barriers slowed a chunk several-fold (SP&A-Net, 2 threads: 77 s
    instead of 9 s for 4,096 maps, README "Deploy"), so the backend computes them between its forwards."""
    if backend == "torch":
        from waferlab.engine.predict import resolve_device

        return resolve_device(job.device).type == "cuda"
    return backend == "onnx" and session is not None and session.get_providers()[0] == "CUDAExecutionProvider"


def _chunk(rows: np.ndarray, p: Any) -> Chunk:
    from waferlab.data.table import UNLABELED

    names = p.label_names()
    names = np.where(names == UNLABELED, "", names).astype(object)
    return Chunk(rows=rows, maps=p.maps, lot=p.lot, wafer=p.wafer_index, labels=names)


# ------------------------------------------------------------------------------------------------ inference
def _worker(spec: BackendSpec, inq: Any, outq: Any) -> None:
    """A worker process: open the model on its device, infer every chunk it is sent until ``None``."""
    try:
        import torch

        if spec.threads:
            torch.set_num_threads(spec.threads)
        backend = open_backend(spec)
        while (item := inq.get()) is not None:
            idx, maps, descriptors = item
            outq.put((idx, *backend.infer(maps, descriptors)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        outq.put((-1, f"{type(exc).__name__}: {exc}", None))


def _worker_specs(job: PredictJob, backend: str, n: int) -> list[BackendSpec]:
    import torch

    cuda = backend == "torch" and torch.cuda.is_available() and job.device in (None, "cuda")
    threads = max(1, (os.cpu_count() or 1) // n)
    return [BackendSpec(job.run, backend, f"cuda:{i}" if cuda else (job.device or "cpu"), job.batch_size,
                        threads, job.tta, job.autocast) for i in range(n)]


def infer_stream(job: PredictJob, backend: str, chunks: Iterator[Chunk], session: Any = None
                 ) -> Iterator[tuple[Chunk, np.ndarray, np.ndarray]]:
    """(chunk, calibrated probs, unknown scores) in source order, in this process (reusing an open ONNX
    ``session``) or one per device."""
    n = job.devices or _default_devices(backend)
    if n <= 1:
        spec = BackendSpec(job.run, backend, job.device, job.batch_size, _process_threads(), job.tta,
                           job.autocast)
        model = open_backend(spec, session)
        for c in chunks:
            yield (c, *model.infer(c.maps, c.descriptors))
        return
    yield from _parallel(_worker_specs(job, backend, n), chunks)


def _process_threads() -> int:
    """The intra-op threads of this process (torch's setting, which follows OMP_NUM_THREADS), so that
    onnxruntime and OpenVINO use as many as torch would rather than every core."""
    import torch

    return torch.get_num_threads()


def _default_devices(backend: str) -> int:
    import torch

    return torch.cuda.device_count() if backend == "torch" and torch.cuda.is_available() else 1


def _parallel(specs: list[BackendSpec], chunks: Iterator[Chunk]) -> Iterator[tuple[Chunk, Any, Any]]:
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    inq, outq = ctx.Queue(maxsize=2 * len(specs)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(s, inq, outq), daemon=True) for s in specs]
    for p in procs:
        p.start()
    pending: dict[int, Chunk] = {}
    done: dict[int, tuple[Any, Any]] = {}
    next_out = 0

    def collect(block: bool) -> None:
        """Move finished results into ``done``: all that are ready, or (block) at least one."""
        while True:
            try:
                idx, a, b = outq.get(timeout=1.0) if block else outq.get_nowait()
            except queue.Empty:
                if not block:
                    return
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError("predict: every worker process died") from None
                continue
            if idx < 0:
                raise RuntimeError(f"predict worker failed: {a}")
            done[idx] = (a, b)
            if block:
                return

    try:
        for i, c in enumerate(chunks):
            pending[i] = c
            while True:
                try:
                    inq.put((i, c.maps, c.descriptors), timeout=1.0)
                    break
                except queue.Full:
                    collect(block=False)
            collect(block=False)
            while next_out in done:
                yield (pending.pop(next_out), *done.pop(next_out))
                next_out += 1
        for _ in procs:
            inq.put(None)
        while pending:
            if next_out not in done:
                collect(block=True)
                continue
            yield (pending.pop(next_out), *done.pop(next_out))
            next_out += 1
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


# ------------------------------------------------------------------------------------------------ writing
def rows_frame(c: Chunk, probs: np.ndarray, ood: np.ndarray, contract: Any) -> Any:
    """One output row per map of the chunk (see :data:`COLUMNS`)."""
    import pandas as pd

    names = np.array(contract.class_names, dtype=object)
    k = probs.shape[1]
    order = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    top = np.take_along_axis(probs, order, axis=1)
    cols: dict[str, Any] = {"row": c.rows.astype(np.int64), "lot": c.lot.astype(str),
                            "wafer": c.wafer.astype(np.int64), "pred_class": names[order[:, 0]],
                            "prob": top[:, 0].astype(np.float32)}
    for j in (1, 2):
        cols[f"top{j + 1}_class"] = names[order[:, j]] if k > j else np.full(len(c.rows), "", object)
        cols[f"top{j + 1}_prob"] = (top[:, j].astype(np.float32) if k > j
                                    else np.zeros(len(c.rows), np.float32))
    flags = map_flags(probs, ood, contract)
    cols["p_none"] = (probs[:, list(contract.class_names).index("none")].astype(np.float32)
                      if "none" in contract.class_names else np.full(len(c.rows), np.nan, np.float32))
    cols["defect"] = flags["defect"]
    cols["unknown_score"] = np.asarray(ood, np.float32)
    cols["unknown"] = flags["unknown"]
    cols["true_label"] = c.labels.astype(str)
    return pd.DataFrame(cols, columns=list(COLUMNS))


class RowWriter:
    """Appends frames to a csv / parquet / jsonl file (the caller makes the whole file atomic)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt, self.n = path, fmt, 0
        self._pq: Any = None
        self._fh = None if fmt == "parquet" else open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115

    def write(self, frame: Any) -> None:
        if self.fmt == "csv":
            frame.to_csv(self._fh, header=self.n == 0, index=False, float_format="%.6g")
        elif self.fmt == "jsonl":
            frame.to_json(self._fh, orient="records", lines=True, double_precision=6)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._pq is None:
                self._pq = pq.ParquetWriter(str(self.path), table.schema)
            self._pq.write_table(table.cast(self._pq.schema))
        self.n += len(frame)

    def close(self, ok: bool = True) -> None:
        """Flush and close; ``ok`` False (an error happened) only releases the file."""
        if self._fh is not None:
            self._fh.close()
        if self.fmt != "parquet":
            return
        if self._pq is not None:
            self._pq.close()
        elif ok:  # no rows at all: still a valid, empty file with the columns
            import pandas as pd

            pd.DataFrame(columns=list(COLUMNS)).to_parquet(self.path, index=False)


def predict_file(job: PredictJob) -> dict[str, Any]:
    """Run ``job``: checks first (nothing written on a bad run/ONNX file/output path), then stream."""
    from tqdm import tqdm

    from waferlab.io import atomic_path

    fmt = output_format(job.out)
    check_writable(job.out)
    gallery = _gallery_for(job)
    backend, contract, session = resolve_backend(job)
    t0 = time.perf_counter()
    total, chunks = iter_chunks(job.data, contract.image_size, job.chunk_size, job.progress, contract.resize)
    summary = {"maps": 0, "unknown": 0, "defect": 0, "low_confidence": 0}
    with atomic_path(job.out) as tmp, tqdm(total=total, desc="predict", unit="map", disable=not job.progress,
                                          smoothing=0.1) as bar:
        writer = RowWriter(tmp, fmt)
        background = BackgroundWriter(lambda item: writer.write(rows_frame(*item, contract)))
        ok = False
        try:
            if descriptors_ahead(job, backend, session):
                chunks = with_descriptors(chunks, contract)
            for c, probs, ood in infer_stream(job, backend, prefetch(chunks), session):
                background.submit((c, probs, ood))
                flags = map_flags(probs, ood, contract)
                if gallery is not None:
                    gallery.offer(c, rows_frame(c, probs, ood, contract))
                summary["maps"] += len(c.rows)
                for key, value in flags.items():
                    summary[key] += int(value.sum())
                bar.update(len(c.rows))
            ok = True
        finally:
            try:
                background.close()
            finally:
                writer.close(ok)
    if gallery is not None:
        gallery.write(job.gallery, model=_cam_model(job, backend), contract=contract)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["quantization"] = contract.quantization
    return summary


def map_flags(probs: np.ndarray, ood: np.ndarray, contract: Any) -> dict[str, np.ndarray]:
    """Per-map flags: ``defect`` at the run's operating point (a run without ``none``, or without a fitted
    threshold, takes every map for a defect), ``unknown`` and ``low_confidence``."""
    names = list(contract.class_names)
    if "none" in names and contract.none_threshold is not None:
        defect = probs[:, names.index("none")] < contract.none_threshold
    else:
        defect = np.ones(len(probs), bool)
    return {"unknown": np.asarray(ood) > contract.ood_threshold, "defect": defect,
            "low_confidence": probs.max(axis=1) < LOW_CONFIDENCE}


def _gallery_for(job: PredictJob) -> Any:
    if not job.gallery:
        return None
    from waferlab.deploy.gallery import GallerySelection

    if Path(job.gallery).suffix.lower() not in (".html", ".htm"):
        raise WaferlabError(f"{job.gallery}: the gallery is an HTML page; give a .html file")
    check_writable(job.gallery)
    return GallerySelection()


def _cam_model(job: PredictJob, backend: str) -> Any:
    """The torch model for GradCAM overlays: from the run directory (an ONNX file alone has none)."""
    if Path(job.run).suffix.lower() == ".onnx":
        return None
    from waferlab.engine.run import Run

    return Run.open(job.run).load_model("cpu")
