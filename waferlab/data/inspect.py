"""``waferlab data inspect``: what a source or cache holds (maps, classes, splits, sizes), and examples."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from waferlab.data.cache import PreparedData, is_cache, load_cache
from waferlab.data.fab.common import FabOptions
from waferlab.data.table import UNLABELED, WM811K_CLASSES, WaferTable

Data = WaferTable | PreparedData


def _label_names(data: Data) -> np.ndarray:
    return data.label_names() if isinstance(data, PreparedData) else data.labels


def _class_order(data: Data, names: np.ndarray) -> list[str]:
    """Classes in a stable order: the data's own vocabulary (or WM-811K's), others sorted, unlabeled last."""
    present = set(names.tolist())
    base = list(data.class_names) if isinstance(data, PreparedData) else list(WM811K_CLASSES)
    order = [c for c in base if c in present]
    order += sorted(c for c in present if c not in order and c != UNLABELED)
    if UNLABELED in present:
        order.append(UNLABELED)
    return order


def _fail_fraction(data: Data) -> np.ndarray:
    """Failed dies / on-wafer dies per map (NaN for a map without dies)."""
    if isinstance(data, PreparedData):
        maps = data.maps.reshape(len(data), -1)
        failed = np.zeros(len(data))
        wafer = np.zeros(len(data))
        for start in range(0, len(data), 65536):  # bounded temporaries on 811k maps
            chunk = maps[start:start + 65536]
            failed[start:start + 65536] = (chunk == 2).sum(1)
            wafer[start:start + 65536] = (chunk > 0).sum(1)
    else:
        failed = np.array([np.count_nonzero(m == 2) for m in data.maps], dtype=np.float64)
        wafer = np.array([np.count_nonzero(m) for m in data.maps], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(wafer > 0, failed / np.maximum(wafer, 1), np.nan)


def summarize(data: Data, source: str = "") -> dict[str, Any]:
    """Counts of maps, classes, source splits, lots and original map sizes, as a JSON-ready dict."""
    names = _label_names(data)
    order = _class_order(data, names)
    if isinstance(data, PreparedData):  # vocabulary order; classes without a map are listed as 0
        class_counts = data.class_counts()
    else:
        counts = Counter(names.tolist())
        class_counts = {c: int(counts[c]) for c in order}
    split_counts = dict(Counter((str(s) or "unassigned") for s in data.split.tolist()).most_common())
    shapes = np.asarray(data.orig_shape, dtype=np.int64).reshape(-1, 2)
    if len(shapes):
        uniq, shape_counts = np.unique(shapes, axis=0, return_counts=True)
        top = np.argsort(-shape_counts, kind="stable")[:10]
        map_sizes = {
            "n_distinct": int(len(uniq)),
            "height": {"min": int(shapes[:, 0].min()), "median": float(np.median(shapes[:, 0])),
                       "max": int(shapes[:, 0].max())},
            "width": {"min": int(shapes[:, 1].min()), "median": float(np.median(shapes[:, 1])),
                      "max": int(shapes[:, 1].max())},
            "top": [{"shape": [int(uniq[t, 0]), int(uniq[t, 1])], "count": int(shape_counts[t])}
                    for t in top],
        }
    else:
        map_sizes = {"n_distinct": 0, "height": None, "width": None, "top": []}
    fail = _fail_fraction(data)
    fail_by_class = {}
    for c in order:
        vals = fail[names == c]
        vals = vals[~np.isnan(vals)]
        fail_by_class[c] = round(float(vals.mean()), 4) if len(vals) else None
    lots = {str(x) for x in data.lot.tolist()} - {""}
    summary: dict[str, Any] = {
        "source": source or data.source,
        "kind": "cache" if isinstance(data, PreparedData) else "table",
        "n_maps": int(len(data)),
        "class_counts": class_counts,
        "split_counts": split_counts,
        "n_lots": len(lots),
        "map_sizes": map_sizes,
        "mean_fail_fraction": fail_by_class,
        "has_masks": data.masks is not None,
    }
    if isinstance(data, PreparedData):
        summary["cache_size"] = int(data.size)
    if data.multi_hot is not None:
        mh = np.asarray(data.multi_hot)
        summary["multi_label_counts"] = {name: int(mh[:, j].sum())
                                         for j, name in enumerate(data.multi_label_names)}
        summary["n_types_per_map"] = {str(k): int(v) for k, v in
                                      sorted(Counter(mh.sum(1).astype(int).tolist()).items())}
    return summary


def inspect_source(src: str | os.PathLike[str], fab: FabOptions | None = None) -> tuple[dict[str, Any], Data]:
    """Read any source (via the readers) or a prepared cache and summarise it; returns (summary, data).

    ``fab`` says how fab files (STDF, G85, ...) become pass/fail maps.
    """
    if is_cache(src):
        data: Data = load_cache(src)
    else:
        from waferlab.data.readers import load_table

        data = load_table(src, fab)
    return summarize(data, source=str(src)), data


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as aligned, human-readable text."""
    n = max(summary["n_maps"], 1)
    lines = [f"source      {summary['source']} ({summary['kind']})", f"maps        {summary['n_maps']}"]
    if "cache_size" in summary:
        lines.append(f"cache size  {summary['cache_size']}x{summary['cache_size']}")
    lines.append(f"lots        {summary['n_lots']}")
    width = max([10, *(len(str(k)) for k in [*summary["class_counts"], *summary["split_counts"]])]) + 2
    lines.append(f"{'classes':<{width + 2}}{'count':>8} {'%':>6}   mean fail fraction")
    for name, count in summary["class_counts"].items():
        ff = summary["mean_fail_fraction"].get(name)
        lines.append(f"  {name:<{width}}{count:>8} {100 * count / n:>6.1f}   "
                     f"{'-' if ff is None else f'{ff:.3f}'}")
    lines.append("splits (source tags)")
    for name, count in summary["split_counts"].items():
        lines.append(f"  {name:<{width}}{count:>8} {100 * count / n:>6.1f}")
    ms = summary["map_sizes"]
    lines.append(f"map sizes   {ms['n_distinct']} distinct shapes")
    if ms["height"]:
        for axis in ("height", "width"):
            d = ms[axis]
            lines.append(f"  {axis:<8} min {d['min']}  median {d['median']:g}  max {d['max']}")
        lines.append("  most common: " + ", ".join(f"{t['shape'][0]}x{t['shape'][1]} ({t['count']})"
                                             for t in ms["top"]))
    if "multi_label_counts" in summary:
        lines.append("mixed types  " + ", ".join(f"{k} {v}"
                                                 for k, v in summary["multi_label_counts"].items()))
        lines.append("types/map    " + ", ".join(f"{k}: {v}" for k, v in summary["n_types_per_map"].items()))
    if summary.get("has_masks"):
        lines.append("masks       yes (true pattern regions)")
    return "\n".join(lines)


