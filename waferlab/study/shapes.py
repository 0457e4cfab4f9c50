"""Paper-shaped views of a study, shown when the study has that shape (SP&A-Net's tables, seeds.md B.7).

* **ablation** (a spec with ``vary:``): rows x varied factor, accuracy per cell; a column the row's base
  recipe already is shows the base cell (marked), a factor that does not apply to the row shows n/a.
* **sweep** (exactly one axis besides the seed, and not ``model``, e.g. SP&A-Net's composition ratio r):
  one row per value with accuracy, macro precision / recall / F1, parameters and defect recall, and the
  spec's ``report.min_defect_recall`` rule marked (the paper's "recall > 99 %").
* **families** (groups that differ only in ``model_options.width``): one line per family through its sizes
  in the accuracy-vs-parameters figure, and a family x size table.

Each view is a table dict for the templates (``title``, ``note``, ``headers``, ``rows`` of ``{"text",
"cls"}`` cells, optional ``top`` header row) plus the frame written as ``<csv>`` next to the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from waferlab.study.spec import MODEL_AXIS, SEED_AXIS, StudySpec
from waferlab.study.stats import as_finite as _num

#: Marks in the ablation table: the row's base cell, a factor that does not apply, a cell not run (yet).
BASE_MARK, NA_TEXT, MISSING_TEXT = " •", "n/a", "—"
WIDTH_KEY = "model_options.width"


def _pct(mean: Any, std: Any = None) -> str:
    m, s = _num(mean), _num(std)
    if m is None:
        return MISSING_TEXT
    return f"{m * 100:.2f}" + (f" ± {s * 100:.2f}" if s is not None else "")


def _by_group(summary) -> dict[str, Any]:  # pandas rows by group name
    return {str(row["group"]): row for _, row in summary.iterrows()}


def _done(row: Any) -> bool:
    return row is not None and int(row["n_seeds"]) > 0


def ablation(spec: StudySpec, summary) -> dict[str, Any] | None:
    """The one-factor-at-a-time table of a ``vary:`` study (None for other studies)."""
    import pandas as pd

    if not spec.vary:
        return None
    groups = _by_group(summary)
    columns = [(f, v) for f, factor in spec.vary.items() for v in factor.variants]
    rows, records = [], []
    for row_name, cells in spec.vary_pivot().items():
        out = [{"text": row_name, "cls": ""}]
        for f, v in columns:
            entry = cells[(f, v)]
            record = {"row": row_name, "factor": f, "variant": v, "status": "not applicable",
                      "group": None}
            if entry is None:
                out.append({"text": NA_TEXT, "cls": "na"})
            else:
                group, is_base = entry
                g = groups.get(group)
                record.update(group=group, status="base" if is_base else "variant")
                text = _pct(g["accuracy_mean"], g["accuracy_std"]) if _done(g) else MISSING_TEXT
                if _done(g):
                    record.update({k: _num(g.get(k)) for k in (
                        "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std")})
                    record["n_seeds"] = int(g["n_seeds"])
                else:
                    record["status"] += " (not run)"
                out.append({"text": text + (BASE_MARK if is_base else ""), "cls": "base" if is_base else ""})
            records.append(record)
        rows.append(out)
    top = [("", 1)] + [(f, len(factor.variants)) for f, factor in spec.vary.items()]
    return {
        "id": "ablation",
        "title": "Ablation: one factor at a time",
        "note": "Accuracy (%, mean ± std over seeds) per row and varied factor, each column the row's base "
        f"recipe with one change. '{BASE_MARK.strip()}': the base recipe already is this variant (the "
        f"row's base cell, one run shared by those columns); {NA_TEXT}: the factor does not apply to the "
        f"row (no cell trained); {MISSING_TEXT}: not run (yet). Every value is in ablation.csv.",
        "top": top,
        "headers": ["model"] + [v for _, v in columns],
        "md_headers": ["model"] + [f"{f}: {v}" for f, v in columns],
        "rows": rows,
        "csv": "ablation.csv",
        "frame": pd.DataFrame(records),
    }


def sweep_axis(spec: StudySpec) -> str | None:
    """The swept axis of a one-axis study (besides the seed; not ``model``), else None."""
    axes = [a for a in spec.axes if a != SEED_AXIS]
    if spec.vary or len(axes) != 1 or axes[0] == MODEL_AXIS:
        return None
    return axes[0]


def sweep(spec: StudySpec, summary) -> dict[str, Any] | None:
    """The sweep table (the paper's composition-ratio table) of a one-axis study; None otherwise."""
    import pandas as pd

    axis = sweep_axis(spec)
    if axis is None:
        return None
    rule = spec.report.get("min_defect_recall")
    name = axis.rsplit(".", 1)[-1]
    by_label = {str(row[axis]): row for _, row in summary.iterrows()}
    headers = [name, "seeds", "accuracy (%)", "precision (macro, %)", "recall (macro, %)", "F1 (macro, %)",
               "parameters (M)", "defect recall (%)"]
    if rule is not None:
        headers.append(f"defect recall > {rule * 100:g} %")
    rows, records = [], []
    for label in spec.axes[axis]:
        g = by_label.get(label)
        done = _done(g)
        params = _num(g["params"]) if done else None
        recall = _num(g.get("defect_vs_none_recall_mean")) if done else None
        record = {name: label, "n_seeds": int(g["n_seeds"]) if g is not None else 0, "params": params}
        out = [{"text": label, "cls": ""}, {"text": str(record["n_seeds"]), "cls": ""}]
        for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "defect_vs_none_recall"):
            mean, std = (g.get(f"{key}_mean"), g.get(f"{key}_std")) if done else (None, None)
            record[f"{key}_mean"], record[f"{key}_std"] = _num(mean), _num(std)
            if key == "defect_vs_none_recall":
                out.append({"text": MISSING_TEXT if params is None else f"{params / 1e6:.2f}", "cls": ""})
            out.append({"text": _pct(mean, std), "cls": ""})
        if rule is not None:
            passes = None if recall is None else recall > rule
            record["passes_rule"] = passes
            text = MISSING_TEXT if passes is None else ("pass" if passes else "fail")
            out.append({"text": text, "cls": "" if passes is None else ("better" if passes else "worse")})
        rows.append(out)
        records.append(record)
    note = (f"One row per value of {axis}: accuracy, macro precision, recall and F1 (%, mean ± std over "
            "seeds), trainable parameters, and defect recall (share of defect maps not called 'none').")
    if rule is not None:
        note += (f" The rule (the spec's report.min_defect_recall): the mean defect recall must exceed "
                 f"{rule * 100:g} % (SP&A-Net's 'recall > 99 %, so as not to miss defective wafers').")
    return {"id": "sweep", "title": f"Sweep of {axis}", "note": note, "top": None, "headers": headers,
            "md_headers": headers, "rows": rows, "csv": "sweep.csv", "frame": pd.DataFrame(records)}


