"""Evaluation metrics for wafer-map classifiers: one dict that every report, run and comparison reads.

Headline metrics are macro-F1 and balanced accuracy, not accuracy: on WM-811K a constant "none"
predictor already scores 85-93 % accuracy. ``defect_vs_none_recall`` tracks the dominant real-world
failure (a defect waved through as "none"); ``ece`` and ``nll`` track calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from waferlab.errors import WaferlabError

#: Probability rows whose sum is further than this from 1 are renormalised (and counted).
SUM_TOLERANCE = 1e-3
#: Probabilities are clipped to at least this before the log in the NLL, so a zero never gives inf.
NLL_EPS = 1e-12


def _to_numpy(x: Any) -> Any:
    """Torch tensors (on any device) become numpy arrays; anything else is left to ``np.asarray``."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return x


def _as_labels(y_true: Any, class_names: Sequence[str]) -> np.ndarray:
    """Turn integer indices or class-name strings into an int64 index array, validating the range."""
    y = np.asarray(_to_numpy(y_true))
    if y.ndim != 1:
        raise WaferlabError(f"y_true must be 1-D (one label per map), got shape {tuple(y.shape)}")
    if y.size and (y.dtype.kind in "OUS"):
        lookup = {name: i for i, name in enumerate(class_names)}
        bad = sorted({str(v) for v in y.tolist() if v not in lookup})
        if bad:
            raise WaferlabError(
                f"y_true has labels not in class_names: {', '.join(bad[:5])}"
                f" (classes: {', '.join(class_names)})"
            )
        return np.fromiter((lookup[v] for v in y.tolist()), dtype=np.int64, count=y.size)
    if y.size and y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise WaferlabError("y_true must hold integer class indices, got non-integer values")
    elif y.size and y.dtype.kind not in "iub":
        raise WaferlabError(f"y_true must hold class indices or class names, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= len(class_names):
            bad = lo if lo < 0 else hi
            hint = " (-1 marks unlabeled maps: evaluate labeled maps only)" if bad == -1 else ""
            raise WaferlabError(
                f"y_true has class index {bad} outside 0..{len(class_names) - 1}{hint}"
            )
    return y


def _as_probs(probs: Any, n: int, num_classes: int) -> tuple[np.ndarray, int]:
    """Validate an (N, C) probability array; renormalise rows that do not sum to 1.

    Returns the float64 probabilities and how many rows were renormalised. Negative, non-finite
    or all-zero rows are an error: they mean logits or garbage were passed, not probabilities.
    """
    p = np.asarray(_to_numpy(probs), dtype=np.float64)
    if p.ndim != 2:
        raise WaferlabError(f"probs must be 2-D (maps x classes), got shape {tuple(p.shape)}")
    if p.shape[0] != n:
        raise WaferlabError(f"probs has {p.shape[0]} rows but y_true has {n} labels")
    if p.shape[1] != num_classes:
        raise WaferlabError(f"probs has {p.shape[1]} columns but there are {num_classes} class names")
    if not np.all(np.isfinite(p)):
        row = int(np.argwhere(~np.isfinite(p))[0, 0])
        raise WaferlabError(f"probs has a non-finite value (NaN or inf) in row {row}")
    if np.any(p < 0):
        row = int(np.argwhere(p < 0)[0, 0])
        raise WaferlabError(
            f"probs has a negative value in row {row}: pass softmax probabilities, not logits"
        )
    sums = p.sum(axis=1)
    if np.any(sums <= 0):
        raise WaferlabError(f"probs row {int(np.argmax(sums <= 0))} is all zeros")
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    return p / sums[:, None], int(off.sum())  # dividing also removes float round-off


def _nan_to_none(value: float) -> float | None:
    """JSON has no NaN: undefined values are reported as ``None`` (``null``)."""
    return None if value is None or not np.isfinite(value) else float(value)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> list[dict[str, Any]]:
    """Equal-width reliability bins on the top-class confidence (for a reliability table/diagram).

    Bin ``i`` holds confidences in ``[i/n_bins, (i+1)/n_bins)``; a confidence of exactly 1.0 is
    put in the top bin. Empty bins are listed with ``count`` 0 and ``None`` averages.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    out = []
    for i in range(n_bins):
        sel = idx == i
        count = int(sel.sum())
        out.append({
            "lo": float(edges[i]),
            "hi": float(edges[i + 1]),
            "count": count,
            "confidence": float(confidence[sel].mean()) if count else None,
            "accuracy": float(correct[sel].mean()) if count else None,
        })
    return out


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    none_class: str = "none",
    n_bins: int = 15,
) -> dict[str, Any]:
    """Compute every evaluation metric of a classifier from true labels and predicted probabilities.

    ``y_true`` holds class indices into ``class_names`` (or the names themselves); ``probs`` is
    (N, C) softmax output, the prediction being its arg-max. Rows not summing to 1 (beyond
    ``SUM_TOLERANCE``) are renormalised and counted in ``renormalized_rows``; negative or
    non-finite values raise :class:`WaferlabError`, as do N = 0 and labels out of range.

    Undefined values are explicit, never silently zero. Per-class counts (tp, fp, fn) and the
    confusion matrix come from torchmetrics with ``average="none"`` and no ``ignore_index`` (every
    label counts); the ratios are taken here in float64 with these 0/0 rules:

    * a class absent from ``y_true`` (support 0) has ``recall`` and ``f1`` = ``None`` (JSON
      ``null``) and ``precision`` = 0.0 if it was predicted (all false alarms) else ``None``;
    * a present class that is never predicted has ``precision`` 0.0 (``zero_division=0``);
    * ``macro_*`` and ``balanced_accuracy`` average over the classes PRESENT in ``y_true`` only
      (torchmetrics' own macro average would count an absent class as 0); ``weighted_f1``
      weights by support, so absent classes weigh nothing.

    With ``none_class`` among the classes it adds ``defect_vs_none_recall`` (share of true defect
    maps NOT predicted as none), ``none_precision`` (share of maps predicted none that are none)
    and ``false_alarm_rate`` (share of true none maps predicted as a defect); each is ``None``
    when its denominator is 0. ``ece`` is torchmetrics' top-label L1 calibration error with
    ``n_bins`` equal-width bins on the max probability; ``nll`` is the mean of -log p(true class)
    with p clipped at ``NLL_EPS``.
    """
    import torch
    from torchmetrics.functional.classification import (
        multiclass_calibration_error,
        multiclass_confusion_matrix,
        multiclass_stat_scores,
    )

    class_names = _checked_classes(class_names, n_bins)
    num_classes = len(class_names)
    y = _as_labels(y_true, class_names)
    n = int(y.size)
    if n == 0:
        raise WaferlabError("no maps to evaluate (N = 0): the evaluation split is empty")
    p, renormalized = _as_probs(probs, n, num_classes)

    # torchmetrics' multiclass metrics need at least 2 classes: pad a never-used class for C = 1.
    tm_classes = max(num_classes, 2)
    p_tm = p if num_classes >= 2 else np.concatenate([p, np.zeros((n, 1))], axis=1)
    target = torch.from_numpy(y)
    pred_idx = torch.from_numpy(p.argmax(axis=1))
    kw: dict[str, Any] = {"num_classes": tm_classes, "ignore_index": None}
    # Integer counts from torchmetrics; the ratios are taken below in float64 with explicit 0/0 rules.
    stats = multiclass_stat_scores(pred_idx, target, average="none", **kw).numpy()[:num_classes]
    tp, fp, fn = (stats[:, j].astype(np.float64) for j in (0, 1, 3))
    cm = multiclass_confusion_matrix(pred_idx, target, **kw).numpy().astype(np.int64)
    cm = cm[:num_classes, :num_classes]
    ece = float(multiclass_calibration_error(torch.from_numpy(p_tm), target, n_bins=int(n_bins),
                                             norm="l1", **kw))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)  # zero_division = 0
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)  # undefined for an absent class
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    accuracy = float(tp.sum() / n)

    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    present = support > 0
    per_class = _per_class(class_names, precision, recall, f1, support, predicted)
    with np.errstate(invalid="ignore", divide="ignore"):
        cm_norm = cm / support[:, None]
    cm_norm_list = [[_nan_to_none(v) for v in row] for row in cm_norm.tolist()]

    true_p = np.clip(p[np.arange(n), y], NLL_EPS, None)
    nll = float(-np.mean(np.log(true_p)))
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)

    out: dict[str, Any] = {
        "n": n,
        "class_names": class_names,
        "accuracy": accuracy,
        "balanced_accuracy": float(recall[present].mean()),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "weighted_f1": float(np.sum(f1[present] * support[present]) / support.sum()),
        "classes_absent": [c for c, k in zip(class_names, present) if not k],
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": cm_norm_list,
        "ece": ece,
        "n_bins": int(n_bins),
        "nll": nll,
        "mean_confidence": float(confidence.mean()),
        "calibration_bins": calibration_bins(confidence, correct, int(n_bins)),
        "renormalized_rows": renormalized,
    }
    if none_class in class_names:
        out.update(_none_vs_defect(cm, class_names.index(none_class)))
    return out


def _checked_classes(class_names: Sequence[str], n_bins: int) -> list[str]:
    """The class names as strings, refusing an empty or duplicated list and a bad bin count."""
    names = [str(c) for c in class_names]
    if not names:
        raise WaferlabError("class_names is empty: cannot compute metrics without classes")
    if len(set(names)) != len(names):
        raise WaferlabError(f"class_names has duplicates: {', '.join(names)}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise WaferlabError(f"n_bins must be a positive integer, got {n_bins!r}")
    return names


def _per_class(names: list[str], precision: np.ndarray, recall: np.ndarray, f1: np.ndarray,
               support: np.ndarray, predicted: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per-class precision, recall, F1 and support; a class absent from the labels has None ratios."""
    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        if support[i] > 0:
            entry = {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i])}
        else:
            entry = {"precision": 0.0 if predicted[i] > 0 else None, "recall": None, "f1": None}
        entry["support"] = int(support[i])
        per_class[name] = entry
    return per_class