def plot_examples(data: Data, png_path: str | os.PathLike[str], per_class: int = 6, seed: int = 0) -> Path:
    """Save a PNG grid of up to ``per_class`` random maps per class (one row per class), atomically."""
    from waferlab.plotting import draw_wafer, save_figure, use_agg

    use_agg()
    import matplotlib.pyplot as plt

    names = _label_names(data)
    order = _class_order(data, names)
    largest = max([int((names == c).sum()) for c in order] or [1])
    per_class = max(1, min(int(per_class), largest))  # no empty columns for a file of one or two wafers
    rng = np.random.default_rng(seed)
    n_rows = max(1, len(order))
    cell = 1.4 if per_class >= 3 else 2.6
    fig, axes = plt.subplots(n_rows, per_class, figsize=(cell * per_class + 0.8, (cell + 0.05) * n_rows),
                             squeeze=False, dpi=100)
    for r, cls in enumerate(order):
        members = np.flatnonzero(names == cls)
        pick = np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False))
        for c in range(per_class):
            ax = axes[r, c]
            if c < len(pick):
                i = int(pick[c])
                h, w = (int(x) for x in data.orig_shape[i])
                wafer_id = getattr(data, "wafer_id", None)
                name = f"{wafer_id[i]}\n" if wafer_id is not None and wafer_id[i] else ""
                draw_wafer(ax, data.maps[i], title=f"{name}{h}x{w}", fontsize=7)
            else:
                ax.axis("off")
            if c == 0:
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_ylabel(f"{cls}\n(n={len(members)})", fontsize=8)
    if not order:
        axes[0, 0].text(0.5, 0.5, "no maps", ha="center", va="center")
    fig.suptitle(f"{Path(str(data.source)).name or 'wafer maps'}: examples per class", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png_path)
    return Path(png_path)
