"""SP&A-Net's three study presets end to end at tiny size, and the study machinery they need: the
one-factor-at-a-time ``vary:`` block, ``--only`` / ``--set``, the dry run that builds every cell's model, and
the report's paper-shaped tables (ablation pivot, the r sweep with the defect-recall rule, model families)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from waferlab.cli import main
from waferlab.errors import WaferlabError
from waferlab.study.spec import load_spec, parse_spec

TINY = ["--set", "image_size=32", "--set", "epochs=1", "--set", "batch_size=64",
        "--set", "precise_bn_batches=2"]
NARROW = ["--set", "model_options.width=0.25"]  # small ablation and ratio models (the peers keep their sizes)


def _section(md: str, title: str) -> list[list[str]]:
    """The rows (header first, separator dropped) of the Markdown table under ``## title``."""
    part = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in part.splitlines() if ln.startswith("|") and not ln.startswith("|:")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]


def _pct(value: float) -> str:
    return f"{value * 100:.2f}"


# --------------------------------------------------------------------------------------- the spec format


def test_vary_gives_each_row_its_base_and_one_change_per_factor() -> None:
    spec = parse_spec(
        {
            "config": "spanet",
            "set": {"optimizer": "nag", "nesterov": False},
            "axes": {
                "model": {"plain": {"model": "spanet", "model_options": {"attention": "none"}},
                          "sa": {"model": "spanet", "model_options": {"attn_norm": "ln"}}},
                "seed": [0, 1],
            },
            "vary": {
                "attn_norm": {"not_for": ["plain"], "bn": {"model_options": {"attn_norm": "bn"}},
                              "ln": {"model_options": {"attn_norm": "ln"}}},
                "optimizer": {"adam": {"optimizer": "adam", "lr": 0.001}, "nag": {"optimizer": "nag"}},
            },
        },
        "s.yaml",
    )
    cells = spec.cells()
    assert [c.name for c in cells if c.seed == 0] == [
        "plain__base__seed-0",
        "plain__optimizer-adam__seed-0",  # no attn_norm cells (n/a); nag is the base: no second run
        "sa__base__seed-0",
        "sa__attn_norm-bn__seed-0",
        "sa__optimizer-adam__seed-0",
    ]
    assert len(cells) == 10 and [c.seed for c in cells] == [0] * 5 + [1] * 5  # seed-major
    adam = next(c for c in cells if c.name == "sa__optimizer-adam__seed-0")
    assert adam.variant == ("optimizer", "adam") and adam.base == "sa__base__seed-0" and adam.row == "sa"
    assert dict(adam.settings) == {"optimizer": "adam", "nesterov": False, "model": "spanet",
                                   "model_options.attn_norm": "ln", "seed": 0, "lr": 0.001}
    pivot = spec.vary_pivot()
    assert pivot["plain"][("attn_norm", "bn")] is None and pivot["plain"][("optimizer", "nag")] == (
        "plain__base", True)
    assert pivot["sa"][("attn_norm", "ln")] == ("sa__base", True)
    assert pivot["sa"][("attn_norm", "bn")] == ("sa__attn_norm-bn", False)
    # the spec round-trips through the study folder's study.yaml
    again = parse_spec(yaml.safe_load(yaml.safe_dump(spec.to_dict())), "again.yaml")
    assert [c.name for c in again.cells()] == [c.name for c in cells] and again.vary == spec.vary


def test_set_merges_into_the_spec_and_only_selects_cells(tmp_path: Path) -> None:
    spec = load_spec("spanet-ablation", ["model_options.width=0.25", "epochs=1"])
    cell = next(c for c in spec.cells() if c.name == "spnet__flatten-gap__seed-1")
    assert dict(cell.settings)["model_options.width"] == 0.25 and dict(cell.settings)["epochs"] == 1
    assert dict(cell.settings)["model_options.flatten"] == "gap"  # the variant still wins over --set
    from waferlab.study.spec import select_cells

    picked = select_cells(spec.cells(), ["spnet__*__seed-0,spanet__base__seed-?"])
    assert [c.name for c in picked][:2] == ["spnet__base__seed-0", "spnet__flatten-gap__seed-0"]
    assert len(picked) == 5 + 3
    with pytest.raises(WaferlabError, match="--only 'nope' matches no cell"):
        select_cells(spec.cells(), ["nope"])


