"""Issue-8 bugs a new user hits first, each pinned by a test that failed before its fix."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from waferlab.engine.sampling import IndexBatchSampler
from waferlab.errors import WaferlabError
from waferlab.models import create_model, list_models

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- a training batch of one
@pytest.mark.parametrize("world", [1, 2])
def test_training_batches_never_hold_a_single_map(world: int) -> None:
    """Whatever the size of the training part modulo the batch size, no rank gets a batch of one."""
    for n in range(2 * world, 60):
        for bs in (2, 3, 4, 7, 16):
            for rank in range(world):
                s = IndexBatchSampler(np.arange(n), bs, shuffle=True, seed=1, rank=rank, world=world)
                sizes = [len(b) for b in s]
                assert len(sizes) == len(s) and min(sizes) >= 2, (n, bs, rank, sizes)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_on_every_batch_the_sampler_gives(name: str, world: int) -> None:
    """Repro of 'Expected more than 1 value per channel': training part = 1 (mod batch size x ranks),
    or a 2-process tail of 3 maps that splits 2 + 1; every registered BatchNorm model must take each batch."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=3).train()
    n = 2 * 4 * world + (1 if world == 1 else 3)
    for rank in range(world):
        for idx in IndexBatchSampler(np.arange(n), 4, shuffle=True, seed=0, rank=rank, world=world):
            model(torch.rand(len(idx), 3, 32, 32))


# ------------------------------------------------------------------------- calibrate's pickle reader
class _RunsCode:
    def __reduce__(self):  # what a hostile pickle does: call something on load
        return (os.getcwd, ())


def test_calibration_reads_the_sample_pickle_with_the_restricted_unpickler(tmp_path: Path) -> None:
    from waferlab.data import calibrate

    pkl = tmp_path / calibrate._PKL
    pkl.parent.mkdir(parents=True)
    pkl.write_bytes(pickle.dumps(_RunsCode(), protocol=4))
    with pytest.raises(WaferlabError, match="LSWMD_sample.pkl"):
        calibrate.load_real_samples(tmp_path)


# ------------------------------------------------------------------------- README paths
def test_configs_folder_at_the_top_holds_the_presets() -> None:
    """README points at configs/<preset>.yaml; the top-level entry must lead to waferlab/configs."""
    for preset in ("default", "spanet", "attention-study"):
        assert (REPO / "configs" / f"{preset}.yaml").is_file(), preset


# ------------------------------------------------------------------------- end to end, through the CLI
def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from waferlab.cli import main

    code = main(args)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def synth_pkl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from waferlab.data.synth import write_synthetic

    path = tmp_path_factory.mktemp("data") / "s.pkl"
    write_synthetic(path, n=150, seed=0)
    return path


def test_batch_of_one_run_overwrite_and_progress_lines(synth_pkl: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """spanet with training part = 1 (mod batch size) trains; a finished run is refused unless --overwrite;
    without a terminal there are no progress bars but one line per epoch; evaluate takes --no-progress."""
    from waferlab.engine.config import build_config
    from waferlab.engine.datamodule import load_split_data

    n_train = len(load_split_data(build_config("spanet", {"data": str(synth_pkl), "image_size": 32})).train)
    run = tmp_path / "r"
    args = ["train", "--model", "spanet", "--config", "spanet", "--data", str(synth_pkl),
            "--image-size", "32", "--epochs", "1", "--batch-size", str(n_train - 1), "--out", str(run)]
    code, err = _cli(args, capsys)
    assert code == 0, err
    assert "\r" not in err and "Epoch 0" not in err  # no progress bars in a log
    assert len([line for line in err.splitlines() if line.startswith("waferlab: epoch 1/1 ")]) == 1, err
    weights = (run / "model.safetensors").read_bytes()
    code, err = _cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err, err
    assert (run / "model.safetensors").read_bytes() == weights and (run / "metrics.json").is_file()
    code, err = _cli(args + ["--overwrite", "--no-progress", "--seed", "1"], capsys)
    assert code == 0, err
    assert (run / "model.safetensors").read_bytes() != weights
    code, err = _cli(["evaluate", str(run), "--data", str(synth_pkl), "--out", str(tmp_path / "e"),
                      "--no-progress"], capsys)
    assert code == 0 and (tmp_path / "e" / "metrics.json").is_file(), err


# ------------------------------------------------------------------------- optimizers and schedules
@pytest.mark.parametrize("name, cls, nesterov", [("sgd", "SGD", False), ("nag", "SGD", True),
                                                 ("adam", "Adam", None), ("adamw", "AdamW", None),
                                                 ("nadam", "NAdam", None)])
def test_every_declared_optimizer_builds(name: str, cls: str, nesterov: bool | None) -> None:
    from waferlab.engine.config import build_config
    from waferlab.engine.optim import OPTIMIZERS, build_optimizer

    assert name in OPTIMIZERS
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], build_config("default", {"optimizer": name}))
    assert type(opt).__name__ == cls
    if nesterov is not None:
        assert opt.param_groups[0]["nesterov"] is nesterov


