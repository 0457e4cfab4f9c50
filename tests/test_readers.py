"""Readers: every real sample in ../shared/data, each layout written and read back, exact decoding."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from waferlab.cli import main
from waferlab.data.lean import MapStore, PackedMaps
from waferlab.data.lswmd import frame_from_table, normalize_class, read_lswmd, read_lswmd_csv, write_lswmd
from waferlab.data.py2pickle import dump_py2
from waferlab.data.readers import (
    VIRIDIS_LEVELS,
    class_from_filename,
    decode_image,
    load_table,
    read_image_folder,
    read_safe,
    sniff,
    write_safe,
)
from waferlab.data.table import MIXED38_TYPES, UNLABELED, WaferTable
from waferlab.errors import WaferlabError

PKL = "wm811k_mohithmanjunath04_sample_197645f/LSWMD_sample.pkl"
SUB100 = "wm811k_caslabai_sub100/sub100_WM-811K.csv"
SUB20 = "wm811k_caslabai_sub100/sub20_WM-811K.csv"
DM3 = "wm811k_dm3_ntu_png_67f9ccf/generated_images"
PNG96 = "wm811k_dm3_ntu_png96_56c3b1a/generated_images"
MARCO = "wm811k_marco_scatassi_png_0439f8b/Image_for_deploy"
JPG32 = "wm811k_mdjunayed_jpg32_45e5fc1/WM811k_Dataset"
GOWWI = "gowwi07_wafermap_ai_png224_e3cf70a/samples_wm811k"
MIXED = "gowwi07_wafermap_ai_png224_e3cf70a/samples_mixed38"

DEFECT8 = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Random", "Scratch")
EXPECTED_COUNTS = {
    PKL: {"Edge-Ring": 64, "Edge-Loc": 41, "Center": 39, "Loc": 23, "Donut": 5, "Scratch": 4, "Random": 3,
          "Near-full": 1},
    SUB100: {"none": 83, "Edge-Loc": 8, "Loc": 4, "Center": 2, UNLABELED: 3},
    DM3: {c: 20 for c in DEFECT8},
    PNG96: {c: 20 for c in (*DEFECT8, "none")},
    MARCO: {c: 10 for c in (*DEFECT8, "none")},
    JPG32: {"Center": 100, "Donut": 102, "Edge-Loc": 103, "Edge-Ring": 102, "Loc": 100, "Near-full": 95,
            "none": 100, "Random": 100, "Scratch": 100},
    GOWWI: {c: 4 for c in ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Random", "Scratch")},
}


def _values(table: WaferTable) -> set[int]:
    return set(np.unique(np.concatenate([m.ravel() for m in table.maps])).tolist())


@pytest.mark.parametrize("rel", list(EXPECTED_COUNTS), ids=lambda r: r.split("/")[0])
def test_real_sample_counts(shared_data: Path, rel: str):
    table = load_table(shared_data / rel)
    assert table.class_counts() == EXPECTED_COUNTS[rel]
    assert _values(table) <= {0, 1, 2} and 2 in _values(table)
    assert all(m.dtype == np.uint8 and m.ndim == 2 for m in table.maps)
    assert table.orig_shape.tolist() == [list(m.shape) for m in table.maps]


def test_lswmd_sample_matches_pandas(shared_data: Path):
    table = load_table(shared_data / PKL)
    df = pd.read_pickle(shared_data / PKL)
    assert table.split_counts() == {"Training": 132, "Test": 48}
    assert all(np.array_equal(a, b) for a, b in zip(table.maps, df.waferMap))
    assert table.labels.tolist() == [a[0][0] for a in df.failureType]
    assert table.lot.tolist() == df.lotName.tolist()
    assert table.wafer_index.tolist() == df.waferIndex.astype(int).tolist()
    assert len({tuple(s) for s in table.orig_shape.tolist()}) > 30  # many products, many sizes


def test_csv_export(shared_data: Path):
    table = load_table(shared_data / SUB100)
    assert table.split_counts() == {"Training": 97, "unassigned": 3}
    assert Counter(map(tuple, table.orig_shape.tolist())) == {(53, 58): 75, (45, 48): 25}
    assert table.lot[:25].tolist() == ["lot1"] * 25 and table.wafer_index[:3].tolist() == [1, 2, 3]
    unlabeled = table.labels == UNLABELED
    assert (table.split[unlabeled] == "").all()
    sub20 = read_lswmd_csv(shared_data / SUB20)
    assert len(sub20) == 20
    assert all(np.array_equal(a, b) for a, b in zip(sub20.maps, table.maps[:20]))
    assert sub20.labels.tolist() == table.labels[:20].tolist()


def test_png_decoding_is_exact(shared_data: Path):
    for rel in (DM3, GOWWI):
        for path in sorted((shared_data / rel).glob("*.png"))[::9]:
            px = np.asarray(Image.open(path))
            assert set(np.unique(px).tolist()) <= {0, 127, 255}
            assert np.array_equal(decode_image(path), np.rint(px / 127.5).astype(np.uint8))
    assert Counter(map(tuple, load_table(shared_data / GOWWI).orig_shape.tolist())) == {(224, 224): 28}


@pytest.mark.parametrize("rel", [PNG96, MARCO])
def test_viridis_decoding_is_exact(shared_data: Path, rel: str):
    levels = {(68, 1, 84): 0, (32, 144, 140): 1, (253, 231, 36): 2}
    for path in sorted((shared_data / rel).rglob("*.png"))[::7]:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        expected = np.vectorize(lambda r, g, b: levels[(r, g, b)])(rgb[..., 0], rgb[..., 1], rgb[..., 2])
        assert np.array_equal(decode_image(path), expected)
    shape = (96, 96) if rel == PNG96 else (53, 52)
    assert {tuple(s) for s in load_table(shared_data / rel).orig_shape.tolist()} == {shape}


def test_jpeg_decoding_is_close_to_the_true_map(shared_data: Path):
    """Two JPEGs are LSWMD rows that are also in the pickle sample: the decoded 32x32 map must match
    the true map (area-resized to 32x32) on most dies even though the JPEG is lossy and blurred."""
    df = pd.read_pickle(shared_data / PKL)
    for idx, folder in ((649347, "Edge Ring"), (682484, "near full")):
        true = df.waferMap.loc[idx].astype(np.float64)
        h, w = true.shape
        # area resize to 32x32 by averaging the source cells that overlap each target cell
        rows = np.minimum((np.arange(32 * h) // h), 31)
        cols = np.minimum((np.arange(32 * w) // w), 31)
        big = np.repeat(np.repeat(true, 32, axis=0), 32, axis=1)
        area = np.zeros((32, 32))
        np.add.at(area, (rows[:, None], cols[None, :]), big)
        area = np.rint(area / (h * w))
        decoded = decode_image(shared_data / JPG32 / folder / f"{idx}.jpg")
        assert decoded.shape == (32, 32)
        assert (decoded == area).mean() > 0.85


def test_mixed38_png_names(shared_data: Path):
    table = load_table(shared_data / MIXED)
    assert len(table) == 30 and table.multi_hot is not None
    assert table.multi_label_names == MIXED38_TYPES
    files = sorted((shared_data / MIXED).glob("*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    by_index = dict(zip(table.wafer_index.tolist(), range(len(table))))
    for f in files:
        i = by_index[int(f.stem.rsplit("_", 1)[1])]
        # data.md S.2: "Random" in these names is the Scratch column; Random never occurs in mixtures
        assert bool(table.multi_hot[i, MIXED38_TYPES.index("Scratch")]) == ("_Random" in f.stem)
        assert table.multi_hot[i].sum() == len(table.labels[i].split("+"))
    assert table.multi_hot[:, MIXED38_TYPES.index("Random")].sum() == 0
    assert table.multi_hot[:, MIXED38_TYPES.index("Near-full")].sum() == 0
    assert "Center+Scratch" in table.labels.tolist()


def test_class_aliases_and_file_names():
    assert normalize_class("Edge Local") == "Edge-Loc"
    assert normalize_class("edge ring") == "Edge-Ring"
    assert normalize_class("Local") == "Loc"
    assert normalize_class("near full") == normalize_class("Near_Full") == "Near-full"
    assert normalize_class("random") == "Random"
    assert normalize_class("None") == normalize_class("Normal") == "none"
    assert normalize_class("Blob") is None
    assert class_from_filename("154_Near-full") == ("Near-full", None)
    assert class_from_filename("3_None") == ("none", None)
    assert class_from_filename("wm811k_Edge-Loc_133996") == ("Edge-Loc", None)
    assert class_from_filename("wm811k_Near_Full_7") == ("Near-full", None)
    assert class_from_filename("mixed_Center_Random_11130") == ("Center+Scratch", ("Center", "Scratch"))
    assert class_from_filename("mixed_Loc_32480") == ("Loc", ("Loc",))
    assert class_from_filename("12345") == (None, None)


# ----------------------------------------------------------------------------------------------------
# layout variants written here and read back


def _small_table(n: int = 12, seed: int = 0, masks: bool = False) -> WaferTable:
    rng = np.random.default_rng(seed)
    classes = ["Center", "Donut", "Edge-Loc", "none", UNLABELED, "Scratch"]
    maps, mask_list = [], []
    for _ in range(n):
        h, w = rng.integers(20, 40, size=2)
        yy, xx = np.mgrid[:h, :w]
        inside = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1
        m = inside.astype(np.uint8) + (inside & (rng.random((h, w)) < 0.2))
        maps.append(m.astype(np.uint8))
        mask_list.append((inside & (xx < w // 3)).astype(np.uint8))
    labels = np.array([classes[i % len(classes)] for i in range(n)], dtype=object)
    split = np.array(["" if lab == UNLABELED else ("Training" if i % 3 else "Test")
                      for i, lab in enumerate(labels)], dtype=object)
    lots = np.array([f"lot{i // 5 + 1}" for i in range(n)])
    return WaferTable(maps=maps, labels=labels, split=split, lot=lots,
                      wafer_index=np.arange(n) % 25 + 1, source="test", masks=mask_list if masks else None)


def _assert_same(a: WaferTable, b: WaferTable, masks: bool = False) -> None:
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) and x.dtype == np.uint8 for x, y in zip(a.maps, b.maps))
    assert a.labels.tolist() == b.labels.tolist()
    assert a.split.tolist() == b.split.tolist()
    assert a.lot.tolist() == b.lot.tolist()
    assert a.wafer_index.tolist() == b.wafer_index.tolist()
    if masks:
        assert a.masks is not None and b.masks is not None
        assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


def test_write_lswmd_layout_and_round_trip(tmp_path: Path):
    table = _small_table(masks=True)
    out = tmp_path / "synthetic.pkl"
    write_lswmd(table, out)
    df = pd.read_pickle(out)
    assert list(df.columns) == ["waferMap", "dieSize", "lotName", "waferIndex", "trianTestLabel",
                                "failureType", "patternMask"]
    assert df.failureType[0].shape == (1, 1) and df.failureType[0][0][0] == "Center"
    unl = int(np.flatnonzero(table.labels == UNLABELED)[0])
    assert df.failureType[unl].shape == (0, 0) and df.trianTestLabel[unl].shape == (0, 0)
    assert df.waferIndex.dtype == np.float64
    assert df.dieSize.tolist() == [float(np.count_nonzero(m)) for m in table.maps]
    assert df.failureType[0] is not df.failureType[6]  # one array per row, as in the original
    _assert_same(read_lswmd(out), table, masks=True)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


def test_written_pickle_never_refers_to_pyarrow(tmp_path: Path):
    """pandas 3 + pyarrow backs string labels with Arrow arrays; our own pickles must stay readable."""
    out = tmp_path / "synthetic.pkl"
    write_lswmd(_small_table(masks=True), out)
    assert pd.read_pickle(out).columns.dtype == object
    assert b"pyarrow" not in out.read_bytes() and b"StringDtype" not in out.read_bytes()


def test_write_lswmd_multi_hot_round_trip(tmp_path: Path):
    table = _small_table(6)
    hot = np.zeros((6, 8), np.uint8)
    hot[0, [0, 6]] = 1
    hot[1, 2] = 1
    table.multi_hot, table.multi_label_names = hot, MIXED38_TYPES
    table.labels = np.array(["Center+Scratch", "Edge-Loc", "none", "none", "none", "none"], dtype=object)
    write_lswmd(table, tmp_path / "m.pkl")
    back = load_table(tmp_path / "m.pkl")
    assert np.array_equal(back.multi_hot, hot) and back.multi_label_names == MIXED38_TYPES
    assert back.labels[0] == "Center+Scratch"


def legacy_pickle_bytes(df: pd.DataFrame) -> bytes:
    """``df`` pickled the way pandas 0.19 under Python 2 wrote LSWMD.pkl (waferlab.data.py2pickle)."""
    buf = io.BytesIO()
    dump_py2(df, buf)
    return buf.getvalue()


def test_legacy_python2_pickle(shared_data: Path, tmp_path: Path):
    df = pd.read_pickle(shared_data / PKL)
    data = legacy_pickle_bytes(df)
    assert b"pandas.indexes.base" in data and b"pandas.core.indexes" not in data
    with pytest.raises(ModuleNotFoundError, match="pandas.indexes"):
        pickle.loads(data, encoding="latin1")  # what a plain load of LSWMD.pkl does today
    (tmp_path / "LSWMD.pkl").write_bytes(data)
    _assert_same(load_table(tmp_path / "LSWMD.pkl"), load_table(shared_data / PKL))


def test_legacy_pickle_with_unlabelled_rows_and_range_index(shared_data: Path, tmp_path: Path):
    table = load_table(shared_data / SUB100)
    write_lswmd(table, tmp_path / "modern.pkl")
    frame = pd.read_pickle(tmp_path / "modern.pkl")
    (tmp_path / "legacy.pkl").write_bytes(legacy_pickle_bytes(frame))
    back = load_table(tmp_path / "legacy.pkl")
    _assert_same(back, table)
    assert back.class_counts()[UNLABELED] == 3


def test_py2_writer_files_map_bytes_outside_the_memo_as_cpickle_did():
    # cPickle memoized an object only when something else held it too, so an array's raw-data string (a
    # temporary of its __reduce__) never went into the memo; Python 3's pickler files it (twice, at
    # protocol 2: the text and the bytes _codecs.encode makes of it). The scale files must be the former.
    import pickletools

    frame = frame_from_table(_small_table(6))
    ops = [op.name for op, _, _ in pickletools.genops(legacy_pickle_bytes(frame))]
    after_maps = [ops[i + 1] for i, name in enumerate(ops) if name == "BINSTRING"]  # maps: >= 256 bytes
    assert len(after_maps) == 6 and not any("PUT" in name for name in after_maps)
    modern = [op.name for op, _, _ in pickletools.genops(pickle.dumps(frame, protocol=2))]
    assert "BINSTRING" not in modern and "_codecs" in str(pickle.dumps(frame, protocol=2))


def _every_layout(table: WaferTable, folder: Path) -> dict[str, Path]:
    """``table`` as the original Python-2 LSWMD.pkl and as today's pickler writes it at protocols 2/4/5."""
    paths = {"py2": folder / "py2.pkl"}
    paths["py2"].write_bytes(legacy_pickle_bytes(frame_from_table(table)))
    for protocol in (2, 4, 5):
        paths[f"protocol{protocol}"] = folder / f"p{protocol}.pkl"
        write_lswmd(table, paths[f"protocol{protocol}"], protocol=protocol)
    return paths


