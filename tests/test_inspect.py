"""``data inspect``: summary counts, readable text, example figure, and the CLI on a real LSWMD sample."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from waferlab.cli import main
from waferlab.data.cache import prepare, save_cache
from waferlab.data.inspect import format_summary, inspect_source, plot_examples, summarize
from waferlab.data.table import MIXED38_TYPES, UNLABELED, WaferTable

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REAL = "wm811k_mohithmanjunath04_sample_197645f/LSWMD_sample.pkl"


def make_table() -> WaferTable:
    rng = np.random.default_rng(0)
    shapes = [(25, 27)] * 6 + [(53, 58)] * 3 + [(40, 40)]
    labels = ["Center"] * 4 + ["Loc"] * 3 + ["none", UNLABELED, UNLABELED]
    maps = [rng.integers(0, 3, s, dtype=np.uint8) for s in shapes]
    maps[0][:] = 2  # one map all failed dies
    return WaferTable(maps=maps, labels=labels, split=["Training"] * 5 + ["Test"] * 3 + ["", ""],
                      lot=[f"lot{i // 4}" for i in range(10)], wafer_index=list(range(1, 11)), source="mem")


def test_summary_counts_classes_splits_and_sizes():
    s = summarize(make_table())
    assert s["n_maps"] == 10 and s["kind"] == "table" and s["n_lots"] == 3
    assert s["class_counts"] == {"Center": 4, "Loc": 3, "none": 1, UNLABELED: 2}
    assert list(s["class_counts"])[-1] == UNLABELED
    assert s["split_counts"] == {"Training": 5, "Test": 3, "unassigned": 2}
    ms = s["map_sizes"]
    assert ms["n_distinct"] == 3
    assert ms["top"][0] == {"shape": [25, 27], "count": 6}
    assert ms["height"] == {"min": 25, "median": 25.0, "max": 53}
    assert ms["width"]["max"] == 58
    assert 0.5 < s["mean_fail_fraction"]["Center"] <= 1.0
    json.dumps(s)  # JSON-ready


def test_summary_of_a_cache_and_mixed_labels(tmp_path):
    table = make_table()
    table.multi_hot = np.zeros((10, 8), np.uint8)
    table.multi_hot[:4, 0] = 1
    table.multi_hot[:2, 4] = 1
    table.multi_label_names = MIXED38_TYPES
    path = tmp_path / "c.npz"
    save_cache(prepare(table, 16), path)
    s, data = inspect_source(path)
    assert s["kind"] == "cache" and s["cache_size"] == 16 and len(data) == 10
    assert s["class_counts"]["Center"] == 4 and s["class_counts"]["Donut"] == 0  # vocabulary listed
    assert list(s["class_counts"])[:2] == ["Center", "Donut"] and list(s["class_counts"])[-1] == UNLABELED
    assert s["map_sizes"]["top"][0]["shape"] == [25, 27]  # original shapes, not 16x16
    assert s["multi_label_counts"]["Center"] == 4 and s["multi_label_counts"]["Loc"] == 2
    assert s["n_types_per_map"] == {"0": 6, "1": 2, "2": 2}
    text = format_summary(s)
    assert "cache size  16x16" in text and "Center" in text and "mixed types" in text


def test_format_summary_is_readable():
    text = format_summary(summarize(make_table()))
    lines = text.splitlines()
    assert lines[1].split() == ["maps", "10"]
    assert any(line.split()[:2] == ["Center", "4"] for line in lines)
    assert "25x27 (6)" in text and "unassigned" in text


@pytest.mark.parametrize("kind", ["table", "cache"])
def test_plot_examples_writes_a_png(tmp_path, kind):
    data = make_table() if kind == "table" else prepare(make_table(), 32)
    out = plot_examples(data, tmp_path / "sub" / "ex.png", per_class=3, seed=1)
    raw = out.read_bytes()
    assert raw.startswith(PNG_SIGNATURE)
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        width, height = im.size
    assert height > 200 and width > 150  # 4 class rows, 3 columns
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ex.png"]  # no temp file left


def test_cli_inspect_real_sample_json(shared_data):
    pytest.importorskip("waferlab.data.readers")
    proc = subprocess.run([sys.executable, "-m", "waferlab.cli", "data", "inspect", str(shared_data / REAL),
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["n_maps"] == 180
    assert s["class_counts"] == {"Center": 39, "Donut": 5, "Edge-Loc": 41, "Edge-Ring": 64, "Loc": 23,
                                 "Near-full": 1, "Random": 3, "Scratch": 4}
    assert s["split_counts"] == {"Training": 132, "Test": 48}
    assert s["map_sizes"]["top"][0] == {"shape": [25, 27], "count": 21}
    assert s["map_sizes"]["height"]["min"] == 25


def test_cli_prepare_then_inspect_cache_with_figure(shared_data, tmp_path, capsys):
    pytest.importorskip("waferlab.data.readers")
    cache = tmp_path / "real64.npz"
    assert main(["data", "prepare", str(shared_data / REAL), "--size", "64", "--out", str(cache)]) == 0
    capsys.readouterr()
    fig = tmp_path / "real.png"
    assert main(["data", "inspect", str(cache), "--json", "--figure", str(fig), "--per-class", "2"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["kind"] == "cache" and s["cache_size"] == 64 and s["n_maps"] == 180
    assert s["class_counts"]["Edge-Ring"] == 64 and s["class_counts"]["none"] == 0
    assert fig.read_bytes().startswith(PNG_SIGNATURE)


def test_cli_inspect_missing_or_foreign_file_is_one_line_error(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope.pkl")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("waferlab: error:")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["data", "inspect", str(tmp_path / "junk.npz")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("waferlab: error:")
