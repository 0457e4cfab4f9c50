"""``study report``: runs.csv, summary.csv, report.md and one self-contained report.html of a study folder."""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from waferlab.errors import WaferlabError
from waferlab.study.aggregate import COSTS, METRICS, RunRecord
from waferlab.study.spec import SEED_AXIS, StudySpec
from waferlab.study.stats import ALPHA, BOOTSTRAP_RESAMPLES, holm, paired_tests
from waferlab.study.stats import as_finite as _num

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: Metrics shown as percentages (the rest, ECE, as a fraction).
PERCENT = {"macro_f1", "accuracy", "balanced_accuracy", "defect_vs_none_recall"}
#: Protocol-card rows: (metrics.json protocol key, label).
CARD_KEYS = (
    ("data", "data"),
    ("split", "split"),
    ("fractions", "train/val/test fractions"),
    ("class_set", "class set"),
    ("image_size", "image size (px)"),
    ("encoding", "encoding"),
    ("epochs", "epochs"),
    ("batch_size", "batch size"),
    ("optimizer", "optimizer"),
    ("lr", "learning rate"),
    ("loss", "loss"),
    ("augment", "online augmentation"),
    ("weights", "weights evaluated"),
    ("n_train", "train maps"),
    ("n_val", "validation maps"),
    ("n_test", "test maps"),
)