def test_schedules_cosine_per_epoch_and_plateau() -> None:
    from waferlab.engine.config import build_config
    from waferlab.engine.optim import build_scheduler

    p = torch.nn.Parameter(torch.zeros(2))
    cfg = build_config("spanet", {"scheduler": "cosine_epoch"}, ["t_max=100", "epochs=100"])
    opt = torch.optim.SGD([p], lr=cfg.lr)
    entry = build_scheduler(opt, cfg, steps_per_epoch=7)
    assert entry["interval"] == "epoch" and entry["scheduler"].T_max == 100
    for _ in range(50):
        opt.step()
        entry["scheduler"].step()
    assert opt.param_groups[0]["lr"] == pytest.approx((cfg.lr + cfg.min_lr) / 2)  # half a period
    cfg = build_config("default", {"scheduler": "plateau"}, ["plateau_monitor=val_loss"])
    entry = build_scheduler(torch.optim.SGD([p], lr=cfg.lr), cfg, steps_per_epoch=7)
    assert entry["monitor"] == "val_loss" and entry["scheduler"].mode == "min"


@pytest.mark.parametrize("overrides, sets, message", [
    ({"optimizer": "lion"}, [], "config optimizer: unknown value 'lion'; use one of sgd, nag, adam"),
    ({"scheduler": "step"}, [], "config scheduler: unknown value 'step'"),
    ({"scheduler": "plateau"}, ["plateau_monitor=val_f1"], "config plateau_monitor: unknown value"),
    ({"scheduler": "plateau"}, ["fractions=[0.8, 0.0, 0.2]"], "plateau watches the validation part"),
    ({}, ["t_max=0"], "t_max must be >= 1"),
    ({"batch_size": 1}, [], "batch_size must be >= 2"),
    ({"data": ["a.pkl:0"]}, [], "weight after ':' must be a number > 0"),
])
def test_bad_engine_options_are_one_line_errors(overrides: dict, sets: list[str], message: str) -> None:
    from waferlab.engine.config import build_config

    with pytest.raises(WaferlabError) as info:
        build_config("default", overrides, sets)
    assert message in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------- several sources, --init