@dataclass
class Family:
    """Groups of one model (same settings but the width): its sizes, smallest first."""

    name: str
    groups: list[str] = field(default_factory=list)
    widths: list[float] = field(default_factory=list)


def families(spec: StudySpec) -> list[Family]:
    """Families of groups that differ only in ``model_options.width`` (at least two widths each)."""
    from waferlab.study.spec import cell_config

    seen: dict[str, Family] = {}
    cells = spec.cells()
    first = cells[0].seed if cells else None
    for cell in cells:
        if cell.seed != first:
            continue
        settings = dict(cell.settings)
        width = settings.pop(WIDTH_KEY, 1.0)
        settings.pop(SEED_AXIS, None)
        key = repr((cell.config, sorted(settings.items(), key=lambda kv: kv[0])))
        model = settings.get("model") or cell_config(cell).model
        fam = seen.setdefault(key, Family(str(model)))
        fam.groups.append(cell.group)
        fam.widths.append(float(width))
    out = [f for f in seen.values() if len(set(f.widths)) >= 2]
    for f in out:
        order = sorted(range(len(f.widths)), key=lambda i: f.widths[i])
        f.groups, f.widths = [f.groups[i] for i in order], [f.widths[i] for i in order]
    return out


def family_table(fams: list[Family], summary) -> dict[str, Any] | None:
    """Family x size: width, parameters, accuracy and macro-F1 (the accuracy-vs-parameters figure's data)."""
    import pandas as pd

    if not fams:
        return None
    groups = _by_group(summary)
    rows, records = [], []
    for fam in fams:
        for i, (group, width) in enumerate(zip(fam.groups, fam.widths)):
            g = groups.get(group)
            done = _done(g)
            params = _num(g["params"]) if done else None
            record = {"family": fam.name, "size": i + 1, "group": group, "width": width, "params": params,
                      "n_seeds": int(g["n_seeds"]) if g is not None else 0}
            for key in ("accuracy", "macro_f1"):
                record[f"{key}_mean"] = _num(g.get(f"{key}_mean")) if done else None
                record[f"{key}_std"] = _num(g.get(f"{key}_std")) if done else None
            records.append(record)
            rows.append([{"text": t, "cls": ""} for t in (
                fam.name if i == 0 else "", str(i + 1), group, f"{width:g}",
                MISSING_TEXT if params is None else f"{params / 1e6:.2f}",
                _pct(record["accuracy_mean"], record["accuracy_std"]) if done else MISSING_TEXT,
                _pct(record["macro_f1_mean"], record["macro_f1_std"]) if done else MISSING_TEXT)])
    headers = ["family", "size", "group", "width", "parameters (M)", "accuracy (%)", "macro-F1 (%)"]
    return {"id": "families", "title": "Model families at several sizes",
            "note": "Each family's sizes (width multiplier), smallest first: the points of the accuracy-vs-"
            "parameters figure, one line per family (mean ± std over seeds).",
            "top": None, "headers": headers, "md_headers": headers, "rows": rows, "csv": "families.csv",
            "frame": pd.DataFrame(records)}


