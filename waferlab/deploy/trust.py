"""Trustworthy outputs of a run, fitted on labelled held-out maps (the validation part at the end of training,
or ``waferlab calibrate RUN --data SRC``) and stored in the run:

* ``calibration.json``: temperature scaling (one T minimising the NLL), ECE/NLL before and after;
* ``thresholds.json``: the operating point, a threshold on P(none) so that defect-vs-none recall reaches the
  target (SP&A-Net's rule: > 99 %), with the false-alarm rate it costs; and the unknown-pattern threshold at
  95 % in-distribution recall;
* ``ood.json`` + ``ood.safetensors``: the unknown-pattern score's method, settings and statistics (feature
  statistics from the training part when given, else from the labelled maps);
* ``trust.md`` + ``calibration.png``: the report, with reliability diagrams before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from waferlab.deploy.ood import DEFAULT_METHOD, FitData, OODScorer, fit_scorer
from waferlab.engine.predict import softmax
from waferlab.errors import WaferlabError

if TYPE_CHECKING:
    from waferlab.engine.predict import Prediction
    from waferlab.engine.run import Run

NONE_CLASS = "none"
TRUST_FILES = ("calibration.json", "thresholds.json", "ood.json")
OOD_ARRAYS = "ood.safetensors"  # only for a score with feature statistics


@dataclass
class TrustOptions:
    """Targets of the fit: defect-vs-none recall of the operating point, in-distribution recall of the
    unknown-pattern threshold, and the unknown-pattern method."""

    defect_recall: float = 0.99
    id_recall: float = 0.95
    ood_method: str = DEFAULT_METHOD
    source: str = "validation part"

    def __post_init__(self) -> None:
        for name in ("defect_recall", "id_recall"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise WaferlabError(f"--{name.replace('_', '-')} must lie in (0, 1], got {value}")


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (bounded 1-D search on log T)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, np.float64)
    idx = np.arange(len(labels))

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        m = s.max(axis=1)
        return float(np.mean(m + np.log(np.exp(s - m[:, None]).sum(axis=1)) - s[idx, labels]))

    res = minimize_scalar(nll, bounds=(np.log(0.02), np.log(50.0)), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))


def operating_point(p_none: np.ndarray, is_defect: np.ndarray, target: float) -> dict[str, Any]:
    """Threshold t on P(none): a map is flagged as a defect when P(none) < t; the smallest t whose
    defect-vs-none recall is >= ``target``, with the false-alarm rate (true none flagged) it costs."""
    d = np.sort(p_none[is_defect])
    if len(d) == 0:
        return {"none_threshold": None, "note": "no defect maps to fit on"}
    k = int(np.ceil(target * len(d))) - 1  # the k-th smallest P(none) of a defect must still be caught
    t = float(np.nextafter(np.float32(d[k]), np.float32(np.inf)))
    flagged = p_none < t
    none = ~is_defect
    return {"none_threshold": t, "defect_recall_target": target,
            "defect_recall": float(flagged[is_defect].mean()),
            "false_alarm_rate": float(flagged[none].mean()) if none.any() else None,
            "n_defect": int(is_defect.sum()), "n_none": int(none.sum())}


def fit_trust(run: Run, val: Prediction, val_labels: np.ndarray, options: TrustOptions | None = None,
              train: FitData | None = None, val_maps: np.ndarray | None = None) -> dict[str, Any]:
    """Fit calibration, operating point and unknown-pattern threshold on labelled maps; write them to ``run``.

    ``val`` comes from :func:`waferlab.engine.predict.predict` with ``features=True`` (needed by the
    feature scores); ``val_labels`` are class ids in the run's class order; ``train`` (optional: logits,
    labels, features, maps of training maps) is what the feature statistics are fitted on; ``val_maps``
    (the maps at the run's size) are needed by the scores that read the maps (``ood.MAP_METHODS``).
    Returns the summary.
    """
    from waferlab.engine.metrics import compute_metrics

    opts = options or TrustOptions()
    y = np.asarray(val_labels, dtype=np.int64)
    names = run.spec().class_names
    if len(y) == 0 or len(y) != len(val.logits):
        raise WaferlabError(f"{run.path}: no labelled maps to calibrate on ({len(y)} labels, "
                            f"{len(val.logits)} predictions)")
    temperature = fit_temperature(val.logits, y)
    probs = softmax(val.logits / temperature)
    before = compute_metrics(y, softmax(val.logits), names)
    after = compute_metrics(y, probs, names)
    scorer, scores = fit_scorer(opts.ood_method, FitData(val.logits, y, val.features, val_maps),
                                 temperature, train)
    ood_t = float(np.quantile(scores, opts.id_recall, method="higher"))
    calibration = {"method": "temperature scaling", "temperature": temperature, "fitted_on": opts.source,
                   "n": int(len(y)), "ece_before": before["ece"], "ece_after": after["ece"],
                   "nll_before": before["nll"], "nll_after": after["nll"],
                   "bins_before": before["calibration_bins"], "bins_after": after["calibration_bins"]}
    thresholds: dict[str, Any] = {"fitted_on": opts.source, "n": int(len(y))}
    if NONE_CLASS in names:
        thresholds.update(operating_point(probs[:, names.index(NONE_CLASS)], y != names.index(NONE_CLASS),
                                          opts.defect_recall))
    else:
        thresholds.update({"none_threshold": None, "note": f"the run has no {NONE_CLASS!r} class"})
    thresholds.update({"ood_method": scorer.method, "ood_threshold": ood_t,
                       "id_recall_target": opts.id_recall, "id_recall": float((scores <= ood_t).mean())})
    run.write_json("calibration.json", calibration)
    run.write_json("thresholds.json", thresholds)
    write_scorer(run, scorer)
    write_trust_report(run, calibration, thresholds)
    return {"calibration": calibration, "thresholds": thresholds}


@dataclass
class Trust:
    """What predict needs from a run: temperature, operating point, unknown-pattern scorer and threshold."""

    temperature: float
    none_threshold: float | None
    ood_threshold: float
    scorer: OODScorer
    fingerprint: str = ""


def load_trust(run: Run) -> Trust:
    """The fitted trust files of ``run``; a missing one is a one-line error naming ``waferlab calibrate``."""
    for name in TRUST_FILES:
        if not run.has(name):
            raise WaferlabError(f"{run.file(name)}: missing (the run has no fitted calibration/thresholds); "
                                f"run 'waferlab calibrate {run.path} --data LABELLED_SRC' first")
    t = run.temperature()
    th = run.read_json("thresholds.json")
    scorer = read_scorer(run)
    try:
        none_t = None if th.get("none_threshold") is None else float(th["none_threshold"])
        return Trust(t, none_t, float(th["ood_threshold"]), scorer, run_fingerprint(run))
    except (KeyError, TypeError, ValueError) as exc:
        raise WaferlabError(f"{run.file('thresholds.json')}: field {exc}: missing or not a number") from None


def write_scorer(run: Run, scorer: OODScorer) -> None:
    """ood.json (settings) and, for a feature score, ood.safetensors (its arrays), atomically; a stale
    arrays file of an earlier logit-only fit is removed."""
    from safetensors.numpy import save_file

    from waferlab.io import atomic_path

    if scorer.arrays:
        with atomic_path(run.file(OOD_ARRAYS)) as tmp:
            save_file({k: np.ascontiguousarray(v, np.float32) for k, v in scorer.arrays.items()}, str(tmp))
    elif run.has(OOD_ARRAYS):
        run.file(OOD_ARRAYS).unlink()
    run.write_json("ood.json", scorer.to_json())


def read_scorer(run: Run) -> OODScorer:
    """The fitted unknown-pattern scorer of ``run`` (ood.json + ood.safetensors when it has arrays)."""
    where = str(run.file("ood.json"))
    obj = run.read_json("ood.json")
    arrays = None
    if isinstance(obj, dict) and obj.get("arrays"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = run.file(OOD_ARRAYS)
        try:
            arrays = load_file(str(path))
        except FileNotFoundError:
            raise WaferlabError(f"{path}: missing (ood.json names its arrays); run 'waferlab calibrate "
                                f"{run.path} --data LABELLED_SRC' again") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise WaferlabError(f"{path}: unreadable unknown-pattern statistics ({exc})") from None
    if not isinstance(obj, dict):
        raise WaferlabError(f"{where}: expected a JSON object")
    return OODScorer.from_json(obj, where, arrays)


def run_fingerprint(run: Run) -> str:
    """SHA-256 (16 hex) of the weights and the trust files: an export records it, predict compares it."""
    import hashlib

    h = hashlib.sha256()
    for name in ("model.safetensors", *TRUST_FILES, OOD_ARRAYS):
        if run.has(name):
            h.update(name.encode())
            h.update(run.file(name).read_bytes())
    return h.hexdigest()[:16]


def write_trust_report(run: Run, calibration: dict[str, Any], th: dict[str, Any]) -> None:
    """trust.md and calibration.png (reliability before | after temperature scaling)."""
    from waferlab.io import write_text

    _plot_before_after(calibration, run.file("calibration.png"))
    fa = th.get("false_alarm_rate")
    lines = [f"# Trust: calibration, operating point, unknown patterns ({run.path.name})", "",
             f"Fitted on {calibration['n']} labelled maps ({calibration['fitted_on']}).", "",
             "| | before | after |", "|---|---|---|",
             f"| ECE (15 bins) | {calibration['ece_before']:.4f} | {calibration['ece_after']:.4f} |",
             f"| NLL | {calibration['nll_before']:.4f} | {calibration['nll_after']:.4f} |", "",
             f"Temperature T = {calibration['temperature']:.4f}.", "", "![reliability](calibration.png)", ""]
    if th.get("none_threshold") is not None:
        lines += [f"Operating point: a map is flagged as a defect when P(none) < {th['none_threshold']:.6g}; "
                  f"defect-vs-none recall {th['defect_recall']:.4f} (target {th['defect_recall_target']}), "
                  f"false-alarm rate " + (f"{fa:.4f}" if fa is not None else "n/a (no none maps)")
                  + f" ({th['n_defect']} defect, {th['n_none']} none maps).", ""]
    else:
        lines += [f"Operating point: none ({th.get('note', '')}).", ""]
    lines += [f"Unknown patterns: {th['ood_method']} score > {th['ood_threshold']:.6g} flags a map as unlike "
              f"every trained class (in-distribution recall {th['id_recall']:.4f}, target "
              f"{th['id_recall_target']}).", ""]
    write_text(run.file("trust.md"), "\n".join(lines))


def _plot_before_after(cal: dict[str, Any], path: Any) -> None:
    from waferlab.plotting import save_figure, use_agg

    use_agg()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), dpi=100, sharey=True)
    titles = ("before", f"T = {cal['temperature']:.3f}")
    for ax, key, title in zip(axes, ("before", "after"), titles):
        bins = [b for b in cal[f"bins_{key}"] if b["count"]]
        lo = np.array([b["lo"] for b in bins])
        w = np.array([b["hi"] - b["lo"] for b in bins])
        ax.plot([0, 1], [0, 1], ls="--", color="#888888", lw=1)
        ax.bar(lo, [b["accuracy"] for b in bins], width=w, align="edge", color="#5b8fd6", edgecolor="#2d4f80",
               label="accuracy")
        ax.bar(lo, [b["confidence"] for b in bins], width=w, align="edge", fill=False, edgecolor="#e0402e",
               label="confidence")
        ax.set_title(f"{title}: ECE {cal[f'ece_{key}']:.4f}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def calibrate_run(run_dir: str, data: str, options: TrustOptions | None = None, batch_size: int = 256,
                  device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``waferlab calibrate``: fit the trust files of a run on a user's labelled held-out data."""
    from dataclasses import replace
    from pathlib import Path

    from waferlab.engine.evaluate import labelled_maps
    from waferlab.engine.predict import PredictOptions, predict
    from waferlab.engine.run import Run

    run = Run.open(run_dir)
    if run.info.task == "multilabel":
        raise WaferlabError(f"{run_dir}: a multilabel run has no trust files to fit (its per-label "
                            "thresholds come from training); 'waferlab calibrate' takes single-label runs")
    spec = run.spec()
    data_ = labelled_maps(run.info, data, "calibrate on", progress)
    pred = predict(run.load_model(), data_.maps, spec,
                   PredictOptions(device=device, batch_size=batch_size, progress=progress, features=True))
    opts = replace(options or TrustOptions(), source=f"{Path(data).name} ({len(data_.labels)} labelled maps)")
    return fit_trust(run, pred, data_.labels, opts, val_maps=data_.maps)
