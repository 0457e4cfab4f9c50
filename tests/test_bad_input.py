"""Bad input through the CLI: exit code 2, ONE stderr line naming file/row/field, and nothing written."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from waferlab.cli import main
from waferlab.data.fab.samples import (
    StdfWafer,
    round_wafer,
    stdf_wafer_from_map,
    write_g85,
    write_klarf,
    write_stdf,
    write_tsk,
)
from waferlab.data.lswmd import frame_from_table, write_lswmd
from waferlab.data.readers import write_safe
from waferlab.data.table import UNLABELED, WaferTable


def _table(n: int = 4) -> WaferTable:
    maps = [np.pad(np.ones((8 + i, 9), np.uint8), 2) for i in range(n)]
    maps[0][5, 5] = 2
    labels = np.array(["Center", "none", UNLABELED, "Loc"][:n] + ["Scratch"] * max(0, n - 4), dtype=object)
    return WaferTable(maps=maps, labels=labels, split=np.array(["Training"] * n, dtype=object),
                      lot=np.array(["lot1"] * n, dtype=object), wafer_index=np.arange(1, n + 1))


def _frame() -> pd.DataFrame:
    return frame_from_table(_table())


def _pickle(df: object, path: Path) -> Path:
    path.write_bytes(pickle.dumps(df, protocol=4))
    return path


def _with_map(row: int, value: object) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        df = _frame()
        df.at[row, "waferMap"] = value
        return _pickle(df, d / "bad_map.pkl")
    return make


def _float_map_with_nan(d: Path) -> Path:
    m = np.ones((10, 10))
    m[3, 4] = np.nan
    return _with_map(1, m)(d)


def _missing_column(d: Path) -> Path:
    return _pickle(_frame().drop(columns=["failureType"]), d / "no_label.pkl")


def _unknown_label(d: Path) -> Path:
    df = _frame()
    df.at[3, "failureType"] = np.array([["Blob"]])
    return _pickle(df, d / "unknown.pkl")


def _truncated_pickle(d: Path) -> Path:
    write_lswmd(_table(), d / "full.pkl")
    data = (d / "full.pkl").read_bytes()
    (d / "full.pkl").unlink()
    (d / "truncated.pkl").write_bytes(data[: len(data) // 2])
    return d / "truncated.pkl"


def _corrupt_pickle(d: Path) -> Path:
    (d / "corrupt.pkl").write_bytes(b"\x80\x04\x95" + bytes(range(256)) * 4)
    return d / "corrupt.pkl"


def _not_a_dataframe(d: Path) -> Path:
    return _pickle([np.ones((3, 3), np.uint8)], d / "list.pkl")


def _empty_file(d: Path) -> Path:
    (d / "empty.pkl").write_bytes(b"")
    return d / "empty.pkl"


def _png_named_pkl(d: Path) -> Path:
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(d / "tmp.png")
    (d / "tmp.png").rename(d / "image.pkl")
    return d / "image.pkl"


def _pickle_named_npz(d: Path) -> Path:
    return _pickle(_frame(), d / "frame.npz")


def _text_named_png(d: Path) -> Path:
    folder = d / "imgs" / "Center"
    folder.mkdir(parents=True)
    (folder / "1.png").write_text("this is not a PNG\n")
    return d / "imgs"


def _truncated_png(d: Path) -> Path:
    folder = d / "imgs" / "Loc"
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 3, (40, 40)) * 127
    Image.fromarray(noise.astype(np.uint8)).save(buf, "PNG")
    (folder / "7.png").write_bytes(buf.getvalue()[:-40])
    return d / "imgs"


def _gray_png_not_three_levels(d: Path) -> Path:
    folder = d / "imgs"
    folder.mkdir()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(folder / "3_Center.png")
    return folder


def _truncated_npz(d: Path) -> Path:
    write_safe(_table(), d / "full.npz")
    data = (d / "full.npz").read_bytes()
    (d / "full.npz").unlink()
    (d / "truncated.npz").write_bytes(data[: len(data) - 60])
    return d / "truncated.npz"


def _npz_wrong_keys(d: Path) -> Path:
    np.savez(d / "keys.npz", maps=np.zeros((2, 5, 5), np.uint8), labels=np.zeros((2, 8)))
    return d / "keys.npz"


def _npz_count_mismatch(d: Path) -> Path:
    np.savez(d / "mixed.npz", np.ones((5, 52, 52), np.uint8), np.zeros((4, 8), np.uint8))
    return d / "mixed.npz"


def _npz_bad_value(d: Path) -> Path:
    maps = np.ones((5, 52, 52), np.int64)
    maps[3, 10, 10] = 5
    np.savez(d / "mixed_value.npz", maps, np.zeros((5, 8), np.uint8))
    return d / "mixed_value.npz"


def _npz_1d_maps(d: Path) -> Path:
    np.savez(d / "flat.npz", np.ones((5, 52), np.uint8), np.zeros((5, 8), np.uint8))
    return d / "flat.npz"


def _safe_tampered(d: Path) -> Path:
    write_safe(_table(), d / "safe.npz")
    with np.load(d / "safe.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["offsets"] = arrays["offsets"] + 1
    np.savez(d / "tampered.npz", **arrays)
    return d / "tampered.npz"


def _prepared_cache(d: Path) -> Path:
    np.savez(d / "cache.npz", __waferlab_cache__=np.array("{}"), maps=np.zeros((1, 8, 8), np.uint8))
    return d / "cache.npz"


def _empty_folder(d: Path) -> Path:
    (d / "nothing").mkdir()
    (d / "nothing" / "README.txt").write_text("no images here")
    return d / "nothing"


def _folder_without_classes(d: Path) -> Path:
    folder = d / "unsorted" / "batch1"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "00017.png")
    return d / "unsorted"


def _csv_bad_json(d: Path) -> Path:
    rows = ["\twaferMap\tdieSize\tlotName\twaferIndex\ttrianTestLabel\tfailureType",
            f"0\t{json.dumps([[0, 1], [1, 2]])}\t3.0\tlot1\t1.0\t[[Training]]\t[[none]]",
            "1\t[[0, 1], [1, 2\t3.0\tlot1\t2.0\t[[Training]]\t[[none]]"]
    (d / "export.csv").write_text("\n".join(rows) + "\n")
    return d / "export.csv"


def _csv_missing_column(d: Path) -> Path:
    (d / "export.csv").write_text("\twaferMap\tlotName\n0\t[[0, 1]]\tlot1\n")
    return d / "export.csv"


def _csv_bad_value(d: Path) -> Path:
    rows = ["\twaferMap\tdieSize\tlotName\twaferIndex\ttrianTestLabel\tfailureType",
            f"0\t{json.dumps([[0, 1], [1, 2]])}\t3.0\tlot1\t1.0\t[[Training]]\t[[none]]",
            f"1\t{json.dumps([[0, 1], [7, 2]])}\t3.0\tlot1\t2.0\t[[Training]]\t[[none]]"]
    (d / "export.csv").write_text("\n".join(rows) + "\n")
    return d / "export.csv"


def _foreign_code(d: Path) -> Path:
    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {d / 'pwned'}",)

    return _pickle(Evil(), d / "evil.pkl")


def _arrow_text_malformed(d: Path) -> Path:
    """A text column as pandas >= 3 pickles it when pyarrow is installed, its offsets pointing past its data
    (pyarrow would read memory it does not own)."""
    pa = pytest.importorskip("pyarrow")

    class BadArrowText:
        def __reduce__(self):
            offsets = pa.py_buffer(np.array([0, 2, 1 << 20], np.int32).tobytes())
            data = (pa.string(), 2, 0, 0, [None, offsets, pa.py_buffer(b"ab")], [], None)
            return pa.lib._restore_array, (data,)

    return _pickle({"failureType": BadArrowText()}, d / "arrow.pkl")


def _nonexistent(d: Path) -> Path:
    return d / "does_not_exist.pkl"


def _zip_named_pkl_zip_without_pickle(d: Path) -> Path:
    with zipfile.ZipFile(d / "LSWMD.pkl.zip", "w") as zf:
        zf.writestr("a.txt", "x")
        zf.writestr("b.txt", "y")
    return d / "LSWMD.pkl.zip"


def _fab_wafer() -> StdfWafer:
    return stdf_wafer_from_map("W01", round_wafer(300, seed=1))


def _stdf_truncated(d: Path) -> Path:
    data = write_stdf(d / "full.stdf", [_fab_wafer()], tests_per_die=2).read_bytes()
    (d / "full.stdf").unlink()
    (d / "cut.stdf").write_bytes(data[: len(data) // 2 + 3])
    return d / "cut.stdf"


def _not_stdf(d: Path) -> Path:
    (d / "lot.stdf").write_text("LOT,WAFER,X,Y,BIN\nA,1,0,0,1\n")
    return d / "lot.stdf"


def _stdf_no_prr(d: Path) -> Path:
    empty = StdfWafer("W01", np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return write_stdf(d / "noprr.stdf", [empty])


def _stdf_no_coordinates(d: Path) -> Path:
    w = _fab_wafer()
    w.x, w.y = np.full_like(w.x, -32768), np.full_like(w.y, -32768)
    return write_stdf(d / "noxy.stdf", [w])


def _g85_row_count(d: Path) -> Path:
    grid = round_wafer(300, seed=1)
    return write_g85(d / "map.xml", [grid], rows_attr=grid.shape[0] + 1)


def _klarf_no_defect_list(d: Path) -> Path:
    text = write_klarf(d / "full.klarf", [round_wafer(300, seed=1)]).read_text()
    (d / "full.klarf").unlink()
    head, _, tail = text.partition("DefectRecordSpec")
    (d / "nolist.klarf").write_text(head + "EndOfFile;\n")
    return d / "nolist.klarf"


def _klarf_no_die_index(d: Path) -> Path:
    (d / "noindex.klarf").write_text('FileVersion 1 2;\nLotID "L";\nWaferID "1";\n'
                                     'DefectRecordSpec 2 DEFECTID DSIZE;\nDefectList\n 1 3.0\n 2 4.0;\n'
                                     'EndOfFile;\n')
    return d / "noindex.klarf"


def _tsk_cut_short(d: Path) -> Path:
    data = write_tsk(d / "full.tsk", round_wafer(300, seed=1)).read_bytes()
    (d / "full.tsk").unlink()
    (d / "cut.tsk").write_bytes(data[:700])
    return d / "cut.tsk"


# (builder, substrings the one error line must contain, also bad for `data inspect`)
CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...], bool]] = {
    "missing_column": (_missing_column, ("missing column 'failureType'",), True),
    "value_3": (_with_map(2, np.full((5, 5), 3, np.uint8)), ("row 2", "'waferMap'", "value 3"), True),
    "negative_value": (_with_map(1, np.full((5, 5), -1, np.int64)), ("row 1", "'waferMap'", "value -1"),
                       True),
    "empty_map": (_with_map(1, np.zeros((0, 0), np.uint8)), ("row 1", "'waferMap'", "empty"), True),
    "1d_map": (_with_map(3, np.ones(12, np.uint8)), ("row 3", "'waferMap'", "1 dimension"), True),
    "ragged_map": (_with_map(0, [[0, 1, 2], [1, 1]]), ("row 0", "'waferMap'"), True),
    "nan_in_map": (_float_map_with_nan, ("row 1", "'waferMap'", "NaN"), True),
    "missing_map": (_with_map(2, None), ("row 2", "'waferMap'", "missing"), True),
    "unknown_label": (_unknown_label, ("row 3", "'failureType'", "unknown label 'Blob'"), True),
    "truncated_pickle": (_truncated_pickle, ("truncated or corrupt",), True),
    "corrupt_pickle": (_corrupt_pickle, ("pickle",), True),
    "not_a_dataframe": (_not_a_dataframe, ("not a pandas DataFrame",), True),
    "empty_file": (_empty_file, ("empty",), True),
    "png_named_pkl": (_png_named_pkl, ("a PNG image", "not a pickle", "'.pkl'"), True),
    "pickle_named_npz": (_pickle_named_npz, ("a pickle", "not a zip/npz", "'.npz'"), True),
    "text_named_png": (_text_named_png, ("1.png", "not a PNG image"), True),
    "truncated_png": (_truncated_png, ("7.png", "truncated"), True),
    "gray_png_levels": (_gray_png_not_three_levels, ("3_Center.png", "3 levels"), True),
    "truncated_npz": (_truncated_npz, ("truncated",), True),
    "npz_wrong_keys": (_npz_wrong_keys, ("'arr_0'", "'labels'"), True),
    "npz_count_mismatch": (_npz_count_mismatch, ("'arr_1'", "4 label rows for 5 maps"), True),
    "npz_bad_value": (_npz_bad_value, ("row 3", "'arr_0'", "value 5"), True),
    "npz_1d_maps": (_npz_1d_maps, ("'arr_0'", "shape (5, 52)"), True),
    "safe_tampered": (_safe_tampered, ("disagree",), True),
    "prepared_cache": (_prepared_cache, ("prepared cache",), False),  # a cache is valid for inspect
    "empty_folder": (_empty_folder, ("no images",), True),
    "folder_without_classes": (_folder_without_classes, ("00017.png", "no class"), True),
    "csv_bad_json": (_csv_bad_json, ("row 1", "'waferMap'", "JSON"), True),
    "csv_missing_column": (_csv_missing_column, ("missing column 'failureType'",), True),
    "csv_bad_value": (_csv_bad_value, ("row 1", "'waferMap'", "value 7"), True),
    "foreign_code": (_foreign_code, ("posix.system", "refusing"), True),
    "arrow_text_malformed": (_arrow_text_malformed, ("arrow.pkl", "pyarrow array is malformed"), True),
    "nonexistent": (_nonexistent, ("no such file",), True),
    "zip_without_pickle": (_zip_named_pkl_zip_without_pickle, ("expected one pickle",), True),
    "stdf_truncated": (_stdf_truncated, ("record", "at byte", "cut short"), True),
    "not_stdf": (_not_stdf, ("record 0", "not an STDF file"), True),
    "stdf_no_prr": (_stdf_no_prr, ("no PRR",), True),
    "stdf_no_coordinates": (_stdf_no_coordinates, ("(PRR)", "no die coordinates"), True),
    "g85_row_count": (_g85_row_count, ("line ", "<Row> elements", "Rows="), True),
    "klarf_no_defect_list": (_klarf_no_defect_list, ("line 7", "no DefectList"), True),
    "klarf_no_die_index": (_klarf_no_die_index, ("line 3", "no die index"), True),
    "tsk_cut_short": (_tsk_cut_short, ("die row", "cut short"), True),
}


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err.strip().splitlines()


PARAMS = [(name, command) for command in ("inspect", "convert") for name, case in CASES.items()
          if command == "convert" or case[2]]


@pytest.mark.parametrize(("name", "command"), PARAMS, ids=[f"{c}-{n}" for n, c in PARAMS])
def test_bad_input_is_one_line_exit_2_nothing_written(name: str, command: str, tmp_path: Path, capsys):
    build, needles, _ = CASES[name]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = build(src_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "converted.npz"
    argv = ["data", "inspect", str(src)] if command == "inspect" else ["data", "convert", str(src), "--out",
                                                                       str(out)]
    rc, lines = _run(argv, capsys)
    assert rc == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("waferlab: error: ")
    assert str(src) in line or any(str(p) in line for p in src.rglob("*")), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert list(out_dir.iterdir()) == []  # nothing written, not even a temporary file
    assert not (src_dir / "pwned").exists()


# ------------------------------------------------------------------------------------------------ deploy
@pytest.fixture(scope="module")
def deploy_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A calibrated run (random weights) with its ONNX export, and a small source to predict."""
    from deploy_util import calibrated_run, synth_file

    tmp = tmp_path_factory.mktemp("deploy_bad")
    run = calibrated_run(tmp, n_cal=45)
    assert main(["export", str(run), "--format", "onnx"]) == 0
    return {"run": run, "data": synth_file(tmp / "fab.npz", 12, seed=3)}


