"""The open-set benchmark's own scores and diagnosis (``benchmarks/open_set.py``), on tiny arrays."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

_SPEC = importlib.util.spec_from_file_location(
    "open_set_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "open_set.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


class _Fold(bench.Fold):
    """A Fold built from arrays in memory (the benchmark reads ``collected.npz``)."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
        self.meta, self.a = meta or {"temperature": 1.0}, arrays


def test_patch_knn_flags_a_map_whose_one_cell_is_new_where_pooled_knn_does_not() -> None:
    """A map of known cells plus one cell unlike any training cell: the pooled features barely move
    (one cell of 16), the patch score (its strangest cell) stands out."""
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(4, 8)).astype(np.float32)

    def maps(n: int, novel: bool = False) -> np.ndarray:
        cells = protos[rng.integers(0, 4, size=(n, 16))] + 0.05 * rng.normal(size=(n, 16, 8))
        if novel:
            cells[:, 0] = rng.normal(size=(n, 8)) * 3
        return cells.transpose(0, 2, 1).reshape(n, 8, 4, 4).astype(np.float16)

    arrays = {f"{p}/cam_sp": maps(n, p == "unknown") for p, n in
              (("train", 200), ("test", 50), ("unknown", 50))}
    for part in ("train", "test", "unknown"):
        arrays[f"{part}/logits"] = np.zeros((len(arrays[f"{part}/cam_sp"]), 3), np.float32)
        arrays[f"{part}/cam"] = arrays[f"{part}/cam_sp"].astype(np.float32).mean(axis=(2, 3))
    fold = _Fold(arrays)
    patch = bench._patch_knn(fold, "cam", k=1)
    pooled = bench._knn(fold, "cam", 1)
    assert bench.auroc(patch("test"), patch("unknown")) > 0.99
    assert bench.auroc(pooled("test"), pooled("unknown")) < bench.auroc(patch("test"), patch("unknown"))


def test_max_fusion_keeps_whatever_either_score_finds_strange() -> None:
    """z-max: a map flagged by one score only stays flagged; a z-sum would halve its margin."""
    ref = np.random.default_rng(1).normal(size=(500, 2))
    data = {"val": ref, "test": np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])}
    fused = bench._z_max(lambda p: data[p][:, 0], lambda p: data[p][:, 1])("test")
    assert fused[1] > 3.5 and fused[2] > 3.5 and fused[0] < 1.0


def test_neighbour_classes_name_the_known_class_a_held_out_class_sits_next_to() -> None:
    """Held-out maps placed next to class 1's training maps: the diagnosis names class 1 (and the class
    the logits predict), per layer."""
    rng = np.random.default_rng(2)
    centres = np.eye(4, 6, dtype=np.float32)
    y = np.repeat([0, 1, 2], 20)
    train = centres[y] + 0.01 * rng.normal(size=(60, 6)).astype(np.float32)
    unk = centres[1] + 0.01 * rng.normal(size=(10, 6)).astype(np.float32)
    logits = np.tile(np.array([[0.0, 5.0, 0.0]], np.float32), (10, 1))
    arrays = {"train/cam": train, "train/cam_max": train, "train/labels": y,
              "unknown/cam": unk, "unknown/cam_max": unk, "unknown/logits": logits}
    fold = _Fold(arrays, {"class_names": json.dumps(["A", "B", "C"])})
    out = bench.neighbour_classes(fold, np.array(["X"] * 10))
    assert out["cam"] == {"X": {"B": 1.0}} and out["predicted"] == {"X": {"B": 1.0}}
