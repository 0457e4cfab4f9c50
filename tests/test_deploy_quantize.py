"""``waferlab export --quantize int8``: a small trained run exported in int8 predicts end to end like torch,
its graph quantises every convolution (fusable into QLinearConv) and keeps the scoring float32, and the
metadata records the quantisation, its calibration and the held-out check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from deploy_util import SIZE, synth_file

from waferlab.cli import main
from waferlab.deploy.export import CONTRACT_VERSION, META_KEY, open_session
from waferlab.deploy.quantize import NETWORK_SCOPE

MODEL = "resnet34"
#: Top-1 agreement of int8 with torch required on the 240 held-out maps. This tiny run (32 px, 3 epochs,
#: 340 training maps) is unsure of many maps, and int8 flips only those: measured 0.95-0.96 on the 240 maps
#: and 0.91-0.97 on its 58 test maps, every flipped map with a float32 top-1/top-2 margin <= 0.12 (calibrated
#: probabilities). 0.9 allows a few more near-ties on another CPU's rounding; a wrong quantisation (a
#: misscaled or uncalibrated tensor) scrambles the classes far below it, and :data:`NEAR_TIE` catches flips
#: of maps the float32 model was sure of.
MIN_AGREEMENT = 0.9
#: float32 top-1 minus top-2 probability below which a map counts as a near-tie that int8 may flip.
NEAR_TIE = 0.25


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run trained briefly (32 px, 400 synthetic maps) exported in int8, and 240 held-out maps."""
    tmp = tmp_path_factory.mktemp("int8")
    train = synth_file(tmp / "train.npz", 400, seed=11)
    run = tmp / "run"
    assert main(["train", "--model", MODEL, "--data", str(train), "--out", str(run), "--epochs", "3",
                 "--image-size", str(SIZE), "--batch-size", "32", "--no-progress"]) == 0
    assert main(["export", str(run), "--format", "onnx", "--quantize", "int8"]) == 0
    return {"tmp": tmp, "run": run, "train": train, "heldout": synth_file(tmp / "heldout.npz", 240, seed=12)}


def _predict(source: Path, data: Path, out: Path, *extra: str) -> pd.DataFrame:
    args = ["predict", str(source), "--data", str(data), "--out", str(out), "--no-progress", *extra]
    assert main(args) == 0
    return pd.read_csv(out, keep_default_na=False, na_values=[""])


