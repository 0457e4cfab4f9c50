"""The one in-memory table every reader yields, and the class vocabularies of WM-811K and MixedWM38."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from waferlab.errors import WaferlabError

#: WM-811K class names, exactly as spelt in ``LSWMD.pkl`` (the order is the canonical 9-class order).
WM811K_CLASSES: tuple[str, ...] = (
    "Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Random", "Scratch", "none",
)
#: The attention study's 8 defect classes, in its label-id order (failureNum: Center=0 ... Near-full=7).
DEFECT8_CLASSES: tuple[str, ...] = (
    "Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Random", "Scratch", "Near-full",
)
#: MixedWM38 ``arr_1`` column order, as checked on real maps (data.md S.2), in WM-811K spelling.
MIXED38_TYPES: tuple[str, ...] = (
    "Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Scratch", "Random",
)
#: Label of a map that carries no label.
UNLABELED = "unlabeled"


@dataclass
class WaferTable:
    """Wafer maps with their labels and provenance, one row per map.

    ``maps`` holds 2-D uint8 arrays (0 no die, 1 good, 2 failed) of varying shape. ``labels`` is the
    class name or ``"unlabeled"``; ``split`` the source's own split tag (``"Training"``, ``"Test"``
    or ``""``). ``multi_hot`` (N x len(multi_label_names)) is set for mixed-type data, ``masks``
    (same shapes as ``maps``, 1 inside the true pattern region) only for synthetic maps. Maps read from
    fab files (:mod:`waferlab.data.fab`) may keep ``bins`` (same shapes as ``maps``, int32, the file's
    bin per die, -1 where there is no die) and ``wafer_id`` (the file's wafer id strings).
    """

    maps: list[np.ndarray]
    labels: np.ndarray
    split: np.ndarray
    lot: np.ndarray
    wafer_index: np.ndarray
    source: str = ""
    multi_hot: np.ndarray | None = None
    multi_label_names: tuple[str, ...] = ()
    masks: list[np.ndarray] | None = None
    orig_shape: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))
    bins: list[np.ndarray] | None = None
    wafer_id: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.maps)
        self.labels = np.asarray(self.labels, dtype=object)
        self.split = np.asarray(self.split, dtype=object)
        self.lot = np.asarray(self.lot, dtype=object)
        self.wafer_index = np.asarray(self.wafer_index, dtype=np.int64)
        if len(self.orig_shape) != n:
            self.orig_shape = np.array([m.shape for m in self.maps], dtype=np.int32).reshape(n, 2)
        for name in ("labels", "split", "lot", "wafer_index"):
            if len(getattr(self, name)) != n:
                raise WaferlabError(f"{self.source or 'table'}: column {name!r} has "
                                    f"{len(getattr(self, name))} rows, expected {n}")
        if self.multi_hot is not None and len(self.multi_hot) != n:
            raise WaferlabError(f"{self.source or 'table'}: {len(self.multi_hot)} label rows for {n} maps")
        if self.wafer_id is not None:
            self.wafer_id = np.asarray(self.wafer_id, dtype=object)
        for name in ("bins", "wafer_id"):
            column = getattr(self, name)
            if column is not None and len(column) != n:
                raise WaferlabError(f"{self.source or 'table'}: column {name!r} has {len(column)} rows, "
                                    f"expected {n}")

    def __len__(self) -> int:
        return len(self.maps)

    def class_counts(self) -> dict[str, int]:
        """Maps per label (``"unlabeled"`` included), most frequent first."""
        return dict(Counter(self.labels.tolist()).most_common())

    def split_counts(self) -> dict[str, int]:
        """Maps per source split tag (``""`` shown as ``"unassigned"``)."""
        return dict(Counter((s or "unassigned") for s in self.split.tolist()).most_common())

    def subset(self, index: np.ndarray | list[int]) -> WaferTable:
        """Rows ``index`` (an int array or boolean mask) as a new table sharing the map arrays."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return WaferTable(
            maps=[self.maps[i] for i in idx],
            labels=self.labels[idx],
            split=self.split[idx],
            lot=self.lot[idx],
            wafer_index=self.wafer_index[idx],
            source=self.source,
            multi_hot=None if self.multi_hot is None else self.multi_hot[idx],
            multi_label_names=self.multi_label_names,
            masks=None if self.masks is None else [self.masks[i] for i in idx],
            orig_shape=self.orig_shape[idx],
            bins=None if self.bins is None else [self.bins[i] for i in idx],
            wafer_id=None if self.wafer_id is None else self.wafer_id[idx],
        )

    def to_frame(self):  # -> pandas.DataFrame
        """The table as a pandas DataFrame (one column per field; maps stay numpy arrays)."""
        import pandas as pd

        frame = pd.DataFrame({
            "map": self.maps,
            "label": self.labels,
            "split": self.split,
            "lot": self.lot,
            "wafer_index": self.wafer_index,
            "orig_shape": [tuple(s) for s in self.orig_shape.tolist()],
        })
        if self.multi_hot is not None:
            for j, name in enumerate(self.multi_label_names):
                frame[f"has_{name}"] = self.multi_hot[:, j]
        if self.masks is not None:
            frame["mask"] = self.masks
        if self.bins is not None:
            frame["bins"] = self.bins
        if self.wafer_id is not None:
            frame["wafer_id"] = self.wafer_id
        return frame
