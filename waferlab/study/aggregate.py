"""Collect a study's runs (one row each) and aggregate them per group across seeds.

Per-map test predictions, inference speed, parameters and MACs are computed here through the run-directory
API (``Run``) and the one prediction function, on the run's own test part, on one device for all runs;
they are cached in ``STUDY/predictions/<cell>.npz``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from waferlab.errors import WaferlabError
from waferlab.study.spec import SEED_AXIS, Cell, StudySpec
from waferlab.study.stats import t_interval

#: Headline metrics of the study (metrics.json key, label), in table order.
METRICS = (
    ("macro_f1", "macro-F1"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced acc."),
    ("defect_vs_none_recall", "defect recall"),
    ("ece", "ECE"),
)
#: The range of every metric column (recalls, F1s, accuracies, ECE): their intervals are clipped to it.
RATE_BOUNDS = (0.0, 1.0)
#: Further metrics kept in runs.csv / summary.csv (the sweep table's macro precision and recall).
EXTRA_METRICS = ("macro_precision", "macro_recall")
#: Cost columns (runs.csv key, label).
COSTS = (
    ("params", "parameters"),
    ("macs", "MACs"),
    ("train_seconds", "train time"),
    ("maps_per_s", "maps/s"),
)
#: Warm-up maps predicted before the timed pass (excluded from maps/s).
WARMUP_MAPS = 64


@dataclass
class RunRecord:
    """One cell of the study: status, and for a finished run its metrics, curves, predictions and costs."""

    cell: Cell
    run_dir: Path
    status: str  # finished, failed, pending (not started or killed), running
    error: str | None = None
    metrics: dict[str, Any] | None = None
    curves: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float | None = None
    cpu_seconds: float | None = None  # the training subprocess's CPU time (comparable on a shared machine)
    class_names: tuple[str, ...] = ()
    pred: dict[str, Any] | None = None  # y_true, y_pred, test_index, maps_per_s, params, macs, device
    note: str | None = None

    @property
    def finished(self) -> bool:
        return self.status == "finished" and self.metrics is not None


def collect(study: Path, spec: StudySpec, cells_state: dict[str, Any]) -> list[RunRecord]:
    """A record per cell of the spec, from its run directory and the study's ``cells.json``."""
    from waferlab.engine.run import Run

    records = []
    for cell in spec.cells():
        run = Run(study / "runs" / cell.name)
        state = cells_state.get(cell.name, {})
        rec = RunRecord(cell, run.path, "pending", train_seconds=state.get("train_seconds"),
                        cpu_seconds=state.get("cpu_seconds"))
        if run.path.is_dir() and run.is_finished():
            rec.status = "finished"
            rec.metrics = run.read_metrics()
            rec.curves = run.read_curves()
            rec.class_names = tuple(run.class_names)
            if rec.train_seconds is None and run.has("timing.json"):
                timing = run.read_json("timing.json")
                rec.train_seconds = timing.get("train_seconds", timing.get("training_seconds"))
        elif state.get("status") == "failed":
            rec.status, rec.error = "failed", state.get("error")
        elif run.path.is_dir():
            rec.status = "unfinished"
        records.append(rec)
    return records


def _split_key(config: dict[str, Any]) -> tuple:
    keys = ("data", "resize", "class_set", "split", "fractions", "seed", "max_maps", "balance_targets")
    return tuple(repr(config.get(k)) for k in keys)


def add_predictions(
    records: list[RunRecord], study: Path, data: str | None, device: str | None = None, progress: bool = True
) -> None:
    """Per-map predictions on each finished run's test part (cached), maps/s, parameters and MACs."""
    from waferlab.engine.predict import resolve_device
    from waferlab.engine.run import Run

    dev = str(resolve_device(device))
    todo = []
    for rec in records:
        if not rec.finished:
            continue
        cached = _read_cache(study, rec, dev)
        if cached is not None:
            rec.pred = cached
        else:
            todo.append((rec, Run.open(rec.run_dir).info.config))
    todo.sort(key=lambda t: _split_key(t[1]))
    current: tuple[tuple, Any] | None = None
    for rec, config in todo:
        key = _split_key(config)
        if current is None or current[0] != key:
            current = (None, None)  # free the previous split before loading the next
            try:
                current = (key, _load_test_part(config, data))
            except WaferlabError as exc:
                current = (key, exc)
        if isinstance(current[1], WaferlabError):
            rec.note = f"no per-map predictions: {current[1]}"
            continue
        if progress:
            print(f"waferlab study: predicting the test part with {rec.cell.name} on {dev}", file=sys.stderr)
        rec.pred = _predict_run(rec, current[1], dev)
        _write_cache(study, rec)


