"""One look for wafer maps in every figure: the colours of no-die / good / failed dies."""

from __future__ import annotations

import numpy as np

#: Colours for 0 (no die), 1 (good die), 2 (failed die).
WAFER_COLORS = ("#f2f2f2", "#5b8fd6", "#e0402e")


def use_agg() -> None:
    """Select matplotlib's file-only backend (no screen needed); call before importing pyplot."""
    import matplotlib

    matplotlib.use("Agg", force=True)


def wafer_cmap():  # -> matplotlib.colors.ListedColormap
    """The 3-colour colormap for maps with values 0/1/2 (use vmin=0, vmax=2)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(list(WAFER_COLORS), name="wafer")


def draw_wafer(ax, wafer: np.ndarray, title: str | None = None, fontsize: int = 8) -> None:
    """Draw one wafer map on ``ax`` with nearest-neighbour pixels and no axes."""
    ax.imshow(np.asarray(wafer), cmap=wafer_cmap(), vmin=0, vmax=2, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def save_figure(fig, path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    from waferlab.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")
    plt.close(fig)
