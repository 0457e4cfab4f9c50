"""``evaluate_run``: a run's metrics on any labelled data, labels matched to the run's classes by name."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from waferlab.errors import WaferlabError


def map_labels(data_classes: tuple[str, ...], labels: np.ndarray, run_classes: tuple[str, ...],
               where: str) -> tuple[np.ndarray, np.ndarray]:
    """Data label ids -> run label ids by class NAME; returns (kept row indices, run ids).

    Unlabeled rows (-1) are dropped; a label the run does not know is a one-line error listing them.
    """
    run_id = {name: i for i, name in enumerate(run_classes)}
    present = np.unique(labels[labels >= 0])
    unknown = sorted(data_classes[i] for i in present if data_classes[i] not in run_id)
    if unknown:
        raise WaferlabError(f"{where}: labels the run does not know: {', '.join(unknown)} "
                            f"(the run's classes: {', '.join(run_classes)})")
    keep = np.flatnonzero(labels >= 0)
    lut = np.array([run_id.get(name, -1) for name in data_classes], dtype=np.int64)
    return keep, lut[labels[keep]]


def map_multi_hot(data_names: tuple[str, ...], multi_hot: np.ndarray, run_names: tuple[str, ...],
                  where: str) -> np.ndarray:
    """The data's multi-hot columns reordered to a multilabel run's labels, matched by NAME.

    A run label the data lacks, or a data label with maps that the run does not know, is a one-line error.
    """
    missing = [n for n in run_names if n not in data_names]
    if missing:
        raise WaferlabError(f"{where}: the data has no label column for {', '.join(missing)} "
                            f"(its labels: {', '.join(data_names)})")
    col = {n: j for j, n in enumerate(data_names)}
    unknown = [n for n in data_names if n not in run_names and multi_hot[:, col[n]].any()]
    if unknown:
        raise WaferlabError(f"{where}: labels the run does not know: {', '.join(unknown)} "
                            f"(the run's labels: {', '.join(run_names)})")
    return np.asarray(multi_hot, dtype=np.int64)[:, [col[n] for n in run_names]]


@dataclass(frozen=True)
class LabelledMaps:
    """A data file's labelled maps prepared at a run's size, with labels as the run's class ids."""

    maps: Any  # the prepared maps of the labelled rows (indexable by the prediction path)
    labels: np.ndarray  # run class ids (single-label) or multi-hot rows in the run's label order
    n_dropped: int  # unlabeled rows left out


def labelled_maps(info: Any, data: str | Path, purpose: str, progress: bool = False) -> LabelledMaps:
    """Every labelled map of ``data`` at the run's size and resize rule, labels matched by NAME to the run's
    classes (``info``: a ``Run.info``); ``purpose`` ("evaluate", "calibrate on") words the no-label error."""
    from waferlab.data.cache import load_prepared

    # a missing file is the readers' one-line error ("F: no such file or directory")
    p = load_prepared(data, info.image_size, progress=progress, resize=info.resize)
    if info.task == "multilabel":  # every map is labelled: an all-zero row is a map without defect
        keep = np.arange(len(p))
        hot = p.require_multi_hot(str(data), "a multilabel run")
        y = map_multi_hot(tuple(p.multi_label_names), hot, info.class_names, str(data))
    else:
        keep, y = map_labels(tuple(p.class_names), p.labels, info.class_names, str(data))
    if len(keep) == 0:
        raise WaferlabError(f"{data}: no labelled maps to {purpose}")
    return LabelledMaps(maps=p.maps[keep], labels=y, n_dropped=len(p) - len(keep))


def evaluate_run(run_dir: str | Path, data: str | Path, out: str | Path, batch_size: int = 256,
                 device: str | None = None, progress: bool = True, tta: bool = False) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` on every labelled map of ``data``; metrics/report go to ``out``
    (``tta``: the prediction path's test-time augmentation)."""
    from waferlab.engine.metrics import compute_metrics, compute_multilabel_metrics
    from waferlab.engine.predict import PredictOptions, predict_probs
    from waferlab.engine.report import write_evaluation
    from waferlab.engine.run import Run

    run = Run.open(run_dir)
    info = run.info
    data_ = labelled_maps(info, data, "evaluate", progress)
    y, multilabel = data_.labels, info.task == "multilabel"
    if data_.n_dropped:
        print(f"waferlab: note: {data_.n_dropped} unlabeled map(s) in {data} dropped", file=sys.stderr)
    opts = PredictOptions(device=device, batch_size=batch_size, progress=progress, tta=tta)
    probs = predict_probs(run.load_model(), data_.maps, run.spec(), opts)
    if multilabel:
        metrics = compute_multilabel_metrics(y, probs, info.class_names, threshold=run.label_thresholds())
    else:
        metrics = compute_metrics(y, probs, info.class_names)
    metrics["run_dir"] = str(run_dir)
    metrics["data"] = str(data)
    cfg = info.config
    card = {"run": str(run_dir), "model": info.model_name, "data": str(data), "n_maps": int(len(y)),
            "n_unlabeled_dropped": int(data_.n_dropped), "trained_on": cfg.get("data"),
            "image_size": info.image_size, "resize": info.resize, "encoding": info.encoding,
            "seed": cfg.get("seed"), "tta": tta,
            **({"task": info.task} if multilabel else {"class_set": cfg.get("class_set")})}
    write_evaluation(metrics, out, f"{info.model_name} evaluated on {Path(data).name}", card)
    return metrics
