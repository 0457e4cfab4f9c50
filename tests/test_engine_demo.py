"""``waferlab demo`` end to end at a tiny size: three runs, a summary table with one row per model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from waferlab.cli import main


def test_demo_trains_three_models_and_writes_summary(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "90", "--epochs", "1", "--image-size", "32"]) == 0
    printed = capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert summary.strip() in printed
    for model in ("resnet34", "cbam", "spanet"):
        metrics = json.loads((out / model / "metrics.json").read_text())
        row = next(line for line in summary.splitlines() if line.startswith(f"| {model} "))
        assert f"{metrics['macro_f1']:.4f}" in row and f"{metrics['accuracy']:.4f}" in row
        assert f"{metrics['balanced_accuracy']:.4f}" in row


def test_demo_rejects_too_few_maps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--n", "10"]) == 2
    assert capsys.readouterr().err.strip() == "waferlab: error: demo --n must be >= 90, got 10"
