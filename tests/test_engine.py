"""Engine: config resolution/validation, CLI errors, end-to-end train + evaluate of three model families."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from waferlab.cli import main
from waferlab.data.cache import DEFAULT_RESIZE
from waferlab.engine.config import TrainConfig, build_config, parse_set
from waferlab.engine.sampling import IndexBatchSampler
from waferlab.errors import WaferlabError

N_MAPS = 240
SIZE = 32


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared 32 px cache of synthetic maps (all 9 classes, ~27 each)."""
    from waferlab.data.cache import prepare, save_cache
    from waferlab.data.synth import generate

    path = tmp_path_factory.mktemp("data") / "synth32.npz"
    save_cache(prepare(generate(N_MAPS, seed=3), SIZE), path)
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- config
def test_presets_load_and_match_their_protocols() -> None:
    d = build_config("default")
    assert (d.split, d.fractions, d.optimizer, d.scheduler, d.encoding, d.image_size, d.checkpoint) == (
        "stratified", [0.7, 0.15, 0.15], "adamw", "cosine", "onehot", 64, "best")
    assert d.augment and d.warmup_epochs > 0 and d.loss in ("weighted_ce", "focal")
    a = build_config("attention-study")
    assert (a.class_set, a.encoding, a.image_size, a.optimizer, a.lr, a.batch_size, a.epochs, a.seed) == (
        "defect8", "rgb", 224, "adam", 1e-4, 16, 10, 60)
    assert (a.split, a.fractions, a.pretrained, a.loss, a.scheduler, a.augment, a.checkpoint) == (
        "random", [0.8, 0.0, 0.2], "imagenet", "ce", "none", False, "last")
    assert not a.has_val
    s = build_config("spanet")
    assert (s.model, s.optimizer, s.nesterov, s.momentum, s.lr, s.min_lr, s.scheduler, s.head, s.loss) == (
        "spanet", "sgd", True, 0.9, 1e-2, 1e-4, "cosine", "cosine", "circle")
    assert s.loss_options == {"gamma": 64, "margin": 0.25}


def test_resolution_order_preset_then_flags_then_set(tmp_path: Path) -> None:
    cfg = build_config("attention-study", {"lr": 3e-4, "epochs": None},
                       ["lr=5e-4", "model_options.width=0.5", "fractions=[0.6, 0.2, 0.2]"])
    assert cfg.lr == 5e-4  # --set beats the flag, the flag beats the preset
    assert cfg.epochs == 10  # a flag that was not given keeps the preset's value
    assert cfg.model_options == {"width": 0.5} and cfg.has_val
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 3\nbatch_size: 8\n")
    cfg = build_config(str(path), {"batch_size": 4})
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (3, 4, TrainConfig().lr)


@pytest.mark.parametrize("overrides, sets, message", [
    ({"lr": 0.0}, [], "lr must be > 0"),
    ({"lr": -1e-3}, [], "lr must be > 0"),
    ({"epochs": 0}, [], "epochs must be >= 1"),
    ({"image_size": 16}, [], "image_size must be >= 32"),
    ({"class_set": "defect9"}, [], "class_set"),
    ({"encoding": "hsv"}, [], "encoding"),
    ({"data": "/no/such/file.pkl"}, [], "data not found: /no/such/file.pkl"),
    ({}, ["fractions=[0.5, 0.2, 0.2]"], "sum to 1"),
    ({}, ["bogus_key=1"], "unknown config key 'bogus_key'"),
    ({}, ["lrr=1"], "did you mean 'lr'"),
    ({}, ["nesterov=true"], "nesterov"),
    ({}, ["precise_bn_batches=-1"], "precise_bn_batches must be >= 0"),
    ({}, ["precise_bn_batches=2.5"], "precise_bn_batches: expected an integer"),
    ({}, ["fractions=[0.0, 0.5, 0.5]"], "the train fraction must be > 0"),
    ({}, ["precision=fp8"], "config precision: unknown value"),
    ({}, ["devices=0"], "config devices: expected a count >= 1"),
])
def test_bad_values_raise_one_line_errors(overrides: dict, sets: list[str], message: str) -> None:
    with pytest.raises(WaferlabError) as info:
        build_config("default", overrides, sets)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_yaml_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(WaferlabError, match=r"bad\.yaml: unknown config key 'learning_rate'"):
        build_config(str(path))
    with pytest.raises(WaferlabError, match="unknown config preset 'nope'"):
        build_config("nope")
    assert parse_set(["model_options.width=0.5", "augment=false"]) == {"model_options": {"width": 0.5},
                                                                       "augment": False}