def _run_copy(setup: dict[str, Path], d: Path) -> Path:
    import shutil

    return Path(shutil.copytree(setup["run"], d / "run_copy"))


def _run_without_weights(setup: dict[str, Path], d: Path) -> tuple[list[str], tuple[str, ...]]:
    run = _run_copy(setup, d)
    (run / "model.safetensors").unlink()
    return [str(run)], ("run_copy", "model.safetensors missing")


def _run_without_thresholds(setup: dict[str, Path], d: Path) -> tuple[list[str], tuple[str, ...]]:
    run = _run_copy(setup, d)
    (run / "thresholds.json").unlink()
    return [str(run)], (str(run / "thresholds.json"), "missing", "waferlab calibrate")


def _run_without_ood_arrays(setup: dict[str, Path], d: Path) -> tuple[list[str], tuple[str, ...]]:
    run = _run_copy(setup, d)  # the default unknown-pattern score keeps its statistics in ood.safetensors
    (run / "ood.safetensors").unlink()
    return [str(run)], (str(run / "ood.safetensors"), "missing", "waferlab calibrate")


def _run_with_corrupt_ood_arrays(setup: dict[str, Path], d: Path) -> tuple[list[str], tuple[str, ...]]:
    run = _run_copy(setup, d)
    (run / "ood.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return [str(run)], (str(run / "ood.safetensors"), "unreadable unknown-pattern statistics")


def _run_with_misshapen_fusion(setup: dict[str, Path], d: Path) -> tuple[list[str], tuple[str, ...]]:
    from safetensors.numpy import load_file, save_file

    run = _run_copy(setup, d)  # a knn+energy fit: its z-scoring needs (mean, std) for both parts
    arrays = load_file(str(run / "ood.safetensors"))
    arrays["fusion"] = np.ones((3, 2), np.float32)
    save_file(arrays, str(run / "ood.safetensors"))
    settings = json.loads((run / "ood.json").read_text())
    settings.update(method="knn+energy", arrays={k: list(v.shape) for k, v in arrays.items()})
    (run / "ood.json").write_text(json.dumps(settings))
    return [str(run)], (str(run / "ood.json"), "inconsistent statistics", "knn+energy")


def _run_with_knn_wafer_without_descriptor_statistics(setup: dict[str, Path], d: Path
                                                      ) -> tuple[list[str], tuple[str, ...]]:
    from safetensors.numpy import load_file, save_file

    run = _run_copy(setup, d)  # a knn+wafer fit whose descriptor part lost its statistics
    arrays = {k: v for k, v in load_file(str(run / "ood.safetensors")).items() if not k.startswith("wafer")}
    save_file(arrays, str(run / "ood.safetensors"))
    settings = json.loads((run / "ood.json").read_text())
    settings.update(method="knn+wafer", arrays={k: list(v.shape) for k, v in arrays.items()})
    (run / "ood.json").write_text(json.dumps(settings))
    return [str(run)], (str(run / "ood.json"), "inconsistent statistics", "knn+wafer", "wafer_bank")


def _onnx_with_corrupt_wafer_part(setup: dict[str, Path], d: Path) -> tuple[list[str], tuple[str, ...]]:
    import onnx

    proto = onnx.load(str(setup["run"] / "exports" / "model.onnx"))  # a knn+wafer export (the default)
    meta = next(p for p in proto.metadata_props if p.key == "waferlab")
    contract = json.loads(meta.value)
    contract["wafer_part"]["bank"] = "not base64!"
    meta.value = json.dumps(contract)
    onnx.save(proto, str(d / "corrupt.onnx"))
    return [str(d / "corrupt.onnx")], (str(d / "corrupt.onnx"), "'waferlab'.wafer_part", "unreadable")


def _onnx_of_another_run(setup: dict[str, Path], d: Path) -> tuple[list[str], tuple[str, ...]]:
    run = _run_copy(setup, d)  # recalibrated after the export: the exported file no longer fits the run
    th = json.loads((run / "thresholds.json").read_text())
    th["ood_threshold"] *= 2
    (run / "thresholds.json").write_text(json.dumps(th))
    onnx = run / "exports" / "model.onnx"
    return [str(run), "--backend", "onnx"], (str(onnx), "'fingerprint'", "another run")


def _onnx_without_metadata(setup: dict[str, Path], d: Path) -> tuple[list[str], tuple[str, ...]]:
    import onnx

    proto = onnx.load(str(setup["run"] / "exports" / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(d / "plain.onnx"))
    return [str(d / "plain.onnx")], (str(d / "plain.onnx"), "'waferlab'", "no waferlab metadata")


def _cache_of_another_rule(setup: dict[str, Path], d: Path) -> tuple[list[str], tuple[str, ...], Path]:
    from waferlab.data.cache import RESIZE_RULES, prepare, save_cache
    from waferlab.data.readers import load_table
    from waferlab.engine.run import Run

    spec = Run.open(setup["run"]).spec()  # a cache shrunk with another rule than the run's is never used
    other = next(rule for rule in RESIZE_RULES if rule != spec.resize)
    save_cache(prepare(load_table(setup["data"]), spec.image_size, resize=other), d / "other.npz")
    return [str(setup["run"])], (str(d / "other.npz"), f"prepared with resize {other!r}",
                                 f"--resize {spec.resize}"), d / "other.npz"


# (builder -> (predict arguments before --data, substrings of the one error line[, the --data to use])),
# output in the out dir
DEPLOY_CASES = {
    "run_without_weights": _run_without_weights,
    "run_without_thresholds": _run_without_thresholds,
    "run_without_ood_arrays": _run_without_ood_arrays,
    "run_with_corrupt_ood_arrays": _run_with_corrupt_ood_arrays,
    "run_with_misshapen_fusion": _run_with_misshapen_fusion,
    "onnx_of_another_run": _onnx_of_another_run,
    "onnx_without_metadata": _onnx_without_metadata,
    "run_with_knn_wafer_without_descriptor_statistics": _run_with_knn_wafer_without_descriptor_statistics,
    "onnx_with_corrupt_wafer_part": _onnx_with_corrupt_wafer_part,
    "cache_of_another_rule": _cache_of_another_rule,
    "tta_with_onnx": lambda setup, d: ([str(setup["run"]), "--backend", "onnx", "--tta"],
                                       ("--tta", "--backend torch", "not --backend onnx")),
}


@pytest.mark.parametrize("name", [*DEPLOY_CASES, "unwritable_output"])
def test_deploy_bad_input_is_one_line_exit_2_nothing_written(name: str, deploy_setup: dict[str, Path],
                                                             tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "pred.csv"
    if name == "unwritable_output":
        (out_dir / "blocker").write_text("a file where a folder should be")
        out = out_dir / "blocker" / "pred.csv"
        head, needles = [str(deploy_setup["run"])], (str(out), "cannot write", "not a directory")
        data = []
    else:
        head, needles, *data = DEPLOY_CASES[name](deploy_setup, tmp_path)
    gallery = out_dir / "gallery.html"
    src = data[0] if data else deploy_setup["data"]
    rc, lines = _run(["predict", *head, "--data", str(src), "--out", str(out),
                      "--gallery", str(gallery), "--no-progress"], capsys)
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("waferlab: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert sorted(p.name for p in out_dir.iterdir()) == (["blocker"] if name == "unwritable_output" else [])


def _run_data_gone(setup: dict[str, Path], d: Path) -> tuple[list[str], tuple[str, ...]]:
    import yaml

    run = _run_copy(setup, d)  # trained elsewhere: its validation part cannot be rebuilt here
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = str(d / "elsewhere" / "train.npz")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return [str(run), "--quantize", "int8"], ("elsewhere/train.npz", "not here", "--calib-data")


# `waferlab export`: (builder or export arguments after RUN, substrings of the one error line); output in out
EXPORT_CASES = {
    "bad_quantize": (["--quantize", "int4"], ("--quantize 'int4'", "choose one of none, int8")),
    "calib_maps_zero": (["--quantize", "int8", "--calib-maps", "0"], ("--calib-maps 0", "at least 1")),
    "calib_data_missing": (["--quantize", "int8", "--calib-data", "nope.npz"],
                           ("nope.npz", "no such file", "--calib-data")),
    "calib_data_without_int8": (["--calib-data", "cal.npz"], ("--calib-data cal.npz", "--quantize int8")),
    "run_data_gone": (_run_data_gone, ()),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_bad_input_is_one_line_exit_2_nothing_written(name: str, deploy_setup: dict[str, Path],
                                                             tmp_path: Path, capsys) -> None:
    args, needles = EXPORT_CASES[name]
    if callable(args):
        head, needles = args(deploy_setup, tmp_path)
    else:
        head = [str(deploy_setup["run"]), *args]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, lines = _run(["export", *head, "--out", str(out_dir / "model.onnx")], capsys)
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("waferlab: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert list(out_dir.iterdir()) == []


# `waferlab study run`: a bad spec or missing data is one line, exit 2, and the study folder is not created
STUDY_CASES = {
    "unknown_spec_key": ("axes: {seed: [0]}\nsettings: {}\n", [], ("study.yaml", "unknown key 'settings'")),
    "bad_config_key": ("axes: {lrr: [0.1]}\n", [], ("cell lrr-0.1", "unknown config key 'lrr'")),
    "no_data": ("axes: {seed: [0]}\n", [], ("names no data", "--data")),
    "data_not_found": ("axes: {seed: [0]}\n", ["--data", "nope.npz"], ("data not found: nope.npz",)),
    "bad_workers": ("axes: {seed: [0]}\n", ["--data", ".", "--workers", "0"], ("--workers must be >= 1",)),
    "vary_unknown_row": ("axes: {model: [spanet]}\nvary: {f: {not_for: [nope], a: {lr: 0.1}}}\n", [],
                         ("'vary.f.not_for'", "'nope' is no label of the axes")),
    "vary_bad_variant": ("vary: {f: {a: 3}}\n", [],
                         ("vary.f", "variant 'a'", "expected a mapping of settings")),
    "vary_repeats_base": ("axes: {seed: [0]}\nvary: {opt: {adamw: {optimizer: adamw}}}\n", [],
                          ("cell opt-adamw__seed-0", "its base's exact config", "'default'")),
    "bad_report_rule": ("report: {min_defect_recall: 99}\n", [], ("report.min_defect_recall", "(0, 1)")),
    "only_matches_nothing": ("axes: {seed: [0]}\n", ["--data", ".", "--only", "nope*"],
                             ("--only 'nope*' matches no cell",)),
    "bad_set_key": ("axes: {seed: [0]}\n", ["--set", "lrr=1"], ("--set", "unknown config key 'lrr'")),
    "bad_resize_rule": ("axes: {seed: [0]}\n", ["--set", "resize=bilinear"],
                        ("config resize", "unknown value 'bilinear'", "nearest, failkeep")),
    "bad_augment_option": ("axes: {seed: [0]}\n", ["--set", "augment_options.rescale=2"],
                           ("config augment_options rescale", "a number >= 0 and <= 1", "got 2")),
    "unknown_augment_option": ("axes: {seed: [0]}\n", ["--set", "augment_options.spin=3"],
                               ("config augment_options", "unknown option 'spin'", "allowed: rot90")),
    "dry_run_misspelt_option": ("axes: {model: {x: {model: spanet, model_options: {attentoin: code}}}}\n",
                                ["--dry-run"], ("cell x:", "'attentoin'")),
    "dry_run_factor_not_for_row": ("axes: {model: {r50: {model: resnet50}}}\n"
                                   "vary: {flatten: {gap: {model_options: {flatten: gap}}}}\n", ["--dry-run"],
                                   ("cell r50__flatten-gap:", "'flatten'", "vary.flatten.not_for")),
}


@pytest.mark.parametrize("name", list(STUDY_CASES))
def test_bad_study_input_is_one_line_exit_2_nothing_written(name: str, tmp_path: Path, capsys) -> None:
    text, extra, needles = STUDY_CASES[name]
    spec = tmp_path / "study.yaml"
    spec.write_text(text)
    out = tmp_path / "out"
    rc, lines = _run(["study", "run", str(spec), "--out", str(out), *extra], capsys)
    assert rc == 2 and len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- train
def _unlabelled_val(d: Path) -> Path:
    t = _table()
    t.labels[:] = UNLABELED  # no map of the class set: nothing to validate on
    write_safe(t, d / "unlabelled.npz")
    return d / "unlabelled.npz"


# (builder of the --val-data source, or None for a missing path -> substrings of the one error line)
TRAIN_CASES: dict[str, tuple[Callable[[Path], Path] | None, tuple[str, ...]]] = {
    "val_data_missing": (None, ("val_data not found", "nope.npz")),
    "val_data_without_labels": (_unlabelled_val, ("unlabelled.npz", "no maps of class set 'all9'")),
}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_bad_train_input_is_one_line_exit_2_nothing_written(name: str, tmp_path: Path, capsys) -> None:
    from deploy_util import synth_file

    make, needles = TRAIN_CASES[name]
    data = synth_file(tmp_path / "train.npz", 45, seed=1)
    val = make(tmp_path) if make else tmp_path / "nope.npz"
    out = tmp_path / "run"
    rc, lines = _run(["train", "--model", "spanet", "--data", str(data), "--val-data", str(val), "--out",
                      str(out), "--epochs", "1", "--image-size", "32", "--no-progress"], capsys)
    assert rc == 2 and len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()


# `waferlab evaluate` / `waferlab calibrate` on a user's labelled data: (builder of the data or None for a
# missing path, substrings of the one error line); {purpose} is "evaluate" or "calibrate on"
LABELLED_CASES: dict[str, tuple[Callable[[Path], Path] | None, tuple[str, ...]]] = {
    "data_missing": (None, ("nope.npz", "no such file or directory")),
    "no_labelled_maps": (_unlabelled_val, ("unlabelled.npz", "no labelled maps to {purpose}")),
}


LABELLED_PARAMS = [(n, c) for c in ("evaluate", "calibrate") for n in LABELLED_CASES]


@pytest.mark.parametrize(("name", "command"), LABELLED_PARAMS, ids=[f"{c}-{n}" for n, c in LABELLED_PARAMS])
def test_labelled_data_errors_are_one_line_exit_2_run_untouched(name: str, command: str,
                                                                deploy_setup: dict[str, Path], tmp_path: Path,
                                                                capsys) -> None:
    make, needles = LABELLED_CASES[name]
    data = make(tmp_path) if make else tmp_path / "nope.npz"
    run = _run_copy(deploy_setup, tmp_path)
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    out = ["--out", str(tmp_path / "eval")] if command == "evaluate" else []
    rc, lines = _run([command, str(run), "--data", str(data), *out, "--no-progress"], capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("waferlab: error: "), lines
    purpose = "evaluate" if command == "evaluate" else "calibrate on"
    for needle in needles:
        assert needle.format(purpose=purpose) in lines[0], (needle, lines[0])
    assert not (tmp_path / "eval").exists()
    assert before == {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
