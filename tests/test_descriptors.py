"""Classic wafer descriptors (the ``wafer`` part of the ``knn+wafer`` unknown-pattern score): what each
family sees on hand-made maps, batch independence, rotation invariance and a per-map reference."""

from __future__ import annotations

import numpy as np
import pytest

from waferlab.deploy.descriptors import DESCRIPTOR_NAMES, wafer_descriptors

SIZE = 32


def col(name: str) -> int:
    return DESCRIPTOR_NAMES.index(name)


def disk(size: int = SIZE) -> np.ndarray:
    """An all-good round wafer (1 inside the disk, 0 outside)."""
    c = (size - 1) / 2
    y, x = np.mgrid[:size, :size]
    return np.where(np.hypot(y - c, x - c) <= size / 2 - 0.5, 1, 0).astype(np.uint8)


def with_fails(mask: np.ndarray) -> np.ndarray:
    m = disk()
    m[mask & (m > 0)] = 2
    return m


def line_map() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[20, 6:26] = True  # a horizontal 1-die scratch
    return with_fails(mask)


def blob_map() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[13:19, 13:19] = True  # a centred compact blob
    return with_fails(mask)


def test_all_good_wafer_and_empty_grid_are_all_zeros() -> None:
    d = wafer_descriptors(np.stack([disk(), np.zeros((SIZE, SIZE), np.uint8)]))
    assert d.shape == (2, len(DESCRIPTOR_NAMES)) and d.dtype == np.float32
    assert np.all(d == 0)


def test_a_line_is_elongated_with_a_radon_line_excess_and_a_blob_is_compact_and_central() -> None:
    line, blob = wafer_descriptors(np.stack([line_map(), blob_map()]))
    assert line[col("comp_elongation")] > 3 and blob[col("comp_elongation")] < 0.1
    assert line[col("line_excess")] > blob[col("line_excess")] > 0  # a blob is a short thick line
    assert line[col("line_excess_over_median")] > 3 * blob[col("line_excess_over_median")]
    assert line[col("line_anisotropy")] > 3 * blob[col("line_anisotropy")]
    assert blob[col("comp_radius")] < 0.1 < line[col("comp_radius")]
    assert blob[col("ring_0.0")] == 1 and line[col("ring_0.0")] == 0  # the centre ring: all failed / none
    assert line[col("comp_log_count")] == pytest.approx(np.log(2))  # one component
    assert line[col("comp_top3_share")] == 1


def test_rotation_by_90_degrees_leaves_the_descriptors_nearly_unchanged() -> None:
    """Rings, shares and component counts are exact; the Radon bins round differently (ties at half-die
    offsets) and equal-sized largest components may swap, so those move on a few maps only."""
    from waferlab.data.cache import prepare
    from waferlab.data.synth import generate

    maps = prepare(generate(100, seed=4), SIZE).maps
    a = wafer_descriptors(maps)
    b = wafer_descriptors(np.ascontiguousarray(np.rot90(maps, 1, axes=(1, 2))))
    rel = np.abs(a - b) / (np.abs(a).max(0) + 1e-3)
    exact = [col(n) for n in DESCRIPTOR_NAMES if n.startswith(("ring", "fail", "clustered", "comp_share",
                                                                 "comp_top3", "comp_log"))]
    assert rel[:, exact].max() < 1e-5
    assert np.quantile(rel, 0.9, axis=0).max() < 0.15 and np.median(rel) == 0


def _components_one_by_one(m: np.ndarray) -> list[float]:
    """The component descriptors of one map, labelled alone (the reference for the batched labelling)."""
    from scipy import ndimage

    die, fail = m > 0, m == 2
    yy, xx = np.nonzero(die)
    cy, cx, radius = yy.mean(), xx.mean(), np.sqrt(die.sum() / np.pi)
    lab, n = ndimage.label(fail, structure=np.ones((3, 3)))
    if n == 0:
        return [0.0] * 5
    sizes = ndimage.sum(fail, lab, range(1, n + 1))
    by, bx = np.nonzero(lab == np.argmax(sizes) + 1)
    cov = np.cov(np.stack([by, bx])) if len(by) > 2 else np.eye(2)
    ev = np.sort(np.linalg.eigvalsh(cov + 1e-3 * np.eye(2)))
    return [sizes.max() / die.sum(), np.hypot(by.mean() - cy, bx.mean() - cx) / radius,
            0.5 * np.log(ev[1] / ev[0]), np.sort(sizes)[::-1][:3].sum() / fail.sum(), np.log1p(n)]


def test_one_labelling_of_the_whole_batch_matches_labelling_each_map_alone() -> None:
    """Fails on the last row of one map and the first row of the next must not join: the batch is labelled
    in one call with a structure that connects nothing across maps."""
    from waferlab.data.cache import prepare
    from waferlab.data.synth import generate

    maps = prepare(generate(40, seed=5), SIZE).maps.copy()
    maps[0::2, -1, :] = 2  # edge rows that would touch the next map in a naive 3-D labelling
    maps[1::2, 0, :] = 2
    batch = wafer_descriptors(maps)
    alone = np.concatenate([wafer_descriptors(m[None]) for m in maps])
    np.testing.assert_allclose(batch, alone, rtol=1e-5, atol=1e-6)
    ref = np.array([_components_one_by_one(m) for m in maps])
    np.testing.assert_allclose(batch[:, col("comp_share"):], ref, rtol=1e-4, atol=1e-5)


def _same_as_reference(maps: np.ndarray) -> None:
    """The descriptors equal the first implementation's (tests/descriptors_reference.py) column by column
    (its 18; columns appended later are not in it)."""
    from descriptors_reference import reference_descriptors

    want = reference_descriptors(maps)
    got = wafer_descriptors(maps)
    np.testing.assert_allclose(got[:, :want.shape[1]], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [32, 45, 64])
def test_the_fast_descriptors_equal_the_first_implementation_on_synthetic_maps(
        size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared outlines (masks computed once), maps without fails or clustered fails, a map without dies,
    several chunks (CHUNK lowered) and odd sizes give the reference's numbers."""
    import waferlab.deploy.descriptors as descriptors
    from waferlab.data.cache import prepare
    from waferlab.data.synth import generate

    maps = prepare(generate(300, seed=6), size).maps.copy()
    maps[:20] = maps[20]  # one outline shared by many maps
    maps[5] = np.where(maps[5] > 0, 1, 0)  # no fails
    maps[6] = 0  # no dies
    maps[7][maps[7] == 2] = 1
    maps[7].reshape(-1)[np.flatnonzero(maps[7])[::7]] = 2  # isolated fails only: nothing clustered
    _same_as_reference(maps)
    monkeypatch.setattr(descriptors, "CHUNK", 64)
    _same_as_reference(maps)


def test_the_fast_descriptors_equal_the_first_implementation_on_real_maps(shared_data) -> None:
    from waferlab.data.cache import prepare
    from waferlab.data.readers import load_table

    for src in ("wm811k_mohithmanjunath04_sample_197645f/LSWMD_sample.pkl",
                "wm811k_caslabai_sub100/sub100_WM-811K.csv"):
        table = load_table(shared_data / src)
        for size, rule in ((64, "failkeep"), (32, "nearest")):
            _same_as_reference(prepare(table, size, resize=rule).maps)
