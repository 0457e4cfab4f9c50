"""Metrics against numbers computed by hand, and the evaluation report / curve / comparison outputs."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from waferlab.data.table import WM811K_CLASSES
from waferlab.engine.metrics import compute_metrics, top_confusions
from waferlab.engine.report import compare_runs, markdown_table, plot_curves, write_evaluation
from waferlab.errors import WaferlabError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def probs_for(preds: list[int], num_classes: int, conf: float = 0.7) -> np.ndarray:
    """Probabilities that put ``conf`` on the predicted class and spread the rest evenly."""
    p = np.full((len(preds), num_classes), (1.0 - conf) / (num_classes - 1))
    p[np.arange(len(preds)), preds] = conf
    return p


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


# ---------------------------------------------------------------------------------------- metrics


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 2, 0, 1, 2, 2])
    m = compute_metrics(y, probs_for(list(y), 3, conf=1.0), ["a", "b", "c"])
    for key in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1",
                "weighted_f1"):
        assert m[key] == pytest.approx(1.0), key
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]
    assert m["confusion_matrix_normalized"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)
    assert m["nll"] == pytest.approx(0.0, abs=1e-9)
    assert m["n"] == 7 and m["per_class"]["c"]["support"] == 3
    assert "defect_vs_none_recall" not in m and "none_precision" not in m and "false_alarm_rate" not in m


def test_all_wrong() -> None:
    y = np.array([0, 1, 2, 0])
    m = compute_metrics(y, probs_for([1, 2, 0, 2], 3), ["a", "b", "c"])
    assert m["accuracy"] == 0.0 and m["macro_f1"] == 0.0 and m["balanced_accuracy"] == 0.0
    assert all(m["per_class"][c]["precision"] == 0.0 for c in "abc")
    assert m["confusion_matrix"] == [[0, 1, 1], [0, 0, 1], [1, 0, 0]]
    assert m["ece"] == pytest.approx(0.7, abs=1e-6)  # confidence 0.7, accuracy 0
    # All cells hold 1 map; ties go to the larger share of the true class (b->c: 1/1 beats a->b: 1/2).
    assert top_confusions(m, k=2) == [("b", "c", 1, 1.0), ("c", "a", 1, 1.0)]


def test_three_class_by_hand() -> None:
    y = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    preds = [0, 0, 1, 1, 2, 2, 2, 2, 0, 1]
    m = compute_metrics(np.array(y), probs_for(preds, 3, conf=0.7), ["a", "b", "c"])
    # Confusion rows (true): a -> [2,1,0], b -> [0,1,1], c -> [1,1,3].
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 1, 3]]
    precision = [Fraction(2, 3), Fraction(1, 3), Fraction(3, 4)]
    recall = [Fraction(2, 3), Fraction(1, 2), Fraction(3, 5)]
    f1 = [Fraction(2, 3), Fraction(2, 5), Fraction(2, 3)]  # 2tp / (2tp + fp + fn)
    for i, c in enumerate("abc"):
        assert m["per_class"][c]["precision"] == pytest.approx(float(precision[i]))
        assert m["per_class"][c]["recall"] == pytest.approx(float(recall[i]))
        assert m["per_class"][c]["f1"] == pytest.approx(float(f1[i]))
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["balanced_accuracy"] == pytest.approx(53 / 90)
    assert m["macro_recall"] == pytest.approx(53 / 90)
    assert m["macro_precision"] == pytest.approx(7 / 12)
    assert m["macro_f1"] == pytest.approx(26 / 45)
    assert m["weighted_f1"] == pytest.approx(46 / 75)  # (3*2/3 + 2*2/5 + 5*2/3) / 10
    assert m["confusion_matrix_normalized"][2] == pytest.approx([0.2, 0.2, 0.6])
    assert m["nll"] == pytest.approx(-(6 * math.log(0.7) + 4 * math.log(0.15)) / 10)
    assert m["ece"] == pytest.approx(0.1, abs=1e-6)  # every confidence 0.7, accuracy 0.6
    assert m["mean_confidence"] == pytest.approx(0.7)
    # The same labels given as names give the same numbers.
    as_names = np.array(["abc"[i] for i in y], dtype=object)
    m_names = compute_metrics(as_names, probs_for(preds, 3), ["a", "b", "c"])
    assert m_names["macro_f1"] == pytest.approx(m["macro_f1"])
    # Torch tensors (as a model returns them) are accepted as well.
    import torch

    m_torch = compute_metrics(torch.tensor(y), torch.from_numpy(probs_for(preds, 3)).float(), ["a", "b", "c"])
    assert m_torch["macro_f1"] == pytest.approx(m["macro_f1"])
    assert m_torch["nll"] == pytest.approx(m["nll"], rel=1e-6)


def test_absent_class_is_null_and_out_of_macro() -> None:
    names = ["a", "b", "c", "d"]
    y = [0, 0, 1, 1]
    preds = [0, 2, 1, 1]  # c never true but predicted once, d neither true nor predicted
    m = compute_metrics(np.array(y), probs_for(preds, 4), names)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0}
    assert m["per_class"]["d"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["classes_absent"] == ["c", "d"]
    # Macro over present classes only: a (P 1, R 1/2, F1 2/3) and b (P 1, R 1, F1 1).
    assert m["macro_recall"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["macro_precision"] == pytest.approx(1.0)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["weighted_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["confusion_matrix_normalized"][2] == [None, None, None, None]
    json.dumps(m, allow_nan=False)  # strict JSON: undefined values are null, never NaN


def test_defect_vs_none_on_nine_classes() -> None:
    names = list(WM811K_CLASSES)
    k = names.index("none")
    scratch, loc = names.index("Scratch"), names.index("Loc")
    # 10 true Scratch maps: 7 right, 2 called none (missed), 1 called Loc (still caught as a defect).
    # 5 true none maps: 4 right, 1 called Loc (a false alarm).
    y = [scratch] * 10 + [k] * 5
    preds = [scratch] * 7 + [k] * 2 + [loc] + [k] * 4 + [loc]
    m = compute_metrics(np.array(y), probs_for(preds, 9), names)
    assert m["defect_vs_none_recall"] == pytest.approx(8 / 10)
    assert m["none_precision"] == pytest.approx(4 / 6)
    assert m["false_alarm_rate"] == pytest.approx(1 / 5)
    assert m["per_class"]["Scratch"]["recall"] == pytest.approx(0.7)
    assert set(m["classes_absent"]) == set(names) - {"Scratch", "none"}
    assert ("Scratch", "none", 2, 0.2) in top_confusions(m)
    # Only none maps: no defect to recall, the value is undefined rather than 0 or 1.
    only_none = compute_metrics(np.array([k, k]), probs_for([k, loc], 9), names)
    assert only_none["defect_vs_none_recall"] is None
    assert only_none["false_alarm_rate"] == pytest.approx(0.5)
    # Without a none class the three keys are absent; a custom none class name is honoured.
    assert "defect_vs_none_recall" not in compute_metrics(np.array([0, 1]), probs_for([0, 1], 2), ["x", "y"])
    custom = compute_metrics(np.array([0, 1]), probs_for([1, 1], 2), ["x", "Normal"], none_class="Normal")
    assert custom["defect_vs_none_recall"] == 0.0


def test_ece_calibrated_vs_overconfident() -> None:
    # Calibrated: confidence 0.75 on every map and exactly 3 of 4 right.
    y = np.array([0, 1, 2, 0] * 25)
    preds = np.array([0, 1, 2, 1] * 25)
    calibrated = compute_metrics(y, probs_for(list(preds), 3, conf=0.75), ["a", "b", "c"])
    assert calibrated["accuracy"] == pytest.approx(0.75)
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-6)
    # Over-confident: 0.99 confidence but only half right -> ECE = 0.49.
    y2 = np.array([0, 1] * 50)
    over = compute_metrics(y2, probs_for([0] * 100, 2, conf=0.99), ["a", "b"])
    assert over["ece"] == pytest.approx(0.49, abs=1e-5)
    assert over["ece"] > calibrated["ece"] + 0.4


def test_ece_matches_bins_on_random_data() -> None:
    """torchmetrics' ECE equals the ECE recomputed from our own reliability bins (no confidence hits 1.0)."""
    rng = np.random.default_rng(0)
    n, c = 400, 9
    y = rng.integers(0, c, n)
    p = rng.dirichlet(np.full(c, 0.4), size=n)
    p[np.arange(n), y] += rng.uniform(0, 1.5, n)
    p /= p.sum(axis=1, keepdims=True)
    m = compute_metrics(y, p, list(WM811K_CLASSES), n_bins=10)
    bins = m["calibration_bins"]
    assert len(bins) == 10 and sum(b["count"] for b in bins) == n
    by_hand = sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert m["ece"] == pytest.approx(by_hand, abs=1e-5)
    # Per-class numbers against a plain numpy confusion matrix.
    pred = p.argmax(axis=1)
    cm = np.zeros((c, c), dtype=int)
    np.add.at(cm, (y, pred), 1)
    assert m["confusion_matrix"] == cm.tolist()
    for i, name in enumerate(WM811K_CLASSES):
        tp, fp, fn = cm[i, i], cm[:, i].sum() - cm[i, i], cm[i].sum() - cm[i, i]
        assert m["per_class"][name]["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["nll"] == pytest.approx(-np.mean(np.log(p[np.arange(n), y])))


def test_single_class() -> None:
    m = compute_metrics(np.array([0, 0, 0]), np.ones((3, 1)), ["Center"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["balanced_accuracy"] == 1.0
    assert m["confusion_matrix"] == [[3]]
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)


def test_probabilities_not_summing_to_one_are_renormalised() -> None:
    y = np.array([0, 1, 2, 2])
    p = probs_for([0, 1, 2, 0], 3, conf=0.6)
    scaled = p * np.array([[2.0], [1.0], [0.5], [3.0]])  # three rows off, one row still sums to 1
    m_ref = compute_metrics(y, p, ["a", "b", "c"])
    m = compute_metrics(y, scaled, ["a", "b", "c"])
    assert m["renormalized_rows"] == 3 and m_ref["renormalized_rows"] == 0
    for key in ("accuracy", "macro_f1", "ece", "nll"):
        assert m[key] == pytest.approx(m_ref[key])


@pytest.mark.parametrize(
    ("y", "probs", "names", "message"),
    [
        ([], np.zeros((0, 3)), ["a", "b", "c"], "N = 0"),
        ([0, -1], np.full((2, 2), 0.5), ["a", "b"], "unlabeled"),
        ([0, 5], np.full((2, 2), 0.5), ["a", "b"], "outside"),
        ([0, 1], [[2.0, -1.0], [0.5, 0.5]], ["a", "b"], "logits"),
        ([0, 1], [[np.nan, 1.0], [0.5, 0.5]], ["a", "b"], "non-finite"),
        ([0, 1], [[0.0, 0.0], [0.5, 0.5]], ["a", "b"], "all zeros"),
        ([0, 1], np.full((3, 2), 0.5), ["a", "b"], "3 rows"),
        ([0, 1], np.full((2, 3), 1 / 3), ["a", "b"], "3 columns"),
        (["a", "zz"], np.full((2, 2), 0.5), ["a", "b"], "zz"),
        ([0, 1], np.full((2, 2), 0.5), ["a", "a"], "duplicates"),
        ([0.5, 1], np.full((2, 2), 0.5), ["a", "b"], "integer"),
    ],
)
def test_bad_input_is_a_waferlab_error(y, probs, names, message) -> None:
    with pytest.raises(WaferlabError, match=message):
        compute_metrics(np.asarray(y), probs, names)


# ----------------------------------------------------------------------------------------- report


def test_markdown_table() -> None:
    text = markdown_table([["a|b", 0.5, None, 3], ["c", float("nan"), 1.25, 4]], ["name", "x", "y", "n"])
    lines = text.strip().splitlines()
    assert lines[0] == "| name | x | y | n |"
    assert lines[1] == "| :--- | ---: | ---: | ---: |"
    assert lines[2] == "| a\\|b | 0.5000 | — | 3 |"
    assert lines[3] == "| c | — | 1.2500 | 4 |"
    with pytest.raises(ValueError):
        markdown_table([[1, 2]], ["only"])


def test_write_evaluation_files(tmp_path: Path) -> None:
    names = list(WM811K_CLASSES)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 9, 300)
    y[y == names.index("Donut")] = names.index("Center")  # Donut absent
    preds = np.where(rng.random(300) < 0.8, y, rng.integers(0, 9, 300))
    m = compute_metrics(y, probs_for(list(preds), 9, conf=0.8), names)
    protocol = {"model": "resnet34", "split": "stratified", "class_set": "all9", "image_size": 64,
                "encoding": "onehot", "seed": 7, "data": "synthetic.npz", "lr": 1e-5}
    out = tmp_path / "eval"
    write_evaluation(m, out, "ResNet-34 test", protocol)
    for png in ("confusion_matrix.png", "confusion_matrix_normalized.png", "reliability.png"):
        assert_png(out / png)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
    record = json.loads((out / "metrics.json").read_text())
    assert record["title"] == "ResNet-34 test" and record["protocol"]["seed"] == 7
    assert record["macro_f1"] == pytest.approx(m["macro_f1"])
    assert record["per_class"]["Donut"]["recall"] is None
    report = (out / "report.md").read_text()
    assert report.startswith("# ResNet-34 test")
    assert "| class | precision | recall | F1 | support |" in report
    for name in names:
        support = m["per_class"][name]["support"]
        assert f"| {name} |" in report and f" {support} |" in report
    assert "| encoding | onehot |" in report and "| seed | 7 |" in report
    assert "| lr | 1e-05 |" in report  # protocol floats keep their significant digits
    assert f"| Macro F1 | {m['macro_f1']:.4f} |" in report
    assert f"| Defect-vs-none recall | {m['defect_vs_none_recall']:.4f} |" in report
    assert "Donut." in report  # listed as absent
    assert "![Confusion matrix (counts)](confusion_matrix.png)" in report
    assert "(confusion_matrix_normalized.png)" in report
    with pytest.raises(WaferlabError, match="compute_metrics"):
        write_evaluation({"accuracy": 1.0}, tmp_path / "bad", "x")


def test_write_evaluation_refuses_incomplete_metrics_and_a_file_as_folder(tmp_path: Path) -> None:
    """Both tasks: a metrics dict lacking a key names the key and its producer; an output path that is a
    file is refused; nothing is written either way."""
    from waferlab.engine.metrics import compute_multilabel_metrics

    y = np.array([0, 1, 2, 1])
    multi = compute_metrics(y, probs_for([0, 1, 1, 1], 3), ["A", "B", "C"])
    hot = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    multilabel = compute_multilabel_metrics(hot, np.array([[0.9, 0.2], [0.3, 0.8], [0.7, 0.6], [0.1, 0.2]]),
                                            ["A", "B"])
    for metrics, key, producer in ((multi, "per_class", "compute_metrics"),
                                   (multilabel, "per_label", "compute_multilabel_metrics")):
        partial = {k: v for k, v in metrics.items() if k != key}
        with pytest.raises(WaferlabError, match=f"metrics lack '{key}': pass the output of {producer}$"):
            write_evaluation(partial, tmp_path / key, "x")
        assert not (tmp_path / key).exists()
        blocker = tmp_path / f"{key}.txt"
        blocker.write_text("a file")
        with pytest.raises(WaferlabError, match="exists and is not a folder"):
            write_evaluation(metrics, blocker, "x")
        assert blocker.read_text() == "a file"


def test_write_evaluation_many_classes(tmp_path: Path) -> None:
    names = [f"type-{i:02d}" for i in range(38)]
    y = np.arange(38 * 3) % 38
    m = compute_metrics(y, probs_for(list((y + (y % 3 == 0)) % 38), 38, conf=0.5), names)
    write_evaluation(m, tmp_path, "38 classes")
    assert_png(tmp_path / "confusion_matrix.png")
    assert_png(tmp_path / "confusion_matrix_normalized.png")
    assert "| type-37 |" in (tmp_path / "report.md").read_text()


def test_plot_curves_with_missing_columns(tmp_path: Path) -> None:
    full = tmp_path / "full.csv"
    # Lightning-style: train and val values of one epoch on separate rows, with gaps.
    full.write_text("epoch,train_loss,val_loss,val_macro_f1,val_accuracy,lr\n"
                    "0,2.0,,,,0.001\n0,,1.8,0.3,0.5,\n1,1.5,1.4,0.5,0.7,0.0008\n2,1.2,,,,0.0005\n")
    plot_curves(full, tmp_path / "full.png")
    assert_png(tmp_path / "full.png")
    only_loss = tmp_path / "loss.csv"
    only_loss.write_text("epoch,train_loss\n0,1.0\n1,0.6\n")
    plot_curves(only_loss, tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png")
    no_epoch = tmp_path / "noepoch.csv"
    no_epoch.write_text("val_macro_f1,val_accuracy\n0.2,0.4\n0.4,nan\n")
    plot_curves(no_epoch, tmp_path / "noepoch.png")
    assert_png(tmp_path / "noepoch.png")
    empty = tmp_path / "empty.csv"
    empty.write_text("epoch,train_loss\n")
    with pytest.raises(WaferlabError, match="no rows"):
        plot_curves(empty, tmp_path / "empty.png")
    with pytest.raises(WaferlabError, match="not found"):
        plot_curves(tmp_path / "missing.csv", tmp_path / "missing.png")
    assert not (tmp_path / "empty.png").exists()


def _fake_run(root: Path, name: str, macro_f1: float | None, n: int = 100, nested: bool = False,
              model: str = "resnet34") -> Path:
    run = root / name
    run.mkdir()
    metrics = {"n": n, "accuracy": 0.9, "balanced_accuracy": 0.8, "macro_f1": macro_f1,
               "class_names": list(WM811K_CLASSES), "ece": 0.05}
    record = {"test": metrics} if nested else {"title": name, "protocol": {"split": "lot"}, **metrics}
    (run / "metrics.json").write_text(json.dumps(record))
    (run / "config.yaml").write_text(f"model: {model}\nsplit: lot\nclass_set: all9\n")
    return run


def test_compare_runs_orders_by_macro_f1(tmp_path: Path) -> None:
    runs = [
        _fake_run(tmp_path, "mid", 0.7, model="spanet"),
        _fake_run(tmp_path, "best", 0.9),
        _fake_run(tmp_path, "nested", 0.8, nested=True, model="cbam"),
        _fake_run(tmp_path, "undefined", None),
        _fake_run(tmp_path, "worst", 0.5),
    ]
    text = compare_runs(runs)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    order = [row.split("|")[2].strip() for row in rows]
    assert order == ["best", "nested", "mid", "worst", "undefined"]
    assert "| spanet |" in rows[2] and "| cbam |" in rows[1] and "0.9000" in rows[0]
    assert "Warning" not in text
    # Different numbers of evaluated maps make the table not comparable, and it says so.
    other = _fake_run(tmp_path, "other", 0.6, n=50)
    assert "not directly comparable" in compare_runs([runs[0], other])
    # A metrics.json path works as well as its folder.
    assert "| best |" in compare_runs([runs[1] / "metrics.json"])
    with pytest.raises(WaferlabError, match="not found"):
        compare_runs([tmp_path / "nope"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    with pytest.raises(WaferlabError, match="not valid JSON"):
        compare_runs([tmp_path / "broken"])
    with pytest.raises(WaferlabError):
        compare_runs([])


def test_compare_runs_reads_write_evaluation_output(tmp_path: Path) -> None:
    y = np.array([0, 1, 2, 2])
    good = compute_metrics(y, probs_for([0, 1, 2, 2], 3), ["a", "b", "c"])
    bad = compute_metrics(y, probs_for([0, 1, 1, 0], 3), ["a", "b", "c"])
    # Write metrics.json the way write_evaluation does without drawing figures (kept fast).
    from waferlab.io import write_json

    for name, m in (("bad", bad), ("good", good)):
        write_json(tmp_path / name / "metrics.json", {"title": name, "protocol": {"model": name}, **m})
    text = compare_runs([tmp_path / "bad", tmp_path / "good"])
    rows = [line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert rows[0].split("|")[2].strip() == "good" and "| 1.0000 |" in rows[0]
    assert rows[1].split("|")[2].strip() == "bad"
