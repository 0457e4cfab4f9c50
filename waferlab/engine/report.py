"""Evaluation reports: metrics.json, a Markdown report, confusion-matrix and training-curve figures,
and a Markdown comparison of several runs.

Every file is written atomically (``waferlab.io``), so an interrupted evaluation never leaves a
half-written report next to a complete-looking metrics.json.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from waferlab.errors import WaferlabError
from waferlab.io import write_json, write_text

#: Protocol-card keys shown first, in this order; any other key follows in the order given.
PROTOCOL_ORDER = (
    "model", "weights", "checkpoint", "run", "run_dir", "data", "data_source", "trained_on", "split",
    "fractions", "evaluated_on", "eval_split", "class_set", "image_size", "resize", "encoding", "seed",
    "head", "loss", "epochs", "n_train", "n_val", "n_test", "n_maps",
)
#: Headline rows of the report: (metrics key, label).
HEADLINE_ROWS = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("macro_precision", "Macro precision"),
    ("macro_recall", "Macro recall"),
    ("macro_f1", "Macro F1"),
    ("weighted_f1", "Weighted F1"),
    ("ece", "ECE"),
    ("nll", "NLL"),
    ("defect_vs_none_recall", "Defect-vs-none recall"),
    ("none_precision", "None precision"),
    ("false_alarm_rate", "False-alarm rate (none → defect)"),
)
#: Headline rows of a multi-label report: (metrics key, label).
MULTILABEL_HEADLINE_ROWS = (
    ("exact_match", "Exact-match ratio (whole label set right)"),
    ("mAP", "mAP (macro average precision)"),
    ("macro_f1", "Macro F1"),
    ("macro_precision", "Macro precision"),
    ("macro_recall", "Macro recall"),
    ("micro_f1", "Micro F1"),
    ("hamming_loss", "Hamming loss"),
    ("label_cardinality", "True labels per map"),
    ("predicted_cardinality", "Predicted labels per map"),
)
#: Columns of :func:`compare_runs`: (metrics key, header).
COMPARE_COLUMNS = (
    ("macro_f1", "macro-F1"),
    ("balanced_accuracy", "bal. acc."),
    ("accuracy", "accuracy"),
    ("macro_precision", "macro-P"),
    ("macro_recall", "macro-R"),
    ("ece", "ECE"),
    ("defect_vs_none_recall", "defect-vs-none R"),
)
#: Cells are annotated with their value only up to this many classes.
ANNOTATE_MAX_CLASSES = 12
CURVE_INDEX_COLUMNS = ("epoch", "step")


def _fmt(value: Any, floatfmt: str = ".4f") -> str:
    """One table cell: floats formatted, None/NaN as an em dash, '|' escaped for Markdown."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "—" if not math.isfinite(float(value)) else format(float(value), floatfmt)
    if isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value)
    elif isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Iterable[Sequence[Any]],
    headers: Sequence[str],
    floatfmt: str = ".4f",
    align: Sequence[str] | None = None,
) -> str:
    """A GitHub-flavoured Markdown table; numeric columns right-aligned unless ``align`` ("l"/"r"/"c") says.

    ``None`` and NaN cells show as an em dash, floats use ``floatfmt``, '|' in text is escaped.
    """
    rows = [list(r) for r in rows]
    for i, r in enumerate(rows):
        if len(r) != len(headers):
            raise ValueError(f"row {i} has {len(r)} cells but there are {len(headers)} headers")
    if align is None:
        align = [
            "r" if rows and all(isinstance(r[j], int | float | np.number) or r[j] is None for r in rows)
            and any(r[j] is not None for r in rows) else "l"
            for j in range(len(headers))
        ]
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(_fmt(h) for h in headers) + " |",
        "| " + " | ".join(marks[a] for a in align) + " |",
    ]
    lines += ["| " + " | ".join(_fmt(v, floatfmt) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ordered_protocol(protocol: dict[str, Any]) -> list[tuple[str, Any]]:
    first = [(k, protocol[k]) for k in PROTOCOL_ORDER if k in protocol]
    return first + [(k, v) for k, v in protocol.items() if k not in PROTOCOL_ORDER]


# ----------------------------------------------------------------------------------------- figures


def plot_confusion(
    matrix: Sequence[Sequence[float | None]],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    normalized: bool = False,
    title: str | None = None,
) -> None:
    """Save a confusion-matrix heat map (rows = true class); readable up to 38 classes.

    Counts use a log colour scale (WM-811K is dominated by "none", a linear scale would hide every
    other cell); zero cells are left white. Row-normalised matrices use 0..1; rows of classes
    absent from the evaluation set are grey. Cells carry their value when there are at most
    ``ANNOTATE_MAX_CLASSES`` classes.
    """
    from waferlab.plotting import use_agg

    use_agg()
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize

    from waferlab.plotting import save_figure

    names = [str(c) for c in class_names]
    c = len(names)
    m = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=np.float64)
    if m.shape != (c, c):
        raise WaferlabError(f"confusion matrix has shape {m.shape} but there are {c} class names")
    side = min(max(4.5, 0.32 * c + 2.8), 16.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=110)
    cmap = plt.get_cmap("Blues").with_extremes(bad="#d9d9d9" if normalized else "white")
    if normalized:
        shown = np.ma.masked_invalid(m)
        norm = Normalize(vmin=0.0, vmax=1.0)
    else:
        shown = np.ma.masked_where(~(m > 0), m)
        norm = LogNorm(vmin=1.0, vmax=max(2.0, float(np.nanmax(m)) if np.any(m > 0) else 2.0))
    im = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("share of true class" if normalized else "maps (log scale)")
    if not normalized:
        from matplotlib.ticker import FuncFormatter

        cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    fontsize = 9 if c <= ANNOTATE_MAX_CLASSES else max(5.0, 9 - (c - ANNOTATE_MAX_CLASSES) / 6.5)
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xticklabels(names, rotation=45 if c <= ANNOTATE_MAX_CLASSES else 90,
                       ha="right" if c <= ANNOTATE_MAX_CLASSES else "center", fontsize=fontsize)
    ax.set_yticklabels(names, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    default_title = "Confusion matrix (row-normalised)" if normalized else "Confusion matrix (counts)"
    ax.set_title(title or default_title, fontsize=10)
    if c <= ANNOTATE_MAX_CLASSES:
        for i in range(c):
            for j in range(c):
                v = m[i, j]
                if not math.isfinite(v):
                    text, dark = "n/a", False
                elif normalized:
                    text, dark = f"{v:.2f}", v > 0.5
                else:
                    text = f"{int(v)}"
                    dark = v > 0 and norm(v) > 0.6
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize - 1,
                        color="white" if dark else "#222222")
    fig.tight_layout()
    save_figure(fig, path)


def plot_reliability(
    bins: Sequence[dict[str, Any]], path: str | os.PathLike[str], ece: float | None = None
) -> None:
    """Save a reliability diagram (accuracy vs confidence per bin, bin counts) from ``calibration_bins``."""
    from waferlab.plotting import use_agg

    use_agg()
    import matplotlib.pyplot as plt

    from waferlab.plotting import save_figure

    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5, 6), dpi=110, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    lo = np.array([b["lo"] for b in bins], dtype=float)
    width = np.array([b["hi"] - b["lo"] for b in bins], dtype=float)
    acc = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins], dtype=float)
    conf = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins], dtype=float)
    count = np.array([b["count"] for b in bins], dtype=float)
    ok = count > 0
    ax.plot([0, 1], [0, 1], ls="--", color="#888888", lw=1, label="perfect calibration")
    ax.bar(lo[ok], acc[ok], width=width[ok], align="edge", color="#5b8fd6", edgecolor="#2d4f80",
           alpha=0.85, label="accuracy")
    ax.bar(lo[ok], conf[ok], width=width[ok], align="edge", fill=False, edgecolor="#e0402e", lw=1.2,
           label="mean confidence")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Reliability" + (f" (ECE {ece:.4f})" if ece is not None else ""), fontsize=10)
    axc.bar(lo, count, width=width, align="edge", color="#777777")
    axc.set_yscale("log" if count.max(initial=0) > 100 else "linear")
    axc.set_xlabel("confidence (max probability)")
    axc.set_ylabel("maps")
    axc.set_xlim(0, 1)
    fig.tight_layout()
    save_figure(fig, path)


