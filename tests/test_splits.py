"""Class sets and splits: study order, determinism, disjointness, stratified proportions, lot-disjointness."""

from __future__ import annotations

import numpy as np
import pytest

from waferlab.data.cache import PreparedData
from waferlab.data.splits import PARTS, SPLIT_METHODS, assign_splits, select_classes, split_summary
from waferlab.data.table import DEFECT8_CLASSES, WM811K_CLASSES
from waferlab.errors import WaferlabError

# rough WM-811K class proportions (Center .. none), so rare classes are rare here too
_WEIGHTS = np.array([4294, 555, 5189, 9680, 3593, 149, 866, 1193, 30000], dtype=float)


def make_data(n_lots: int = 60, per_lot: int = 5, seed: int = 0, unlabeled: int = 0,
              tags: bool = True) -> PreparedData:
    """Labels only (maps are 1x1 dummies): lots with their own class mix, as in WM-811K."""
    rng = np.random.default_rng(seed)
    n = n_lots * per_lot
    labels = np.empty(n, dtype=np.int64)
    for lot in range(n_lots):
        mix = rng.dirichlet(_WEIGHTS / _WEIGHTS.sum() * 10 + 1e-3)
        labels[lot * per_lot:(lot + 1) * per_lot] = rng.choice(9, per_lot, p=mix)
    labels[:unlabeled] = -1
    split = np.where(rng.random(n) < 0.3, "Test", "Training") if tags else np.full(n, "")
    return PreparedData(
        maps=np.zeros((n, 1, 1), np.uint8), labels=labels, class_names=WM811K_CLASSES,
        split=split.astype(object), lot=np.array([f"lot{i // per_lot}" for i in range(n)], dtype=object),
        wafer_index=np.arange(n) % 25 + 1, orig_shape=np.ones((n, 2), np.int32), size=1, source="mem",
    )


def test_select_defect8_uses_the_study_order_and_drops_none_and_unlabeled():
    p = make_data(unlabeled=7)
    names_before = p.label_names()
    d8 = select_classes(p, "defect8")
    assert d8.class_names == DEFECT8_CLASSES
    keep = (p.labels >= 0) & (names_before != "none")
    assert len(d8) == int(keep.sum())
    # every kept row keeps its class name under the new ids
    assert list(d8.label_names()) == list(names_before[keep])
    assert DEFECT8_CLASSES.index("Near-full") == 7 and DEFECT8_CLASSES.index("Random") == 5
    assert set(d8.labels.tolist()) <= set(range(8))


def test_select_all9_drops_only_unlabeled_and_custom_sets():
    p = make_data(unlabeled=4)
    a9 = select_classes(p, "all9")
    assert a9.class_names == WM811K_CLASSES and len(a9) == len(p) - 4
    np.testing.assert_array_equal(a9.labels, p.labels[4:])
    two = select_classes(p, ["none", "Center"])
    assert two.class_names == ("none", "Center")
    assert set(two.label_names().tolist()) <= {"none", "Center"}
    assert (two.labels[two.label_names() == "none"] == 0).all()


def test_select_errors():
    p = make_data()
    with pytest.raises(WaferlabError, match="unknown class set"):
        select_classes(p, "defect7")
    foreign = PreparedData(maps=np.zeros((2, 1, 1), np.uint8), labels=[0, 1], class_names=("a", "b"),
                           split=["", ""], lot=["", ""], wafer_index=[0, 0], orig_shape=[[1, 1]] * 2, size=1)
    with pytest.raises(WaferlabError, match="none of the classes"):
        select_classes(foreign, "defect8")