def test_several_weighted_sources_and_init_from_a_run(synth_pkl: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.synth import generate
    from waferlab.engine.config import build_config
    from waferlab.engine.datamodule import WaferDataModule, describe, load_split_data
    from waferlab.engine.run import Run

    other = tmp_path / "other.npz"
    save_cache(prepare(generate(90, seed=5), 48), other)
    cfg = build_config("default", {"data": [str(synth_pkl), f"{other}:2.5"], "image_size": 32})
    split = load_split_data(cfg)
    assert split.data.maps.shape[1:] == (32, 32) and split.weights == (1.0, 2.5)
    rows = split.epoch_rows(cfg.seed)
    per_source = np.bincount(split.source[rows], minlength=2)
    n_other = int(np.sum(split.source[split.train] == 1))
    assert per_source[1] == round(2.5 * n_other) and per_source[0] == np.sum(split.source[split.train] == 0)
    assert describe(split, cfg).startswith("s.pkl+other.npz:2.5: ")
    data = WaferDataModule(cfg, split)
    data.trainer = SimpleNamespace(world_size=len(rows), global_rank=0, current_epoch=0)  # one map a process
    with pytest.raises(WaferlabError, match=r"^s\.pkl\+other\.npz:2\.5: too few training maps"):
        data.train_dataloader()  # the sources by name, not a list's repr

    base = ["train", "--model", "resnet34", "--image-size", "32", "--epochs", "1", "--batch-size", "32",
            "--no-progress", "--set", "precise_bn_batches=0"]
    first = tmp_path / "first"
    assert _cli(base + ["--data", str(synth_pkl), "--out", str(first)], capsys)[0] == 0
    tuned = tmp_path / "tuned"
    code, err = _cli(base + ["--data", str(synth_pkl), "--data", f"{other}:2", "--class-set", "defect8",
                             "--init", str(first), "--out", str(tuned)], capsys)
    assert code == 0, err
    assert "rebuilt for 8 classes" in err
    a, b = Run.open(first).read_weights(), Run.open(tuned).read_weights()
    assert b["classifier.weight"].shape[0] == 8 and a["classifier.weight"].shape[0] == 9
    assert Run.open(tuned).config().init == str(first)


def test_missing_data_names_the_first_absent_source(tmp_path: Path) -> None:
    """data entries first (weights stripped), then val_data; no data passes unless required."""
    from waferlab.engine.config import missing_data

    here = tmp_path / "a.npz"
    here.write_bytes(b"")
    assert missing_data({"data": [str(here)], "val_data": str(here)}) is None
    assert missing_data({"data": [str(here), f"{tmp_path / 'b.npz'}:2"]}) == ("data", tmp_path / "b.npz")
    assert missing_data({"data": str(here), "val_data": str(tmp_path / "v.npz")}) == ("val_data",
                                                                                      tmp_path / "v.npz")
    assert missing_data({"data": None}) is None
    assert missing_data({"data": None}, required=True) == missing_data({}, required=True) == ("data", None)


def test_val_data_is_the_validation_part_and_calibrates_the_run(synth_pkl: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--val-data: its labelled maps (only they) are the validation part, never trained on; --data's own
    validation share is trained on; the run's calibration is fitted on those maps and says so."""
    import json

    from deploy_util import synth_file

    from waferlab.engine.config import build_config
    from waferlab.engine.datamodule import load_split_data

    real = synth_file(tmp_path / "fab.npz", 40, seed=7, unlabel_every=4)  # 30 labelled maps
    plain = load_split_data(build_config("default", {"data": str(synth_pkl), "image_size": 32}))
    split = load_split_data(build_config("default", {"data": str(synth_pkl), "image_size": 32,
                                                     "val_data": str(real)}))
    assert len(split.val) == 30 and set(split.source[split.val]) == {1}
    assert set(split.source[split.epoch_rows(0)]) == {0}  # never trained on
    assert len(split.train) == len(plain.train) + len(plain.val) and len(split.test) == len(plain.test)
    assert split.data.maps.shape[1:] == (32, 32)

    out = tmp_path / "run"
    code, err = _cli(["train", "--model", "spanet", "--data", str(synth_pkl), "--val-data", str(real),
                      "--out", str(out), "--image-size", "32", "--epochs", "1", "--batch-size", "32",
                      "--no-progress", "--set", "precise_bn_batches=0"], capsys)
    assert code == 0, err
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["n"] == 30 and "fab.npz (--val-data)" in cal["fitted_on"]
    assert "calibrated on 30 validation maps" in err


def test_a_misspelt_device_is_one_user_error_for_every_command() -> None:
    """The one device rule turns a bad name into a WaferlabError (predict/evaluate printed a traceback)."""
    from waferlab.engine.predict import resolve_device
    from waferlab.errors import WaferlabError

    with pytest.raises(WaferlabError, match="invalid device 'cdua'"):
        resolve_device("cdua")
    assert resolve_device("cpu").type == "cpu"


def test_epoch_lines_leave_out_what_was_not_measured(capsys: pytest.CaptureFixture[str]) -> None:
    """A run without a validation part printed 'val_loss nan  val_macro_f1 nan' every epoch; those are
    left out of the line (curves.csv keeps its nan columns)."""
    from types import SimpleNamespace

    from waferlab.engine.callbacks import EpochLines

    nan = float("nan")
    module = SimpleNamespace(history=[{"epoch": 1, "train_loss": 0.423, "val_loss": nan, "val_macro_f1": nan,
                                       "val_accuracy": nan, "lr": 2.7e-4},
                                      {"epoch": 2, "train_loss": 0.3, "val_loss": 0.25, "val_macro_f1": 0.8,
                                       "val_accuracy": 0.81, "lr": 1e-4}])
    EpochLines().on_train_epoch_end(SimpleNamespace(is_global_zero=True, max_epochs=2), module)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "waferlab: epoch 1/2  train_loss 0.423  lr 0.00027"
    assert lines[1] == ("waferlab: epoch 2/2  train_loss 0.3  val_loss 0.25  val_macro_f1 0.8  "
                        "val_accuracy 0.81  lr 0.0001")