def fig_families(summary, fams: list[Family]) -> bytes:
    """Accuracy against parameters, one line per family through its sizes (SP&A-Net's raei/radi/rapi plot);
    groups outside a family are single points."""
    import matplotlib.pyplot as plt

    from waferlab.study.report import _colors, _png, params_axes

    groups = _by_group(summary)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = _colors([f.name for f in fams])
    in_family = {g for f in fams for g in f.groups}
    for fam in fams:
        pts = [(groups[g]["params"] / 1e6, groups[g]["accuracy_mean"] * 100,
                _num(groups[g]["accuracy_std"]))
               for g in fam.groups if _done(groups.get(g)) and _num(groups[g]["params"]) is not None]
        if not pts:
            continue
        x, y, s = zip(*pts)
        err = [v * 100 if v is not None else 0.0 for v in s]
        ax.errorbar(x, y, yerr=err if any(err) else None, fmt="-o", ms=6, capsize=3, lw=1.6,
                    color=colors[fam.name], label=fam.name)
    for name, row in groups.items():
        if name not in in_family and _done(row) and _num(row["params"]) is not None:
            ax.plot([row["params"] / 1e6], [row["accuracy_mean"] * 100], "o", color="#555555")
            ax.annotate(name, (row["params"] / 1e6, row["accuracy_mean"] * 100), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
    params_axes(ax, "Accuracy vs parameters, one line per model family (mean ± std over seeds)")
    if fams:
        ax.legend(fontsize=8)
    return _png(fig)


def views(spec: StudySpec, summary) -> tuple[list[dict[str, Any]], list[Family]]:
    """Every paper-shaped table this study has, and its model families (for the figure)."""
    fams = families(spec)
    tables = [t for t in (ablation(spec, summary), sweep(spec, summary), family_table(fams, summary)) if t]
    return tables, fams