def _read_curves(csv_path: Path):  # -> pandas.DataFrame
    import pandas as pd

    if not csv_path.is_file():
        raise WaferlabError(f"{csv_path}: training-curve file not found")
    try:
        df = pd.read_csv(csv_path)
    except pd.errors.EmptyDataError as exc:
        raise WaferlabError(f"{csv_path}: file is empty (no header, no rows)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise WaferlabError(f"{csv_path}: not a readable CSV ({str(exc).splitlines()[0]})") from exc
    if df.empty:
        raise WaferlabError(f"{csv_path}: no rows (training logged no epoch yet)")
    for col in df.columns:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    index = next((c for c in CURVE_INDEX_COLUMNS if c in df.columns and df[c].notna().any()), None)
    if index is None:
        df.insert(0, "epoch", np.arange(len(df), dtype=float))
        index = "epoch"
    df = df[df[index].notna()]
    # Loggers (Lightning's CSVLogger) write train and val metrics of one epoch on separate rows.
    return df.groupby(index, sort=True).mean(numeric_only=True), index


def plot_curves(csv_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> None:
    """Plot training curves from the engine's ``curves.csv``: a loss panel and a metric panel.

    Expected columns are epoch, train_loss, val_loss, val_macro_f1, val_accuracy, lr; any may be
    missing or NaN (each series is drawn where it has values). Any other numeric column goes to
    the loss panel if its name contains "loss", else to the metric panel; lr is drawn on a
    log-scale right axis of the loss panel.
    """
    from waferlab.plotting import use_agg

    use_agg()
    import matplotlib.pyplot as plt

    from waferlab.plotting import save_figure

    csv_path = Path(csv_path)
    df, index = _read_curves(csv_path)
    x = df.index.to_numpy(dtype=float)
    cols = [c for c in df.columns if c not in CURVE_INDEX_COLUMNS and df[c].notna().any()]
    lr_cols = [c for c in cols if c == "lr" or c.startswith("lr-") or c.startswith("lr_")]
    loss_cols = [c for c in cols if "loss" in c and c not in lr_cols]
    metric_cols = [c for c in cols if c not in loss_cols and c not in lr_cols]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)

    def draw(ax, names: list[str], ylabel: str) -> None:
        for name in names:
            y = df[name].to_numpy(dtype=float)
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], marker="o" if ok.sum() <= 30 else None, ms=3, lw=1.5, label=name)
        ax.set_xlabel(index)
        if index == "epoch":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, f"no {ylabel} logged", ha="center", va="center", transform=ax.transAxes,
                    color="#888888")

    draw(ax_loss, loss_cols, "loss")
    ax_loss.set_title("Loss", fontsize=10)
    if lr_cols:
        ax_lr = ax_loss.twinx()
        for name in lr_cols:
            y = df[name].to_numpy(dtype=float)
            ok = np.isfinite(y) & (y > 0)
            ax_lr.plot(x[ok], y[ok], color="#999999", ls=":", lw=1.2, label=name)
        if np.any([np.any(df[n].to_numpy(dtype=float) > 0) for n in lr_cols]):
            ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate", color="#777777")
        handles, labels = ax_loss.get_legend_handles_labels()
        lr_handles, lr_labels = ax_lr.get_legend_handles_labels()
        ax_lr.legend(handles + lr_handles, labels + lr_labels, fontsize=8, loc="best")
        if ax_loss.get_legend() is not None:
            ax_loss.get_legend().remove()
    draw(ax_metric, metric_cols, "metric")
    ax_metric.set_title("Metrics", fontsize=10)
    if metric_cols and all(df[c].dropna().between(0, 1).all() for c in metric_cols):
        ax_metric.set_ylim(0, 1.02)
    fig.tight_layout()
    save_figure(fig, png_path)