def test_int8_file_predicts_end_to_end_like_torch(setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    int8 = setup["run"] / "exports" / "model-int8.onnx"
    assert not (setup["run"] / "exports" / "model.onnx").exists()  # the float32 default path is left alone
    torch_rows = _predict(setup["run"], setup["heldout"], tmp_path / "torch.csv")
    capsys.readouterr()
    int8_rows = _predict(int8, setup["heldout"], tmp_path / "int8.csv")
    assert "(int8 model)" in capsys.readouterr().err
    assert (int8_rows["row"] == torch_rows["row"]).all() and len(int8_rows) == 240
    same = (int8_rows["pred_class"] == torch_rows["pred_class"]).to_numpy()
    assert same.mean() >= MIN_AGREEMENT, same.mean()
    margin = (torch_rows["prob"] - torch_rows["top2_prob"]).to_numpy()
    assert (margin[~same] < NEAR_TIE).all(), margin[~same]  # only near-ties flip
    # most maps move by a few thousandths; a single unsure map of this tiny model moved 0.28 in one run
    # (onnxruntime's threaded reductions vary with the load, and int8 rounding amplifies it)
    diff = np.abs(int8_rows["prob"] - torch_rows["prob"]).to_numpy()
    assert np.quantile(diff, 0.95) < 0.05 and diff.max() < 0.5, np.sort(diff)[-5:]


def test_metadata_records_the_quantisation_and_its_held_out_check(setup: dict[str, Path]) -> None:
    _, contract = open_session(setup["run"] / "exports" / "model-int8.onnx")
    from waferlab.engine.config import config_from_dict
    from waferlab.engine.datamodule import load_split_data
    from waferlab.engine.run import Run

    values = {**Run.open(setup["run"]).config_values(), "progress": False}
    n_val = len(load_split_data(config_from_dict(values, "config.yaml")).val)  # 400 maps: 60
    assert contract.quantization == "int8"
    assert contract.calibration_maps == min(512, n_val) > 0
    assert contract.calibration_source == f"the run's validation part ({n_val} of {n_val} maps)"
    check = contract.quantization_check
    assert check["on"] == "the run's test part" and check["maps"] > 0
    assert check["top1_agreement"] >= 0.85 and check["max_abs_prob_diff"] < 0.2  # 58 maps: one is 0.017
    assert check["unknown_score_spearman"] > 0.9  # measured 0.995
    assert {"macro_f1_fp32", "macro_f1_int8", "unknown_score_spearman", "unknown_flag_agreement"} <= set(
        check)
    # the thresholds were moved to the int8 outputs on the calibration maps; the float32 ones are recorded
    th = json.loads((setup["run"] / "thresholds.json").read_text())
    moved = contract.threshold_transfer
    assert moved["on"] == contract.calibration_source and moved["maps"] == contract.calibration_maps
    assert moved["ood_threshold_fp32"] == pytest.approx(th["ood_threshold"])
    assert moved["none_threshold_fp32"] == pytest.approx(th["none_threshold"])
    assert contract.version == CONTRACT_VERSION


def test_thresholds_move_with_the_int8_outputs_and_keep_the_flagged_share() -> None:
    """A shift of the outputs moves each threshold with it; the flagged count on the maps stays the same."""
    from waferlab.deploy.export import Contract
    from waferlab.deploy.quantize import matched_threshold, transfer_thresholds

    assert matched_threshold(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.15, 0.25, 0.35, 0.45]), 0.25,
                             below=True) == pytest.approx(np.nextafter(np.float32(0.25), np.float32(1)))
    assert matched_threshold(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 3.0, 4.0, 5.0]), 3.5,
                             below=False) == 4.0  # one map above, before and after
    assert matched_threshold(np.array([1.0, 2.0]), np.array([5.0, 6.0]), 9.0, below=False) == 9.0  # none
    rng = np.random.default_rng(0)
    names = ("Center", "none")
    p_none = rng.uniform(size=500).astype(np.float32)
    p0 = np.stack([1 - p_none, p_none], 1)
    p1 = np.clip(p0 + np.float32(0.03) * np.array([-1, 1], np.float32), 0, 1)  # int8 leans to none
    s0 = rng.normal(size=500).astype(np.float32)
    s1 = s0 * np.float32(1.1) + np.float32(0.2)
    c = Contract(32, "onehot", names, 1.0, 1.0, 0.3, 1.5, "knn", "fp")
    moved = transfer_thresholds((p0, s0), (p1, s1), c, "test maps")
    assert moved.none_threshold > c.none_threshold and moved.ood_threshold > c.ood_threshold
    assert (p1[:, 1] < moved.none_threshold).sum() == (p0[:, 1] < c.none_threshold).sum()
    assert (s1 > moved.ood_threshold).sum() == (s0 > c.ood_threshold).sum()
    assert moved.threshold_transfer == {"on": "test maps", "maps": 500, "none_threshold_fp32": 0.3,
                                        "ood_threshold_fp32": 1.5}


def test_int8_graph_quantises_every_convolution_and_keeps_the_scoring_float(setup: dict[str, Path]) -> None:
    """Every Conv of the network takes int8 weights and a quantised int32 bias from DequantizeLinear (so
    onnxruntime fuses it into QLinearConv: a bias left behind torch's Identity nodes keeps it float and
    slower than float32), the classifier layer keeps float32 weights, and no node outside the network
    (softmax, temperature, k-NN score) takes a quantised input."""
    import onnx

    graph = onnx.load(str(setup["run"] / "exports" / "model-int8.onnx")).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) >= 30  # resnet34
    for conv in convs:
        dq = [producer.get(i) for i in conv.input]
        assert all(d is not None and d.op_type == "DequantizeLinear" for d in dq), conv.name
        assert inits[dq[1].input[0]] == onnx.TensorProto.INT8, conv.name  # per-channel weights
        assert inits[dq[2].input[0]] == onnx.TensorProto.INT32, conv.name  # quantised bias
    gemm = [n for n in graph.node if n.op_type == "Gemm"]  # the classifier: float32 weights
    assert len(gemm) == 1 and inits[gemm[0].input[1]] == onnx.TensorProto.FLOAT
    quant_ops = {"QuantizeLinear", "DequantizeLinear"}
    for node in graph.node:
        if node.op_type in ("Softmax", "TopK", "Sqrt") or (node.op_type == "MatMul"
                                                           and not node.name.startswith(NETWORK_SCOPE)):
            quantised = [i for i in node.input if i in producer and producer[i].op_type in quant_ops]
            assert not quantised, node.name


