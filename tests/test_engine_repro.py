"""Engine reproducibility: identical reruns, exact resume after a mid-epoch crash, DDP equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from waferlab.engine.config import build_config
from waferlab.engine.train import train
from waferlab.io import seed_everything
from waferlab.models import create_model

SIZE = 32


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.synth import generate

    path = tmp_path_factory.mktemp("data") / "small32.npz"
    save_cache(prepare(generate(126, seed=11), SIZE), path)
    return path


def _cfg(data: Path, out: Path, **kw: object):
    base = {"model": "resnet34", "data": str(data), "out": str(out), "epochs": 2, "image_size": SIZE,
            "batch_size": 16, "progress": False}
    base.update(kw)
    return build_config("default", base)


class _Crash(L.Callback):
    """Raises in the middle of epoch 2, like a job killed mid-epoch (the last checkpoint is epoch 1's)."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if trainer.current_epoch == 1 and batch_idx == 2:
            raise RuntimeError("simulated kill")


class _RngLog(L.Callback):
    """The global RNG state (what dropout draws from) at each training step, by (epoch, batch)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], bytes] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        self.seen[(trainer.current_epoch, batch_idx)] = torch.get_rng_state().numpy().tobytes()


REFERENCE_RNG = _RngLog()


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(small_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run, default recipe (augmentation, warm-up + cosine, best checkpoint)."""
    return train(_cfg(small_cache, tmp_path_factory.mktemp("ref") / "run"), callbacks=[REFERENCE_RNG])


def test_same_config_and_seed_give_identical_results(reference_run: Path, small_cache: Path,
                                                     tmp_path: Path) -> None:
    again = train(_cfg(small_cache, tmp_path / "again"))
    assert _metrics(again) == _metrics(reference_run)
    assert (again / "curves.csv").read_text() == (reference_run / "curves.csv").read_text()
    a, b = _weights(reference_run), _weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_mid_epoch_kill_matches_uninterrupted(reference_run: Path, small_cache: Path,
                                                           tmp_path: Path) -> None:
    run = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(_cfg(small_cache, run), callbacks=[_Crash()])
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()
    killed_log = (run / "logs" / "metrics.csv").read_text()
    resumed = _RngLog()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(small_cache, run), resume=True, callbacks=[resumed])
    # the killed part's step log is kept (Lightning deleted it, with a warning) and the rest goes beside it
    assert (run / "logs" / "metrics.csv").read_text() == killed_log
    assert (run / "logs" / "resume-1" / "metrics.csv").is_file()
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    # every replayed step draws dropout from the same RNG state as the uninterrupted run (the per-epoch
    # reseed did not: Lightning draws from the global RNG between epoch start and the first step)
    assert resumed.seen and all(resumed.seen[k] == REFERENCE_RNG.seen[k] for k in resumed.seen)
    assert _metrics(run) == _metrics(reference_run)
    assert (run / "curves.csv").read_text() == (reference_run / "curves.csv").read_text()
    a, b = _weights(reference_run), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_match_one_process(small_cache: Path, tmp_path: Path) -> None:
    """2 CPU processes (gloo) x batch 8 must train the same weights as 1 process x batch 16.

    Well defined because: each global batch is the same 16 maps split between the ranks (seeded sampler),
    DDP averages the ranks' gradients, and the engine scales each rank's loss by its share of the global
    batch, so the average is the gradient of the mean loss over the global batch even for the last, partial
    one (93 training maps: 5 x 16 + 13, the 13 split 7 + 6; without the scaling that step's gradient is the
    mean of two means). BatchNorm is frozen to its running statistics (``freeze_bn``: per-rank batch
    statistics would differ, and SyncBatchNorm needs a GPU), no augmentation, plain SGD (linear in the
    gradient). Both runs train in float64 (``precision=64-true``): in float32 the 1-process and 2-process
    sums round differently (~6e-8), and that alone can move a ReLU input across 0 in a later step (seen on
    the generator's maps: one layer2 pre-activation 0.0 vs 5e-8 turned into a 8e-4 weight difference), so a
    float32 comparison would test luck, not the engine.
    """
    sets = ["freeze_bn=true", "augment=false", "optimizer=sgd", "scheduler=none", "weight_decay=0", "lr=0.01",
            "precision=64-true", "split=random", "fractions=[0.74, 0.13, 0.13]"]
    one = train(build_config("default", {"model": "resnet34", "data": str(small_cache),
                                         "out": str(tmp_path / "one"), "epochs": 1, "image_size": SIZE,
                                         "batch_size": 16, "loss": "ce", "progress": False}, sets))
    cmd = [sys.executable, "-m", "waferlab.cli", "train", "--model", "resnet34", "--data", str(small_cache),
           "--out", str(tmp_path / "two"), "--epochs", "1", "--image-size", str(SIZE), "--batch-size", "8",
           "--loss", "ce", "--devices", "2", "--accelerator", "cpu", "--strategy", "ddp", "--no-progress"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "93 training maps" in proc.stderr  # the last global batch is 13 maps: 7 + 6
    two = tmp_path / "two"
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    seed_everything(0)  # train() seeds the same way before building the model: these are its initial weights
    init = create_model("resnet34", num_classes=9, in_chans=3).state_dict()
    moved = max(float((a[k] - v).abs().max()) for k, v in init.items() if v.is_floating_point())
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    print(f"max weight change {moved:.3g}, max 1-vs-2-process difference {diff:.3g}")
    assert moved > 1e-3  # training really changed the weights ...
    assert diff < 1e-6  # ... and the 2-process run changed them the same way (float32 rounding of the result)
    assert "2 process(es)" in proc.stderr


def test_last_checkpoint_is_written_every_epoch_even_without_improvement(small_cache: Path,
                                                                          tmp_path: Path) -> None:
    """--resume continues from the LAST epoch, not the best one (Lightning's save_last=True alone writes
    last.ckpt only when the monitored metric improves). A negligible lr keeps val macro-F1 flat."""
    run = train(_cfg(small_cache, tmp_path / "flat", lr=1e-12, min_lr=0.0, augment=False))
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and best["epoch"] == 0
    assert last["global_step"] == 2 * best["global_step"]
    # best.ckpt holds the weights only (resume reads last.ckpt): a third of a ResNet34's full checkpoint
    assert "optimizer_states" in last and "optimizer_states" not in best
    assert best["state_dict"].keys() == last["state_dict"].keys()