# ------------------------------------------------------------------------------------------ report


def render_report(metrics: dict[str, Any], title: str, protocol: dict[str, Any] | None = None,
                  figures: dict[str, str] | None = None) -> str:
    """The Markdown text of an evaluation report (protocol card, headline, per-class, confusions, figures)."""
    from waferlab.engine.metrics import top_confusions

    names = list(metrics["class_names"])
    lines = [f"# {title}", ""]
    lines += ["## Protocol", ""]
    card = _ordered_protocol(protocol or {})
    card.append(("maps evaluated", metrics["n"]))
    card.append(("classes", f"{len(names)}: {', '.join(names)}"))
    lines += [markdown_table(card, ["", "value"], floatfmt=".6g", align=["l", "l"])]

    lines += ["## Headline metrics", ""]
    rows = [(label, metrics.get(key)) for key, label in HEADLINE_ROWS if key in metrics]
    support = np.array([metrics["per_class"][c]["support"] for c in names])
    majority = int(np.argmax(support))
    rows.append((f"Majority-class accuracy (always {names[majority]})",
                 float(support[majority] / metrics["n"])))
    lines += [markdown_table(rows, ["metric", "value"], align=["l", "r"])]
    notes = [
        "Macro averages and balanced accuracy are taken over the classes present in the evaluation set.",
        f"ECE: top-label expected calibration error, {metrics.get('n_bins', '?')} equal-width bins.",
    ]
    if "defect_vs_none_recall" in metrics:
        notes.append("Defect-vs-none recall: share of true defect maps not predicted as none.")
    if metrics.get("classes_absent"):
        notes.append(f"Absent from the evaluation set (recall undefined, excluded from macro averages): "
                     f"{', '.join(metrics['classes_absent'])}.")
    if metrics.get("renormalized_rows"):
        notes.append(f"**Warning:** {metrics['renormalized_rows']} probability rows did not sum to 1 "
                     "and were renormalised.")
    lines += [f"- {n}" for n in notes] + [""]

    lines += ["## Per-class metrics", ""]
    per = metrics["per_class"]
    lines += [markdown_table(
        [(c, per[c]["precision"], per[c]["recall"], per[c]["f1"], per[c]["support"]) for c in names],
        ["class", "precision", "recall", "F1", "support"],
        align=["l", "r", "r", "r", "r"],
    )]

    confusions = top_confusions(metrics, k=8)
    if confusions:
        lines += ["## Most frequent confusions", ""]
        lines += [markdown_table(
            [(t, p, n, share) for t, p, n, share in confusions],
            ["true", "predicted", "maps", "share of true class"],
            floatfmt=".3f",
        )]

    bins = [b for b in metrics.get("calibration_bins", []) if b["count"]]
    if bins:
        lines += ["## Calibration", ""]
        lines += [markdown_table(
            [(f"{b['lo']:.2f}–{b['hi']:.2f}", b["count"], b["confidence"], b["accuracy"]) for b in bins],
            ["confidence bin", "maps", "mean confidence", "accuracy"],
            floatfmt=".3f",
            align=["l", "r", "r", "r"],
        )]

    if figures:
        lines += ["## Figures", ""]
        for caption, fname in figures.items():
            lines += [f"![{caption}]({fname})", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_multilabel_section(metrics: dict[str, Any]) -> str:
    """Markdown of the multi-label part of a report: headline, exact match by cardinality, per-label table."""
    names = list(metrics["label_names"])
    lines = ["## Multi-label metrics", ""]
    rows = [(label, metrics.get(key)) for key, label in MULTILABEL_HEADLINE_ROWS if key in metrics]
    lines += [markdown_table(rows, ["metric", "value"], align=["l", "r"])]
    rule = (f">= {metrics['threshold']:g}" if isinstance(metrics["threshold"], int | float)
            else ">= its own threshold (column threshold; fitted on the run's validation part)")
    notes = [f"A label is predicted when its sigmoid probability is {rule}; "
             "AP and mAP are threshold-free.",
             "mAP and macro averages are taken over the labels present in the evaluation set."]
    if metrics.get("labels_absent"):
        notes.append(f"Absent from the evaluation set (recall, F1 and AP undefined, excluded from mAP and "
                     f"macro averages): {', '.join(metrics['labels_absent'])}.")
    lines += [f"- {n}" for n in notes] + [""]
    by_card = metrics.get("exact_match_by_cardinality") or {}
    if by_card:
        lines += ["### Exact match by number of true defect types", ""]
        lines += [markdown_table([(int(c), v["n"], v["exact_match"]) for c, v in by_card.items()],
                                 ["true types", "maps", "exact match"], align=["r", "r", "r"])]
    per = metrics["per_label"]
    lines += ["### Per-label metrics", ""]
    lines += [markdown_table(
        [(c, per[c].get("threshold"), per[c]["precision"], per[c]["recall"], per[c]["f1"], per[c]["ap"],
          per[c]["support"], per[c]["predicted"]) for c in names],
        ["label", "threshold", "precision", "recall", "F1", "AP", "support", "predicted"],
        align=["l", "r", "r", "r", "r", "r", "r", "r"],
    )]
    return "\n".join(lines).rstrip() + "\n"


def render_multilabel_report(metrics: dict[str, Any], title: str,
                             protocol: dict[str, Any] | None = None) -> str:
    """The Markdown text of a multi-label evaluation report: protocol card, then the multi-label section."""
    names = list(metrics["label_names"])
    card = _ordered_protocol(protocol or {})
    card.append(("maps evaluated", metrics["n"]))
    card.append(("labels", f"{len(names)}: {', '.join(names)}"))
    lines = [f"# {title}", "", "## Protocol", "",
             markdown_table(card, ["", "value"], floatfmt=".6g", align=["l", "l"])]
    return "\n".join(lines) + "\n" + render_multilabel_section(metrics)


def write_evaluation(
    metrics: dict[str, Any],
    out_dir: str | os.PathLike[str],
    title: str,
    protocol: dict[str, Any] | None = None,
) -> None:
    """Write ``metrics.json``, ``report.md``, ``confusion_matrix.png``, ``confusion_matrix_normalized.png``
    and ``reliability.png`` into ``out_dir`` (each atomically).

    ``metrics`` is :func:`waferlab.engine.metrics.compute_metrics` output; ``protocol`` (split,
    class set, image size, encoding, seed, data source, ...) is shown as the report's protocol card
    and stored under ``"protocol"`` in metrics.json, with ``"title"``, so runs can be compared.
    Multi-label metrics (:func:`~waferlab.engine.metrics.compute_multilabel_metrics`, ``task`` =
    ``"multilabel"``) get metrics.json and report.md only (no confusion matrix or reliability figure).
    """
    if metrics.get("task") == "multilabel":
        _write_multilabel_evaluation(metrics, out_dir, title, protocol)
        return
    keys = ("class_names", "per_class", "confusion_matrix", "confusion_matrix_normalized", "n")
    out = _evaluation_dir(metrics, keys, "compute_metrics", out_dir)
    names = metrics["class_names"]
    figures = {
        "Confusion matrix (counts)": "confusion_matrix.png",
        "Confusion matrix (row-normalised)": "confusion_matrix_normalized.png",
    }
    plot_confusion(metrics["confusion_matrix"], names, out / figures["Confusion matrix (counts)"],
                   normalized=False, title=f"{title}: counts")
    plot_confusion(metrics["confusion_matrix_normalized"], names,
                   out / figures["Confusion matrix (row-normalised)"], normalized=True,
                   title=f"{title}: row-normalised")
    if metrics.get("calibration_bins"):
        figures["Reliability diagram"] = "reliability.png"
        plot_reliability(metrics["calibration_bins"], out / "reliability.png", metrics.get("ece"))
    record = {"title": title, "protocol": dict(protocol or {}), **metrics}
    write_json(out / "metrics.json", record)
    write_text(out / "report.md", render_report(metrics, title, protocol, figures))


def _write_multilabel_evaluation(metrics: dict[str, Any], out_dir: str | os.PathLike[str], title: str,
                                 protocol: dict[str, Any] | None) -> None:
    out = _evaluation_dir(metrics, ("label_names", "per_label", "exact_match", "threshold", "n"),
                          "compute_multilabel_metrics", out_dir)
    write_json(out / "metrics.json", {"title": title, "protocol": dict(protocol or {}), **metrics})
    write_text(out / "report.md", render_multilabel_report(metrics, title, protocol))


def _evaluation_dir(metrics: dict[str, Any], keys: tuple[str, ...], producer: str,
                    out_dir: str | os.PathLike[str]) -> Path:
    """Check ``metrics`` holds ``keys`` (what ``producer`` returns), then create and return ``out_dir``."""
    missing = next((k for k in keys if k not in metrics), None)
    if missing is not None:
        raise WaferlabError(f"metrics lack '{missing}': pass the output of {producer}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WaferlabError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------- compare


def _headline_source(obj: Any) -> dict[str, Any] | None:
    """The dict holding the headline metrics: the top level, or a test/eval section of a run record."""
    if isinstance(obj, dict) and "macro_f1" in obj:
        return obj
    if isinstance(obj, dict):
        for key in ("test", "evaluation", "eval", "metrics", "val"):
            sub = obj.get(key)
            if isinstance(sub, dict) and "macro_f1" in sub:
                return sub
    return None


def _run_label_info(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Model / split / class set of a run: from metrics.json's protocol, else the run's config.yaml."""
    info: dict[str, Any] = {}
    protocol = record.get("protocol") if isinstance(record.get("protocol"), dict) else {}
    from waferlab.engine.run import Run

    try:
        cfg = Run(run_dir).config_values()
    except WaferlabError:
        cfg = {}
    for key in ("model", "split", "class_set", "image_size"):
        value = protocol.get(key, cfg.get(key))
        if isinstance(value, dict):
            value = value.get("name", json.dumps(value, sort_keys=True))
        info[key] = value
    if record.get("task") == "multilabel":  # class_set does not apply: name the labels instead
        info["class_set"] = f"multilabel ({len(record.get('label_names') or [])} labels)"
    return info


def compare_runs(run_dirs: Sequence[str | os.PathLike[str]]) -> str:
    """A Markdown table of headline metrics across run folders (each with metrics.json), best macro-F1 first.

    A folder may also be passed as the metrics.json itself. When the runs were evaluated on
    different class sets, splits or numbers of maps, a warning line follows the table: such
    numbers are not comparable.
    """
    if not run_dirs:
        raise WaferlabError("compare_runs needs at least one run folder")
    entries = []
    for rd in run_dirs:
        path = Path(rd)
        mpath = path if path.is_file() else path / "metrics.json"
        run_dir = mpath.parent
        if not mpath.is_file():
            raise WaferlabError(f"{mpath}: not found (evaluate the run first)")
        try:
            record = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WaferlabError(f"{mpath}: not valid JSON ({exc})") from exc
        source = _headline_source(record)
        if source is None:
            raise WaferlabError(f"{mpath}: has no 'macro_f1' (not an evaluation metrics file)")
        info = _run_label_info(run_dir, record)
        entries.append((run_dir.name or str(run_dir), info, source))

    def key(entry: tuple[str, dict[str, Any], dict[str, Any]]) -> tuple[int, float, str]:
        f1 = entry[2].get("macro_f1")
        ok = isinstance(f1, int | float) and math.isfinite(f1)
        return (0 if ok else 1, -float(f1) if ok else 0.0, entry[0])

    entries.sort(key=key)
    headers = ["rank", "run", "model", "split", "class set", "n"] + [h for _, h in COMPARE_COLUMNS]
    rows = []
    for rank, (name, info, src) in enumerate(entries, 1):
        rows.append([rank, name, info["model"], info["split"], info["class_set"], src.get("n")]
                    + [src.get(k) for k, _ in COMPARE_COLUMNS])
    align = ["r", "l", "l", "l", "l", "r"] + ["r"] * len(COMPARE_COLUMNS)
    text = markdown_table(rows, headers, align=align)
    differ = []
    for label, values in (
        ("class sets", [src.get("class_names") or info["class_set"] for _, info, src in entries]),
        ("splits", [info["split"] for _, info, _ in entries]),
        ("numbers of evaluated maps", [src.get("n") for _, _, src in entries]),
    ):
        if len({json.dumps(v, default=str) for v in values}) > 1:
            differ.append(label)
    if differ:
        text += (f"\n**Warning:** these runs differ in {', '.join(differ)}; "
                 "their metrics are not directly comparable.\n")
    return text