@pytest.mark.parametrize("extra, message", [
    (["--model", "no_such_net"], "unknown model 'no_such_net'"),
    (["--lr", "0"], "lr must be > 0"),
    (["--lr", "-0.1"], "lr must be > 0"),
    (["--image-size", "16"], "image_size must be >= 32"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--class-set", "all10"], "class_set"),
    (["--config", "no-such-preset"], "unknown config preset"),
    (["--set", "nonsense=3"], "unknown config key 'nonsense'"),
    (["--resume"], "no checkpoint to resume from"),
    (["--set", "augment_options.spin=3"], "augment_options"),
    (["--loss", "circle"], "head is 'failpool'"),
    (["--loss", "hinge"], "unknown loss 'hinge'"),
])
def test_cli_bad_configs_exit_2_with_one_line(extra: list[str], message: str, synth_cache: Path,
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--model", "resnet34", "--data", str(synth_cache), "--out", str(tmp_path / "run"),
            "--no-progress"]
    code, err = run_cli(args + extra, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("waferlab: error:") and message in lines[0], err


def test_cli_missing_data_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["train", "--model", "resnet34", "--data", str(tmp_path / "absent.pkl"),
                         "--out", str(tmp_path / "r")], capsys)
    expected = f"waferlab: error: data not found: {tmp_path / 'absent.pkl'}"
    assert code == 2 and err.strip().splitlines() == [expected]


# ---------------------------------------------------------------------------------------------- batching
def test_index_batches_are_seeded_per_epoch_and_shard_global_batches() -> None:
    idx = np.arange(100)
    one = IndexBatchSampler(idx, 10, shuffle=True, seed=5)
    one.set_epoch(3)
    a = [b.tolist() for b in one]
    one.set_epoch(3)
    assert a == [b.tolist() for b in one]  # same (seed, epoch) -> same order (what resuming relies on)
    one.set_epoch(4)
    assert a != [b.tolist() for b in one]
    assert sorted(sum(a, [])) == list(range(100)) and len(a) == len(one) == 10
    shards = []
    for rank in range(2):
        s = IndexBatchSampler(idx, 5, shuffle=True, seed=5, rank=rank, world=2)
        s.set_epoch(3)
        shards.append([b.tolist() for b in s])
    # two ranks with half the batch each see exactly the single process's global batches
    assert [r0 + r1 for r0, r1 in zip(*shards)] == a
    ev = [IndexBatchSampler(idx[:7], 2, shuffle=False, rank=r, world=2) for r in range(2)]
    assert sorted(sum((b.tolist() for s in ev for b in s), [])) == list(range(7))
    assert [len(s) for s in ev] == [2, 2]


# ---------------------------------------------------------------------------------------------- end to end
RUNS = {  # model -> (preset, extra CLI flags): one run per model family and preset
    "resnet34": ("default", ["--batch-size", "32"]),
    # the preset's rule is nearest; the shared cache has the default rule, and a run must match its cache's
    "cbam": ("attention-study", ["--set", "pretrained=null", "--class-set", "all9",
                                 "--resize", DEFAULT_RESIZE]),
    "spanet": ("spanet", ["--class-set", "defect8", "--batch-size", "32"]),
}


@pytest.fixture(scope="module")
def trained_runs(synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """CI-sized runs (32 px, 240 maps, 1 epoch) of resnet34, cbam and spanet through the CLI."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for model, (preset, extra) in RUNS.items():
        run = base / model
        code = main(["train", "--model", model, "--data", str(synth_cache), "--out", str(run),
                     "--config", preset, "--epochs", "1", "--image-size", str(SIZE), "--no-progress", *extra])
        assert code == 0, model
        out[model] = run
    return out


@pytest.mark.parametrize("model", list(RUNS))
def test_train_writes_a_complete_run_dir(model: str, trained_runs: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    from waferlab.data.cache import load_cache
    from waferlab.data.splits import assign_splits, select_classes
    from waferlab.engine.predict import PredictOptions, predict_probs
    from waferlab.engine.run import Run

    run = trained_runs[model]
    for name in ("model.safetensors", "config.yaml", "classes.json", "versions.json", "seed", "curves.csv",
                 "curves.png", "metrics.json", "report.md", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    assert "torch" in json.loads((run / "versions.json").read_text())
    curves = (run / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("epoch,train_loss,val_loss,val_macro_f1") and len(curves) == 2
    model_, info = Run.open(run).load_model(), Run.open(run).info
    saved = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model_.state_dict().items() if k in saved)
    assert info.model_name == model and info.image_size == SIZE
    assert info.class_names == tuple(json.loads((run / "classes.json").read_text()))
    # the saved weights reproduce the recorded test accuracy exactly
    cfg = info.config
    p = select_classes(load_cache(cfg["data"]), cfg["class_set"])
    test = np.flatnonzero(assign_splits(p, cfg["split"], cfg["fractions"], seed=cfg["seed"]) == "test")
    probs = predict_probs(model_, p.maps[test], Run(run).spec(), PredictOptions(batch_size=64))
    assert probs.shape == (len(test), len(info.class_names))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert metrics["n"] == len(test)
    assert np.mean(probs.argmax(1) == p.labels[test]) == pytest.approx(metrics["accuracy"])


def test_protocols_recorded(trained_runs: dict[str, Path]) -> None:
    import yaml

    cbam = yaml.safe_load((trained_runs["cbam"] / "config.yaml").read_text())
    assert (cbam["encoding"], cbam["optimizer"], cbam["checkpoint"]) == ("rgb", "adam", "last")
    assert cbam["seed"] == 60
    curves = (trained_runs["cbam"] / "curves.csv").read_text().splitlines()[1].split(",")
    assert curves[2] == "nan"  # no validation part in the attention-study protocol
    assert json.loads((trained_runs["spanet"] / "classes.json").read_text())[-1] == "Near-full"


def test_evaluate_cli_on_any_data(trained_runs: dict[str, Path], synth_cache: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    code, _ = run_cli(["evaluate", str(trained_runs["resnet34"]), "--data", str(synth_cache),
                       "--out", str(out)], capsys)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == N_MAPS and 0 <= metrics["macro_f1"] <= 1
    assert (out / "report.md").is_file()


def test_evaluate_class_set_mismatch_is_one_line_error(
        trained_runs: dict[str, Path], synth_cache: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # the spanet run knows the 8 defect classes only; the data also has 'none'
    code, err = run_cli(["evaluate", str(trained_runs["spanet"]), "--data", str(synth_cache),
                         "--out", str(tmp_path / "e")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "labels the run does not know: none" in lines[0]
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_evaluate_maps_labels_by_name_and_drops_unlabeled() -> None:
    from waferlab.engine.evaluate import map_labels

    keep, y = map_labels(("Scratch", "Center", "Loc"), np.array([0, -1, 1, 2, 0]),
                         ("Center", "Donut", "Loc", "Scratch"), "d")
    assert keep.tolist() == [0, 2, 3, 4] and y.tolist() == [3, 0, 2, 3]
    with pytest.raises(WaferlabError, match="labels the run does not know: Loc"):
        map_labels(("Center", "Loc"), np.array([0, 1]), ("Center", "Donut"), "d")


def test_precise_bn_recomputes_running_stats_from_training_rows() -> None:
    """Precise BN replaces stale running statistics by the batch statistics of the training rows
    (with the current weights), so an evaluated model sees what it was trained on."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from waferlab.engine.callbacks import PreciseBN
    from waferlab.engine.config import build_config
    from waferlab.engine.datamodule import SplitData, WaferDataModule
    from waferlab.engine.module import WaferClassifier

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    cfg = build_config("default", {"model": "resnet34", "image_size": 32, "batch_size": 64,
                                   "precise_bn_batches": 4, "augment": False})
    maps = torch.randint(0, 3, (40, 32, 32), dtype=torch.uint8)
    prepared = SimpleNamespace(maps=maps.numpy(), labels=np.zeros(40, np.int64), class_names=("a", "b", "c"))
    split = SplitData(prepared, np.arange(0, 30), np.arange(30, 40), np.arange(0))
    data = WaferDataModule(cfg, split)
    module = WaferClassifier(net, cfg, np.array([40, 0, 0]))
    bn = net[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    module.train()
    PreciseBN(cfg.precise_bn_batches, cfg.batch_size, cfg.seed).recalibrate(module, data, epoch=0)
    x, _ = data.gather(torch.arange(0, 30), train=False)
    with torch.no_grad():
        feats = net[0](x)
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, feats.var((0, 2, 3)), rtol=1e-4)
    assert bn.momentum == 0.01  # restored


def test_training_fits_the_unknown_pattern_statistics_on_the_training_part(
        trained_runs: dict[str, Path]) -> None:
    from waferlab.deploy.ood import DEFAULT_METHOD, FEATURE_METHODS
    from waferlab.deploy.trust import load_trust
    from waferlab.engine.datamodule import load_split_data
    from waferlab.engine.run import Run

    run = Run.open(trained_runs["resnet34"])
    trust = load_trust(run)
    split = load_split_data(run.config())
    th = json.loads((run.path / "thresholds.json").read_text())
    assert trust.scorer.method == DEFAULT_METHOD == th["ood_method"] and th["id_recall"] >= 0.95
    if DEFAULT_METHOD in FEATURE_METHODS:  # fitted on the training maps, not on the validation part
        fitted_on = json.loads((run.path / "ood.json").read_text())["fitted_on"]
        assert fitted_on == f"training part ({len(np.unique(split.train))} maps)"
        if DEFAULT_METHOD in ("knn", "knn+energy", "knn+wafer"):
            assert len(trust.scorer.arrays["bank"]) == len(np.unique(split.train))
        if trust.scorer.needs_maps:  # the descriptors of the training maps at the run's size, standardised
            from waferlab.deploy.descriptors import wafer_descriptors
            from waferlab.engine.predict import input_maps

            bank = trust.scorer.arrays["wafer_bank"]
            assert len(bank) == len(np.unique(split.train))
            d = wafer_descriptors(input_maps(split.data.maps[np.unique(split.train)], run.spec()))
            np.testing.assert_allclose(trust.scorer.arrays["wafer_norm"][0], d.mean(0), rtol=1e-4, atol=1e-5)


def test_drop_checkpoints_only_of_a_finished_run(tmp_path: Path) -> None:
    """A finished run's Lightning checkpoints go (bytes freed reported); an unfinished run keeps what
    --resume needs: a one-line error, nothing deleted."""
    from waferlab.engine.run import REQUIRED, Run

    run = Run(tmp_path / "r")
    (run.checkpoints).mkdir(parents=True)
    run.last_checkpoint.write_bytes(b"x" * 1000)
    (run.checkpoints / "best.ckpt").write_bytes(b"y" * 500)
    with pytest.raises(WaferlabError, match="not a finished run"):
        run.drop_checkpoints()
    assert run.last_checkpoint.is_file()
    for name in REQUIRED:
        (run.path / name).write_text("x")
    assert run.drop_checkpoints() == 1500
    assert not run.checkpoints.exists() and all((run.path / n).is_file() for n in REQUIRED)
    assert run.drop_checkpoints() == 0
