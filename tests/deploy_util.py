"""Helpers for the deploy tests: a calibrated run with random weights, built in seconds (no training)."""

from __future__ import annotations

from pathlib import Path

import torch

from waferlab.data.readers import write_safe
from waferlab.data.synth import generate
from waferlab.data.table import WM811K_CLASSES

SIZE = 32
MODEL = "mobilenetv2_100"


def fake_run(path: Path, data: Path, model: str = MODEL, seed: int = 0, resize: str | None = None) -> Path:
    """A finished run directory holding a randomly initialised ``model`` (what consumers of a run read);
    ``resize``: its rule (None: the default preset's)."""
    from waferlab.engine.config import build_config
    from waferlab.engine.run import Run
    from waferlab.models import create_model

    cfg = build_config("default", {"model": model, "data": str(data), "out": str(path), "image_size": SIZE,
                                   "resize": resize})
    run = Run.create(path, overwrite=True)
    run.write_start(cfg, WM811K_CLASSES)
    torch.manual_seed(seed)
    run.write_weights(create_model(model, num_classes=len(WM811K_CLASSES), in_chans=3))
    run.mark("finished")
    return path


def synth_file(path: Path, n: int, seed: int, unlabel_every: int = 0) -> Path:
    """``n`` synthetic maps in the safe .npz format (every ``unlabel_every``-th map without a label)."""
    table = generate(n, seed=seed)
    if unlabel_every:
        labels = table.labels.copy()
        labels[::unlabel_every] = "unlabeled"
        table.labels = labels
    write_safe(table, path)
    return path


def calibrated_run(tmp: Path, n_cal: int = 90, resize: str | None = None) -> Path:
    """A fake run (with the rule ``resize``) calibrated with ``waferlab calibrate`` on ``n_cal`` synthetic
    maps."""
    from waferlab.cli import main

    cal = synth_file(tmp / "cal.npz", n_cal, seed=1)
    run = fake_run(tmp / "run", cal, resize=resize)
    assert main(["calibrate", str(run), "--data", str(cal), "--no-progress"]) == 0
    return run