def format_seconds(seconds: float | None) -> str:
    """58.2318 -> '58 s', 125 -> '2 min 05 s', 3725 -> '1 h 02 min' (None -> an em dash)."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        m, s = divmod(round(seconds), 60)
        return f"{m} min {s:02d} s"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m:02d} min"


def format_count(value: float | None) -> str:
    """21289000 -> '21.3 M', 299000000 -> '299 M', 1.2e9 -> '1.2 G'."""
    if value is None or not math.isfinite(value):
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            v = value / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{value:.0f}"


def fmt_metric(key: str, mean: float | None, std: float | None = None) -> str:
    """'90.80 ± 0.35' (percent) or '0.031 ± 0.004' (ECE); a missing std is left out."""
    if mean is None or not math.isfinite(mean):
        return "—"
    scale, digits = (100.0, 2) if key in PERCENT or key.startswith(("recall[", "f1[")) else (1.0, 3)
    text = f"{mean * scale:.{digits}f}"
    if std is not None and math.isfinite(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def fmt_ci(key: str, lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None:
        return "—"
    scale, digits = (100.0, 2) if key in PERCENT else (1.0, 3)
    return f"[{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


@dataclass
class Significance:
    """The paired tests between groups: names, pair results, Holm-adjusted p-values, seeds used, verdict."""

    groups: list[str] = field(default_factory=list)
    pairs: dict[tuple[int, int], Any] = field(default_factory=dict)
    p_adj: dict[tuple[int, int], float] = field(default_factory=dict)
    p_mcnemar_adj: dict[tuple[int, int], float] = field(default_factory=dict)
    seeds: list[Any] = field(default_factory=list)
    n_maps: int = 0
    note: str | None = None

    def cell(self, a: int, b: int) -> dict[str, Any] | None:
        """Row a vs column b: Δ macro-F1 (a − b, points), adjusted p, and whether it is real."""
        if a == b or not self.pairs:
            return None
        i, j, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        r = self.pairs[(i, j)]
        p = self.p_adj[(i, j)]
        return {
            "diff": sign * r.diff * 100,
            "p": p,
            "p_mcnemar": self.p_mcnemar_adj[(i, j)],
            "real": p < ALPHA,
            "better": sign * r.diff > 0,
        }


def significance(records: list[RunRecord], groups: list[str]) -> Significance:
    """Paired tests on the seeds whose test maps every group was evaluated on (identical maps)."""
    by = {(r.cell.group, r.cell.seed): r for r in records if r.pred is not None}
    have = [g for g in groups if any(k[0] == g for k in by)]
    if len(have) < 2:
        return Significance(note="paired tests need per-map predictions of at least two groups")
    seeds = []
    for seed in dict.fromkeys(r.cell.seed for r in records):
        recs = [by.get((g, seed)) for g in have]
        if all(recs) and all(
            np.array_equal(r.pred["test_index"], recs[0].pred["test_index"])
            and np.array_equal(r.pred["y_true"], recs[0].pred["y_true"])
            for r in recs
        ):
            seeds.append(seed)
    if not seeds:
        return Significance(groups=have, note="no seed has every group's predictions on the same test maps")
    k = max(len(r.class_names) for r in records if r.finished)
    y = [by[(have[0], s)].pred["y_true"] for s in seeds]
    preds = [np.stack([by[(g, s)].pred["y_pred"] for g in have]) for s in seeds]
    pairs = paired_tests(y, preds, k)
    keys = list(pairs)
    p_adj = dict(zip(keys, holm([pairs[q].p_bootstrap for q in keys])))
    p_mc = dict(zip(keys, holm([pairs[q].p_mcnemar for q in keys])))
    return Significance(have, pairs, p_adj, p_mc, seeds, int(sum(len(v) for v in y)))


def verdict(summary, sig: Significance) -> str:
    """One paragraph in words: the best group and which others are within noise of it."""
    done = summary[summary["n_seeds"] > 0]
    if done.empty:
        return "No cell has finished yet: there is nothing to compare."
    best = done.sort_values("macro_f1_mean", ascending=False).iloc[0]
    ci = fmt_ci("macro_f1", best["macro_f1_ci_lo"], best["macro_f1_ci_hi"])
    text = (
        f"Best macro-F1: {best['group']} with "
        f"{fmt_metric('macro_f1', best['macro_f1_mean'], best['macro_f1_std'])}"
        f" % (mean ± std over {int(best['n_seeds'])} seed(s)"
        + (f", 95 % CI {ci}" if ci != "—" else "")
        + ")."
    )
    if len(done) == 1:
        return text
    if not sig.pairs or best["group"] not in sig.groups:
        return (
            text + f" Paired tests are not available ({sig.note or 'no predictions'}); do not read "
            "the ranking as real without them."
        )
    b = sig.groups.index(best["group"])
    others = [g for g in sig.groups if g != best["group"]]
    noise = [g for g in others if not sig.cell(b, sig.groups.index(g))["real"]]
    below = [g for g in others if g not in noise]
    how = (
        f"paired bootstrap of macro-F1 over the same {sig.n_maps} test maps (seeds "
        f"{', '.join(map(str, sig.seeds))}), Holm-adjusted p ≥ {ALPHA}"
    )
    if not below:
        return (
            text + f" The best and all the rest are within noise of one another ({how}): this study "
            "cannot rank these models."
        )
    if not noise:
        return (
            text + f" It is significantly better than every other model ({how.replace('≥', '<')})."
            + _seed_caveat(done, best, below)
        )
    return (
        text + f" Within noise of it ({how}): {', '.join(noise)}. Significantly below it: {', '.join(below)}."
        + _seed_caveat(done, best, below)
    )


def _seed_caveat(done, best, below: list[str]) -> str:
    """The paired tests hold the trained models fixed; say so when the seed intervals still overlap."""
    lo = _num(best["macro_f1_ci_lo"])
    if lo is None:
        return ""
    his = {g: _num(hi) for g, hi in zip(done["group"], done["macro_f1_ci_hi"])}
    overlap = [g for g in below if his.get(g) is not None and his[g] >= lo]
    if not overlap:
        return ""
    return (
        f" Those tests hold each trained model fixed (noise of the test maps); over training seeds the 95 % "
        f"interval of {', '.join(overlap)} still overlaps the best's, so with {int(best['n_seeds'])} seeds a "
        "retrained model may rank differently: add seeds before claiming the ranking."
    )


# ----------------------------------------------------------------------------------------- figures


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _colors(groups: list[str]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    return {g: cmap(i % cmap.N) for i, g in enumerate(groups)}


def fig_macro_f1(summary, runs) -> bytes:
    """Macro-F1 per group: mean with its 95 % t-interval, and every seed's value as a dot."""
    import matplotlib.pyplot as plt

    done = summary[summary["n_seeds"] > 0].sort_values("macro_f1_mean", ascending=False)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(done) + 2), 3.6))
    colors = _colors(list(summary["group"]))
    for x, (_, row) in enumerate(done.iterrows()):
        mean = row["macro_f1_mean"] * 100
        lo, hi = row["macro_f1_ci_lo"], row["macro_f1_ci_hi"]
        err = None if lo is None or not np.isfinite(lo) else [[mean - lo * 100], [hi * 100 - mean]]
        ax.errorbar([x], [mean], yerr=err, fmt="o", ms=7, capsize=5, color=colors[row["group"]])
        seeds = runs[(runs["group"] == row["group"]) & (runs["status"] == "finished")]["macro_f1"]
        jitter = np.linspace(-0.12, 0.12, len(seeds)) if len(seeds) > 1 else [0.0]
        ax.scatter(x + np.asarray(jitter) + 0.22, seeds.astype(float) * 100, s=12, color="#555555", zorder=3)
    ax.set_xticks(range(len(done)))
    ax.set_xticklabels(done["group"], rotation=30, ha="right")
    ax.set_ylabel("macro-F1 (%)")
    ax.set_title("Macro-F1: mean and 95 % t-interval over seeds (dots: single seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def fig_acc_vs_params(summary) -> bytes:
    """Accuracy against parameters (log scale), a point per group, 95 % interval (SP&A-Net's plot)."""
    import matplotlib.pyplot as plt

    done = summary[(summary["n_seeds"] > 0) & summary["params"].notna()]
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = _colors(list(summary["group"]))
    for _, row in done.iterrows():
        mean = row["accuracy_mean"] * 100
        lo = row["accuracy_ci_lo"]
        err = (
            None
            if lo is None or not np.isfinite(lo)
            else [[mean - lo * 100], [row["accuracy_ci_hi"] * 100 - mean]]
        )
        ax.errorbar(
            [row["params"] / 1e6], [mean], yerr=err, fmt="o", ms=7, capsize=4, color=colors[row["group"]]
        )
        ax.annotate(
            row["group"], (row["params"] / 1e6, mean), textcoords="offset points", xytext=(6, 4), fontsize=8
        )
    params_axes(ax, "Accuracy vs parameters")
    return _png(fig)


def params_axes(ax, title: str) -> None:
    """The accuracy-vs-parameters axes: log-scale millions with plain tick labels, accuracy in %."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("parameters (millions, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")


def fig_curves(records: list[RunRecord], groups: list[str]) -> bytes:
    """Training curves overlaid: train loss and (when there is a validation part) val macro-F1 per epoch."""
    import matplotlib.pyplot as plt

    panels = [("train_loss", "train loss"), ("val_macro_f1", "validation macro-F1")]
    has_val = any(np.isfinite(row.get("val_macro_f1", np.nan)) for r in records for row in r.curves)
    panels = panels if has_val else panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    colors = _colors(groups)
    for ax, (key, label) in zip(axes[0], panels):
        for g in groups:
            for i, r in enumerate(x for x in records if x.cell.group == g and x.curves):
                ep = [row["epoch"] for row in r.curves]
                val = [row.get(key, np.nan) for row in r.curves]
                ax.plot(
                    ep,
                    val,
                    marker="o",
                    ms=3,
                    lw=1.4,
                    color=colors[g],
                    alpha=0.85,
                    label=g if i == 0 else None,
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if key == "train_loss" and _spans_decades(records, key):
            ax.set_yscale("log")  # losses of different scales (Circle loss vs CE) would flatten each other
            ax.set_ylabel(f"{label} (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Training curves (one line per seed)", fontsize=10)
    return _png(fig)


def _spans_decades(records: list[RunRecord], key: str) -> bool:
    """True when the positive values of a curve span more than a factor of 10 across all runs."""
    vals = [row.get(key, np.nan) for r in records for row in r.curves]
    pos = [v for v in vals if np.isfinite(v) and v > 0]
    return bool(pos) and max(pos) > 10 * min(pos)


def fig_confusions(records: list[RunRecord], groups: list[str]) -> bytes:
    """Row-normalised confusion matrix of every group, summed over its seeds (small multiples)."""
    import matplotlib.pyplot as plt

    mats = {}
    for g in groups:
        rs = [r for r in records if r.cell.group == g and r.finished]
        if rs:
            mats[g] = (
                np.sum([np.asarray(r.metrics["confusion_matrix"], float) for r in rs], axis=0),
                rs[0].metrics["class_names"],
            )
    cols = min(4, len(mats))
    rows = math.ceil(len(mats) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (g, (cm, names)) in zip(axes.flat, mats.items()):
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = cm / cm.sum(axis=1, keepdims=True)
        ax.axis("on")
        ax.imshow(np.nan_to_num(norm), cmap="Blues", vmin=0, vmax=1)
        k = len(names)
        if k <= 10:
            for i in range(k):
                for j in range(k):
                    if np.isfinite(norm[i, j]) and norm[i, j] >= 0.01:
                        ax.text(
                            j,
                            i,
                            f"{norm[i, j]:.2f}".lstrip("0"),
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "#222222",
                        )
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.set_yticklabels(names, fontsize=6)
        ax.set_title(g, fontsize=9)
    fig.suptitle("Confusion matrices, row-normalised, summed over seeds (rows: true class)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------------------------------ report


def protocol_card(records: list[RunRecord], spec: StudySpec) -> list[tuple[str, str]]:
    """(label, value) rows; a setting that differs between runs shows every value."""
    protos = [r.metrics.get("protocol", {}) for r in records if r.finished]
    rows = [("study", spec.name), ("base config", spec.config)]
    for key, label in CARD_KEYS:
        values = list(
            dict.fromkeys(re.sub(r" \([0-9.]+\)$", "", str(p.get(key))) for p in protos if key in p)
        )
        if values:
            rows.append((label, values[0] if len(values) == 1 else "varies: " + ", ".join(values)))
    if protos:
        rows.append(("classes", ", ".join(next(r.class_names for r in records if r.finished))))
    seeds = list(dict.fromkeys(str(r.cell.seed) for r in records))
    rows.append(("seeds", ", ".join(seeds)))
    axes = [f"{a} ({len(v)})" for a, v in spec.axes.items() if a != SEED_AXIS]
    if axes:
        rows.append(("axes", ", ".join(axes)))
    return rows


def _method_rank(name: str, methods: list[str]) -> tuple[int, str]:
    """Order CAM grids as the methods were asked for (GradCAM before GradCAM++), unknown ones last."""
    return (methods.index(name) if name in methods else len(methods), name)


def _explanations(study: Path, fig_dir: Path) -> dict[str, Any] | None:
    """The CAM grids and the faithfulness / localisation scores of ``waferlab explain --json``."""
    import json

    ex = study / "explain"
    scores = ex / "scores.json"
    if not scores.is_file():
        return None
    doc = json.loads(scores.read_text(encoding="utf-8"))
    methods = doc.get("methods") or []
    compare = sorted(ex.glob("compare_*.png"), key=lambda p: _method_rank(p.stem[len("compare_"):], methods))
    images = compare or sorted(ex.glob("*/study_grid.png"))
    figures = []
    for img in images:
        name = f"cam_{img.parent.name}_{img.name}" if img.name == "study_grid.png" else img.name
        shutil.copyfile(img, fig_dir / name)
        caption = img.stem.replace("compare_", "") if img.name != "study_grid.png" else img.parent.name
        figures.append(
            {
                "caption": caption,
                "file": f"figures/{name}",
                "data": base64.b64encode(img.read_bytes()).decode("ascii"),
            }
        )
    rows = []
    for model, s in (doc.get("models") or {}).items():
        if not s:
            continue
        for method, block in s.get("methods", {}).items():
            o = block.get("overall", {})
            rows.append(
                [
                    model,
                    method,
                    o.get("deletion_auc"),
                    o.get("insertion_auc"),
                    o.get("road"),
                    o.get("pointing_game"),
                    o.get("iou_top"),
                ]
            )
        rnd = s.get("random_order", {}).get("overall", {})
        rows.append(
            [model, "random order", rnd.get("deletion_auc"), rnd.get("insertion_auc"), None, None, None]
        )
    fmt = [[r[0], r[1]] + ["—" if v is None else f"{v:.3f}" for v in r[2:]] for r in rows]
    return {
        "figures": figures,
        "rows": fmt,
        "settings": doc.get("settings", {}),
        "headers": [
            "model",
            "method",
            "deletion AUC ↓",
            "insertion AUC ↑",
            "ROAD",
            "pointing game ↑",
            "IoU (top) ↑",
        ],
    }


def build_context(
    study: Path, report_dir: Path, spec: StudySpec, records: list[RunRecord], runs, summary, sig: Significance
) -> dict[str, Any]:
    """Everything the templates show (figures both as files for report.md and inline for report.html)."""
    from waferlab.study.shapes import fig_families, views

    groups = list(dict.fromkeys(r.cell.group for r in records))
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    shapes, fams = views(spec, summary)
    if (summary["n_seeds"] > 0).any():
        for name, caption, png in (
            (
                "macro_f1.png",
                "Macro-F1 per model (mean, 95 % t-interval, single seeds)",
                fig_macro_f1(summary, runs),
            ),
            (
                "accuracy_vs_params.png",
                "Accuracy vs parameters" + (", one line per model family" if fams else ""),
                fig_families(summary, fams) if fams else fig_acc_vs_params(summary),
            ),
            ("curves.png", "Training curves", fig_curves(records, groups)),
            ("confusion.png", "Confusion matrices", fig_confusions(records, groups)),
        ):
            (fig_dir / name).write_bytes(png)
            figures.append(
                {"caption": caption, "file": f"figures/{name}", "data": base64.b64encode(png).decode("ascii")}
            )
    from waferlab import __version__

    return {
        "spec": spec,
        "title": f"Study {spec.name}",
        "version": __version__,
        "verdict": verdict(summary, sig),
        "card": protocol_card(records, spec),
        "main": main_table(summary),
        "shapes": shapes,
        "per_class": per_class_tables(records, summary),
        "sig": sig_matrix(sig),
        "figures": figures,
        "explain": _explanations(study, fig_dir),
        "status": status_rows(records),
        "runs": run_rows(runs),
        "counts": {
            s: sum(r.status == s for r in records) for s in ("finished", "failed", "unfinished", "pending")
        },
    }


def main_table(summary) -> dict[str, Any]:
    """Headline table: metrics as mean ± std (with the 95 % CI under macro-F1 and accuracy), then costs.

    Every cell is ``{"text", "sub"}``; ``sub`` (the CI) is shown under the text in HTML, after it in Markdown.
    """
    headers = ["model", "seeds"] + [label + (" (%)" if key in PERCENT else "") for key, label in METRICS]
    headers += [label for _, label in COSTS]
    rows = []
    for _, row in summary.iterrows():
        cells = [{"text": str(row["group"]), "sub": ""}, {"text": str(int(row["n_seeds"])), "sub": ""}]
        for key, _ in METRICS:
            text = fmt_metric(key, _num(row.get(f"{key}_mean")), _num(row.get(f"{key}_std")))
            ci = fmt_ci(key, _num(row.get(f"{key}_ci_lo")), _num(row.get(f"{key}_ci_hi")))
            cells.append(
                {"text": text, "sub": f"CI {ci}" if key in ("macro_f1", "accuracy") and ci != "—" else ""}
            )
        speed = _num(row["maps_per_s"])
        cells += [
            {"text": t, "sub": ""}
            for t in (
                format_count(_num(row["params"])),
                format_count(_num(row["macs"])),
                format_seconds(_num(row["train_seconds"])),
                "—" if speed is None else f"{speed:,.0f}",
            )
        ]
        rows.append(cells)
    return {"headers": headers, "rows": rows}


def per_class_tables(records: list[RunRecord], summary) -> list[dict[str, Any]]:
    """The study's two tables: per-class recall and per-class F1 (+ macro-F1, accuracy), classes x models."""
    names = next((list(r.metrics["class_names"]) for r in records if r.finished), [])
    done = summary[summary["n_seeds"] > 0]
    tables = []
    for kind, title in (("recall", "Recall per class (%)"), ("f1", "F1 per class (%)")):
        rows = [
            [c]
            + [
                fmt_metric(f"{kind}[{c}]", _num(g.get(f"{kind}[{c}]_mean")), _num(g.get(f"{kind}[{c}]_std")))
                for _, g in done.iterrows()
            ]
            for c in names
        ]
        if kind == "f1":
            for key, label in (("macro_f1", "F1-macro"), ("accuracy", "Accuracy")):
                rows.append(
                    [label]
                    + [
                        fmt_metric(key, _num(g[f"{key}_mean"]), _num(g[f"{key}_std"]))
                        for _, g in done.iterrows()
                    ]
                )
        tables.append({"title": title, "headers": ["class"] + list(done["group"]), "rows": rows})
    return tables


def sig_matrix(sig: Significance) -> dict[str, Any]:
    """The matrix of paired tests: row minus column, Δ macro-F1 in points and the Holm-adjusted p-value."""
    cells = []
    for a in range(len(sig.groups)):
        row = []
        for b in range(len(sig.groups)):
            c = sig.cell(a, b)
            if c is None:
                row.append({"text": "", "cls": "diag", "title": ""})
            else:
                p = "< 0.001" if c["p"] < 0.001 else f"{c['p']:.3f}"
                row.append(
                    {
                        "text": f"{c['diff']:+.2f} (p {p})",
                        "title": f"McNemar (pooled over seeds, Holm): p {c['p_mcnemar']:.3g}",
                        "cls": ("better" if c["better"] else "worse") if c["real"] else "noise",
                    }
                )
        cells.append(row)
    return {
        "groups": sig.groups,
        "cells": cells,
        "seeds": sig.seeds,
        "n_maps": sig.n_maps,
        "note": sig.note,
        "resamples": BOOTSTRAP_RESAMPLES,
        "alpha": ALPHA,
    }


def pairs_frame(sig: Significance):  # -> pandas.DataFrame
    """One row per pair of groups: macro-F1 difference (a − b), its bootstrap CI, both tests (raw, Holm)."""
    import pandas as pd

    rows = []
    for (a, b), r in sig.pairs.items():
        rows.append(
            {
                "a": sig.groups[a],
                "b": sig.groups[b],
                "macro_f1_diff": r.diff,
                "ci_lo": r.lo,
                "ci_hi": r.hi,
                "p_bootstrap": r.p_bootstrap,
                "p_bootstrap_holm": sig.p_adj[(a, b)],
                "a_right_b_wrong": r.discordant_a,
                "b_right_a_wrong": r.discordant_b,
                "p_mcnemar": r.p_mcnemar,
                "p_mcnemar_holm": sig.p_mcnemar_adj[(a, b)],
                "seeds": " ".join(map(str, sig.seeds)),
                "n_maps": sig.n_maps,
            }
        )
    columns = [
        "a",
        "b",
        "macro_f1_diff",
        "ci_lo",
        "ci_hi",
        "p_bootstrap",
        "p_bootstrap_holm",
        "a_right_b_wrong",
        "b_right_a_wrong",
        "p_mcnemar",
        "p_mcnemar_holm",
        "seeds",
        "n_maps",
    ]
    return pd.DataFrame(rows, columns=columns)


def status_rows(records: list[RunRecord]) -> list[list[str]]:
    return [
        [r.cell.name, r.status, r.error or r.note or ""] for r in records if r.status != "finished" or r.note
    ]


def run_rows(runs) -> dict[str, Any]:
    cols = ["cell", "seed", "status"] + [k for k, _ in METRICS] + ["train_seconds", "maps_per_s"]
    rows = []
    for _, r in runs.iterrows():
        rows.append(
            [str(r["cell"]), str(r["seed"]), str(r["status"])]
            + [fmt_metric(k, _num(r.get(k))) for k, _ in METRICS]
            + [
                format_seconds(_num(r["train_seconds"])),
                "—" if _num(r["maps_per_s"]) is None else f"{r['maps_per_s']:,.0f}",
            ]
        )
    return {
        "headers": ["cell", "seed", "status"] + [lbl for _, lbl in METRICS] + ["train time", "maps/s"],
        "rows": rows,
        "columns": cols,
    }


def _render(name: str, context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=name.endswith(".html.j2"),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template(name).render(**context)


def write_report(study: str | Path, report_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Write runs.csv, summary.csv, report.md and report.html of a study folder; returns report.html."""
    import json

    from waferlab.io import write_text
    from waferlab.study.aggregate import add_predictions, collect, runs_frame, summary_frame
    from waferlab.study.runner import load_study_spec

    study = Path(study).resolve()
    if not study.is_dir():
        raise WaferlabError(f"study folder not found: {study}")
    spec = load_study_spec(study)
    out = Path(report_dir).resolve() if report_dir else study / "report"
    out.mkdir(parents=True, exist_ok=True)
    state_path = study / "cells.json"
    state = (
        json.loads(state_path.read_text(encoding="utf-8")).get("cells", {}) if state_path.is_file() else {}
    )
    records = collect(study, spec, state)
    add_predictions(records, study, spec.data, progress=progress)
    runs = runs_frame(records, spec)
    summary = summary_frame(runs, spec)
    write_text(out / "runs.csv", runs.to_csv(index=False))
    write_text(out / "summary.csv", summary.to_csv(index=False))
    groups = list(dict.fromkeys(r.cell.group for r in records))
    sig = significance(records, groups)
    write_text(out / "pairs.csv", pairs_frame(sig).to_csv(index=False))
    context = build_context(study, out, spec, records, runs, summary, sig)
    for table in context["shapes"]:  # the paper-shaped tables' data (ablation.csv, sweep.csv, families.csv)
        write_text(out / table["csv"], table["frame"].to_csv(index=False))
    context["compare_runs"] = _compare_runs_md(records)
    write_text(out / "report.md", _render("report.md.j2", context))
    write_text(out / "report.html", _render("report.html.j2", context))
    if progress:
        print(f"waferlab study: report -> {out / 'report.html'}", file=sys.stderr)
    return out / "report.html"


def _compare_runs_md(records: list[RunRecord]) -> str:
    """The per-run headline table of the engine (with its warning when runs are not comparable)."""
    from waferlab.engine.report import compare_runs

    done = [r.run_dir for r in records if r.finished]
    return compare_runs(done) if done else ""


def summary_text(report_html: Path) -> str:
    """The headline table as plain text for a terminal (read back from summary.csv)."""
    import pandas as pd

    summary = pd.read_csv(report_html.parent / "summary.csv")
    table = main_table(summary)
    n = len(table["headers"])
    keep = [
        0,
        1,
        2,
        3,
        4,
        n - 4,
        n - 2,
        n - 1,
    ]  # model, seeds, macro-F1, accuracy, bal. acc., params, time, speed
    rows = [[table["headers"][i] for i in keep]] + [[r[i]["text"] for i in keep] for r in table["rows"]]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(keep))]
    lines = [
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
