"""Data layer: readers for every source, synthetic wafers, the prepared cache, splits and augmentation."""

from waferlab.data.table import (
    DEFECT8_CLASSES,
    MIXED38_TYPES,
    UNLABELED,
    WM811K_CLASSES,
    WaferTable,
)

__all__ = ["DEFECT8_CLASSES", "MIXED38_TYPES", "UNLABELED", "WM811K_CLASSES", "WaferTable"]