def test_calib_data_and_calib_maps(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", str(setup["run"]), "--quantize", "int8", "--calib-data", str(setup["heldout"]),
                 "--calib-maps", "40", "--out", str(out)]) == 0
    _, contract = open_session(out)
    n = contract.calibration_maps  # a stratified sample: about 40, each of the 9 classes rounded
    assert abs(n - 40) <= 9 and contract.calibration_source == f"heldout.npz ({n} of 240 maps)"


def test_float32_export_is_unchanged_and_older_contracts_read_as_float32(setup: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "fp32.onnx"
    assert main(["export", str(setup["run"]), "--out", str(out)]) == 0
    proto = onnx.load(str(out))
    assert not [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    _, contract = open_session(out)
    assert contract.quantization == "none" and contract.quantization_check is None
    meta = json.loads(proto.metadata_props[0].value)  # a version-1 file: no quantisation fields
    for key in ("quantization", "calibration_maps", "calibration_source", "quantization_check"):
        del meta[key]
    meta["version"] = 1
    proto.metadata_props[0].value = json.dumps(meta)
    onnx.save(proto, str(out))
    assert open_session(out)[1].quantization == "none"
    assert proto.metadata_props[0].key == META_KEY


def test_compare_outputs_counts_flips_flags_rank_and_defect_recall() -> None:
    from types import SimpleNamespace

    from waferlab.deploy.quantize import compare_outputs

    contract = SimpleNamespace(class_names=("Loc", "none"), none_threshold=0.5, ood_threshold=1.0)
    p0 = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    p1 = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.45, 0.55]])  # map 2 flips class and defect flag
    s0, s1 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 2.0, 1.5, 3.0])  # maps 1 and 2 swap ranks
    out = compare_outputs((p0, s0), (p1, s1), np.array([0, 1, 0, 0]), contract)
    assert out["maps"] == 4 and out["top1_agreement"] == 0.75
    assert out["max_abs_prob_diff"] == pytest.approx(0.2)
    assert out["defect_flag_agreement"] == 0.75 and out["unknown_flag_agreement"] == 0.75  # map 1: 2.0 > 1
    assert out["unknown_score_spearman"] == pytest.approx(0.8)
    assert out["defect_recall_fp32"] == pytest.approx(2 / 3)
    assert out["defect_recall_int8"] == pytest.approx(1 / 3)
    assert out["macro_f1_fp32"] > out["macro_f1_int8"]


@pytest.mark.parametrize("rule", ["nearest", "failkeep"])
def test_calib_data_is_shrunk_with_the_runs_rule(tmp_path: Path, rule: str) -> None:
    """--calib-data maps reach the int8 calibration shrunk with the run's resize rule, not the default one
    (the merge of int8 and resize first read them with the default rule)."""
    from deploy_util import calibrated_run

    from waferlab.data.cache import load_prepared, prepare, save_cache
    from waferlab.data.readers import write_safe
    from waferlab.data.synth import generate
    from waferlab.deploy.quantize import QuantizeOptions, calibration_set
    from waferlab.engine.run import Run

    run = Run.open(calibrated_run(tmp_path, resize=rule))
    big = generate(40, seed=5)
    src = tmp_path / "big.npz"
    write_safe(big, src)
    cache = tmp_path / f"big-{rule}.npz"
    save_cache(prepare(big, SIZE, resize=rule), cache)
    other = "nearest" if rule == "failkeep" else "failkeep"
    assert (prepare(big, SIZE, resize=other).maps != prepare(big, SIZE, resize=rule).maps).any()
    for calib in (src, cache):  # a raw file is shrunk with the run's rule; the run's own cache is accepted
        got = calibration_set(run, QuantizeOptions("int8", calib_data=str(calib), calib_maps=40)).maps
        want = load_prepared(src, SIZE, resize=rule).maps
        assert sorted(map(bytes, got)) == sorted(map(bytes, want))