# ----------------------------------------------------------------------------------------- the presets


def _dry(preset: str, tmp_path: Path, capsys, extra: tuple[str, ...] = ()) -> list[list[str]]:
    argv = ["study", "run", preset, "--out", str(tmp_path / "dry"), "--dry-run", "--no-progress", *extra]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing
    return [ln.split() for ln in lines[1:]]


def test_ablation_preset_expands_one_factor_at_a_time_and_builds_every_model(tmp_path: Path, capsys) -> None:
    rows = _dry("spanet-ablation", tmp_path, capsys, tuple(NARROW))  # 18 models; narrow ones build fast
    names = [r[0] for r in rows]
    assert len(names) == 3 * (4 * 6 + 5 + 7)  # ResNet50s: base + bn, gn, sgd, adam, plateau (no flatten)
    assert "spnet__attn_norm-bn__seed-0" not in names and "resnet50+se__flatten-gap__seed-0" not in names
    base_variants = r"attn_norm-ln|flatten-conv1x1|optimizer-nag|schedule-cosine"  # the base already is them
    assert not [n for n in names if re.search(base_variants, n)]
    params = {r[0]: int(r[4].replace(",", "")) for r in rows}
    assert params["spnet__base__seed-0"] < params["spanet__base__seed-0"]  # the attention's parameters
    assert params["spanet__flatten-gap__seed-0"] < params["spanet__base__seed-0"]  # no 1280 hidden layer