def _load_test_part(
    config: dict[str, Any], fallback_data: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(maps, labels, row indexes) of a run's test part, re-derived from its config (seeded split)."""
    from waferlab.engine.config import config_from_dict, missing_data
    from waferlab.engine.datamodule import load_split_data

    values = {**config, "progress": False}
    missing = missing_data(values, required=True)
    if missing is not None and missing[0] == "data" and fallback_data:  # --data stands in for data only
        values["data"] = fallback_data
        missing = missing_data(values, required=True)
    if missing is not None:
        raise WaferlabError("the run's config has no 'data'" if missing[1] is None
                            else f"the run's {missing[0]} {str(missing[1])!r} is not here")
    split = load_split_data(config_from_dict(values, "config.yaml"))
    rows = split.test if len(split.test) else split.val
    if not len(rows):
        raise WaferlabError("the run's split has no test or validation part")
    return split.data.maps[rows], np.asarray(split.data.labels[rows], dtype=np.int64), np.asarray(rows)


def _predict_run(rec: RunRecord, part: tuple[np.ndarray, np.ndarray, np.ndarray], dev: str) -> dict[str, Any]:
    from waferlab.engine.predict import PredictOptions, predict
    from waferlab.engine.run import Run
    from waferlab.models.profile import count_macs, count_params

    maps, labels, rows = part
    run = Run.open(rec.run_dir)
    info, spec = run.info, run.spec()
    model = run.load_model(dev)
    opts = PredictOptions(device=dev, batch_size=256)
    predict(model, maps[:WARMUP_MAPS], spec, opts)  # warm-up: allocator, kernels, caches
    if dev.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    start = time.perf_counter()
    out = predict(model, maps, spec, opts)
    seconds = time.perf_counter() - start
    return {
        "y_true": labels,
        "y_pred": out.probs.argmax(1).astype(np.int64),
        "test_index": rows,
        "maps_per_s": len(maps) / max(seconds, 1e-9),
        "device": dev,
        "params": count_params(model),
        "macs": count_macs(model, info.image_size, info.in_chans),
        "stamp": _stamp(rec.run_dir),
    }


def _stamp(run_dir: Path) -> str:
    return str((run_dir / "model.safetensors").stat().st_mtime_ns)


def _read_cache(study: Path, rec: RunRecord, dev: str) -> dict[str, Any] | None:
    path = study / "predictions" / f"{rec.cell.name}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            doc = {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None
    if str(doc.get("stamp")) != _stamp(rec.run_dir) or str(doc.get("device")) != dev:
        return None
    for key in ("maps_per_s",):
        doc[key] = float(doc[key])
    for key in ("params", "macs"):
        doc[key] = int(doc[key])
    doc["device"] = str(doc["device"])
    return doc


def _write_cache(study: Path, rec: RunRecord) -> None:
    from waferlab.io import atomic_path

    path = study / "predictions" / f"{rec.cell.name}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in (rec.pred or {}).items()})


def runs_frame(records: list[RunRecord], spec: StudySpec):  # -> pandas.DataFrame
    """One row per cell: axis labels, status/error, headline metrics, per-class recall and F1, costs."""
    import pandas as pd

    rows = []
    for rec in records:
        row: dict[str, Any] = {"cell": rec.cell.name, "group": rec.cell.group}
        row.update({axis: label for axis, label in rec.cell.labels})
        row.update({"seed": rec.cell.seed, "status": rec.status, "error": rec.error})
        m = rec.metrics or {}
        row["n_test"] = m.get("n")
        for key in [k for k, _ in METRICS] + list(EXTRA_METRICS):
            row[key] = m.get(key)
        for name in m.get("class_names", []):
            per = m["per_class"][name]
            row[f"recall[{name}]"] = per.get("recall")
            row[f"f1[{name}]"] = per.get("f1")
        pred = rec.pred or {}
        row.update(
            {
                "params": pred.get("params"),
                "macs": pred.get("macs"),
                "train_seconds": rec.train_seconds if rec.finished else None,
                "train_cpu_seconds": rec.cpu_seconds if rec.finished else None,
                "maps_per_s": pred.get("maps_per_s"),
                "run_dir": str(rec.run_dir),
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def summary_frame(runs, spec: StudySpec):  # -> pandas.DataFrame
    """One row per group: the seeds it has, mean/std/95% t-interval of every metric, mean costs."""
    import pandas as pd

    done = runs[runs["status"] == "finished"]
    axes = [a for a in spec.axes if a != SEED_AXIS]
    kept = set(dict(METRICS)) | set(EXTRA_METRICS)
    value_cols = [c for c in done.columns if c in kept or c.startswith(("recall[", "f1["))]
    rows = []
    for group in dict.fromkeys(runs["group"]):
        part = done[done["group"] == group]
        row: dict[str, Any] = {"group": group}
        first = runs[runs["group"] == group].iloc[0]
        row.update({a: first[a] for a in axes})
        row["n_seeds"] = len(part)
        row["seeds"] = " ".join(str(s) for s in part["seed"])
        for col in value_cols:
            vals = [float(v) for v in part[col] if v is not None and pd.notna(v)]
            iv = t_interval(vals, bounds=RATE_BOUNDS)  # every metric column is a rate in [0, 1]
            row.update(
                {
                    f"{col}_mean": iv.mean if iv.n else None,
                    f"{col}_std": iv.std,
                    f"{col}_ci_lo": iv.lo,
                    f"{col}_ci_hi": iv.hi,
                }
            )
        for col, _ in COSTS:
            vals = [float(v) for v in part[col] if v is not None and pd.notna(v)]
            row[col] = float(np.mean(vals)) if vals else None
        rows.append(row)
    return pd.DataFrame(rows)
