"""Fab formats: the real STDF/TSK/KLARF files and G85 examples give their known counts; written files
(little-endian, several wafers, gzip, V4-2007, decimal/ASCII G85, KLARF 1.2/1.8) read back exactly; the
canonical orientation holds whatever the file's axes; bins and wafer ids survive ``data convert``."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from waferlab.cli import main
from waferlab.data.fab import FabOptions, detect
from waferlab.data.fab import samples as S
from waferlab.data.fab.common import parse_pass_bins
from waferlab.data.fab.stdf import _scan
from waferlab.data.readers import load_table, read_safe, sniff, write_safe
from waferlab.errors import WaferlabError

LOT2 = "stdf_noonchen_rust-stdf_ce9dfe4/lot2.stdf.gz"
A595 = "stdf_stephensonb_stdflib_ec18666/a595.stdf"
G85_ALL = "g85_fronzbot_wafer-view_f6f3c2f/SEMI_G85_1101_ALL.xml"
G85_MIN = "g85_fronzbot_wafer-view_f6f3c2f/SEMI_G85_1101_MIN.xml"
TSK = "tsk_larvata_tsk-parser_d9016f0/001.QR2352-D5U278-CP-1"
KLARF11 = "klarf_michaelhotaling_klarfkit_056a11e/CPS3TwithoutReview.001"
KLARF12 = "klarf_impro02_wafermap-clustering_f809851/QUU_NUU.000"
KLARF18 = "klarf_btrapp_jklarfreader_373eec3/simple18.klarf"


def _counts(m: np.ndarray) -> tuple[int, int, int]:
    """(dies, good, failed) of a 0/1/2 map."""
    return int((m > 0).sum()), int((m == 1).sum()), int((m == 2).sum())


def _trim(m: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


# ---------------------------------------------------------------------------------------------------
# real samples


def test_stdf_lot2_one_wafer_last_retest_kept(shared_data):
    table = load_table(shared_data / LOT2)
    assert len(table) == 1 and table.lot.tolist() == ["GAL-LOT"] and table.wafer_id.tolist() == ["GAL-LOT-02"]
    m, bins = table.maps[0], table.bins[0]
    assert m.shape == (43, 42)  # X 4..45, Y -45..-3
    assert _counts(m) == (1456, 1389, 67)  # 1,569 PRRs, 113 retests: the last test of each die counts
    assert round(100 * 1389 / 1456, 1) == 95.4
    assert ((bins == 1) == (m == 1)).all() and ((bins == -1) == (m == 0)).all()
    # every die shows the bin of its LAST PRR (WCR: POS_X R, POS_Y U, flat D: row = Ymax - Y, col = X - Xmin)
    cols = _scan(shared_data / LOT2).prr_columns()
    x, y, hard = cols["X_COORD"], cols["Y_COORD"], cols["HARD_BIN"]
    last = {(int(a), int(b)): int(h) for a, b, h in zip(x, y, hard)}
    first = {}
    for a, b, h in zip(x.tolist(), y.tolist(), hard.tolist()):
        first.setdefault((a, b), h)
    assert len(last) == 1456 and len(x) == 1569
    assert all(bins[y.max() - b, a - x.min()] == h for (a, b), h in last.items())
    assert any(first[k] != last[k] for k in last)  # the retests change bins: first-test-wins would differ


def test_stdf_a595_three_wafers_and_pass_bins(shared_data):
    table = load_table(shared_data / A595)
    assert table.wafer_id.tolist() == ["02", "03", "09"] and table.wafer_index.tolist() == [2, 3, 9]
    assert set(table.lot.tolist()) == {"TEST"}
    assert [_counts(m) for m in table.maps] == [(112, 88, 24), (112, 89, 23), (112, 86, 26)]
    assert all(m.shape == (12, 12) for m in table.maps)
    both = load_table(shared_data / A595, FabOptions(pass_bins=(1, 2)))  # hard bins 1:263, 2:14
    assert sum(_counts(m)[1] for m in both.maps) == 263 + 14
    soft = load_table(shared_data / A595, FabOptions(bin_kind="soft"))  # soft bin 1 PASS: 263
    assert sum(_counts(m)[1] for m in soft.maps) == 263
    assert {int(v) for b in soft.bins for v in np.unique(b)} == {-1, 1, 3, 4, 8, 9, 10, 11}


@pytest.mark.parametrize("rel", [G85_ALL, G85_MIN])
def test_g85_examples(shared_data, rel):
    table = load_table(shared_data / rel)
    m, bins = table.maps[0], table.bins[0]
    assert m.shape == (60, 60) and int((m == 0).sum()) == 792
    assert _counts(m) == (2808, 2765, 43)
    assert [int((bins == code).sum()) for code in (0x00, 0xDE, 0xAD)] == [2765, 38, 5]
    assert table.wafer_id.tolist() == (["ABCD123"] if rel == G85_ALL else ["P6AB36-01"])


def test_tsk_real_map(shared_data):
    table = load_table(shared_data / TSK)
    m = table.maps[0]
    assert m.shape == (265, 254) and _counts(m) == (49631, 46927, 2704)
    assert table.lot.tolist() == ["QR2352-D5U278-CP"] and table.wafer_id.tolist() == ["QR2352-D5U278-CP-1"]
    assert table.wafer_index.tolist() == [1]
    # no die -> bin -1 (numpy 2 truncated the -1 to 65535 in a uint16 np.where, numpy 2.5 raises there)
    bins = table.bins[0]
    assert ((bins == -1) == (m == 0)).all() and bins[m > 0].min() >= 0 and bins.max() < 64


def test_klarf_11_real(shared_data):
    table = load_table(shared_data / KLARF11)
    assert table.lot.tolist() == ["HJU008"] and table.wafer_id.tolist() == ["25"]
    assert table.wafer_index.tolist() == [25]
    assert _counts(table.maps[0]) == (4988, 4988 - 15, 15)  # SampleTestPlan 4988; 16 defects on 15 dies


def test_klarf_12_three_wafers_without_sample_plan(shared_data, capsys):
    table = load_table(shared_data / KLARF12)
    assert table.wafer_id.tolist() == ["02", "06", "01"] and table.wafer_index.tolist() == [1, 5, 25]
    assert [_counts(m)[2] for m in table.maps] == [37, 22, 58]  # NDEFDIE of each SummaryList
    dies = {_counts(m)[0] for m in table.maps}
    # no SampleTestPlan: the dies wholly inside a 200 mm wafer at 2459.878 x 2659.947 um; the summaries'
    # NDIE (4306, after edge exclusion) is a lower bound, the full-area count an upper one
    assert len(dies) == 1 and 4306 <= dies.pop() <= np.pi * 100_000 ** 2 / (2459.878 * 2659.947)
    assert "no SampleTestPlan" in capsys.readouterr().err


def test_klarf_18_nested_syntax(shared_data):
    table = load_table(shared_data / KLARF18)
    assert table.wafer_id.tolist() == ["FirstWaferId", "SecondWaferId"]
    assert table.wafer_index.tolist() == [25, 3]
    assert table.lot.tolist() == ["aLot.String"] * 2
    first = table.maps[0]
    # two TestRecords plan 5 + 4 dies; the 3 defects lie on 3 other dies, which are added (failed)
    assert _counts(first) == (12, 9, 3)
    assert _counts(table.maps[1])[2] == 1


@pytest.mark.parametrize("rel", [LOT2, A595, G85_ALL, G85_MIN, TSK, KLARF11, KLARF12, KLARF18])
def test_detected_by_content_and_extension(shared_data, rel):
    path = shared_data / rel
    assert detect(path, sniff(path)) in ("stdf", "g85", "tsk", "klarf")


@pytest.mark.parametrize("rel", [LOT2, G85_ALL, TSK, KLARF11])
def test_cli_convert_keeps_bins_and_ids_and_inspect_draws(shared_data, rel, tmp_path, capsys):
    out = tmp_path / "x.npz"
    assert main(["data", "convert", str(shared_data / rel), "--out", str(out)]) == 0
    back, direct = read_safe(out), load_table(shared_data / rel)
    assert all(np.array_equal(a, b) for a, b in zip(back.maps, direct.maps))
    assert back.wafer_id.tolist() == direct.wafer_id.tolist() and back.lot.tolist() == direct.lot.tolist()
    if direct.bins is None:
        assert back.bins is None
    else:
        assert all(np.array_equal(a, b) for a, b in zip(back.bins, direct.bins))
    png = tmp_path / "maps.png"
    assert main(["data", "inspect", str(shared_data / rel), "--figure", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------
# written files


@pytest.fixture(scope="module")
def grids() -> list[np.ndarray]:
    return [S.round_wafer(400, fail_fraction=0.2, seed=k) for k in range(3)]


@pytest.mark.parametrize("kw", [dict(byte_order="<"), dict(byte_order=">"), dict(gz=True),
                                dict(v2007=True, tests_per_die=2)], ids=["little", "big", "gzip", "v4-2007"])
def test_stdf_written_round_trip(tmp_path, grids, kw):
    wafers = [S.stdf_wafer_from_map(f"W{k}", g) for k, g in enumerate(grids)]
    path = S.write_stdf(tmp_path / ("lot.stdf.gz" if kw.get("gz") else "lot.stdf"), wafers, **kw)
    table = load_table(path)
    assert table.wafer_id.tolist() == ["W0", "W1", "W2"] and set(table.lot.tolist()) == {"LOT1"}
    assert all(np.array_equal(m, _trim(g)) for m, g in zip(table.maps, grids))
    assert all(set(np.unique(b).tolist()) <= {-1, 1, 5} for b in table.bins)


def test_stdf_gzip_without_stdf_extension_is_sniffed(tmp_path, grids):
    raw = S.write_stdf(tmp_path / "a.stdf", [S.stdf_wafer_from_map("W", grids[0])]).read_bytes()
    (tmp_path / "wafer.dat.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(load_table(tmp_path / "wafer.dat.gz").maps[0], _trim(grids[0]))


def test_stdf_without_wir_is_one_map_with_a_note(tmp_path, grids, capsys):
    wafers = [S.stdf_wafer_from_map("W", grids[0])]
    table = load_table(S.write_stdf(tmp_path / "nowir.stdf", wafers, wir=False))
    assert len(table) == 1 and np.array_equal(table.maps[0], _trim(grids[0]))
    assert "no WIR" in capsys.readouterr().err


def test_stdf_retest_keeps_the_last_test(tmp_path):
    x, y = np.array([0, 1, 0, 1, 0]), np.array([0, 0, 1, 1, 0])
    # die (0,0) fails (bin 7), then passes on retest; die (1,1) passes, so the map is all good but (0,1)
    w = S.StdfWafer("W", x, y, hard=np.array([7, 1, 3, 1, 1]))
    table = load_table(S.write_stdf(tmp_path / "retest.stdf", [w]))
    assert table.maps[0].tolist() == [[1, 1], [2, 1]] and table.bins[0].tolist() == [[1, 1], [3, 1]]
    w.hard = np.array([1, 1, 3, 1, 7])  # now the retest fails
    assert load_table(S.write_stdf(tmp_path / "retest2.stdf", [w])).maps[0].tolist() == [[2, 1], [2, 1]]


def test_stdf_pass_bins_and_soft_bins(tmp_path, grids, capsys):
    w = S.stdf_wafer_from_map("W", grids[0], fail_bin=2)
    w.soft = np.where(w.hard == 1, 10, 20)
    path = S.write_stdf(tmp_path / "bins.stdf", [w])
    assert _counts(load_table(path, FabOptions(pass_bins=(1, 2))).maps[0])[2] == 0
    soft = load_table(path, FabOptions(pass_bins=(10,), bin_kind="soft"))
    assert np.array_equal(soft.maps[0], _trim(grids[0]))
    assert set(np.unique(soft.bins[0]).tolist()) == {-1, 10, 20}
    out = tmp_path / "x.npz"
    assert main(["data", "convert", str(path), "--out", str(out), "--pass-bins", "1,2"]) == 0
    assert _counts(read_safe(out).maps[0])[2] == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as usage:
        main(["data", "inspect", str(path), "--pass-bins", "one"])
    assert usage.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pass-bins" in err[0] and "'one'" in err[0]


def _asymmetric() -> np.ndarray:
    g = np.ones((5, 7), np.uint8)
    g[0, 0] = 2  # top-left marker
    g[4, 3:] = 0  # an uneven bottom edge
    g[4, 4] = 2
    return g


@pytest.mark.parametrize("flat", ["D", "U", "L", "R"])
@pytest.mark.parametrize("axes", [("R", "D"), ("L", "D"), ("R", "U"), ("L", "U")])
def test_stdf_orientation_is_canonical_whatever_the_axes(tmp_path, flat, axes):
    canonical = _asymmetric()
    # the map as the file's tool sees it: the flat (at the bottom of ``canonical``) turned to side ``flat``
    view = np.rot90(canonical, {"D": 0, "L": -1, "U": 2, "R": 1}[flat])  # k=-1: clockwise, bottom -> left
    rows, cols = np.nonzero(view)
    x = cols if axes[0] == "R" else -cols
    y = rows if axes[1] == "D" else -rows
    w = S.StdfWafer("W", x, y, hard=np.where(view[rows, cols] == 1, 1, 9))
    table = load_table(S.write_stdf(tmp_path / "o.stdf", [w], wcr=(flat, *axes)))
    assert np.array_equal(table.maps[0], canonical)


@pytest.mark.parametrize("bin_type", ["HexaDecimal", "Decimal", "ASCII"])
def test_g85_written_bin_types_and_several_maps(tmp_path, grids, bin_type):
    path = S.write_g85(tmp_path / "maps.xml", grids, bin_type=bin_type, namespace=bin_type == "Decimal")
    table = load_table(path)
    assert table.wafer_id.tolist() == ["W01", "W02", "W03"]
    assert all(np.array_equal(m, g) for m, g in zip(table.maps, grids))


def test_g85_orientation_and_missing_bin_definitions(tmp_path, capsys):
    g = _asymmetric()
    text = S.write_g85(tmp_path / "a.xml", [g], bin_type="Decimal", with_bins=False).read_text()
    (tmp_path / "b.xml").write_text(text.replace('Orientation="0"', 'Orientation="90"'))  # mark on the left
    assert np.array_equal(load_table(tmp_path / "b.xml").maps[0], np.rot90(g))
    assert "no <Bin> definitions" in capsys.readouterr().err
    # without Bin definitions the pass bins come from --pass-bins: 222 (the fail code) passing too
    assert _counts(load_table(tmp_path / "a.xml", FabOptions(pass_bins=(1, 222))).maps[0])[2] == 0


def test_tsk_written_round_trip_and_flat(tmp_path, grids):
    assert np.array_equal(load_table(S.write_tsk(tmp_path / "a.tsk", grids[0])).maps[0], grids[0])
    flat_up = load_table(S.write_tsk(tmp_path / "b.tsk", grids[1], flat=0)).maps[0]
    assert np.array_equal(flat_up, np.rot90(grids[1], 2))


@pytest.mark.parametrize("version", ["1.2", "1.8"])
def test_klarf_written_round_trip(tmp_path, grids, version):
    table = load_table(S.write_klarf(tmp_path / "lot.klarf", grids, version=version))
    assert table.wafer_index.tolist() == [1, 2, 3]
    assert all(np.array_equal(m, _trim(g)) for m, g in zip(table.maps, grids))


def test_klarf_die_from_coordinates_without_index(tmp_path):
    text = "\n".join(['FileVersion 1 2;', 'LotID "L";', 'DiePitch 1000.0 1000.0;', 'DieOrigin 0.0 0.0;',
                      'WaferID "7";', 'SampleTestPlan 3\n 0 0\n 1 0\n 2 0;',
                      'DefectRecordSpec 3 DEFECTID XREL YREL;',
                      'DefectList\n 1 1500.0 200.0\n 2 1999.0 999.0;', 'EndOfFile;'])
    (tmp_path / "rel.klarf").write_text(text)
    assert load_table(tmp_path / "rel.klarf").maps[0].tolist() == [[1, 2, 1]]


def test_safe_format_keeps_bins_and_wafer_ids(tmp_path, shared_data):
    table = load_table(shared_data / A595)
    write_safe(table, tmp_path / "a.npz")
    back = read_safe(tmp_path / "a.npz")
    assert back.wafer_id.tolist() == ["02", "03", "09"]
    assert all(np.array_equal(a, b) for a, b in zip(back.bins, table.bins))
    sub = back.subset([2])
    assert sub.wafer_id.tolist() == ["09"] and np.array_equal(sub.bins[0], table.bins[2])
    assert "bins" in back.to_frame().columns


def test_parse_pass_bins():
    assert parse_pass_bins("2, 1,2") == (1, 2)
    for bad in ("", "a", "-1", "70000"):
        with pytest.raises(WaferlabError):
            parse_pass_bins(bad)


def test_other_binary_is_not_taken_for_tsk(tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(WaferlabError, match="unsupported file"):
        load_table(tmp_path / "blob.bin")
    assert detect(Path(tmp_path / "blob.bin"), "binary") is None


def test_g85_bad_bin_code_names_its_line(tmp_path):
    text = S.write_g85(tmp_path / "a.xml", [S.round_wafer(200, seed=3)]).read_text()
    lines = text.splitlines()
    k = next(i for i, line in enumerate(lines) if "<Row>" in line and "01" in line)
    lines[k] = lines[k].replace("01", "0G", 1)
    (tmp_path / "bad.xml").write_text("\n".join(lines))
    with pytest.raises(WaferlabError, match=rf"line {k + 1}: bin code '0G' is not hexadecimal"):
        load_table(tmp_path / "bad.xml")