def test_ratio_preset_builds_every_r(tmp_path: Path, capsys) -> None:
    from waferlab.models.spanet import PAPER_R_UNBUILDABLE

    rows = _dry("spanet-ratio", tmp_path, capsys)
    assert [r[1] for r in rows[:5]] == ["r-0.06", "r-0.13", "r-0.25", "r-0.5", "r-1.0"]
    text = load_spec("spanet-ratio").source
    assert all(f"{r:g} " in Path(text).read_text() for r in PAPER_R_UNBUILDABLE)  # the comment says so
    bad = tmp_path / "r.yaml"  # the config is valid; only building the model finds the r that cannot be built
    bad.write_text("config: spanet\naxes:\n  model_options.r: [0.5, 0.63]\n")
    assert main(["study", "run", str(bad), "--out", str(tmp_path / "x"), "--dry-run", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"waferlab: error: cell r-0\.63: .*r=0\.63 cannot be built", err[0])


def test_peers_preset_uses_the_figure_sizes(tmp_path: Path, capsys) -> None:
    from waferlab.models.sizes import FIGURE_SIZES

    rows = _dry("spanet-peers", tmp_path, capsys)
    spec = load_spec("spanet-peers")
    seed0 = [c for c in spec.cells() if c.seed == 0]
    got = {}
    for cell in seed0:
        got.setdefault(cell.value("model"), []).append(cell.value("model_options.width"))
    assert got == {m: [w for w, _ in sizes] for m, sizes in FIGURE_SIZES.items()}
    params = {r[1]: int(r[4].replace(",", "")) for r in rows}
    published = {c.group: p for c in seed0 for w, p in FIGURE_SIZES[c.value("model")]
                 if w == c.value("model_options.width")}
    for group, p in published.items():
        assert abs(params[group] / 1e6 - p) / p < 0.03, (group, params[group], p)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import synthetic_cache

    return synthetic_cache(tmp_path_factory.mktemp("data"), n=240)


def _run(preset: str, out: Path, data: Path, only: list[str], extra: list[str]) -> Path:
    argv = ["study", "run", preset, "--data", str(data), "--out", str(out), "--workers", "2", "--no-progress",
            *TINY, *extra, "--only", ",".join(only)]
    assert main(argv) == 0
    return out


#: Every row and every factor value at least once (the columns the base already is through a base cell).
ABLATION_CELLS = [
    "resnet50+se__attn_norm-bn__seed-0",
    "resnet50+nl__attn_norm-gn__seed-0",
    "resnet50+snl__optimizer-sgd__seed-0",
    "resnet50+gc__schedule-plateau__seed-0",
    "spnet__flatten-gap__seed-0",
    "spanet__optimizer-adam__seed-0",
    "spanet__base__seed-0",  # LN, Conv1x1, NAG and cosine
]


def test_ablation_preset_end_to_end_shows_the_paper_table(tmp_path: Path, data: Path) -> None:
    out = _run("spanet-ablation", tmp_path / "abl", data, ABLATION_CELLS, NARROW)
    runs = {p.name for p in (out / "runs").iterdir()}
    assert runs == set(ABLATION_CELLS)
    config = yaml.safe_load((out / "runs" / "resnet50+nl__attn_norm-gn__seed-0" / "config.yaml").read_text())
    assert config["model_options"] == {"attn_norm": "gn", "width": 0.25} and config["optimizer"] == "nag"
    config = yaml.safe_load((out / "runs" / "spanet__optimizer-adam__seed-0" / "config.yaml").read_text())
    assert (config["optimizer"], config["lr"], config["model_options"]["attn_norm"]) == ("adam", 0.001, "ln")
    summary = pd.read_csv(out / "report" / "summary.csv").set_index("group")
    acc = {g: _pct(summary.loc[g, "accuracy_mean"]) for g in summary.index if summary.loc[g, "n_seeds"] > 0}
    table = _section((out / "report" / "report.md").read_text(), "Ablation: one factor at a time")
    assert table[0] == ["model", "attn_norm: bn", "attn_norm: ln", "attn_norm: gn", "flatten: gap",
                        "flatten: conv1x1", "optimizer: sgd", "optimizer: adam", "optimizer: nag",
                        "schedule: plateau", "schedule: cosine"]
    rows = {r[0]: r[1:] for r in table[1:]}
    assert list(rows) == ["resnet50+se", "resnet50+nl", "resnet50+snl", "resnet50+gc", "spnet", "spanet"]
    assert rows["spnet"][:3] == ["n/a"] * 3 and rows["spnet"][3] == acc["spnet__flatten-gap"]
    for r50 in ("resnet50+se", "resnet50+nl", "resnet50+snl", "resnet50+gc"):
        assert rows[r50][3:5] == ["n/a", "n/a"]
    assert rows["resnet50+se"][0] == acc["resnet50+se__attn_norm-bn"] and rows["resnet50+se"][1] == "— •"
    assert rows["resnet50+gc"][8] == acc["resnet50+gc__schedule-plateau"]
    base = acc["spanet__base"] + " •"  # one run, shown in every column the base recipe already is
    assert [rows["spanet"][i] for i in (1, 4, 7, 9)] == [base] * 4
    assert rows["spanet"][6] == acc["spanet__optimizer-adam"] and rows["spanet"][0] == "—"  # not run
    frame = pd.read_csv(out / "report" / "ablation.csv")
    assert len(frame) == 60 and (frame["status"] == "not applicable").sum() == 3 + 4 * 2
    html = (out / "report" / "report.html").read_text()
    assert '<section id="ablation">' in html
    assert '<th colspan="3" style="text-align:center">attn_norm</th>' in html


def test_ratio_preset_end_to_end_marks_the_recall_rule(tmp_path: Path, data: Path) -> None:
    out = _run("spanet-ratio", tmp_path / "ratio", data, ["r-0.06__seed-0", "r-1.0__seed-0"], NARROW)
    table = _section((out / "report" / "report.md").read_text(), "Sweep of model_options.r")
    assert table[0] == ["r", "seeds", "accuracy (%)", "precision (macro, %)", "recall (macro, %)",
                        "F1 (macro, %)", "parameters (M)", "defect recall (%)", "defect recall > 99 %"]
    rows = {r[0]: r for r in table[1:]}
    assert list(rows) == ["0.06", "0.13", "0.25", "0.5", "1.0"] and rows["0.5"][2:] == ["—"] * 7
    runs = pd.read_csv(out / "report" / "runs.csv").set_index("cell")
    for r in ("0.06", "1.0"):
        m = json.loads((out / "runs" / f"r-{r}__seed-0" / "metrics.json").read_text())
        keys = ("accuracy", "macro_precision", "macro_recall", "macro_f1")
        assert rows[r][2:6] == [_pct(m[k]) for k in keys]
        assert rows[r][6] == f"{runs.loc[f'r-{r}__seed-0', 'params'] / 1e6:.2f}"
        assert rows[r][8] == ("pass" if m["defect_vs_none_recall"] > 0.99 else "fail")
    assert float(rows["0.06"][6]) > float(rows["1.0"][6])  # parameters grow as r falls (multiplier ratio-1)
    sweep = pd.read_csv(out / "report" / "sweep.csv")
    assert list(sweep["r"]) == [0.06, 0.13, 0.25, 0.5, 1.0] and "passes_rule" in sweep


def test_sweep_rule_passes_and_fails_on_a_constructed_summary() -> None:
    from waferlab.study.shapes import sweep

    spec = parse_spec({"axes": {"model_options.r": [0.5, 1.0]}, "report": {"min_defect_recall": 0.99}}, "s")
    summary = pd.DataFrame([
        {"group": "r-0.5", "model_options.r": "0.5", "n_seeds": 2, "params": 2.6e6,
         "defect_vs_none_recall_mean": 0.995, "accuracy_mean": 0.98},
        {"group": "r-1.0", "model_options.r": "1.0", "n_seeds": 2, "params": 2.3e6,
         "defect_vs_none_recall_mean": 0.99, "accuracy_mean": 0.96},  # not above 99 %: fails
    ])
    t = sweep(spec, summary)
    assert [r[-1]["text"] for r in t["rows"]] == ["pass", "fail"]
    assert [r[-1]["cls"] for r in t["rows"]] == ["better", "worse"]
    assert list(t["frame"]["passes_rule"]) == [True, False]


def test_peers_preset_end_to_end_draws_one_line_per_family(tmp_path: Path, data: Path) -> None:
    # every family once, SP&A-Net at two sizes (a line); the rest of the 15 cells only in the dry run above
    cells = ["spanet-s__seed-0", "spanet-l__seed-0", "ghostnet-s__seed-0", "mobilenetv3-s__seed-0",
             "mobilenetv2-s__seed-0", "gc-resnet-s__seed-0"]
    out = _run("spanet-peers", tmp_path / "peers", data, cells, [])
    fams = pd.read_csv(out / "report" / "families.csv")
    assert list(dict.fromkeys(fams["family"])) == ["spanet", "ghostnet_100", "mobilenetv3_large_100",
                                                   "mobilenetv2_100", "gc_resnet34"]
    sp = fams[fams["family"] == "spanet"]
    assert list(sp["width"]) == [0.72, 0.94, 1.21]
    assert list(sp["accuracy_mean"].notna()) == [True, False, True]
    assert sp["params"].iloc[0] < sp["params"].iloc[2] and fams["accuracy_mean"].notna().sum() == 6
    table = _section((out / "report" / "report.md").read_text(), "Model families at several sizes")
    assert table[1][:4] == ["spanet", "1", "spanet-s", "0.72"] and len(table) == 1 + 15
    md = (out / "report" / "report.md").read_text()
    assert "![Accuracy vs parameters, one line per model family](figures/accuracy_vs_params.png)" in md
    assert (out / "report" / "figures" / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("preset", ["attention-study", "attention-study-leakfree", "demo"])
def test_generic_studies_get_no_paper_shaped_tables(preset: str, tmp_path: Path) -> None:
    from waferlab.study.aggregate import collect, runs_frame, summary_frame
    from waferlab.study.shapes import views

    spec = load_spec(preset)
    summary = summary_frame(runs_frame(collect(tmp_path, spec, {}), spec), spec)
    assert views(spec, summary) == ([], [])