def _none_vs_defect(cm: np.ndarray, k: int) -> dict[str, float | None]:
    """Defect-vs-none recall, none precision and false-alarm rate from the confusion matrix (none = k)."""
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    defect = np.arange(len(cm)) != k
    true_defect, pred_none, true_none = int(support[defect].sum()), int(predicted[k]), int(support[k])
    caught = int(cm[defect][:, defect].sum())  # true defect, predicted any defect class
    return {"defect_vs_none_recall": caught / true_defect if true_defect else None,
            "none_precision": int(cm[k, k]) / pred_none if pred_none else None,
            "false_alarm_rate": int(cm[k, defect].sum()) / true_none if true_none else None}


def top_confusions(metrics: dict[str, Any], k: int = 5) -> list[tuple[str, str, int, float]]:
    """The ``k`` largest off-diagonal cells as (true, predicted, count, share of the true class)."""
    names = metrics["class_names"]
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    support = cm.sum(axis=1)
    cells = [
        (names[i], names[j], int(cm[i, j]), float(cm[i, j] / support[i]))
        for i in range(len(names))
        for j in range(len(names))
        if i != j and cm[i, j] > 0
    ]
    cells.sort(key=lambda c: (-c[2], -c[3], c[0], c[1]))
    return cells[:k]


# ------------------------------------------------------------------------------------------ multi-label
#: Default decision threshold on each label's sigmoid probability.
MULTILABEL_THRESHOLD = 0.5
#: The metrics a multi-label report leads with, in display order.
MULTILABEL_HEADLINE_KEYS = (
    "exact_match", "mAP", "macro_f1", "macro_precision", "macro_recall", "micro_f1", "hamming_loss",
)


