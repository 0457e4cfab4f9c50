"""The resize rules: ``failkeep`` keeps 1-die scratches that nearest drops, does not thicken sparse noise,
equals nearest when upsampling, numpy == torch; every consumer of a run shrinks maps with the run's rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from waferlab.data.cache import (
    RESIZE_RULES,
    block_bounds,
    load_cache,
    load_prepared,
    prepare,
    resize_stack,
    save_cache,
)
from waferlab.data.encode import resize_maps
from waferlab.data.table import WaferTable
from waferlab.errors import WaferlabError

N, S = 150, 48  # a large real-like grid shrunk to the sim2real benchmark's size


def round_wafer(n: int = N) -> np.ndarray:
    """An n x n round wafer of good dies (0 outside)."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return np.where(yy ** 2 + xx ** 2 <= (n / 2 - 1) ** 2, 1, 0).astype(np.uint8)


def _draw(m: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = m.copy()
    inside = out[rows, cols] > 0
    out[rows[inside], cols[inside]] = 2
    return out


def _line_cover(out: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """Share of the output pixels a source line passes through (its blocks) that came out failed."""
    lo = block_bounds(N, S)[0]
    cells = {(int(np.searchsorted(lo, r, "right") - 1), int(np.searchsorted(lo, c, "right") - 1))
             for r, c in zip(rows, cols)}
    return float(np.mean([out[i, j] == 2 for i, j in cells]))


def test_one_die_scratches_survive_failkeep_and_mostly_vanish_with_nearest() -> None:
    base = round_wafer()
    span = np.arange(25, 125)
    for shape in ("horizontal", "diagonal"):
        cover: dict[str, list[float]] = {"nearest": [], "failkeep": []}
        for offset in range(9):  # every phase of the line against the ~3.1-die blocks
            rows, cols = (np.full_like(span, 70 + offset), span) if shape == "horizontal" else (
                span, span + offset - 4)
            m = _draw(base, rows, cols)
            near, keep = (resize_stack(m[None], S, rule)[0] for rule in ("nearest", "failkeep"))
            for rule, out in (("nearest", near), ("failkeep", keep)):
                cover[rule].append(_line_cover(out, rows, cols))
            # nothing appears away from the line: every failed pixel's block holds a die of it
            lo, hi = block_bounds(N, S)
            for i, j in zip(*np.nonzero(keep == 2)):
                assert any(lo[i] <= r < hi[i] and lo[j] <= c < hi[j] for r, c in zip(rows, cols)), (i, j)
            assert ((keep == 0) == (near == 0)).all()  # the same outline
        assert min(cover["failkeep"]) >= 0.95, (shape, cover)
        assert np.mean(cover["nearest"]) <= 0.4, (shape, cover)


def test_sparse_noise_does_not_get_denser() -> None:
    rng = np.random.default_rng(0)
    base = round_wafer()
    maps = np.stack([np.where((base == 1) & (rng.random(base.shape) < 0.1), 2, base) for _ in range(30)])
    maps = maps.astype(np.uint8)
    source = (maps == 2).sum() / (maps > 0).sum()
    for rule in RESIZE_RULES:
        out = resize_stack(maps, S, rule)
        assert (out == 2).sum() / (out > 0).sum() <= source + 0.005, rule


@pytest.mark.parametrize("shape", [(20, 30), (48, 48), (33, 47), (1, 40)])
def test_upsampling_equals_nearest(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    maps = rng.integers(0, 3, size=(6, *shape), dtype=np.uint8)
    np.testing.assert_array_equal(resize_stack(maps, S, "failkeep"), resize_stack(maps, S, "nearest"))
    masks = (maps == 2).astype(np.uint8)
    np.testing.assert_array_equal(resize_stack(masks, S, "failkeep", mask=True), resize_stack(masks, S))


@pytest.mark.parametrize("shape", [(150, 150), (60, 100), (100, 40), (49, 47), (200, 180), (30, 70)])
@pytest.mark.parametrize("rule", RESIZE_RULES)
def test_numpy_and_torch_give_identical_maps(shape: tuple[int, int], rule: str) -> None:
    rng = np.random.default_rng(2)
    for fail in (0.03, 0.3):
        maps = rng.choice(3, size=(4, *shape), p=[0.2, 0.8 - fail, fail]).astype(np.uint8)
        np.testing.assert_array_equal(resize_stack(maps, S, rule),
                                      resize_maps(torch.from_numpy(maps), S, rule).numpy())
        masks = (maps == 2).astype(np.uint8)
        np.testing.assert_array_equal(resize_stack(masks, S, rule, mask=True),
                                      resize_maps(torch.from_numpy(masks), S, rule, mask=True).numpy())


def _table(n: int = 12, seed: int = 0) -> WaferTable:
    """Large-grid maps (96-130 dies wide) with 1-die scratches and sparse noise, labelled."""
    rng = np.random.default_rng(seed)
    maps = []
    for i in range(n):
        side = int(rng.integers(96, 131))
        m = np.where((round_wafer(side) == 1) & (rng.random((side, side)) < 0.05), 2, round_wafer(side))
        r = np.arange(side // 4, 3 * side // 4)
        maps.append(_draw(m.astype(np.uint8), r, r if i % 2 else np.full_like(r, side // 2 + 1)))
    labels = np.array(["Scratch", "none"] * (n // 2), dtype=object)
    return WaferTable(maps=maps, labels=labels, split=np.array(["Test"] * n, dtype=object),
                      lot=np.array(["lot"] * n, dtype=object), wafer_index=np.arange(n))


def test_cache_records_its_rule_and_a_run_with_another_rule_refuses_it(tmp_path: Path) -> None:
    table = _table()
    for rule in RESIZE_RULES:
        save_cache(prepare(table, 32, resize=rule), tmp_path / f"{rule}.npz")
        p = load_cache(tmp_path / f"{rule}.npz")
        assert p.resize == rule
        np.testing.assert_array_equal(p.maps, np.stack([resize_stack(m[None], 32, rule)[0]
                                                        for m in table.maps]))
    maps = {rule: load_cache(tmp_path / f"{rule}.npz").maps for rule in RESIZE_RULES}
    assert not np.array_equal(maps["nearest"], maps["failkeep"])
    with pytest.raises(WaferlabError, match="prepared with resize 'nearest'.*--resize failkeep"):
        load_prepared(tmp_path / "nearest.npz", 32, resize="failkeep")
    assert load_prepared(tmp_path / "failkeep.npz", None, resize="failkeep").resize == "failkeep"


def test_bad_rule_name_is_a_one_line_error() -> None:
    from waferlab.engine.config import build_config

    with pytest.raises(WaferlabError, match="config resize: unknown value 'bilinear'; use one of nearest"):
        build_config("default", sets=["resize=bilinear"])
    with pytest.raises(WaferlabError, match="unknown resize rule 'area'"):
        resize_stack(np.ones((1, 90, 90), np.uint8), 32, "area")


def test_a_run_without_the_key_reads_as_nearest_and_presets_state_theirs(tmp_path: Path) -> None:
    import yaml
    from deploy_util import fake_run, synth_file

    from waferlab.engine.config import build_config
    from waferlab.engine.run import Run

    run = fake_run(tmp_path / "old", synth_file(tmp_path / "data.npz", 20, seed=0))
    values = yaml.safe_load((run / "config.yaml").read_text())
    values.pop("resize")
    (run / "config.yaml").write_text(yaml.safe_dump(values))
    assert Run.open(run).info.resize == "nearest" and Run.open(run).spec().resize == "nearest"
    assert Run.open(run).config().resize == "nearest"
    assert build_config("attention-study").resize == "nearest"  # its protocol (224 px: upsampling anyway)


def test_predict_and_export_shrink_large_grids_with_the_runs_rule(tmp_path: Path) -> None:
    import pandas as pd
    from deploy_util import SIZE, calibrated_run

    from waferlab.cli import main
    from waferlab.data.readers import write_safe
    from waferlab.engine.predict import PredictOptions, predict_probs
    from waferlab.engine.run import Run

    run_dir = calibrated_run(tmp_path, n_cal=45, resize="failkeep")
    run = Run.open(run_dir)
    assert run.spec().resize == "failkeep"
    table = _table(10, seed=4)
    write_safe(table, tmp_path / "big.npz")
    model = run.load_model()
    opts = PredictOptions(device="cpu", temperature=run.temperature())
    want = {rule: predict_probs(model, np.stack([resize_stack(m[None], SIZE, rule)[0] for m in table.maps]),
                                run.spec(), opts) for rule in RESIZE_RULES}
    assert np.abs(want["failkeep"] - want["nearest"]).max() > 1e-4  # the rule matters for these maps
    assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.csv"
        assert main(["predict", str(run_dir), "--data", str(tmp_path / "big.npz"), "--out", str(out),
                     "--backend", backend, "--chunk-size", "4", "--no-progress"]) == 0
        df = pd.read_csv(out, keep_default_na=False, na_values=[""])
        np.testing.assert_allclose(df["prob"], want["failkeep"].max(1), atol=1e-4)