@pytest.mark.parametrize("batch", [4096, 7])  # 7: many batches, the last one short
def test_lean_reader_packs_the_maps_and_gives_the_same_table(shared_data: Path, tmp_path: Path, batch: int,
                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(MapStore, "BATCH", batch)
    table = load_table(shared_data / SUB100)  # 3 unlabelled rows (empty label arrays)
    table.maps = [np.asfortranarray(m) if i % 2 else m for i, m in enumerate(table.maps)]  # LSWMD's are F
    for layout, path in {**_every_layout(table, tmp_path), "sample": shared_data / PKL}.items():
        full, lean = read_lswmd(path), read_lswmd(path, lean=True)
        assert isinstance(lean.maps, PackedMaps) and isinstance(full.maps, list), layout
        _assert_same(lean, full)
        assert np.array_equal(lean.orig_shape, full.orig_shape) and lean.source == full.source
        assert [m.flags.f_contiguous for m in lean.maps] == [m.flags.f_contiguous for m in full.maps]
        assert all(m.flags.writeable for m in lean.maps)
        dies = sum(m.size for m in full.maps)  # 2 bits a die, not a byte
        assert lean.maps.nbytes <= dies // 4 + 4 * (len(full) // batch + 1), layout
    sub = lean.subset([3, 1])
    assert [m.shape for m in sub.maps] == [tuple(full.orig_shape[3]), tuple(full.orig_shape[1])]


def test_lean_reader_falls_back_or_fails_exactly_as_the_full_reader(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(MapStore, "BATCH", 3)  # the bad map (row 5) ends a batch that stays unpacked
    masked = tmp_path / "masked.pkl"
    write_lswmd(_small_table(masks=True), masked)  # a layout it does not keep packed: the full reader
    back = read_lswmd(masked, lean=True)
    assert isinstance(back.maps, list) and back.masks is not None
    _assert_same(back, read_lswmd(masked), masks=True)
    bad = _small_table(8)
    bad.maps[5] = bad.maps[5].copy()
    bad.maps[5][bad.maps[5].shape[0] // 2, bad.maps[5].shape[1] // 2] = 3
    for layout, path in _every_layout(bad, tmp_path).items():
        with pytest.raises(WaferlabError, match=r"row 5, field 'waferMap': value 3 outside") as lean_err:
            read_lswmd(path, lean=True)
        with pytest.raises(WaferlabError) as full_err:
            read_lswmd(path)
        assert str(lean_err.value) == str(full_err.value), layout

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(WaferlabError, match="refusing to load it"):
        read_lswmd(tmp_path / "evil.pkl", lean=True)


@pytest.mark.parametrize("batch", [4096, 7])
def test_lean_safe_npz_is_read_in_packed_batches_with_the_full_readers_checks(
        shared_data: Path, tmp_path: Path, batch: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(MapStore, "BATCH", batch)
    table = load_table(shared_data / SUB100)
    write_safe(table, tmp_path / "t.npz")
    full, lean = load_table(tmp_path / "t.npz"), load_table(tmp_path / "t.npz", lean=True)
    assert isinstance(lean.maps, PackedMaps) and isinstance(full.maps, list)
    _assert_same(lean, full)
    assert np.array_equal(lean.orig_shape, full.orig_shape) and lean.source == full.source
    assert lean.maps.nbytes <= sum(m.size for m in full.maps) // 4 + 4 * (len(full) // batch + 1)
    bad = _small_table(8)
    bad.maps[5] = bad.maps[5].copy()
    bad.maps[5][bad.maps[5].shape[0] // 2, bad.maps[5].shape[1] // 2] = 3
    write_safe(bad, tmp_path / "bad.npz")
    with pytest.raises(WaferlabError, match=r"row 5, field 'maps': value 3 outside") as lean_err:
        load_table(tmp_path / "bad.npz", lean=True)
    with pytest.raises(WaferlabError) as full_err:
        load_table(tmp_path / "bad.npz")
    assert str(lean_err.value) == str(full_err.value)
    late = _small_table(12)  # a bad map in the second batch (of 7) names its row in the file, not the batch
    late.maps[9] = late.maps[9].copy()
    late.maps[9][late.maps[9].shape[0] // 2, late.maps[9].shape[1] // 2] = 3
    write_safe(late, tmp_path / "late.npz")
    with pytest.raises(WaferlabError, match=r"row 9, field 'maps': value 3 outside"):
        load_table(tmp_path / "late.npz", lean=True)
    write_safe(_small_table(masks=True), tmp_path / "masks.npz")  # masks index the flat buffer: read whole
    masked = load_table(tmp_path / "masks.npz", lean=True)
    assert isinstance(masked.maps, list) and masked.masks is not None


def _lean_and_full(path: Path) -> WaferTable:
    """The full reader's table of ``path``, after checking the lean reader gives the same one."""
    full, lean = load_table(path), load_table(path, lean=True)
    _assert_same(lean, full)
    assert np.array_equal(lean.orig_shape, full.orig_shape)
    return full


def test_pickle_variants(tmp_path: Path):  # each read by both readers (the lean one keeps maps packed)
    table = _small_table(12)
    df = frame_from_table(table)
    # labels flattened to plain strings, NaN / None for unlabelled rows, split column spelt correctly
    flat = df.copy()
    flat["failureType"] = [np.nan if lab == UNLABELED else lab for lab in table.labels]
    flat["failureType"] = flat["failureType"].astype(object)
    flat.loc[flat.index[10], "failureType"] = None
    flat = flat.rename(columns={"trianTestLabel": "trainTestLabel"})
    flat["trainTestLabel"] = [s or np.nan for s in table.split]
    flat["someExtra"] = "ignored"
    flat["failureNum"] = 3
    flat.to_pickle(tmp_path / "flat.pkl")
    back = _lean_and_full(tmp_path / "flat.pkl")
    _assert_same(back, table)
    # labels as text like the CSV export, in an arbitrary (non-range) index, compressed
    text = df.copy()
    text["failureType"] = ["[]" if lab == UNLABELED else f"[['{lab}']]" for lab in table.labels]
    text.index = np.arange(100, 100 + len(text)) * 7
    text.to_pickle(tmp_path / "text.pkl.gz")
    _assert_same(_lean_and_full(tmp_path / "text.pkl.gz"), table)
    with zipfile.ZipFile(tmp_path / "LSWMD.pkl.zip", "w") as zf:
        zf.writestr("LSWMD.pkl", pickle.dumps(df))
    _assert_same(_lean_and_full(tmp_path / "LSWMD.pkl.zip"), table)
    # maps stored as int64 arrays or nested lists are converted (and checked)
    lists = df.copy()
    lists["waferMap"] = [m.astype(np.int64) if i % 2 else m.tolist() for i, m in enumerate(table.maps)]
    lists.to_pickle(tmp_path / "lists.pickle")
    _assert_same(_lean_and_full(tmp_path / "lists.pickle"), table)


def test_content_sniffing_without_extension(tmp_path: Path):
    table = _small_table(5)
    write_lswmd(table, tmp_path / "data.bin")
    write_safe(table, tmp_path / "data.arr")
    assert sniff(tmp_path / "data.bin") == "pickle" and sniff(tmp_path / "data.arr") == "zip"
    _assert_same(load_table(tmp_path / "data.bin"), table)
    _assert_same(load_table(tmp_path / "data.arr"), table)


def _write_csv(table: WaferTable, path: Path, sep: str = "\t") -> None:
    rows = [sep.join(["", "waferMap", "dieSize", "lotName", "waferIndex", "trianTestLabel", "failureType"])]
    for i, m in enumerate(table.maps):
        lab = "[]" if table.labels[i] == UNLABELED else f"[[{table.labels[i]}]]"
        split = f"[[{table.split[i]}]]" if table.split[i] else "[]"
        cells = [str(i), json.dumps(m.tolist()), f"{np.count_nonzero(m)}.0", table.lot[i],
                 f"{table.wafer_index[i]}.0", split, lab]
        rows.append(sep.join(f'"{c}"' if sep in c else c for c in cells))
    path.write_text("\n".join(rows) + "\n")


def test_csv_variants(tmp_path: Path):
    table = _small_table(9)
    _write_csv(table, tmp_path / "export.csv")
    _assert_same(load_table(tmp_path / "export.csv"), table)
    _write_csv(table, tmp_path / "comma.csv", sep=",")
    _assert_same(load_table(tmp_path / "comma.csv"), table)


def test_mixed38_npz(tmp_path: Path):
    rng = np.random.default_rng(1)
    maps = rng.integers(0, 3, size=(7, 52, 52)).astype(np.int64)
    hot = np.zeros((7, 8), np.int32)
    hot[1, 0] = 1
    hot[2, [0, 3]] = 1
    hot[3, [1, 4, 6]] = 1
    hot[4, 7] = 1
    np.savez(tmp_path / "Wafer_Map_Datasets.npz", maps, hot)  # saved as arr_0 / arr_1
    table = load_table(tmp_path / "Wafer_Map_Datasets.npz")
    assert table.labels.tolist() == ["none", "Center", "Center+Edge-Ring", "Donut+Loc+Scratch", "Random",
                                     "none", "none"]
    assert np.array_equal(table.multi_hot, hot) and table.multi_label_names == MIXED38_TYPES
    assert all(np.array_equal(m, maps[i]) and m.dtype == np.uint8 for i, m in enumerate(table.maps))
    assert table.wafer_index.tolist() == list(range(7))


def test_safe_round_trip_is_exact_and_pickle_free(shared_data: Path, tmp_path: Path):
    tables = (_small_table(10, masks=True), load_table(shared_data / MIXED), load_table(shared_data / PKL))
    for table in tables:
        out = tmp_path / "safe.npz"
        write_safe(table, out)
        with np.load(out, allow_pickle=False) as npz:
            assert all(npz[k].dtype != object for k in npz.files)
            assert npz["maps"].dtype == np.uint8 and npz["maps"].ndim == 1
        back = read_safe(out)
        _assert_same(back, table, masks=table.masks is not None)
        assert np.array_equal(back.orig_shape, table.orig_shape)
        if table.multi_hot is not None:
            assert np.array_equal(back.multi_hot, table.multi_hot)
            assert back.multi_label_names == table.multi_label_names
        _assert_same(load_table(out), table)


def test_empty_table_safe_round_trip(tmp_path: Path):
    table = _small_table(3).subset(np.zeros(3, bool))
    write_safe(table, tmp_path / "empty.npz")
    assert len(read_safe(tmp_path / "empty.npz")) == 0


def _viridis_rgb(m: np.ndarray, alpha: bool = False) -> np.ndarray:
    rgb = VIRIDIS_LEVELS.astype(np.uint8)[m]
    return np.concatenate([rgb, np.full(m.shape + (1,), 255, np.uint8)], axis=2) if alpha else rgb


def test_image_folders_both_ways(tmp_path: Path):
    table = _small_table(12)
    by_folder, by_name = tmp_path / "by_folder", tmp_path / "by_name"
    aliases = {"Edge-Loc": "Edge Local", "none": "Normal", "Center": "center", "Donut": "Donut",
               "Scratch": "scratch"}
    expected = []
    for i, (m, lab) in enumerate(zip(table.maps, table.labels)):
        if lab == UNLABELED:
            continue
        expected.append((m, lab))
        folder = by_folder / aliases[lab]
        folder.mkdir(parents=True, exist_ok=True)
        by_name.mkdir(exist_ok=True)
        if i % 3 == 0:  # grayscale 0/127/255
            Image.fromarray((m * 127 + (m == 2)).astype(np.uint8)).save(folder / f"{i}.png")
            Image.fromarray((m * 127 + (m == 2)).astype(np.uint8)).save(by_name / f"{i}_{aliases[lab]}.png")
        elif i % 3 == 1:  # viridis RGB
            Image.fromarray(_viridis_rgb(m)).save(folder / f"{i}.png")
            Image.fromarray(_viridis_rgb(m)).save(by_name / f"wm811k_{lab}_{i}.png")
        else:  # viridis RGBA
            Image.fromarray(_viridis_rgb(m, alpha=True)).save(folder / f"{i}.png")
            Image.fromarray(_viridis_rgb(m, alpha=True)).save(by_name / f"{i}_{lab}.png")
    (by_folder / "notes.txt").write_text("not an image")
    for folder in (by_folder, by_name):
        back = read_image_folder(folder)
        assert Counter(back.labels.tolist()) == Counter(lab for _, lab in expected)
        pairs = {(lab, m.tobytes()) for m, lab in expected}
        assert {(lab, m.tobytes()) for m, lab in zip(back.maps, back.labels)} == pairs


def test_mixed_and_jpeg_image_folders(tmp_path: Path):
    m = _small_table(1).maps[0]
    big = np.kron(m, np.ones((4, 4), np.uint8))  # nearest-upscaled, kept at file size
    Image.fromarray(big * 127).save(tmp_path / "mixed_Center_Random_5.png")
    Image.fromarray(big * 127).save(tmp_path / "mixed_Edge-Loc_6.png")
    Image.fromarray(_viridis_rgb(big)).save(tmp_path / "mixed_Donut_Loc_7.jpg", quality=90)
    table = read_image_folder(tmp_path)
    assert table.labels.tolist() == ["Center+Scratch", "Donut+Loc", "Edge-Loc"]  # sorted by file name
    assert table.multi_hot.tolist()[0] == [1, 0, 0, 0, 0, 0, 1, 0]
    assert np.array_equal(table.maps[0], big) and table.maps[0].shape == big.shape
    assert (table.maps[1] == big).mean() > 0.97  # lossy JPEG: nearest-colour decoding, approximate


def test_cli_convert_real_sample(shared_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "sample.npz"
    assert main(["data", "convert", str(shared_data / PKL), "--out", str(out)]) == 0
    assert "wrote 180 maps" in capsys.readouterr().err
    _assert_same(read_safe(out), load_table(shared_data / PKL))


def test_pickle_with_foreign_code_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(WaferlabError, match="refusing"):
        load_table(tmp_path / "evil.pkl")
    assert not marker.exists()
    (tmp_path / "evil2.pkl").write_bytes(gzip.compress(pickle.dumps(Evil())))
    with pytest.raises(WaferlabError, match="extension"):
        load_table(tmp_path / "evil2.pkl")


def test_single_image_file(shared_data: Path, tmp_path: Path):
    one = load_table(shared_data / DM3 / "154_Near-full.png")
    assert len(one) == 1 and one.labels.tolist() == ["Near-full"]
    Image.fromarray(np.full((6, 6), 127, np.uint8)).save(tmp_path / "wafer.png")
    assert load_table(tmp_path / "wafer.png").labels.tolist() == [UNLABELED]
