"""Multi-label (MixedWM38-style) metrics against hand-computed values, the report, the task config key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from waferlab.engine.config import build_config
from waferlab.engine.metrics import compute_multilabel_metrics, fit_label_thresholds
from waferlab.engine.report import compare_runs, render_multilabel_report, write_evaluation
from waferlab.errors import WaferlabError

# 4 maps x 3 labels. At threshold 0.5 the predictions are A / B+C / A / B.
LABELS = ("A", "B", "C")
Y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
P = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.6], [0.6, 0.4, 0.2], [0.1, 0.7, 0.3]])


def test_multilabel_metrics_by_hand() -> None:
    m = compute_multilabel_metrics(Y, P, LABELS)
    # exact: map 0 right; map 1 has a false C, map 2 misses B, map 3 (no defect) has a false B
    assert m["exact_match"] == pytest.approx(1 / 4)
    assert m["hamming_loss"] == pytest.approx(3 / 12)
    a, b, c = (m["per_label"][k] for k in LABELS)
    # A: tp 2, no errors; its scores rank both positives (0.9, 0.6) first -> AP 1
    assert (a["precision"], a["recall"], a["f1"], a["ap"]) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    # B: tp 1 (map 1), fp 1 (map 3), fn 1 (map 2); ranking 0.8+ 0.7- 0.4+ 0.2- -> AP = (1/1 + 2/3) / 2
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert b["ap"] == pytest.approx(5 / 6)
    assert (b["support"], b["predicted"]) == (2, 2)
    # C: never true, predicted once -> precision 0, the rest undefined, and left out of the macro averages
    assert c == {"precision": 0.0, "recall": None, "f1": None, "ap": None, "support": 0, "predicted": 1,
                 "threshold": 0.5}
    assert m["labels_absent"] == ["C"]
    assert m["mAP"] == pytest.approx((1 + 5 / 6) / 2)
    assert m["macro_f1"] == pytest.approx(0.75) and m["macro_precision"] == pytest.approx(0.75)
    # micro: tp 3, fp 2 (B on map 3, C on map 1), fn 1
    assert m["micro_precision"] == pytest.approx(3 / 5) and m["micro_recall"] == pytest.approx(3 / 4)
    assert m["micro_f1"] == pytest.approx(2 / 3)
    assert m["exact_match_by_cardinality"] == {"0": {"n": 1, "exact_match": 0.0},
                                               "1": {"n": 2, "exact_match": 0.5},
                                               "2": {"n": 1, "exact_match": 0.0}}
    assert m["label_cardinality"] == pytest.approx(1.0) and m["predicted_cardinality"] == pytest.approx(1.25)
    json.dumps(m)  # JSON-ready: no NaN, no numpy scalars


def test_multilabel_threshold_and_perfect() -> None:
    m = compute_multilabel_metrics(Y, P, LABELS, threshold=0.65)  # A now only on map 0: recall 1/2
    assert m["per_label"]["A"]["recall"] == pytest.approx(0.5) and m["per_label"]["A"]["ap"] == 1.0
    assert m["per_label"]["C"]["precision"] is None  # absent and never predicted
    perfect = compute_multilabel_metrics(Y, Y * 0.9 + 0.05, LABELS)
    assert perfect["exact_match"] == 1.0 and perfect["mAP"] == 1.0 and perfect["hamming_loss"] == 0.0


def test_label_thresholds_fitted_by_hand() -> None:
    # A: positives 0.9, 0.6, negatives 0.3, 0.1 -> every cut in (0.3, 0.6] is perfect: midpoint 0.45.
    # B (+ at 0.8, 0.4; - at 0.7, 0.2): F1 at >= 0.8 / 0.7 / 0.4 / 0.2 is 2/3, 1/2, 4/5, 2/3 -> cut at 0.3.
    # C has no positive: it keeps 0.5.
    t = fit_label_thresholds(Y, P, LABELS)
    assert t == pytest.approx({"A": 0.45, "B": 0.3, "C": 0.5})
    m = compute_multilabel_metrics(Y, P, LABELS, threshold=t)
    # maps 0 and 2 now exactly right (2 had B at 0.4 < 0.5 before); 1 keeps its false C, 3 its false B
    assert m["exact_match"] == pytest.approx(2 / 4) and m["threshold"] == "per-label"
    assert m["per_label"]["B"]["threshold"] == pytest.approx(0.3) and m["per_label"]["B"]["recall"] == 1.0
    assert compute_multilabel_metrics(Y, P, LABELS, threshold=[0.45, 0.3, 0.5])["exact_match"] == 0.5
    with pytest.raises(WaferlabError, match="no threshold for label"):
        compute_multilabel_metrics(Y, P, LABELS, threshold={"A": 0.5})
    with pytest.raises(WaferlabError, match="one per label"):
        compute_multilabel_metrics(Y, P, LABELS, threshold=[0.5, 0.5])


@pytest.mark.parametrize("y, p, message", [
    (Y[:, :2], P, "multi-hot rows"),
    (Y * 2, P, "0 and 1"),
    (Y, P[:3], "shape"),
    (Y, P * 4 - 2, "not logits"),
    (Y, np.where(P > 0.85, np.nan, P), "non-finite"),
    (Y[:0], P[:0], "N = 0"),
])
def test_multilabel_bad_input(y, p, message) -> None:
    with pytest.raises(WaferlabError, match=message):
        compute_multilabel_metrics(y, p, LABELS)


def test_multilabel_report_and_metrics_json(tmp_path: Path) -> None:
    m = compute_multilabel_metrics(Y, P, LABELS)
    write_evaluation(m, tmp_path, "toy multi-label", {"model": "toy", "task": "multilabel"})
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["task"] == "multilabel" and record["protocol"]["model"] == "toy"
    assert record["mAP"] == pytest.approx(m["mAP"])
    text = (tmp_path / "report.md").read_text()
    assert text == render_multilabel_report(m, "toy multi-label", {"model": "toy", "task": "multilabel"})
    assert "| Exact-match ratio (whole label set right) | 0.2500 |" in text
    assert "| B | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.8333 | 2 | 2 |" in text
    assert "| C | 0.5000 | 0.0000 | — | — | — | 0 | 1 |" in text
    assert "excluded from mAP and macro averages): C." in text


def test_task_config_key() -> None:
    assert build_config(overrides={"task": "multilabel", "loss": "asl"}).task == "multilabel"
    assert build_config().task == "multiclass"
    with pytest.raises(WaferlabError, match="config task: unknown value 'multi'"):
        build_config(sets=["task=multi"])
    with pytest.raises(WaferlabError, match="linear or failpool"):
        build_config(sets=["task=multilabel", "head=cosine"])
    # the default preset's failpool head is the model's own classifier after a weighted pooling: allowed
    assert build_config(sets=["task=multilabel", "loss=bce"]).head == "failpool"


def test_prepared_data_keeps_and_requires_multi_hot(tmp_path: Path) -> None:
    from waferlab.data.cache import load_cache, prepare, save_cache
    from waferlab.data.synth import generate
    from waferlab.data.table import MIXED38_TYPES

    table = generate(12, seed=3, mixed=True)
    p = prepare(table, 32)
    save_cache(p, tmp_path / "c.npz")
    back = load_cache(tmp_path / "c.npz").subset(np.arange(5, 12))
    assert back.multi_label_names == MIXED38_TYPES
    np.testing.assert_array_equal(back.require_multi_hot(), table.multi_hot[5:])
    plain = prepare(generate(4, seed=3), 32)
    with pytest.raises(WaferlabError, match="needs multi-hot labels"):
        plain.require_multi_hot()


# ------------------------------------------------------------------------------------ training end to end
ML_SIZE = 32


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~200 synthetic MixedWM38-style maps (multi-hot labels) prepared at 32 px."""
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.synth import generate

    path = tmp_path_factory.mktemp("mixed") / "mixed32.npz"
    save_cache(prepare(generate(200, seed=5, mixed=True), ML_SIZE), path)
    return path


