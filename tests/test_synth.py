"""Synthetic generator: reproducibility, classes, masks, mixtures, calibration against real maps, CLI."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from waferlab.cli import main
from waferlab.data.calibrate import compare, load_real_samples, map_stats, table_stats
from waferlab.data.synth import generate, mixed_class_names, write_synthetic
from waferlab.data.table import MIXED38_TYPES, WM811K_CLASSES
from waferlab.errors import WaferlabError

_HAVE_READERS = all(importlib.util.find_spec(m) is not None
                    for m in ("waferlab.data.readers", "waferlab.data.lswmd"))
needs_readers = pytest.mark.skipif(not _HAVE_READERS, reason="waferlab.data.readers/lswmd not present")


@pytest.fixture(scope="module")
def table():
    return generate(270, seed=11)  # 30 maps of each of the 9 classes


def _norm_radius(shape):
    h, w = shape
    ii, jj = np.mgrid[0:h, 0:w]
    return np.sqrt(((ii - (h - 1) / 2) / (h / 2)) ** 2 + ((jj - (w - 1) / 2) / (w / 2)) ** 2)


def test_same_seed_same_maps_and_different_seed_differs():
    a, b, c = generate(40, seed=5), generate(40, seed=5), generate(40, seed=6)
    assert list(a.labels) == list(b.labels)
    assert all(np.array_equal(x, y) for x, y in zip(a.maps, b.maps))
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    assert list(a.split) == list(b.split)
    assert list(a.labels) != list(c.labels) or not all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a.maps, c.maps))


def test_every_class_balanced_values_lots_and_splits(table):
    assert table.class_counts() == {c: 30 for c in WM811K_CLASSES}
    for m, k in zip(table.maps, table.masks):
        assert m.dtype == np.uint8 and m.ndim == 2 and min(m.shape) >= 22
        assert set(np.unique(m)) <= {0, 1, 2} and (m == 1).any()
        assert k.shape == m.shape and k.dtype == np.uint8 and set(np.unique(k)) <= {0, 1}
        assert not (k.astype(bool) & (m == 0)).any()  # the region lies on the wafer
    assert table.split_counts() == {"Training": 216, "Test": 54}
    assert table.lot[0] == "synlot1" and table.lot[25] == "synlot2" and table.lot[-1] == "synlot11"
    assert table.wafer_index.min() == 1 and table.wafer_index.max() == 25
    assert list(table.wafer_index[:26]) == [*range(1, 26), 1]


def test_shapes_vary_and_do_not_give_the_class_away():
    t = generate(900, seed=2)
    area = np.array([m.size for m in t.maps])
    assert len({m.shape for m in t.maps}) > 60
    assert area.min() < 800 and area.max() > 3500  # small grids (about 25x27) up to large ones
    overall = np.median(area)
    for c in WM811K_CLASSES:
        assert 0.7 < np.median(area[t.labels == c]) / overall < 1.4, c


def test_mask_regions_per_class(table):
    for label, m, k in zip(table.labels, table.maps, table.masks):
        wafer, region = m > 0, k.astype(bool)
        r = _norm_radius(m.shape)
        if label == "none":
            assert not region.any()
        elif label in ("Random", "Near-full"):
            assert np.array_equal(region, wafer)
        else:
            assert 0 < region.sum() < wafer.sum(), label
        if label == "Center":
            assert r[region].mean() < 0.35
        elif label == "Edge-Ring":
            rim_dist = distance_transform_edt(np.pad(wafer, 1))[1:-1, 1:-1]
            assert rim_dist[region].max() <= 5 and r[region].mean() > 0.75  # a band along the rim
        elif label == "Edge-Loc":
            assert r[region].mean() > 0.7
        elif label == "Donut":
            assert r[region].mean() > 0.18 and region[r < 0.06].sum() == 0  # a ring round an empty middle


def test_failures_concentrate_inside_the_mask(table):
    for cls in ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Scratch"):
        inside = outside = n_in = n_out = 0
        for label, m, k in zip(table.labels, table.maps, table.masks):
            if label != cls:
                continue
            region, wafer = k.astype(bool), m > 0
            inside += (m[region] == 2).sum()
            n_in += region.sum()
            outside += (m[wafer & ~region] == 2).sum()
            n_out += (wafer & ~region).sum()
        assert inside / n_in > 4 * outside / n_out, cls
    near = [(m[m > 0] == 2).mean() for lab, m in zip(table.labels, table.maps) if lab == "Near-full"]
    rand = [(m[m > 0] == 2).mean() for lab, m in zip(table.labels, table.maps) if lab == "Random"]
    none = [(m[m > 0] == 2).mean() for lab, m in zip(table.labels, table.maps) if lab == "none"]
    assert min(near) > 0.6 and 0.08 < np.median(rand) < 0.7 and np.median(none) < 0.2


def test_mixed_maps_and_multi_hot():
    names = mixed_class_names()
    assert len(names) == 38 and len(set(names)) == 38
    assert sum(n.count("+") == 1 for n in names) == 13 and sum(n.count("+") == 2 for n in names) == 12
    assert sum(n.count("+") == 3 for n in names) == 4
    t = generate(76, seed=1, mixed=True)
    assert t.class_counts() == {n: 2 for n in names}
    assert t.multi_label_names == MIXED38_TYPES and t.multi_hot.shape == (76, 8)
    for label, hot, m, k in zip(t.labels, t.multi_hot, t.maps, t.masks):
        assert m.shape == (52, 52) and k.shape == (52, 52)
        parts = [] if label == "none" else label.split("+")
        assert [MIXED38_TYPES[j] for j in np.flatnonzero(hot)] == parts
        assert bool(k.any()) == bool(parts)
        if len(parts) > 1:
            assert not {"Near-full", "Random"} & set(parts)
            assert not {"Center", "Donut"} <= set(parts) and not {"Edge-Loc", "Edge-Ring"} <= set(parts)


def test_class_subset_names_and_bad_input(tmp_path):
    t = generate(7, seed=0, classes=["center", "Scratch"])
    assert set(t.labels) == {"Center", "Scratch"} and sorted(t.class_counts().values()) == [3, 4]
    m = generate(4, seed=0, mixed=True, classes=["Loc+Center", "none"])
    assert set(m.labels) == {"Center+Loc", "none"}
    for bad in (0, -3, 2.5):
        with pytest.raises(WaferlabError, match="positive integer"):
            generate(bad)
    with pytest.raises(WaferlabError, match="unknown WM-811K class 'Blob'"):
        generate(5, classes=["Center", "Blob"])
    with pytest.raises(WaferlabError, match="unknown MixedWM38 class"):
        generate(5, mixed=True, classes=["Center+Donut"])
    with pytest.raises(WaferlabError, match="MixedWM38 layout"):
        write_synthetic(tmp_path / "m.pkl", 5, mixed=True)
    with pytest.raises(WaferlabError, match=r"\.pkl .* or \.npz"):
        write_synthetic(tmp_path / "m.csv", 5)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_map_stats_on_hand_made_maps():
    h = w = 40
    r = _norm_radius((h, w))
    wafer = np.where(r <= 1.0, 1, 0).astype(np.uint8)
    ring = wafer.copy()
    ring[(r > 0.93) & (wafer > 0)] = 2
    st = map_stats(ring)
    assert st["peak_r"] == 0.95 and st["edge_coverage"] == 1.0 and st["rate_center"] == 0.0
    assert st["radial_extent"] == pytest.approx(0.1) and st["cc_length"] > 0.95
    line = wafer.copy()
    line[20, 8:28] = 2  # a 20-die straight scratch on a 40-die wafer
    st = map_stats(line)
    assert st["cc_length"] == pytest.approx(0.5, abs=0.03)
    assert st["largest_cc_frac"] == pytest.approx(20 / (wafer > 0).sum())
    with pytest.raises(WaferlabError):
        map_stats(np.zeros((5, 5), np.uint8))


def test_synthetic_statistics_match_the_real_samples(shared_data):
    real = load_real_samples(shared_data)
    classes = ["Center", "Edge-Loc", "Edge-Ring", "Loc"]
    real = real.subset(np.isin(real.labels, classes))
    assert len(real) > 150
    synth = generate(240, seed=7, classes=classes)
    stats = ("fail_frac", "peak_r", "radial_extent", "rate_center", "rate_edge", "edge_coverage",
             "largest_cc_frac", "cc_length")
    cmp = compare(table_stats(real), table_stats(synth), stats=stats)
    assert len(cmp) == len(classes) * len(stats)
    bad = cmp[~cmp["agree"]]
    assert len(bad) <= 2, f"synthetic statistics off the real ones:\n{bad.to_string()}"
    # the features that tell these classes apart go the right way
    med = cmp.set_index(["class", "stat"])["synth_median"]
    assert med["Edge-Ring", "edge_coverage"] > 0.6 > med["Edge-Loc", "edge_coverage"]
    assert med["Center", "rate_center"] > 3 * med["Edge-Ring", "rate_center"]


@needs_readers
def test_cli_writes_files_the_readers_load_back(tmp_path, capsys):
    from waferlab.data.readers import load_table

    for name, extra, n in (("syn.npz", [], 45), ("syn.pkl", [], 36), ("mix.npz", ["--mixed"], 38)):
        out = tmp_path / name
        assert main(["data", "synth", "--n", str(n), "--out", str(out), "--seed", "3", *extra]) == 0
        assert f"wrote {n} synthetic maps" in capsys.readouterr().err
        expected = generate(n, seed=3, mixed=bool(extra))
        back = load_table(out)
        assert len(back) == n and back.class_counts() == expected.class_counts()
        assert all(np.array_equal(a, b) for a, b in zip(back.maps, expected.maps))
        if not extra:
            assert back.split_counts() == expected.split_counts()
            assert back.masks is not None
            assert all(np.array_equal(a, b) for a, b in zip(back.masks, expected.masks))
        else:
            assert np.array_equal(back.multi_hot, expected.multi_hot)
    assert main(["data", "synth", "--n", "5", "--out", str(tmp_path / "x.pkl"), "--mixed"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("waferlab: error:") and len(err.splitlines()) == 1
    assert main(["data", "synth", "--n", "5", "--out", str(tmp_path / "y.npz"), "--classes", "Blob"]) == 2
    assert "unknown WM-811K class 'Blob'" in capsys.readouterr().err
