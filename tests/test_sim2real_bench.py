"""The synthetic-to-real benchmark's command building (``benchmarks/sim2real.py``), without training."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "sim2real_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "sim2real.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench  # its dataclasses look their module up
_SPEC.loader.exec_module(bench)


def test_fine_tune_command_sets_each_key_once(monkeypatch, tmp_path: Path) -> None:
    """The synthetic run's own split (``--synth-set fractions=...``) is not passed to fine-tuning next to the
    fine-tuning split: each --set key appears once, other synthetic settings still apply."""
    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(bench, "_train", lambda plan, data, out, epochs, seed, *extra: seen.append(extra))
    plan = bench.Plan(model="cbam", image_size=48, epochs=6, real_epochs=30, ft_epochs=5, ft_lr=3e-4,
                      ft_synth=0.1, ft_real_weight=3.0, resize="failkeep",
                      synth_set=("fractions=[0.85, 0.15, 0.0]", "loss=focal"))
    bench._fine_tune(plan, tmp_path / "s.npz", tmp_path / "c.npz", tmp_path / "init", tmp_path / "ft", 0)
    sets = [v for k, v in zip(seen[0], seen[0][1:]) if k == "--set"]
    keys = [s.split("=", 1)[0] for s in sets]
    assert sorted(keys) == sorted(set(keys)) and "loss=focal" in sets
    assert "fractions=[1.0, 0.0, 0.0]" in sets and "lr=0.0003" in sets


def test_table_names_the_part_it_reports() -> None:
    """The calibration-part table (what judges a change) says so in its header; the default stays held-out."""
    metrics = {"class_names": ["A", "B"], "n": 3, "macro_f1": 0.5, "accuracy": 0.6, "ece": 0.1,
               "per_class": {"A": {"recall": 1.0, "support": 2}, "B": {"recall": 0.0, "support": 1}}}
    calib = bench.table({"synthetic only": [metrics, metrics]}, "calibration")
    assert calib.startswith("| class | calibration maps |")
    assert "| A recall | 2 | 1.000 (1.00-1.00) |" in calib
    assert bench.table({"synthetic only": [metrics]}).startswith("| class | held-out maps |")
    assert "| min class recall | 3 | 0.000 (0.00-0.00) |" in calib
