"""Test-time augmentation in the one prediction path: the 8 dihedral views, their averaged probabilities,
and ``--tta`` on ``evaluate`` and ``predict`` (torch backend; the ONNX backends refuse it); and the
prediction path's precision policy (``PredictOptions.autocast``, ``predict --autocast``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from maps_util import blob_wafers
from torch import nn

from waferlab.cli import main
from waferlab.engine.predict import (
    AUTOCAST_POLICIES,
    DIHEDRAL_VIEWS,
    InputSpec,
    PredictOptions,
    dihedral_view,
    predict,
    softmax,
)
from waferlab.errors import WaferlabError

SIZE = 16
SPEC = InputSpec(image_size=SIZE, encoding="onehot", class_names=("a", "b", "c"))


class Flat(nn.Module):
    """Not rotation-invariant: a linear layer on the flattened one-hot map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.cam_target_layer = self.conv
        self.fc = nn.Linear(4 * SIZE * SIZE, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def wafers(n: int, seed: int = 0) -> np.ndarray:
    """Round wafers with an off-centre blob of fails (no symmetry)."""
    return blob_wafers(n, SIZE, seed, fail=0.05, centre=((3, 7), (9, 13)), r2=6)


def test_views_are_the_rotations_and_mirrors_of_the_input() -> None:
    x = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    expect = [np.rot90(x, k, axes=(1, 2)) for k in range(4)]
    expect += [e[:, :, ::-1] for e in expect]
    views = [dihedral_view(torch.from_numpy(x), t).numpy() for t in range(DIHEDRAL_VIEWS)]
    for got, want in zip(views, expect):
        np.testing.assert_array_equal(got, want)
    assert len({v.tobytes() for v in views}) == DIHEDRAL_VIEWS
    four = torch.arange(16.0).reshape(1, 1, 4, 4)  # (N, C, H, W): the last two dims turn
    assert torch.equal(dihedral_view(four, 1)[0, 0], torch.rot90(four[0, 0], 1))
    with pytest.raises(WaferlabError, match="dihedral view 8"):
        dihedral_view(four, 8)


def test_tta_is_the_mean_of_the_views_probabilities_and_differs_for_a_model_that_is_not_invariant() -> None:
    maps = wafers(5)
    model = Flat()
    opts = dict(device="cpu", batch_size=3, temperature=1.7)
    plain = predict(model, maps, SPEC, PredictOptions(**opts))
    tta = predict(model, maps, SPEC, PredictOptions(tta=True, **opts))
    assert not np.allclose(plain.probs, tta.probs, atol=1e-3)
    views = [predict(model, dihedral_view(torch.from_numpy(maps), t), SPEC, PredictOptions(**opts))
             for t in range(DIHEDRAL_VIEWS)]
    np.testing.assert_allclose(tta.probs, np.mean([v.probs for v in views], 0), atol=1e-6)
    np.testing.assert_allclose(tta.logits, np.mean([v.logits for v in views], 0), atol=1e-5)
    np.testing.assert_allclose(tta.probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(views[0].probs, softmax(views[0].logits / 1.7), atol=1e-6)


def test_tta_features_are_one_row_per_map_the_mean_of_the_views() -> None:
    maps = wafers(4)
    model = Flat()
    tta = predict(model, maps, SPEC, PredictOptions(device="cpu", batch_size=3, tta=True, features=True))
    views = [predict(model, dihedral_view(torch.from_numpy(maps), t), SPEC,
                     PredictOptions(device="cpu", features=True)).features for t in range(DIHEDRAL_VIEWS)]
    assert tta.features.shape == (4, 8)
    np.testing.assert_allclose(tta.features, np.mean(views, 0), atol=1e-5)


def test_tta_on_an_input_with_every_symmetry_equals_plain_prediction() -> None:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    c = (SIZE - 1) / 2
    r2 = (yy - c) ** 2 + (xx - c) ** 2
    ring = np.where(r2 <= (SIZE / 2) ** 2, np.where((r2 > 9) & (r2 < 20), 2, 1), 0).astype(np.uint8)[None]
    for t in range(DIHEDRAL_VIEWS):  # the map is its own rotations and mirrors
        assert np.array_equal(dihedral_view(torch.from_numpy(ring), t).numpy(), ring)
    model = Flat()
    plain = predict(model, ring, SPEC, PredictOptions(device="cpu"))
    tta = predict(model, ring, SPEC, PredictOptions(device="cpu", tta=True))
    np.testing.assert_allclose(tta.probs, plain.probs, atol=1e-6)
    np.testing.assert_allclose(tta.logits, plain.logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from deploy_util import calibrated_run, synth_file

    tmp = tmp_path_factory.mktemp("tta")
    run = calibrated_run(tmp, n_cal=45)
    return {"run": run, "data": synth_file(tmp / "fab.npz", 20, seed=5)}


def test_evaluate_tta_changes_the_probabilities_and_says_so(setup: dict[str, Path], tmp_path: Path) -> None:
    metrics = {}
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        out = tmp_path / name
        assert main(["evaluate", str(setup["run"]), "--data", str(setup["data"]), "--out", str(out),
                     "--no-progress", *extra]) == 0
        metrics[name] = json.loads((out / "metrics.json").read_text())
    assert metrics["plain"]["n"] == metrics["tta"]["n"] == 20
    assert metrics["plain"]["ece"] != metrics["tta"]["ece"]  # random weights: not rotation-invariant
    assert "| tta | true |" in (tmp_path / "tta" / "report.md").read_text()
    assert "| tta | false |" in (tmp_path / "plain" / "report.md").read_text()


def test_predict_tta_with_the_torch_backend(setup: dict[str, Path], tmp_path: Path) -> None:
    frames = {}
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(setup["run"]), "--data", str(setup["data"]), "--out", str(out),
                     "--no-progress", *extra]) == 0
        frames[name] = pd.read_csv(out, keep_default_na=False)
    assert len(frames["tta"]) == 20 and list(frames["tta"].columns) == list(frames["plain"].columns)
    assert not np.allclose(frames["plain"]["prob"], frames["tta"]["prob"], atol=1e-4)


# ------------------------------------------------------------------------------------------- autocast
class Recorder(nn.Module):
    """Records, at each forward, whether CPU bf16 autocast, cuDNN TF32 and CUDA-matmul TF32 were on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.cam_target_layer = self.conv
        self.seen: list[tuple[bool, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.backends.cudnn.allow_tf32,
                          torch.backends.cuda.matmul.allow_tf32))
        return self.conv(x).mean(dim=(2, 3))


def test_autocast_policy_reaches_the_forward_and_off_turns_tf32_off_then_back_on() -> None:
    """``off`` is float32 on a GPU too: cuDNN's default TF32 convolutions (10-bit mantissas) are switched
    off for the forward and the caller's flags restored; ``bf16`` autocasts anywhere, ``auto`` on CUDA."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    model = Recorder()
    try:
        for policy in AUTOCAST_POLICIES:
            predict(model, wafers(3), SPEC, PredictOptions(device="cpu", autocast=policy))
        after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    assert dict(zip(AUTOCAST_POLICIES, model.seen)) == {
        "auto": (False, True, True), "off": (False, False, False), "bf16": (True, True, True)}
    assert after == (True, True)


def test_predict_autocast_flag_reaches_the_model_and_the_onnx_backend_refuses_bf16(
        setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frames = {}
    for policy in ("off", "bf16"):
        out = tmp_path / f"{policy}.csv"
        assert main(["predict", str(setup["run"]), "--data", str(setup["data"]), "--out", str(out),
                     "--no-progress", "--autocast", policy]) == 0
        frames[policy] = pd.read_csv(out, keep_default_na=False)
    diff = np.abs(frames["off"]["prob"] - frames["bf16"]["prob"]).max()
    assert 0 < diff < 0.2  # bf16's 8-bit mantissas moved every probability a little, none a lot
    capsys.readouterr()
    rc = main(["predict", str(setup["run"]), "--data", str(setup["data"]), "--out", str(tmp_path / "x.csv"),
               "--backend", "onnx", "--autocast", "bf16", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--autocast bf16" in err[0] and "float32" in err[0]
    assert not (tmp_path / "x.csv").exists()