def _as_multi_hot(y_true: Any, label_names: Sequence[str]) -> np.ndarray:
    """Validate (N, K) multi-hot truth (0/1, K = number of label names) and return it as int64."""
    y = np.asarray(_to_numpy(y_true))
    if y.ndim != 2 or y.shape[1] != len(label_names):
        raise WaferlabError(f"y_true must be (maps x {len(label_names)} labels) multi-hot rows, "
                            f"got shape {tuple(y.shape)}")
    if y.dtype.kind not in "biuf" or not np.all(np.isin(y, (0, 1))):
        raise WaferlabError("y_true must hold multi-hot rows of 0 and 1")
    return y.astype(np.int64)


def _as_label_probs(probs: Any, n: int, k: int) -> np.ndarray:
    """Validate (N, K) independent per-label probabilities in [0, 1] (sigmoid outputs, not logits)."""
    p = np.asarray(_to_numpy(probs), dtype=np.float64)
    if p.shape != (n, k):
        raise WaferlabError(f"probs must have shape ({n}, {k}) like y_true, got {tuple(p.shape)}")
    if not np.all(np.isfinite(p)):
        row = int(np.argwhere(~np.isfinite(p))[0, 0])
        raise WaferlabError(f"probs has a non-finite value (NaN or inf) in row {row}")
    if np.any((p < 0) | (p > 1)):
        row = int(np.argwhere((p < 0) | (p > 1))[0, 0])
        raise WaferlabError(f"probs has a value outside [0, 1] in row {row}: pass sigmoid probabilities, "
                            "not logits")
    return p


