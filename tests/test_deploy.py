"""Deploy: trust fitting (temperature, operating point, unknown-pattern score), streamed predict in every
output format and backend, several worker processes, export round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from deploy_util import calibrated_run, synth_file

from waferlab.cli import main
from waferlab.deploy.ood import (
    FEATURE_METHODS,
    MAP_METHODS,
    FitData,
    OODScorer,
    fit_gaussian,
    fit_scorer,
    knn_distance,
    ledoit_wolf,
    normalise,
    stratified_sample,
)
from waferlab.deploy.predict import COLUMNS, BackgroundWriter, prefetch
from waferlab.deploy.trust import fit_temperature, operating_point
from waferlab.engine.predict import softmax
from waferlab.errors import WaferlabError


# ---------------------------------------------------------------------------------------------- unit
def test_temperature_scaling_recovers_the_true_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6000, 5))
    true_t = 2.5
    p = softmax(logits / true_t)
    labels = np.array([rng.choice(5, p=row / row.sum()) for row in p.astype(np.float64)])
    assert abs(fit_temperature(logits, labels) - true_t) / true_t < 0.1


def test_operating_point_is_the_smallest_threshold_meeting_the_recall_target() -> None:
    rng = np.random.default_rng(1)
    p_none = np.concatenate([rng.beta(1, 8, 500), rng.beta(8, 1, 300)])
    is_defect = np.arange(800) < 500
    op = operating_point(p_none, is_defect, 0.99)
    t = op["none_threshold"]
    assert ((p_none < t)[is_defect]).mean() >= 0.99 == op["defect_recall_target"]
    lower = np.nextafter(np.float32(np.sort(p_none[is_defect])[int(np.ceil(0.99 * 500)) - 1]), np.float32(0))
    assert ((p_none < lower)[is_defect]).mean() < 0.99  # any smaller threshold misses the target
    assert op["false_alarm_rate"] == pytest.approx(((p_none < t)[~is_defect]).mean())


def test_ledoit_wolf_is_well_conditioned_with_fewer_samples_than_dimensions() -> None:
    x = np.random.default_rng(2).normal(size=(20, 64))
    cov = ledoit_wolf(x - x.mean(0))
    eig = np.linalg.eigvalsh(cov)
    assert eig.min() > 0 and eig.max() / eig.min() < 1e3


@pytest.mark.parametrize("method", [m for m in FEATURE_METHODS if m not in MAP_METHODS])  # knn+wafer: below
def test_feature_scores_flag_a_cluster_unlike_the_known_ones_at_the_fitted_recall(method: str) -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 16)) * 3

    def known(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 3, n)
        return centres[labels] + rng.normal(size=(n, 16)), labels

    (feats, labels), (train_f, train_y) = known(600), known(2000)
    logits = rng.normal(size=(600, 3))
    strange = rng.normal(size=(300, 16)) * 3 + 10
    for train in (None, FitData(rng.normal(size=(2000, 3)), train_y, train_f)):  # calibrate | after training
        scorer, scores = fit_scorer(method, FitData(logits, labels, feats), 1.0, train)
        threshold = np.quantile(scores, 0.95, method="higher")
        s_known = scorer.score(rng.normal(size=(300, 3)), known(300)[0])
        s_strange = scorer.score(rng.normal(size=(300, 3)), strange)
        assert 0.9 <= (s_known <= threshold).mean() <= 0.99
        assert (s_strange > threshold).mean() > 0.95
        assert ("training part" in scorer.info["fitted_on"]) == (train is not None)
        again = OODScorer.from_json(json.loads(json.dumps(scorer.to_json())), "ood.json", scorer.arrays)
        np.testing.assert_allclose(again.score(logits[:5], feats[:5]), scorer.score(logits[:5], feats[:5]),
                                   rtol=1e-4)
    means, prec = fit_gaussian(feats, labels)
    assert means.shape == (3, 16) and prec.shape == (16, 16)


def test_knn_energy_flags_maps_strange_in_either_part_and_weighs_both_the_same() -> None:
    """The fused default: z-scored on the threshold's maps, so a map far from the bank (known-looking
    logits) and a map with a low max-logit (known-looking features) both score high."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(3, 16)) * 3
    y = rng.integers(0, 3, 1000)
    feats = centres[y] + rng.normal(size=(1000, 16))
    logits = np.eye(3)[y] * 8 + rng.normal(size=(1000, 3))
    train = FitData(logits[:800], y[:800], feats[:800])
    scorer, scores = fit_scorer("knn+energy", FitData(logits[800:], y[800:], feats[800:]), 1.0, train)
    mean, std = scorer.arrays["fusion"][:, 0], scorer.arrays["fusion"][:, 1]
    parts = scorer.parts(logits[800:], feats[800:])
    np.testing.assert_allclose(mean, parts.mean(0), rtol=1e-4)  # fitted on the validation maps' parts
    np.testing.assert_allclose(std, parts.std(0), rtol=1e-3)
    np.testing.assert_allclose(scores, ((parts - mean) / std).sum(1), rtol=1e-4, atol=1e-4)
    threshold = np.quantile(scores, 0.95, method="higher")
    far = scorer.score(logits[:50], rng.normal(size=(50, 16)) * 3 + 10)  # strange features only
    flat = scorer.score(np.zeros((50, 3)), feats[:50])  # strange logits only
    assert (far > threshold).mean() > 0.9 and (flat > threshold).mean() > 0.9


