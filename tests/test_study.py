"""``waferlab study``: cells and names, statistics against hand-computed values, and one tiny study end to end
(a failing cell, a kill and resume, emitted commands run as-is, the report opened in a real browser)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from waferlab.cli import main
from waferlab.errors import WaferlabError
from waferlab.study.spec import load_spec, parse_spec, train_arguments

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- cells and names


def test_cells_are_the_product_of_the_axes_named_from_their_values(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "config": "default",
            "set": {"epochs": 3, "model_options": {"width": 0.5}},
            "axes": {
                "model": {"resnet34": {}, "spanet": {"config": "spanet"}},
                "model_options.ratio": [2, 4],
                "seed": [60, 61],
            },
        },
        "s.yaml",
    )
    cells = spec.cells()
    assert [c.name for c in cells] == [
        "resnet34__ratio-2__seed-60",
        "resnet34__ratio-4__seed-60",
        "spanet__ratio-2__seed-60",
        "spanet__ratio-4__seed-60",
        "resnet34__ratio-2__seed-61",
        "resnet34__ratio-4__seed-61",
        "spanet__ratio-2__seed-61",
        "spanet__ratio-4__seed-61",
    ]  # seed-major: a partial study is comparable
    c = cells[2]
    assert c.group == "spanet__ratio-2" and c.seed == 60 and c.config == "spanet"
    assert dict(c.settings) == {
        "epochs": 3,
        "model_options.width": 0.5,
        "model": "spanet",
        "model_options.ratio": 2,
        "seed": 60,
    }
    args = train_arguments(c, "/d/x.npz", "/o/spanet__ratio-2__seed-60")
    assert args[:4] == ["train", "--model", "spanet", "--config"] and args[4] == "spanet"
    assert ["--seed", "60"] == args[args.index("--seed") : args.index("--seed") + 2]
    assert "model_options.ratio=2" in args and "model_options.width=0.5" in args


def test_named_variants_can_set_several_keys_and_any_config_key(tmp_path: Path) -> None:
    path = tmp_path / "opt.yaml"
    path.write_text(
        "config: spanet\naxes:\n  recipe:\n    nag: {}\n"
        "    adam: {optimizer: adam, nesterov: false, lr: 0.001}\n  scheduler: [cosine, none]\n"
    )
    spec = load_spec(str(path))  # every cell's config is validated (adam + nesterov would be refused)
    assert [c.name for c in spec.cells()] == [
        "recipe-nag__scheduler-cosine",
        "recipe-nag__scheduler-none",
        "recipe-adam__scheduler-cosine",
        "recipe-adam__scheduler-none",
    ]
    args = train_arguments(spec.cells()[3], "d.npz", "out")
    assert "optimizer=adam" in args and "nesterov=false" in args and "scheduler=none" in args


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("axes: {model: [resnet34]}\nsets: {}\n", "unknown key 'sets'"),
        ("axes: {seed: [1, 1.5]}\n", "seeds must be integers"),
        ("axes: {lrr: [0.1]}\n", "cell lrr-0.1: --set: unknown config key 'lrr' (did you mean 'lr'?)"),
        ("axes: {model: {a: {optimizer: adam, nesterov: true}}}\n", "cell a: config nesterov"),
        ("axes: {x: [a b, a_b]}\n", "two values give the same label"),
        ("explain: {methods: [gradcam, nope]}\n", "unknown method 'nope'"),
    ],
)
def test_bad_specs_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(WaferlabError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}"):
        load_spec(str(path))


def test_presets_expand() -> None:
    study = load_spec("attention-study").cells()
    assert len(study) == 40 and study[0].name == "resnet34__seed-60" and study[-1].seed == 64
    assert {c.config for c in study} == {"attention-study"}
    assert {c.config for c in load_spec("attention-study-leakfree").cells()} == {"default"}
    demo = load_spec("demo")
    assert [c.name for c in demo.cells()][:4] == [
        "resnet34__seed-0",
        "cbam__seed-0",
        "pan__seed-0",
        "spanet__seed-0",
    ]
    assert demo.explain and demo.explain["methods"] == ["gradcam", "gradcam++"]


# ------------------------------------------------------------------------------------------ statistics


def test_t_interval_against_hand_computed_values() -> None:
    from waferlab.study.stats import t_interval

    iv = t_interval([0.80, 0.82, 0.85])
    # mean 0.823333, s = sqrt(((-.023333)^2 + (-.003333)^2 + .026667^2) / 2) = 0.0251661
    # t(0.975, 2) = 4.302653
    half = 4.302653 * 0.0251661 / math.sqrt(3)
    assert iv.mean == pytest.approx(0.8233333, abs=1e-7) and iv.std == pytest.approx(0.0251661, abs=1e-7)
    assert iv.lo == pytest.approx(0.8233333 - half, abs=1e-6) and iv.hi == pytest.approx(
        0.8233333 + half, abs=1e-6
    )
    one = t_interval([0.9])
    assert one.mean == 0.9 and one.std is None and one.lo is None


def test_t_interval_is_clipped_to_the_metric_range() -> None:
    """Two seeds (t = 12.71) at 0.95 and 0.99: the raw interval 0.97 +/- 0.254 leaves [0, 1]; clipped, it ends
    at 1.0 while the lower end keeps its raw value."""
    from waferlab.study.stats import t_interval

    raw = t_interval([0.95, 0.99])
    half = 12.706205 * (0.04 / math.sqrt(2)) / math.sqrt(2)
    assert raw.hi == pytest.approx(0.97 + half, abs=1e-6) and raw.hi > 1.0
    clipped = t_interval([0.95, 0.99], bounds=(0.0, 1.0))
    assert clipped.hi == 1.0 and clipped.lo == pytest.approx(0.97 - half, abs=1e-6)


def _record(
    name: str, group_model: str, seed: int, macro_f1: float, accuracy: float, status: str = "finished"
):
    from waferlab.study.aggregate import RunRecord
    from waferlab.study.spec import Cell, cell_name

    labels = (("model", group_model), ("seed", str(seed)))
    cell = Cell(cell_name(labels), labels, "default", (("model", group_model), ("seed", seed)))
    metrics = None
    if status == "finished":
        metrics = {
            "n": 10,
            "class_names": ["a", "b"],
            "macro_f1": macro_f1,
            "accuracy": accuracy,
            "balanced_accuracy": accuracy,
            "ece": 0.1,
            "defect_vs_none_recall": None,
            "per_class": {"a": {"recall": accuracy, "f1": macro_f1}, "b": {"recall": 1.0, "f1": macro_f1}},
        }
    return RunRecord(
        cell,
        Path(name),
        status,
        error="boom" if status == "failed" else None,
        metrics=metrics,
        train_seconds=10.0 * seed,
    )


def test_summary_aggregates_seeds_per_group_and_skips_failed_cells() -> None:
    from waferlab.study.aggregate import runs_frame, summary_frame

    spec = parse_spec({"axes": {"model": ["m1", "m2"], "seed": [1, 2, 3]}}, "s.yaml")
    records = [
        _record("r1", "m1", 1, 0.70, 0.80),
        _record("r2", "m1", 2, 0.74, 0.84),
        _record("r3", "m1", 3, 0.0, 0.0, status="failed"),
        _record("r4", "m2", 1, 0.60, 0.90),
        _record("r5", "m2", 2, 0.62, 0.88),
        _record("r6", "m2", 3, 0.67, 0.86),
    ]
    runs = runs_frame(records, spec)
    assert list(runs["status"]) == ["finished"] * 2 + ["failed"] + ["finished"] * 3
    summary = summary_frame(runs, spec).set_index("group")
    m1, m2 = summary.loc["m1"], summary.loc["m2"]
    assert m1["n_seeds"] == 2 and m1["seeds"] == "1 2"
    # m1: mean 0.72, s = 0.028284, t(0.975, 1) = 12.706205
    # -> half width 12.706205 * 0.028284 / sqrt(2) = 0.254124
    assert m1["macro_f1_mean"] == pytest.approx(0.72) and m1["macro_f1_std"] == pytest.approx(
        0.0282843, abs=1e-6
    )
    assert m1["macro_f1_ci_lo"] == pytest.approx(0.72 - 0.254124, abs=1e-5)
    # m2: mean 0.63, s = 0.036056, t(0.975, 2) = 4.302653 -> half 0.089566
    assert m2["macro_f1_ci_hi"] == pytest.approx(0.63 + 0.089566, abs=1e-5)
    assert m2["accuracy_mean"] == pytest.approx(0.88) and m2["recall[a]_mean"] == pytest.approx(0.88)
    assert m1["train_seconds"] == pytest.approx(15.0)  # the failed cell's time is not a training time


def test_paired_tests_on_a_constructed_case() -> None:
    from waferlab.study.stats import paired_tests

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    perfect = y.copy()
    worse = y.copy()
    idx = rng.choice(200, 30, replace=False)
    worse[idx] = (y[idx] + 1) % 4  # wrong on 30 maps the perfect model gets right
    # two models with the same confusion matrix, wrong on disjoint maps: no real difference
    x1, x2 = y.copy(), y.copy()
    x1[0:15], x2[15:30] = 1, 1  # class-0 maps called class 1
    res = paired_tests([y, y], [np.stack([perfect, worse, x1, x2])] * 2, 4, resamples=1000)
    a = res[(0, 1)]
    assert a.discordant_a == 60 and a.discordant_b == 0  # 30 per seed, pooled over the two seeds
    assert a.p_mcnemar == pytest.approx(2 * 0.5**60)  # exact binomial, two-sided
    assert a.diff > 0 and a.lo > 0 and a.p_bootstrap < 0.001
    same = res[(2, 3)]
    assert same.diff == 0 and same.discordant_a == same.discordant_b == 30 and same.p_mcnemar == 1.0
    assert same.p_bootstrap > 0.5 and same.lo < 0 < same.hi


def test_verdict_says_when_the_best_and_the_rest_are_within_noise() -> None:
    from waferlab.study.aggregate import runs_frame, summary_frame
    from waferlab.study.report import Significance, verdict
    from waferlab.study.stats import PairedResult

    spec = parse_spec({"axes": {"model": ["m1", "m2"], "seed": [1, 2]}}, "s.yaml")
    records = [
        _record("a", "m1", 1, 0.71, 0.8),
        _record("b", "m1", 2, 0.73, 0.8),
        _record("c", "m2", 1, 0.70, 0.8),
        _record("d", "m2", 2, 0.72, 0.8),
    ]
    summary = summary_frame(runs_frame(records, spec), spec)
    pair = {(0, 1): PairedResult(0.01, -0.01, 0.03, 0.4, 5, 4, 1.0)}
    text = verdict(summary, Significance(["m1", "m2"], pair, {(0, 1): 0.4}, {(0, 1): 1.0}, [1, 2], 20))
    assert text.startswith("Best macro-F1: m1 with 72.00 ± 1.41 %") and "within noise of one another" in text
    pair = {(0, 1): PairedResult(0.01, 0.005, 0.03, 0.001, 9, 0, 0.004)}
    text = verdict(summary, Significance(["m1", "m2"], pair, {(0, 1): 0.001}, {(0, 1): 0.004}, [1, 2], 20))
    assert "significantly better than every other model" in text
    # m1's seed interval 72.00 +/- 12.71 overlaps m2's (71.00 +/- 12.71): the verdict must say so ...
    assert "over training seeds the 95 % interval of m2 still overlaps" in text
    # ... and not when the seeds agree tightly
    tight = [_record("a", "m1", 1, 0.800, 0.8), _record("b", "m1", 2, 0.801, 0.8),
             _record("c", "m2", 1, 0.700, 0.8), _record("d", "m2", 2, 0.701, 0.8)]
    text = verdict(summary_frame(runs_frame(tight, spec), spec),
                   Significance(["m1", "m2"], pair, {(0, 1): 0.001}, {(0, 1): 0.004}, [1, 2], 20))
    assert "significantly better" in text and "overlaps" not in text


def test_test_part_is_rebuilt_for_a_multi_source_run_and_a_missing_source_is_named(tmp_path: Path) -> None:
    """A run trained on several sources (``data`` a list) gets its test part back; before, the list was
    taken for one path and the run had no per-map predictions. A source that is gone is named."""
    from conftest import synthetic_cache

    from waferlab.engine.config import build_config
    from waferlab.study.aggregate import _load_test_part

    cache = synthetic_cache(tmp_path, 90)
    config = build_config("default", {"data": [str(cache), f"{cache}:2"], "image_size": 32}, []).to_dict()
    maps, labels, rows = _load_test_part(config, None)
    assert len(maps) == len(labels) == len(rows) > 0 and maps.shape[1:] == (32, 32)
    gone = {**config, "val_data": str(tmp_path / "moved.npz")}
    with pytest.raises(WaferlabError, match="the run's val_data .*moved.npz' is not here"):
        _load_test_part(gone, str(cache))
    moved = {**config, "data": [str(cache), str(tmp_path / "moved.npz")]}  # --data stands in for data
    single = _load_test_part({**config, "data": str(cache)}, None)[2]
    assert np.array_equal(_load_test_part(moved, str(cache))[2], single)
    with pytest.raises(WaferlabError, match="the run's data .*moved.npz' is not here"):
        _load_test_part(moved, None)
    with pytest.raises(WaferlabError, match="^the run's config has no 'data'$"):
        _load_test_part({**config, "data": None}, None)


def test_workers_get_one_gpu_each_or_a_share_of_the_cpu_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from waferlab.study.runner import worker_envs

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert worker_envs(3) == [{"CUDA_VISIBLE_DEVICES": g} for g in ("2", "5", "2")]
    assert worker_envs(1) == [{}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert worker_envs(3) == [{"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}] * 3


def test_format_seconds() -> None:
    from waferlab.study.report import format_seconds

    assert [format_seconds(s) for s in (4.23, 58.2318, 125, 3725, None)] == [
        "4.2 s",
        "58 s",
        "2 min 05 s",
        "1 h 02 min",
        "—",
    ]


# ------------------------------------------------------------------------------------ end to end, tiny

TINY = """description: tiny test study
config: default
set: {{image_size: 32, epochs: {epochs}, batch_size: 32, precise_bn_batches: 0}}
axes:
  model:
{models}
  seed: [{seeds}]
{explain}"""


def _spec(path: Path, models: str, seeds: str, epochs: int = 1, explain: bool = False) -> Path:
    ex = "explain: {per_class: 1, score_per_class: 1, steps: 4, road: false}\n" if explain else ""
    path.write_text(TINY.format(models=models, seeds=seeds, epochs=epochs, explain=ex))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import synthetic_cache

    return synthetic_cache(tmp_path_factory.mktemp("data"), n=180)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """Two models x two seeds, one cell that fails (a bad model option), explanations, report; 2 workers."""
    root = tmp_path_factory.mktemp("study")
    spec = _spec(
        root / "tiny.yaml",
        "    ghostnet_100: {}\n    mobilenetv2_100: {}\n"
        "    broken: {model: spanet, model_options: {ratio: -1}}",
        "0, 1",
        explain=True,
    )
    rc = main(
        [
            "study",
            "run",
            str(spec),
            "--data",
            str(data),
            "--out",
            str(root / "s"),
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 1  # a cell failed; the others went on
    return root / "s"


def test_failing_cell_is_recorded_and_the_others_go_on(study: Path) -> None:
    cells = json.loads((study / "cells.json").read_text())["cells"]
    assert cells["broken__seed-0"]["status"] == "failed"
    assert cells["broken__seed-0"]["error"] == "spanet: option ratio must be an integer >= 1, got -1"
    for name in (
        "ghostnet_100__seed-0",
        "ghostnet_100__seed-1",
        "mobilenetv2_100__seed-0",
        "mobilenetv2_100__seed-1",
    ):
        assert cells[name]["status"] == "finished"
        assert (study / "runs" / name / "metrics.json").is_file()  # an ordinary run directory
        # its Lightning checkpoints (last.ckpt: optimizer state) were dropped; the weights stay
        assert not (study / "runs" / name / "checkpoints").exists()
        assert (study / "runs" / name / "model.safetensors").is_file()
    md = (study / "report" / "report.md").read_text()
    assert "| broken__seed-1 | failed | spanet: option ratio must be an integer >= 1, got -1 |" in md


def test_report_tables_match_the_runs(study: Path) -> None:
    import pandas as pd

    runs = pd.read_csv(study / "report" / "runs.csv")
    assert len(runs) == 6 and sorted(runs["status"]) == ["failed"] * 2 + ["finished"] * 4
    m = json.loads((study / "runs" / "ghostnet_100__seed-1" / "metrics.json").read_text())
    row = runs.set_index("cell").loc["ghostnet_100__seed-1"]
    assert row["macro_f1"] == pytest.approx(m["macro_f1"]) and row["params"] > 1e6 and row["macs"] > 0
    assert row["maps_per_s"] > 0 and row["train_seconds"] > 0
    summary = pd.read_csv(study / "report" / "summary.csv").set_index("group")
    both = [
        json.loads((study / "runs" / f"ghostnet_100__seed-{s}" / "metrics.json").read_text())["accuracy"]
        for s in (0, 1)
    ]
    assert summary.loc["ghostnet_100", "accuracy_mean"] == pytest.approx(np.mean(both))
    assert summary.loc["ghostnet_100", "accuracy_std"] == pytest.approx(np.std(both, ddof=1))
    assert summary.loc["broken", "n_seeds"] == 0
    # the per-map predictions of the report step reproduce training's own test metrics
    pred = np.load(study / "predictions" / "ghostnet_100__seed-1.npz")
    assert np.mean(pred["y_pred"] == pred["y_true"]) == pytest.approx(m["accuracy"])
    md = (study / "report" / "report.md").read_text()
    for heading in (
        "## Summary",
        "## Protocol",
        "## Results",
        "## Which differences are real",
        "### Recall per class (%)",
        "### F1 per class (%)",
        "## Figures",
        "## Explanations",
        "## All runs",
    ):
        assert heading in md
    assert "Best macro-F1:" in md and "![CAM gradcam++](figures/compare_gradcam++.png)" in md


def _browser() -> str | None:
    for candidate in (
        os.environ.get("WAFERLAB_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def test_report_opens_in_a_real_browser(study: Path) -> None:
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    exe = _browser()
    if exe is None:
        pytest.skip("no chromium here (CI installs it: apt-get install -y chromium)")
    errors: list[str] = []
    requests: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda req: requests.append(req.url))
        page.goto((study / "report" / "report.html").as_uri())
        page.wait_for_load_state("load")
        for section in (
            "summary",
            "protocol",
            "results",
            "significance",
            "per-class",
            "figures",
            "explanations",
            "cells",
            "runs",
        ):
            assert page.locator(f"section#{section} h2").is_visible(), section
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) >= 6 and all(w > 0 for w in widths)  # 4 figures + 2 CAM grids, all decoded
        assert "Best macro-F1" in page.inner_text("section#summary")
        browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests)  # self-contained: no network


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "waferlab.cli", *args], env=env, **kw)


def _same_results(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    for key in ("accuracy", "macro_f1", "nll", "ece", "confusion_matrix", "per_class"):
        assert ma[key] == mb[key], key
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_killed_study_resumes_to_the_same_results_and_emitted_commands_run_as_is(
    tmp_path: Path, data: Path
) -> None:
    spec = _spec(tmp_path / "one.yaml", "    ghostnet_100: {}", "3", epochs=2)
    # reference: the emitted command, run as-is by a shell
    emitted = _run_cli(
        ["study", "run", str(spec), "--data", str(data), "--out", str(tmp_path / "ref"), "--emit-commands"],
        stdout=subprocess.PIPE,
        text=True,
    ).communicate()[0]
    commands = [line for line in emitted.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 1 and commands[0].startswith("waferlab train --model ghostnet_100 ")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    subprocess.run(["bash", "-c", emitted], env=env, check=True, capture_output=True)
    ref = tmp_path / "ref" / "runs" / "ghostnet_100__seed-3"
    # the study, killed (with its training subprocess) once the first epoch's checkpoint is written
    out = tmp_path / "killed"
    proc = _run_cli(
        ["study", "run", str(spec), "--data", str(data), "--out", str(out), "--no-report"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = out / "runs" / "ghostnet_100__seed-3" / "checkpoints" / "last.ckpt"
    deadline, size = time.monotonic() + 600, -1
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file() and ckpt.stat().st_size == size > 0:
            break  # the size held for one poll: the checkpoint is written
        size = ckpt.stat().st_size if ckpt.is_file() else -1
        time.sleep(0.3)
    assert proc.poll() is None, "the study finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cell = out / "runs" / "ghostnet_100__seed-3"
    assert not (cell / "metrics.json").exists()
    dry = _run_cli(
        ["study", "run", str(spec), "--data", str(data), "--out", str(out), "--dry-run"],
        stdout=subprocess.PIPE,
        text=True,
    ).communicate()[0]
    assert "resume from checkpoint" in dry
    rerun = ["study", "run", str(spec), "--data", str(data), "--out", str(out),
             "--no-report", "--no-progress", "--keep-checkpoints"]
    assert main(rerun) == 0
    assert "--resume" in (out / "logs" / "ghostnet_100__seed-3.log").read_text()
    _same_results(ref, cell)
    assert (cell / "checkpoints" / "last.ckpt").is_file()  # kept on request: 'train --resume' can extend it
    # started again, the finished study trains nothing
    assert main(rerun) == 0
    assert (out / "logs" / "ghostnet_100__seed-3.log").read_text().count("waferlab.cli train") == 2