def _per_label(names: list[str], precision: np.ndarray, recall: np.ndarray, f1: np.ndarray, ap: np.ndarray,
               support: np.ndarray, predicted: np.ndarray) -> dict[str, dict[str, Any]]:
    """The per-class entries plus each label's average precision (None when absent) and predicted count."""
    out = _per_class(names, precision, recall, f1, support, predicted)
    for j, name in enumerate(names):
        out[name]["ap"] = float(ap[j]) if support[j] > 0 else None
        out[name]["predicted"] = int(predicted[j])
    return out


def _label_thresholds(threshold: Any, names: list[str]) -> np.ndarray:
    """One threshold per label from a number, a sequence (label order) or a {label: threshold} dict."""
    if isinstance(threshold, dict):
        missing = [n for n in names if n not in threshold]
        if missing:
            raise WaferlabError(f"thresholds: no threshold for label(s) {', '.join(missing)}")
        threshold = [threshold[n] for n in names]
    values = [threshold] * len(names) if np.ndim(threshold) == 0 else list(threshold)
    if len(values) != len(names):
        raise WaferlabError(f"thresholds: expected {len(names)} (one per label), got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float | np.floating) or not 0 < v < 1:
            raise WaferlabError(f"threshold must be a number in (0, 1), got {v!r}")
    return np.asarray(values, dtype=np.float64)


def fit_label_thresholds(y_true_multi_hot: Any, probs: Any, label_names: Sequence[str]) -> dict[str, float]:
    """Per-label decision thresholds maximising each label's F1 on labelled (validation) maps.

    One shared 0.5 suits no label when the labels' score scales differ (a rare label's sigmoid rarely
    reaches 0.5), so exact match collapses although mAP is high. Each threshold is the midpoint below the
    best-F1 score (ties: the one nearest 0.5); a label without positives keeps 0.5.
    """
    names = [str(c) for c in label_names]
    y = _as_multi_hot(y_true_multi_hot, names)
    p = _as_label_probs(probs, len(y), len(names))
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        pos = int(y[:, j].sum())
        cand = np.unique(p[:, j])[::-1]  # descending: "predict when >= cand[i]"
        if pos == 0 or len(cand) == 0:
            out[name] = MULTILABEL_THRESHOLD
            continue
        order = np.argsort(-p[:, j], kind="stable")
        tp = np.cumsum(y[order, j])
        # for each candidate, the count of maps scoring >= it
        k = np.searchsorted(-p[order, j], -cand, side="right")
        f1 = 2 * tp[k - 1] / (k + pos)
        below = np.append(cand[1:], 0.0)
        mids = (cand + below) / 2
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        t = float(mids[best[np.argmin(np.abs(mids[best] - MULTILABEL_THRESHOLD))]])
        out[name] = float(np.clip(t, 1e-6, 1 - 1e-6))
    return out


def compute_multilabel_metrics(
    y_true_multi_hot: Any,
    probs: Any,
    label_names: Sequence[str],
    threshold: float | Sequence[float] | dict[str, float] = MULTILABEL_THRESHOLD,
) -> dict[str, Any]:
    """Every metric of a multi-label classifier (e.g. MixedWM38's 8 defect types) from multi-hot truth and
    per-label sigmoid probabilities; a label is predicted when its probability is >= ``threshold`` (one
    number, or one per label: a sequence in label order or a {label: threshold} dict, e.g. a run's fitted
    ``label_thresholds.json``).

    * ``exact_match``: share of maps whose whole predicted label set equals the true set (subset
      accuracy; a map with no defect counts only when nothing is predicted), also per number of true
      labels in ``exact_match_by_cardinality``; ``hamming_loss``: share of wrong label decisions.
    * ``per_label``: precision, recall, F1 at the threshold, ``ap`` (average precision: area under the
      label's precision-recall curve over all thresholds, torchmetrics = scikit-learn's definition),
      ``support`` (maps with the label) and ``predicted``. A label absent from ``y_true`` has recall,
      F1 and AP ``None`` and precision 0.0 if it was predicted, else ``None`` (as in
      :func:`compute_metrics`); a present, never-predicted label has precision 0.0.
    * ``mAP`` and ``macro_*`` average over the labels PRESENT in ``y_true`` (absent ones are listed in
      ``labels_absent``); ``micro_*`` pool every label decision.
    """
    import torch
    from torchmetrics.functional.classification import multilabel_average_precision, multilabel_stat_scores

    names = [str(c) for c in label_names]
    k = len(names)
    if k == 0 or len(set(names)) != k:
        raise WaferlabError(f"label_names must be distinct and non-empty, got {names}")
    thresholds = _label_thresholds(threshold, names)
    y = _as_multi_hot(y_true_multi_hot, names)
    n = len(y)
    if n == 0:
        raise WaferlabError("no maps to evaluate (N = 0): the evaluation split is empty")
    p = _as_label_probs(probs, n, k)
    pred = (p >= thresholds[None, :]).astype(np.int64)
    pt, yt = torch.from_numpy(p), torch.from_numpy(y)
    # integer counts (tp, fp, tn, fn, support) from torchmetrics; ratios below in float64 with explicit 0/0
    stats = multilabel_stat_scores(torch.from_numpy(pred), yt, num_labels=k, threshold=0.5, average=None,
                                   ignore_index=None).numpy().reshape(k, 5).astype(np.float64)
    tp, fp, fn = stats[:, 0], stats[:, 1], stats[:, 3]
    support = y.sum(axis=0)
    present = support > 0
    import warnings

    with warnings.catch_warnings():  # an absent label's AP is undefined: set to None below, not warned
        warnings.filterwarnings("ignore", message=".*No positive samples.*")
        ap = multilabel_average_precision(pt, yt, num_labels=k, average=None, thresholds=None).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(present, tp / np.maximum(tp + fn, 1), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    per_label = _per_label(names, precision, recall, f1, ap, support, pred.sum(axis=0))
    for name, t in zip(names, thresholds.tolist()):
        per_label[name]["threshold"] = t
    uniform = bool(np.all(thresholds == thresholds[0]))
    exact = (pred == y).all(axis=1)
    cardinality = y.sum(axis=1)
    by_card = {str(c): {"n": int((cardinality == c).sum()),
                        "exact_match": float(exact[cardinality == c].mean())}
               for c in np.unique(cardinality).tolist()}
    s_tp, s_fp, s_fn = tp.sum(), fp.sum(), fn.sum()
    macro = present.any()
    return {
        "task": "multilabel",
        "n": n,
        "label_names": names,
        "threshold": float(thresholds[0]) if uniform else "per-label",
        "exact_match": float(exact.mean()),
        "exact_match_by_cardinality": by_card,
        "hamming_loss": float((pred != y).mean()),
        "mAP": float(ap[present].mean()) if macro else None,
        "macro_precision": float(precision[present].mean()) if macro else None,
        "macro_recall": float(recall[present].mean()) if macro else None,
        "macro_f1": float(f1[present].mean()) if macro else None,
        "micro_precision": float(s_tp / (s_tp + s_fp)) if s_tp + s_fp > 0 else 0.0,
        "micro_recall": float(s_tp / (s_tp + s_fn)) if s_tp + s_fn > 0 else None,
        "micro_f1": float(2 * s_tp / (2 * s_tp + s_fp + s_fn)) if s_tp + s_fp + s_fn > 0 else None,
        "labels_absent": [c for c, ok in zip(names, present) if not ok],
        "label_cardinality": float(cardinality.mean()),
        "predicted_cardinality": float(pred.sum(axis=1).mean()),
        "per_label": per_label,
    }


def multilabel_summary(metrics: dict[str, Any]) -> str:
    """One line of a multi-label result for the terminal: exact match, mAP, macro-F1, n."""
    def num(key: str) -> str:
        value = metrics.get(key)
        return "—" if value is None else f"{value:.4f}"

    return (f"exact match {num('exact_match')}  mAP {num('mAP')}  macro-F1 {num('macro_f1')}  "
            f"(n={metrics['n']})")