@pytest.mark.parametrize("method", SPLIT_METHODS)
def test_every_method_is_deterministic_complete_and_seeded(method):
    p = select_classes(make_data(), "all9")
    a = assign_splits(p, method, seed=3)
    b = assign_splits(p, method, seed=3)
    c = assign_splits(p, method, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(a) == len(p) and set(a.tolist()) <= set(PARTS)
    assert all((a == part).any() for part in PARTS)
    summary = split_summary(p, a)
    assert sum(sum(v.values()) for v in summary.values()) == len(p)


def test_stratified_proportions_hold_per_class():
    p = select_classes(make_data(n_lots=120), "all9")
    a = assign_splits(p, "stratified", fractions=(0.7, 0.15, 0.15), seed=0)
    for c in range(len(p.class_names)):
        rows = p.labels == c
        n_c = int(rows.sum())
        if n_c < 3:
            continue
        for part, frac in zip(PARTS, (0.7, 0.15, 0.15)):
            got = int((a[rows] == part).sum())
            assert abs(got - frac * n_c) <= 1.0 + 1e-9 or (got == 1 and frac * n_c < 1), (c, part, got, n_c)


def test_stratified_tiny_classes_are_handled():
    p = make_data(n_lots=2, per_lot=5)
    p.labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    a = assign_splits(p, "stratified", seed=0)
    assert (a[:2] == "train").all()  # 2 maps cannot fill 3 parts: both train
    assert sorted(a[2:5].tolist()) == ["test", "train", "val"]  # 3 maps: one each
    assert (a[5:] == "train").sum() >= 3
    no_val = assign_splits(p, "stratified", fractions=(0.8, 0.0, 0.2), seed=0)
    assert "val" not in no_val.tolist() and sorted(no_val[:2].tolist()) == ["test", "train"]


def test_random_split_sizes():
    p = make_data(n_lots=40)
    a = assign_splits(p, "random", fractions=(0.8, 0.0, 0.2), seed=60)
    assert (a == "test").sum() == 40 and (a == "train").sum() == 160 and "val" not in a.tolist()


def test_official_split_follows_tags_with_stratified_val():
    p = select_classes(make_data(n_lots=80), "all9")
    a = assign_splits(p, "official", fractions=(0.7, 0.15, 0.15), seed=0)
    tags = p.split.astype(str)
    assert (a[tags == "Test"] == "test").all()
    assert set(a[tags == "Training"].tolist()) == {"train", "val"}
    share = (a == "val").sum() / (tags == "Training").sum()
    assert abs(share - 0.15 / 0.85) < 0.05
    no_val = assign_splits(p, "official", fractions=(0.85, 0.0, 0.15))
    assert (no_val[tags == "Training"] == "train").all()


def test_official_split_errors():
    with pytest.raises(WaferlabError, match="trianTestLabel"):
        assign_splits(make_data(tags=False), "official")
    p = make_data()
    p.split[5] = ""
    with pytest.raises(WaferlabError, match="row 5"):
        assign_splits(p, "official")


def test_lot_split_never_shares_a_lot_and_keeps_classes():
    p = select_classes(make_data(n_lots=400, per_lot=10, seed=1), "all9")
    a = assign_splits(p, "lot", seed=0)
    for lot in np.unique(p.lot.astype(str)):
        assert len(set(a[p.lot == lot].tolist())) == 1
    sizes = {part: (a == part).mean() for part in PARTS}
    assert abs(sizes["train"] - 0.7) < 0.03 and abs(sizes["val"] - 0.15) < 0.03
    for c in range(9):
        rows = p.labels == c
        lots_with_c = len(np.unique(p.lot[rows].astype(str)))
        if lots_with_c >= 3:  # enough lots: the class reaches every part
            assert all((a[rows] == part).any() for part in PARTS), p.class_names[c]
        if rows.sum() >= 200:
            assert abs((a[rows] == "train").mean() - 0.7) < 0.1


def test_lot_split_needs_lot_names():
    p = make_data()
    p.lot = np.full(len(p), "", dtype=object)
    with pytest.raises(WaferlabError, match="lot names"):
        assign_splits(p, "lot")


@pytest.mark.parametrize("fractions", [(0.7, 0.2, 0.2), (0.5, 0.5), (-0.1, 0.6, 0.5), (0.0, 0.5, 0.5), "abc"])
def test_bad_fractions(fractions):
    with pytest.raises(WaferlabError, match="fractions"):
        assign_splits(make_data(), "random", fractions=fractions)


def test_unknown_method():
    with pytest.raises(WaferlabError, match="unknown split method"):
        assign_splits(make_data(), "kfold")
