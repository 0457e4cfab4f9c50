"""The prepared cache: nearest resize keeps values and shapes, exact round trip, clear errors; encodings."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from waferlab.data import cache as cache_mod
from waferlab.data.cache import (
    CACHE_MARKER,
    PreparedData,
    is_cache,
    load_cache,
    load_prepared,
    nearest_indices,
    prepare,
    resize_stack,
    save_cache,
)
from waferlab.data.encode import ENCODINGS, encode, num_channels, resize_maps
from waferlab.data.table import MIXED38_TYPES, UNLABELED, WM811K_CLASSES, WaferTable
from waferlab.errors import WaferlabError


def wafer(h: int, w: int, rng: np.random.Generator, fail: float = 0.2) -> np.ndarray:
    """A round wafer of h x w dies with random failures."""
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2 <= 1.0
    return np.where(inside, np.where(rng.random((h, w)) < fail, 2, 1), 0).astype(np.uint8)


def make_table(n: int = 60, seed: int = 0, labels=None, masks: bool = False) -> WaferTable:
    rng = np.random.default_rng(seed)
    shapes = [(25, 27), (38, 36), (53, 58), (30, 30)]
    maps = [wafer(*shapes[i % len(shapes)], rng) for i in range(n)]
    if labels is None:
        labels = [([*WM811K_CLASSES, UNLABELED])[i % 10] for i in range(n)]
    return WaferTable(
        maps=maps, labels=labels, split=["Training" if i % 3 else "Test" for i in range(n)],
        lot=[f"lot{i // 5}" for i in range(n)], wafer_index=[i % 25 + 1 for i in range(n)], source="mem",
        masks=[(m == 2).astype(np.uint8) for m in maps] if masks else None,
    )


# --------------------------------------------------------------------------------------------- resize
def test_nearest_indices_cover_and_stay_in_range():
    for n_in, n_out in [(25, 64), (64, 25), (53, 64), (64, 64), (1, 8), (300, 32)]:
        idx = nearest_indices(n_in, n_out)
        assert len(idx) == n_out and idx.min() >= 0 and idx.max() <= n_in - 1
        assert np.all(np.diff(idx) >= 0)
        if n_out >= n_in:  # upsampling reaches every source row
            assert set(idx.tolist()) == set(range(n_in))


def test_resize_stack_exact_upsample_and_identity():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (4, 16, 16), dtype=np.uint8)
    up = resize_stack(x, 32)
    np.testing.assert_array_equal(up, x.repeat(2, axis=1).repeat(2, axis=2))
    np.testing.assert_array_equal(resize_stack(x, 16), x)
    down = resize_stack(up, 16)
    np.testing.assert_array_equal(down, x)


@pytest.mark.parametrize("shape", [(25, 27), (53, 58), (64, 64), (143, 132), (7, 40)])
@pytest.mark.parametrize("size", [26, 32, 64])
def test_numpy_resize_matches_torch_resize_maps(shape, size):
    x = np.random.default_rng(2).integers(0, 3, (3, *shape), dtype=np.uint8)
    np.testing.assert_array_equal(resize_stack(x, size), resize_maps(torch.from_numpy(x), size).numpy())


def test_prepare_keeps_values_orig_shape_and_row_order():
    table = make_table(60)
    p = prepare(table, 32, resize="nearest")
    assert p.maps.shape == (60, 32, 32) and p.maps.dtype == np.uint8
    assert set(np.unique(p.maps).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(p.orig_shape, [m.shape for m in table.maps])
    for i in (0, 1, 2, 3, 37, 59):  # row order survives the grouping by shape
        np.testing.assert_array_equal(p.maps[i], resize_stack(table.maps[i][None], 32)[0])
    assert p.size == 32 and p.source == "mem" and len(p) == 60
    np.testing.assert_array_equal(p.wafer_index, table.wafer_index)
    assert list(p.lot) == list(table.lot) and list(p.split) == list(table.split)


def test_prepare_class_vocabulary_and_unlabeled():
    p = prepare(make_table(30), 16)
    assert p.class_names == WM811K_CLASSES
    names = p.label_names()
    assert list(names) == [([*WM811K_CLASSES, UNLABELED])[i % 10] for i in range(30)]
    assert (p.labels == -1).sum() == 3
    counts = p.class_counts()
    assert counts[UNLABELED] == 3 and counts["Center"] == 3 and sum(counts.values()) == 30
    # foreign names: sorted vocabulary
    q = prepare(make_table(6, labels=["b", "a", "c", "a", UNLABELED, "b"]), 16)
    assert q.class_names == ("a", "b", "c")
    assert q.labels.tolist() == [1, 0, 2, 0, -1, 1]


def test_prepare_masks_and_multi_hot():
    table = make_table(12, masks=True)
    table.multi_hot = np.eye(8, dtype=np.uint8)[np.arange(12) % 8]
    table.multi_label_names = MIXED38_TYPES
    p = prepare(table, 24, resize="nearest")
    assert p.masks is not None and p.masks.shape == p.maps.shape
    np.testing.assert_array_equal(p.masks, (p.maps == 2).astype(np.uint8))  # same gather as the maps
    np.testing.assert_array_equal(p.multi_hot, table.multi_hot)
    assert p.multi_label_names == MIXED38_TYPES


def test_prepare_rejects_bad_values_naming_the_row():
    table = make_table(8)
    table.maps[5] = table.maps[5].copy()
    table.maps[5][3, 3] = 7
    with pytest.raises(WaferlabError, match="row 5"):
        prepare(table, 16)
    table.maps[5] = np.zeros((0, 4), np.uint8)
    with pytest.raises(WaferlabError, match="row 5"):
        prepare(table, 16)
    table.maps[5] = np.zeros((3, 4, 2), np.uint8)
    with pytest.raises(WaferlabError, match="row 5.*2-D"):
        prepare(table, 16)
    floats = make_table(8)
    floats.maps = [m.astype(np.float32) for m in floats.maps]
    assert prepare(floats, 16).maps.dtype == np.uint8  # whole-number floats are fine
    floats.maps[6] = floats.maps[6].copy()
    floats.maps[6][0, 0] = 0.5
    with pytest.raises(WaferlabError, match="row 6"):
        prepare(floats, 16)


def test_prepare_empty_table_and_bad_size():
    empty = make_table(0)
    p = prepare(empty, 8)
    assert len(p) == 0 and p.maps.shape == (0, 8, 8)
    with pytest.raises(WaferlabError, match="size"):
        prepare(make_table(2), 0)


def test_subset_and_bool_mask():
    p = prepare(make_table(20, masks=True), 16)
    s = p.subset([3, 1])
    np.testing.assert_array_equal(s.maps, p.maps[[3, 1]])
    assert s.labels.tolist() == p.labels[[3, 1]].tolist() and s.masks.shape == (2, 16, 16)
    m = p.subset(p.labels == 0)
    assert len(m) == int((p.labels == 0).sum()) and set(m.labels.tolist()) == {0}


# --------------------------------------------------------------------------------------------- cache file
def test_cache_round_trip_is_exact(tmp_path):
    table = make_table(40, masks=True)
    table.multi_hot = (np.arange(40 * 8).reshape(40, 8) % 3 == 0).astype(np.uint8)
    table.multi_label_names = MIXED38_TYPES
    p = prepare(table, 32)
    path = tmp_path / "c.npz"
    save_cache(p, path)
    assert is_cache(path)
    q = load_cache(path)
    for name in ("maps", "labels", "orig_shape", "wafer_index", "multi_hot", "masks"):
        np.testing.assert_array_equal(getattr(q, name), getattr(p, name))
    assert list(q.split) == list(p.split) and list(q.lot) == list(p.lot)
    assert q.class_names == p.class_names and q.size == 32 and q.source == "mem"
    assert q.multi_label_names == MIXED38_TYPES
    # pickle-free: every member loads with allow_pickle=False and none is an object array
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
        meta = json.loads(str(z[CACHE_MARKER][()]))
    assert meta["size"] == 32 and meta["class_names"] == list(WM811K_CLASSES)
    with zipfile.ZipFile(path) as zf:  # uncompressed, so loading is a plain read
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())


def test_cache_without_optional_fields_and_odd_suffix(tmp_path):
    p = prepare(make_table(5), 8)
    path = tmp_path / "cache.bin"  # np.savez must not append .npz
    save_cache(p, path)
    assert path.is_file() and not (tmp_path / "cache.bin.npz").exists()
    q = load_cache(path)
    assert q.masks is None and q.multi_hot is None and len(q) == 5


def test_is_cache_and_load_errors(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, arr_0=np.zeros((2, 4, 4), np.uint8))
    text = tmp_path / "x.txt"
    text.write_text("hello")
    assert not is_cache(foreign) and not is_cache(text) and not is_cache(tmp_path / "missing.npz")
    assert not is_cache(tmp_path)
    with pytest.raises(WaferlabError, match="not a waferlab cache"):
        load_cache(foreign)
    with pytest.raises(WaferlabError, match="not found"):
        load_cache(tmp_path / "missing.npz")
    good = tmp_path / "good.npz"
    save_cache(prepare(make_table(10), 16), good)
    data = good.read_bytes()
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(WaferlabError, match="corrupt|not a waferlab cache"):
        load_cache(corrupt)


def test_cache_with_object_member_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{CACHE_MARKER: np.array(json.dumps({"format": 1, "size": 4, "class_names": []})),
                      "maps": np.array([object()], dtype=object)})
    with pytest.raises(WaferlabError, match="corrupt"):
        load_cache(path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    p = prepare(make_table(4), 8)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.np, "savez", boom)
    with pytest.raises(OSError):
        save_cache(p, tmp_path / "c.npz")
    assert list(tmp_path.iterdir()) == []


def test_load_prepared_from_cache_resizes(tmp_path):
    p = prepare(make_table(12, masks=True), 32, resize="nearest")
    path = tmp_path / "c.npz"
    save_cache(p, path)
    same = load_prepared(path, resize="nearest")
    np.testing.assert_array_equal(same.maps, p.maps)
    assert load_prepared(path, 32, resize="nearest").size == 32
    small = load_prepared(path, 16, resize="nearest")
    assert small.maps.shape == (12, 16, 16) and small.masks.shape == (12, 16, 16)
    np.testing.assert_array_equal(small.maps, resize_stack(p.maps, 16))
    np.testing.assert_array_equal(small.orig_shape, p.orig_shape)


def test_load_prepared_from_a_source(shared_data):
    pytest.importorskip("waferlab.data.readers")
    src = shared_data / "wm811k_mohithmanjunath04_sample_197645f" / "LSWMD_sample.pkl"
    p = load_prepared(src, 32)
    assert len(p) == 180 and p.maps.shape == (180, 32, 32)
    assert p.class_names == WM811K_CLASSES and (p.labels >= 0).all()
    assert p.class_counts()["Edge-Ring"] == 64
    assert set(np.unique(p.maps).tolist()) <= {0, 1, 2}
    assert int(p.orig_shape[:, 0].max()) > 32  # original shapes kept


def test_prepared_data_validates_shapes():
    with pytest.raises(WaferlabError, match="uint8"):
        PreparedData(maps=np.zeros((2, 4, 4), np.float32), labels=[0, 0], class_names=("a",), split=["", ""],
                     lot=["", ""], wafer_index=[0, 0], orig_shape=[[4, 4], [4, 4]], size=4)
    with pytest.raises(WaferlabError, match="label ids"):
        PreparedData(maps=np.zeros((2, 4, 4), np.uint8), labels=[0, 3], class_names=("a",), split=["", ""],
                     lot=["", ""], wafer_index=[0, 0], orig_shape=[[4, 4], [4, 4]], size=4)


# --------------------------------------------------------------------------------------------- encodings
def test_encodings_values_and_shapes():
    maps = torch.tensor([[[0, 1], [2, 1]], [[2, 2], [0, 0]]], dtype=torch.uint8)
    onehot = encode(maps)
    assert onehot.shape == (2, 3, 2, 2) and onehot.dtype == torch.float32
    torch.testing.assert_close(onehot.sum(1), torch.ones(2, 2, 2))
    torch.testing.assert_close(onehot.argmax(1), maps.long())
    gray = encode(maps, "gray")
    assert gray.shape == (2, 1, 2, 2)
    torch.testing.assert_close(gray[:, 0], maps.float() / 2)
    rgb = encode(maps, "rgb")
    assert rgb.shape == (2, 3, 2, 2)
    torch.testing.assert_close(rgb[:, 0], rgb[:, 2])
    torch.testing.assert_close(rgb[0, 1], torch.tensor([[0.0, 127 / 255], [1.0, 127 / 255]]))
    for enc in ENCODINGS:
        assert encode(maps, enc).shape[1] == num_channels(enc)


def test_encoding_errors():
    with pytest.raises(WaferlabError, match="unknown encoding"):
        num_channels("hsv")
    with pytest.raises(WaferlabError, match="unknown encoding"):
        encode(torch.zeros(1, 4, 4, dtype=torch.uint8), "hsv")
    with pytest.raises(WaferlabError, match="uint8"):
        encode(torch.zeros(1, 4, 4), "onehot")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encode_and_resize_on_cuda():
    maps = torch.randint(0, 3, (4, 25, 27), dtype=torch.uint8)
    for enc in ENCODINGS:
        out = encode(maps.cuda(), enc)
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), encode(maps, enc))
    torch.testing.assert_close(resize_maps(maps.cuda(), 64).cpu(), resize_maps(maps, 64))