def _maps_and_features(n: int, seed: int, classes: list[str], centres: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic maps (32 px) of ``classes``, their class ids and features clustered by class."""
    from waferlab.data.cache import prepare
    from waferlab.data.synth import generate

    p = prepare(generate(n, seed=seed, classes=classes), 32)
    rng = np.random.default_rng(seed)
    y = np.asarray(p.labels) % len(centres)
    return p.maps, y, centres[y] + rng.normal(size=(n, centres.shape[1]))


def test_knn_wafer_flags_a_held_out_line_pattern_the_features_miss_and_strange_features() -> None:
    """knn+wafer: held-out Scratches whose network features look known are flagged by the descriptor part;
    maps whose features are far from the bank by the deep part; both parts z-scored on the validation maps;
    without the maps the score is a one-line error."""
    from waferlab.data.table import WM811K_CLASSES

    known = [c for c in WM811K_CLASSES if c != "Scratch"]
    centres = np.random.default_rng(7).normal(size=(len(WM811K_CLASSES), 16)) * 3
    (tm, ty, tf), (vm, vy, vf), (km, _, kf) = (_maps_and_features(n, s, known, centres)
                                               for n, s in ((500, 1), (200, 2), (200, 3)))
    scratch = _draw_lines(_maps_and_features(150, 4, ["none"], centres)[0])  # clean wafers + a 1-die line
    zeros = np.zeros((500, 3))
    scorer, scores = fit_scorer("knn+wafer", FitData(zeros[:200], vy, vf, vm), 1.0,
                                FitData(zeros, ty, tf, tm))
    parts = scorer.parts(zeros[:200], vf, vm)
    np.testing.assert_allclose(scorer.arrays["fusion"][:, 0], parts.mean(0), rtol=1e-4)
    np.testing.assert_allclose(scores, scorer.fuse(parts), rtol=1e-5)
    threshold = np.quantile(scores, 0.95, method="higher")
    s_known = scorer.score(zeros[:200], kf, km)
    s_scratch = scorer.score(zeros[:150], kf[:150], scratch)  # known-looking features, a new pattern
    s_far = scorer.score(zeros[:150], rng_far(150), km[:150])  # known maps, features from nowhere
    deep = OODScorer("knn", 1.0, {"bank": scorer.arrays["bank"]})  # the features alone do not see them
    assert _auroc(deep.score(zeros[:200], kf), deep.score(zeros[:150], kf[:150])) < 0.65
    assert _auroc(s_known, s_scratch) > 0.85  # measured 0.91
    assert (s_far > threshold).mean() > 0.9 and (s_known <= threshold).mean() > 0.85
    again = OODScorer.from_json(json.loads(json.dumps(scorer.to_json())), "ood.json", scorer.arrays)
    np.testing.assert_allclose(again.score(zeros[:5], kf[:5], km[:5]), s_known[:5], rtol=1e-5)
    with pytest.raises(WaferlabError, match="knn[+]wafer unknown-pattern score needs the 5 maps"):
        scorer.score(zeros[:5], kf[:5])
    ahead = scorer.describe(km)  # what predict's reader thread computes
    np.testing.assert_array_equal(scorer.score(zeros[:200], kf, descriptors=ahead), s_known)
    with pytest.raises(WaferlabError, match="199 maps' descriptors for 200 maps"):
        scorer.score(zeros[:200], kf, descriptors=ahead[1:])
    with pytest.raises(WaferlabError, match="needs the 200 maps"):
        fit_scorer("knn+wafer", FitData(zeros[:200], vy, vf), 1.0)  # waferlab calibrate without maps


def rng_far(n: int) -> np.ndarray:
    return np.random.default_rng(9).normal(size=(n, 16)) * 3 + 10


def _auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    return float((unknown[:, None] > known[None]).mean() + 0.5 * (unknown[:, None] == known[None]).mean())


def _draw_lines(maps: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each map with a straight failed line (1 die wide, 0.6 of the grid long, random angle) on its dies."""
    rng = np.random.default_rng(seed)
    out = maps.copy()
    size = maps.shape[1]
    t = np.linspace(-0.3 * size, 0.3 * size, 4 * size)
    for m in out:
        a, c = rng.uniform(0, np.pi), (size - 1) / 2 + rng.uniform(-size / 8, size / 8, 2)
        y, x = np.round(c[0] + t * np.sin(a)).astype(int), np.round(c[1] + t * np.cos(a)).astype(int)
        ok = (y >= 0) & (y < size) & (x >= 0) & (x < size)
        y, x = y[ok], x[ok]
        on = m[y, x] > 0
        m[y[on], x[on]] = 2
    return out


def test_feature_scores_pool_the_engines_average_and_max_features_and_old_runs_keep_average() -> None:
    """The engine returns (average | max) pooled features; the default pooling uses both halves, each
    L2-normalised; a run fitted before the pooling setting (no 'pool' in ood.json) used the average."""
    from waferlab.deploy.ood import DEFAULT_POOL, pooled

    rng = np.random.default_rng(6)
    avg, top = rng.random((20, 4)) + 0.1, rng.random((20, 4)) * 9 + 0.1
    f = np.concatenate([avg, top], 1)
    assert DEFAULT_POOL == "avg+max"
    np.testing.assert_allclose(pooled(f, "avg"), avg, rtol=1e-6)
    np.testing.assert_allclose(pooled(f, "max"), top, rtol=1e-6)
    np.testing.assert_allclose(pooled(f, "avg+max"), np.concatenate([normalise(avg), normalise(top)], 1),
                               rtol=1e-5)
    scorer = OODScorer("knn").fit(f, np.zeros(20, int))
    assert scorer.arrays["bank"].shape == (20, 8) and scorer.to_json()["pool"] == "avg+max"
    old = {"method": "knn", "temperature": 1.0, "k": 5, "arrays": {"bank": [20, 4]}}
    legacy = OODScorer.from_json(old, "ood.json", {"bank": normalise(avg).astype(np.float32)})
    assert legacy.pool == "avg"
    want = knn_distance(normalise(avg), normalise(avg), 5)
    np.testing.assert_allclose(legacy.score(np.zeros((20, 2)), f), want, atol=1e-5)
    with pytest.raises(WaferlabError, match="ood.json: unknown-pattern pooling 'sum'"):
        OODScorer.from_json({**old, "pool": "sum"}, "ood.json", {"bank": normalise(avg).astype(np.float32)})


def test_knn_distance_is_the_distance_to_the_kth_nearest_bank_row() -> None:
    rng = np.random.default_rng(4)
    bank, f = normalise(rng.normal(size=(50, 8))), normalise(rng.normal(size=(7, 8)))
    dist = np.linalg.norm(f[:, None, :] - bank[None, :, :], axis=2)
    for k in (1, 3, 50, 80):  # k beyond the bank: its farthest row
        want = np.sort(dist, axis=1)[:, min(k, 50) - 1]
        np.testing.assert_allclose(knn_distance(f, bank, k, chunk=3), want, rtol=1e-4, atol=1e-5)


def test_stratified_sample_keeps_every_class_and_the_cap() -> None:
    labels = np.array([0] * 10000 + [1] * 30 + [2] * 2)
    rows = stratified_sample(labels, 1000)
    assert abs(len(rows) - 1000) <= 3 and set(labels[rows]) == {0, 1, 2} and len(set(rows)) == len(rows)
    assert (stratified_sample(labels[:500], 1000) == np.arange(500)).all()


def test_prefetch_keeps_order_and_reraises_the_reader_error_in_the_consumer() -> None:
    def chunks():
        yield from (1, 2)
        raise WaferlabError("src: row 3, field 'waferMap': bad")

    got = []
    with pytest.raises(WaferlabError, match="row 3"):
        for item in prefetch(chunks()):
            got.append(item)
    assert got == [1, 2]
    stream = prefetch(iter(range(1000)), depth=1)
    assert next(stream) == 0
    stream.close()  # the consumer gives up (an inference error): the reader thread must not hang
    assert not [t for t in threading.enumerate() if t.name == "waferlab-prefetch"]


def test_background_writer_writes_in_order_and_reraises_the_first_error() -> None:
    written = []

    def write(item: int) -> None:
        if item == 3:
            raise OSError("disk full")
        written.append(item)

    writer = BackgroundWriter(write, depth=1)
    with pytest.raises(OSError, match="disk full"):
        try:
            for i in range(10):
                writer.submit(i)
        finally:
            writer.close()
    assert written == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("deploy")
    run = calibrated_run(tmp)
    data = synth_file(tmp / "fab.npz", 70, seed=5, unlabel_every=3)
    return {"tmp": tmp, "run": run, "data": data}


def _predict(setup: dict[str, Path], out: Path, *extra: str) -> pd.DataFrame:
    rc = main(["predict", str(setup["run"]), "--data", str(setup["data"]), "--out", str(out), "--no-progress",
               *extra])
    assert rc == 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    if out.suffix == ".csv":
        return pd.read_csv(out, keep_default_na=False, na_values=[""])
    if out.suffix == ".parquet":
        return pd.read_parquet(out)
    return pd.read_json(out, lines=True)


def test_calibrate_writes_the_trust_files_and_report(setup: dict[str, Path]) -> None:
    run = setup["run"]
    cal = json.loads((run / "calibration.json").read_text())
    th = json.loads((run / "thresholds.json").read_text())
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9 and cal["temperature"] > 0
    assert th["defect_recall"] >= 0.99 and 0 < th["none_threshold"] <= 1
    assert th["id_recall"] >= 0.95
    assert json.loads((run / "ood.json").read_text())["method"] == th["ood_method"]
    report = (run / "trust.md").read_text()
    assert "ECE" in report and "calibration.png" in report and (run / "calibration.png").stat().st_size > 1000


def test_predict_rows_in_every_format(setup: dict[str, Path], tmp_path: Path) -> None:
    import importlib.util

    exts = ("csv", "jsonl") + (("parquet",) if importlib.util.find_spec("pyarrow") else ())
    frames = {ext: _predict(setup, tmp_path / ext / f"p.{ext}") for ext in exts}
    th = json.loads((setup["run"] / "thresholds.json").read_text())
    for ext, df in frames.items():
        assert list(df.columns) == list(COLUMNS), ext
        assert len(df) == 70 and df["row"].tolist() == list(range(70))
        assert (df["prob"] >= df["top2_prob"]).all() and (df["top2_prob"] >= df["top3_prob"]).all()
        assert (df["defect"] == (df["p_none"] < th["none_threshold"])).all()
        assert (df["unknown"] == (df["unknown_score"] > th["ood_threshold"])).all()
        truth = df["true_label"].fillna("")
        assert (truth.iloc[::3] == "").all() and (truth.iloc[1::3] != "").all()  # unlabelled rows stay empty
    if "parquet" not in frames:
        print("pyarrow not installed: .parquet output not checked")
    for ext in exts[1:]:
        pd.testing.assert_series_equal(frames["csv"]["pred_class"], frames[ext]["pred_class"])
        np.testing.assert_allclose(frames["csv"]["prob"], frames[ext]["prob"], atol=1e-5)


def test_small_chunks_give_the_same_rows(setup: dict[str, Path], tmp_path: Path) -> None:
    # float32 on any device (on a GPU the default bf16 autocast makes rows move with the batch size)
    whole = _predict(setup, tmp_path / "a.csv", "--autocast", "off")
    chunked = _predict(setup, tmp_path / "b.csv", "--chunk-size", "16", "--batch-size", "7",
                       "--autocast", "off")
    # the score's deep part is z-scored (divided by its std on the validation maps): float32 rounding of
    # other batch sizes grows by that factor
    score = "unknown_score"
    np.testing.assert_allclose(whole.pop(score), chunked.pop(score), rtol=1e-4, atol=1e-4)
    pd.testing.assert_frame_equal(whole, chunked, atol=1e-5)


def test_a_python2_lswmd_pickle_predicts_the_same_rows_as_the_safe_file(setup: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    # the pickle is read lean: its maps stay packed (waferlab.data.lean) until their chunk
    from waferlab.data.lswmd import frame_from_table
    from waferlab.data.py2pickle import write_py2
    from waferlab.data.readers import load_table

    write_py2(frame_from_table(load_table(setup["data"])), tmp_path / "LSWMD.pkl")
    safe = _predict(setup, tmp_path / "safe.csv", "--chunk-size", "16")
    pkl = _predict({**setup, "data": tmp_path / "LSWMD.pkl"}, tmp_path / "pkl.csv", "--chunk-size", "16")
    pd.testing.assert_frame_equal(safe, pkl, atol=1e-6)


def test_onnx_backend_and_the_onnx_file_alone_match_torch(setup: dict[str, Path], tmp_path: Path) -> None:
    torch_rows = _predict(setup, tmp_path / "torch.csv", "--autocast", "off")  # float32, as the export
    assert main(["export", str(setup["run"]), "--format", "onnx"]) == 0
    onnx_rows = _predict(setup, tmp_path / "onnx.csv", "--backend", "onnx")
    alone = tmp_path / "copy" / "model.onnx"
    alone.parent.mkdir()
    alone.write_bytes((setup["run"] / "exports" / "model.onnx").read_bytes())
    rc = main(["predict", str(alone), "--data", str(setup["data"]), "--out", str(tmp_path / "alone.csv"),
               "--no-progress"])
    assert rc == 0
    alone_rows = pd.read_csv(tmp_path / "alone.csv", keep_default_na=False, na_values=[""])
    from waferlab.deploy.export import contract_of_file, open_session  # the OpenVINO backend's reader

    assert contract_of_file(alone) == open_session(alone, optimize=False)[1]
    for rows in (onnx_rows, alone_rows):
        assert np.abs(rows["prob"] - torch_rows["prob"]).max() <= 1e-4
        assert (rows["pred_class"] == torch_rows["pred_class"]).all()
        np.testing.assert_allclose(rows["unknown_score"], torch_rows["unknown_score"], rtol=1e-3, atol=1e-3)


def test_descriptors_computed_ahead_score_as_those_computed_in_the_inference_call(setup: dict[str, Path]
                                                                                  ) -> None:
    """predict computes the wafer descriptors of each chunk in its reader thread (with_descriptors) and
    hands them to the backend: torch and onnx score them as when they compute them from the maps."""
    from waferlab.deploy.predict import BackendSpec, iter_chunks, open_backend, with_descriptors

    if not (setup["run"] / "exports" / "model.onnx").is_file():
        assert main(["export", str(setup["run"]), "--format", "onnx"]) == 0
    for backend in ("torch", "onnx"):
        model = open_backend(BackendSpec(str(setup["run"]), backend, "cpu", 16))
        contract = model.contract
        assert contract.wafer_part is not None  # the default score, knn+wafer
        _, chunks = iter_chunks(setup["data"], contract.image_size, 32, False, contract.resize)
        for c in with_descriptors(chunks, contract):
            assert c.descriptors is not None and len(c.descriptors) == len(c.maps)
            ahead, inline = model.infer(c.maps, c.descriptors), model.infer(c.maps)
            np.testing.assert_allclose(ahead[0], inline[0], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(ahead[1], inline[1], rtol=1e-6, atol=1e-6)


def test_the_reader_thread_computes_descriptors_only_beside_a_gpu(setup: dict[str, Path]) -> None:
    """On the CPU the inference's threads hold every core: the backend computes the descriptors between its
    forwards instead of a busy reader thread beside them (which slowed a chunk several-fold)."""
    from waferlab.deploy.export import open_session
    from waferlab.deploy.predict import PredictJob, descriptors_ahead

    job = PredictJob(str(setup["run"]), str(setup["data"]), "out.csv", device="cpu")
    assert not descriptors_ahead(job, "torch") and not descriptors_ahead(job, "openvino")
    if not (setup["run"] / "exports" / "model.onnx").is_file():
        assert main(["export", str(setup["run"]), "--format", "onnx"]) == 0
    session, _ = open_session(setup["run"] / "exports" / "model.onnx", optimize=False)
    if session.get_providers()[0] == "CPUExecutionProvider":
        assert not descriptors_ahead(job, "onnx", session)


def test_a_run_calibrated_with_knn_keeps_knn_and_an_old_export_still_predicts(setup: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    """Runs and ONNX files from before knn+wafer (method knn, contract version 2 without wafer_part) keep
    working: predict scores them with knn on both backends, the same numbers."""
    import shutil

    import onnx

    run = Path(shutil.copytree(setup["run"], tmp_path / "run"))
    assert main(["calibrate", str(run), "--data", str(setup["tmp"] / "cal.npz"), "--ood-method", "knn",
                 "--no-progress"]) == 0
    assert json.loads((run / "ood.json").read_text())["method"] == "knn"
    knn = {**setup, "run": run}
    torch_rows = _predict(knn, tmp_path / "torch.csv", "--autocast", "off")
    assert main(["export", str(run), "--format", "onnx"]) == 0
    proto = onnx.load(str(run / "exports" / "model.onnx"))
    meta = next(p for p in proto.metadata_props if p.key == "waferlab")
    contract = json.loads(meta.value)
    assert contract["ood_method"] == "knn" and contract["wafer_part"] is None
    del contract["wafer_part"]
    meta.value = json.dumps({**contract, "version": 2})  # as a file exported before knn+wafer
    onnx.save(proto, str(tmp_path / "old.onnx"))
    old = _predict({**setup, "run": tmp_path / "old.onnx"}, tmp_path / "old.csv")
    np.testing.assert_allclose(old["unknown_score"], torch_rows["unknown_score"], rtol=1e-3, atol=1e-3)
    default = _predict(setup, tmp_path / "default.csv")  # the same network with knn+wafer scores otherwise
    assert np.abs(default["unknown_score"] - torch_rows["unknown_score"]).max() > 0.1


def test_openvino_backend_matches_torch(setup: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    torch_rows = _predict(setup, tmp_path / "torch.csv")
    assert main(["export", str(setup["run"]), "--format", "onnx"]) == 0
    ov_rows = _predict(setup, tmp_path / "ov.csv", "--backend", "openvino")
    assert np.abs(ov_rows["prob"] - torch_rows["prob"]).max() <= 1e-4
    assert (ov_rows["pred_class"] == torch_rows["pred_class"]).all()
    np.testing.assert_allclose(ov_rows["unknown_score"], torch_rows["unknown_score"], rtol=1e-3, atol=1e-3)


def test_two_worker_processes_match_one_process(setup: dict[str, Path], tmp_path: Path) -> None:
    one = _predict(setup, tmp_path / "one.csv", "--chunk-size", "20", "--device", "cpu")
    cmd = [sys.executable, "-m", "waferlab.cli", "predict", str(setup["run"]), "--data", str(setup["data"]),
           "--out", str(tmp_path / "two.csv"), "--chunk-size", "20", "--devices", "2", "--device", "cpu",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = pd.read_csv(tmp_path / "two.csv", keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(one, two, atol=1e-5)


def test_sigterm_mid_predict_leaves_no_temporary_file(setup: dict[str, Path], tmp_path: Path) -> None:
    import signal
    import time

    data = synth_file(tmp_path / "many.npz", 3000, seed=7)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "waferlab.cli", "predict", str(setup["run"]), "--data", str(data), "--out",
           str(out_dir / "pred.csv"), "--chunk-size", "16", "--batch-size", "16", "--device", "cpu",
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not list(out_dir.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until the atomic temporary file exists: predict is writing
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated" in err and not list(out_dir.iterdir())
