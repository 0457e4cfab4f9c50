"""Figures of CAMs drawn on the wafer maps themselves: heat over the dies only, with a colour bar."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from waferlab.explain.cam import METHOD_TITLES
from waferlab.plotting import draw_wafer, save_figure, use_agg

#: Colormap and opacity of the heat drawn over the wafer.
HEAT_CMAP = "jet"
HEAT_ALPHA = 0.55
#: Opacity of the dark mark that keeps failed dies visible under the heat.
FAILED_ALPHA = 0.35
_FAILED_CMAP = "Greys"


def draw_overlay(ax, wafer: np.ndarray, cam: np.ndarray, title: str | None = None, fontsize: int = 8):
    """Draw the wafer map, then the CAM over its dies only (no-die area uncoloured); returns the image."""
    wafer = np.asarray(wafer)
    draw_wafer(ax, wafer, title, fontsize=fontsize)
    heat = np.ma.masked_where(wafer == 0, np.asarray(cam, dtype=np.float32))
    image = ax.imshow(heat, cmap=HEAT_CMAP, vmin=0.0, vmax=1.0, alpha=HEAT_ALPHA, interpolation="nearest")
    # keep the failed dies visible through the heat: darken them slightly
    failed = np.ma.masked_where(wafer != 2, np.ones(wafer.shape, np.float32))
    ax.imshow(failed, cmap=_FAILED_CMAP, vmin=0.0, vmax=1.0, alpha=FAILED_ALPHA, interpolation="nearest")
    return image


def _colorbar(fig, image, axes) -> None:
    bar = fig.colorbar(image, ax=list(np.ravel(axes)), shrink=0.8, fraction=0.03, pad=0.02)
    bar.set_label("CAM relevance", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _blank(ax, text: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=7, wrap=True, transform=ax.transAxes)


@dataclass
class GridRow:
    """One row of a CAM grid: a label, the wafer map (None = nothing to show) and its CAM per method."""

    label: str
    wafer: np.ndarray | None
    cams: dict[str, np.ndarray] = field(default_factory=dict)
    note: str = ""


def plot_study_grid(rows: Sequence[GridRow], methods: Sequence[str], path: str | os.PathLike[str],
                    title: str | None = None) -> None:
    """The attention study's figure: per class the original map, then one overlay per method."""
    use_agg()
    import matplotlib.pyplot as plt

    n_rows, n_cols = max(1, len(rows)), 1 + len(methods)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols + 0.8, 2.15 * n_rows), dpi=110,
                             squeeze=False)
    fig.subplots_adjust(hspace=0.45)
    image = None
    titled = False
    for r, row in enumerate(rows):
        if row.wafer is None:
            _blank(axes[r, 0], f"{row.label}\n(no correctly classified map)")
            for c in range(1, n_cols):
                _blank(axes[r, c], "")
            continue
        draw_wafer(axes[r, 0], row.wafer, f"{row.label}" + (f"\n{row.note}" if row.note else ""), fontsize=7)
        for c, method in enumerate(methods, start=1):
            image = draw_overlay(axes[r, c], row.wafer, row.cams[method],
                                 None if titled else METHOD_TITLES.get(method, method), fontsize=8)
        titled = True
    if image is not None:
        _colorbar(fig, image, axes)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def plot_map_overlays(wafer: np.ndarray, cams: dict[str, np.ndarray], title: str,
                      path: str | os.PathLike[str]) -> None:
    """One map: the original and one overlay per method, titled with true/predicted class and confidence."""
    use_agg()
    import matplotlib.pyplot as plt

    methods = list(cams)
    fig, axes = plt.subplots(1, 1 + len(methods), figsize=(2.2 * (1 + len(methods)) + 0.8, 2.6), dpi=110,
                             squeeze=False)
    draw_wafer(axes[0, 0], wafer, "map", fontsize=8)
    image = None
    for c, method in enumerate(methods, start=1):
        image = draw_overlay(axes[0, c], wafer, cams[method], METHOD_TITLES.get(method, method))
    if image is not None:
        _colorbar(fig, image, axes)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def plot_comparison(models: Sequence[str], cells: Sequence[Sequence[GridRow]], path: str | os.PathLike[str],
                    title: str | None = None) -> None:
    """Several models on the same maps: one row per model, one column per map, one CAM per cell.

    ``cells[m][j]`` is map j for model m; its ``cams`` hold exactly one CAM and ``note`` the cell title.
    """
    use_agg()
    import matplotlib.pyplot as plt

    n_rows = max(1, len(models))
    n_cols = max(1, max((len(r) for r in cells), default=1))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols + 1.2, 2.0 * n_rows), dpi=110,
                             squeeze=False)
    image = None
    for m, name in enumerate(models):
        for j in range(n_cols):
            ax = axes[m, j]
            if j >= len(cells[m]) or cells[m][j].wafer is None:
                _blank(ax, "")
                continue
            cell = cells[m][j]
            cam = next(iter(cell.cams.values()))
            image = draw_overlay(ax, cell.wafer, cam, cell.note, fontsize=7)
        axes[m, 0].set_ylabel(name, fontsize=8)
    if image is not None:
        _colorbar(fig, image, axes)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