@pytest.fixture(scope="module")
def mixed_run(mixed_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CI-sized multilabel run (32 px, 200 maps, 1 epoch) through the CLI and the multilabel preset."""
    import hashlib

    import waferlab.engine.predict as predict_module
    from waferlab.cli import main

    run = tmp_path_factory.mktemp("runs") / "mixed"
    real_predict, parts = predict_module.predict, []

    def counting_predict(model, maps, *args, **kwargs):  # which maps training's own predictions cover
        parts.append(hashlib.sha1(np.ascontiguousarray(maps).tobytes()).hexdigest())
        return real_predict(model, maps, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(predict_module, "predict", counting_predict)
        code = main(["train", "--model", "mobilenetv2_100", "--data", str(mixed_cache), "--out", str(run),
                     "--config", "multilabel", "--epochs", "1", "--image-size", str(ML_SIZE),
                     "--batch-size", "32", "--no-progress", "--set", "precise_bn_batches=2"])
    assert code == 0
    assert len(parts) == len(set(parts)) == 2, parts  # validation part (thresholds), test part: once each
    return run


def test_multilabel_training_end_to_end(mixed_run: Path) -> None:
    import yaml

    from waferlab.data.cache import load_cache
    from waferlab.data.splits import assign_splits
    from waferlab.data.table import MIXED38_TYPES
    from waferlab.engine.predict import PredictOptions, predict
    from waferlab.engine.run import Run

    for name in ("model.safetensors", "config.yaml", "classes.json", "curves.csv", "metrics.json",
                 "report.md"):
        assert (mixed_run / name).is_file(), name
    cfg = yaml.safe_load((mixed_run / "config.yaml").read_text())
    assert cfg["task"] == "multilabel" and cfg["loss"] == "asl"
    assert tuple(json.loads((mixed_run / "classes.json").read_text())) == MIXED38_TYPES
    metrics = json.loads((mixed_run / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["protocol"]["task"] == "multilabel"
    assert "class_set" not in metrics["protocol"]  # it does not apply to multi-hot labels
    assert "| multilabel (8 labels) |" in compare_runs([mixed_run])
    assert set(metrics["per_label"]) == set(MIXED38_TYPES)
    assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["mAP"] <= 1.0
    assert "## Multi-label metrics" in (mixed_run / "report.md").read_text()
    # the kept weights, through the one prediction function, reproduce metrics.json: sigmoid per label
    run = Run.open(mixed_run)
    assert run.spec().task == "multilabel"
    p = load_cache(cfg["data"])
    test = np.flatnonzero(assign_splits(p, cfg["split"], cfg["fractions"], seed=cfg["seed"]) == "test")
    pred = predict(run.load_model(), p.maps[test], run.spec(), PredictOptions(batch_size=64))
    np.testing.assert_allclose(pred.probs, 1 / (1 + np.exp(-pred.logits)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(pred.probs.sum(1), 1.0)  # independent sigmoids, not a softmax
    # per-label thresholds fitted on the validation part, stored in the run and applied to metrics.json
    fitted = json.loads((mixed_run / "label_thresholds.json").read_text())["thresholds"]
    assert set(fitted) == set(MIXED38_TYPES) and run.label_thresholds() == fitted
    assert {k: v["threshold"] for k, v in metrics["per_label"].items()} == pytest.approx(fitted)
    again = compute_multilabel_metrics(p.multi_hot[test], pred.probs, MIXED38_TYPES, threshold=fitted)
    assert metrics["n"] == len(test)
    assert again["exact_match"] == pytest.approx(metrics["exact_match"])
    assert again["mAP"] == pytest.approx(metrics["mAP"], abs=1e-6)


def test_evaluate_multilabel_run_on_real_mixedwm38(mixed_run: Path, shared_data: Path,
                                                   tmp_path: Path) -> None:
    from waferlab.cli import main

    real = shared_data / "gowwi07_wafermap_ai_png224_e3cf70a" / "samples_mixed38"
    assert main(["evaluate", str(mixed_run), "--data", str(real), "--out", str(tmp_path),
                 "--no-progress"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n"] == 30 and m["task"] == "multilabel"
    # no real sample has them (a file name's "Random" means Scratch, data.md S.2)
    assert m["labels_absent"] == ["Near-full", "Random"]
    assert m["per_label"]["Scratch"]["support"] == 21 and m["per_label"]["Loc"]["support"] == 15
    fitted = json.loads((mixed_run / "label_thresholds.json").read_text())["thresholds"]
    assert {k: v["threshold"] for k, v in m["per_label"].items()} == pytest.approx(fitted)  # the run's own


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from waferlab.cli import main

    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_multilabel_user_errors_are_one_line(mixed_run: Path, mixed_cache: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.synth import generate

    single = tmp_path / "single.npz"
    save_cache(prepare(generate(20, seed=1), ML_SIZE), single)
    train = ["train", "--model", "mobilenetv2_100", "--epochs", "1", "--no-progress"]
    line = _cli_error([*train, "--data", str(mixed_cache), "--out", str(tmp_path / "a"), "--config",
                       "multilabel", "--loss", "weighted_ce"], capsys)
    assert "multiclass loss but the task is multilabel" in line and not (tmp_path / "a").exists()
    line = _cli_error([*train, "--data", str(single), "--out", str(tmp_path / "b"), "--config", "multilabel"],
                      capsys)
    assert str(single) in line and "needs multi-hot labels" in line
    line = _cli_error(["evaluate", str(mixed_run), "--data", str(single), "--out",
                       str(tmp_path / "c"), "--no-progress"], capsys)
    assert "needs multi-hot labels" in line and not (tmp_path / "c").exists()
    out = tmp_path / "p.csv"
    line = _cli_error(["predict", str(mixed_run), "--data", str(mixed_cache), "--out", str(out)], capsys)
    assert "a multilabel run" in line and "label_thresholds.json" in line and not out.exists()
    before = {f.name: f.read_bytes() for f in mixed_run.iterdir() if f.is_file()}
    line = _cli_error(["calibrate", str(mixed_run), "--data", str(mixed_cache), "--no-progress"], capsys)
    assert str(mixed_run) in line and "a multilabel run has no trust files" in line
    assert before == {f.name: f.read_bytes() for f in mixed_run.iterdir() if f.is_file()}


def test_two_multilabel_sources_join_by_class_name(tmp_path: Path) -> None:
    """Each source's mixture vocabulary differs; joined labels must still name each row's own mixture."""
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.synth import generate
    from waferlab.engine.datamodule import load_split_data

    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for path, seed, classes in ((a, 1, ["Center", "Loc+Scratch"]), (b, 2, ["Loc+Scratch", "Donut", "none"])):
        save_cache(prepare(generate(40, seed=seed, mixed=True, classes=classes), ML_SIZE), path)
    cfg = build_config("multilabel", {"model": "mobilenetv2_100", "data": [str(a), f"{b}:2"],
                                      "image_size": ML_SIZE})
    split = load_split_data(cfg)
    p = split.data
    assert split.class_names == p.multi_label_names and split.targets().shape == (80, 8)
    names = np.array(p.class_names, dtype=object)[p.labels]
    combos = ["+".join(t for t, on in zip(p.multi_label_names, row) if on) or "none" for row in p.multi_hot]
    assert names.tolist() == combos
    assert set(names) == {"Center", "Loc+Scratch", "Donut", "none"}


def test_multilabel_val_data_is_the_validation_part(mixed_cache: Path, tmp_path: Path) -> None:
    """train --val-data on a multi-label run: the other source's multi-hot maps (only they) validate, the
    per-label thresholds are fitted on them and label_thresholds.json names that file."""
    from waferlab.cli import main
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.synth import generate
    from waferlab.engine.datamodule import load_split_data

    fab = tmp_path / "fab.npz"
    save_cache(prepare(generate(48, seed=11, mixed=True), ML_SIZE), fab)
    split = load_split_data(build_config("multilabel", {"model": "mobilenetv2_100", "data": str(mixed_cache),
                                                        "val_data": str(fab), "image_size": ML_SIZE}))
    assert len(split.val) == 48 and set(split.source[split.val]) == {1}
    assert set(split.source[split.epoch_rows(0)]) == {0}  # never trained on
    assert split.targets(split.val).shape == (48, 8)

    run = tmp_path / "run"
    assert main(["train", "--model", "mobilenetv2_100", "--data", str(mixed_cache), "--val-data", str(fab),
                 "--out", str(run), "--config", "multilabel", "--epochs", "1", "--image-size", str(ML_SIZE),
                 "--batch-size", "32", "--no-progress", "--set", "precise_bn_batches=0"]) == 0
    fitted = json.loads((run / "label_thresholds.json").read_text())
    assert fitted["n"] == 48 and "fab.npz (--val-data)" in fitted["fitted_on"]
