"""Outlier exposure: the generic anomalies, the extra rows of a training batch and the loss term."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from waferlab.data.anomalies import ANOMALY_KINDS, paint_anomalies
from waferlab.engine.config import build_config
from waferlab.errors import WaferlabError


def _wafers(n: int, size: int = 32) -> torch.Tensor:
    """Disc-shaped maps (0 outside) with a few failed dies, like prepared wafer maps."""
    ii = torch.arange(size) - (size - 1) / 2
    disc = (ii[:, None] ** 2 + ii[None, :] ** 2) <= (size / 2 - 1) ** 2
    g = torch.Generator().manual_seed(1)
    maps = torch.where(torch.rand((n, size, size), generator=g) < 0.05, 2, 1).to(torch.uint8)
    return torch.where(disc, maps, torch.zeros_like(maps))


def test_anomalies_keep_each_die_layout_and_are_seeded() -> None:
    maps = _wafers(64)
    a = paint_anomalies(maps, torch.Generator().manual_seed(0))
    assert a.shape == maps.shape and a.dtype == torch.uint8
    assert torch.equal(a == 0, maps == 0)  # no die stays no die, every die stays a die
    assert set(torch.unique(a).tolist()) == {0, 1, 2}
    failed = (a == 2).flatten(1).sum(1).float() / (maps > 0).flatten(1).sum(1)
    assert bool((failed > 0.02).all()) and bool((failed < 0.9).all())  # a pattern, never a full map
    assert torch.equal(a, paint_anomalies(maps, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, paint_anomalies(maps, torch.Generator().manual_seed(1)))
    assert len(ANOMALY_KINDS) == 4


def test_training_batches_carry_anomalies_only_with_outlier_exposure() -> None:
    from waferlab.engine.datamodule import OUTLIER_SHARE, SplitData, WaferDataModule

    maps = _wafers(40)
    prepared = SimpleNamespace(maps=maps.numpy(), labels=np.zeros(40, np.int64), class_names=("a", "b"))
    split = SplitData(prepared, np.arange(0, 30), np.arange(30, 40), np.arange(0))
    idx = torch.arange(0, 16)
    for weight, extra in ((0.0, 0), (0.5, 16 // OUTLIER_SHARE)):
        cfg = build_config("default", {"model": "resnet34", "image_size": 32, "augment": False},
                           [f"outlier_exposure={weight}"])
        data = WaferDataModule(cfg, split)
        x, y = data.gather(idx, train=True)
        assert (len(x), len(y)) == (16 + extra, 16)
        assert len(data.gather(idx, train=False)[0]) == 16  # validation batches never do


def test_outlier_exposure_loss_pushes_the_anomalies_towards_a_flat_softmax() -> None:
    from torch import nn

    from waferlab.engine.module import WaferClassifier, uniform_cross_entropy

    flat = torch.zeros(3, 5)
    peaked = torch.tensor([[4.0, 0, 0, 0, 0]] * 3)
    assert float(uniform_cross_entropy(flat)) == pytest.approx(np.log(5), rel=1e-6)
    assert float(uniform_cross_entropy(peaked)) > float(uniform_cross_entropy(flat)) + 1
    cfg = build_config("default", {"model": "resnet34", "image_size": 32}, ["outlier_exposure=0.5"])
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
    module = WaferClassifier(net, cfg, np.array([10, 10, 10, 10, 10]))
    module.log = lambda *a, **k: None  # no trainer attached
    module.__dict__["_trainer"] = SimpleNamespace(world_size=1)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3])
    loss = module.training_step((x, y), 0)
    out = net(x)
    expected = module.criterion(out[:4], y) + 0.5 * uniform_cross_entropy(out[4:])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


@pytest.mark.parametrize("sets, message", [
    (["outlier_exposure=-1"], "outlier_exposure must be >= 0"),
    (["outlier_exposure=0.5", "head=cosine", "loss=circle"], "outlier_exposure: needs task multiclass"),
])
def test_bad_outlier_exposure_settings_are_one_line_errors(sets: list[str], message: str) -> None:
    with pytest.raises(WaferlabError, match=message):
        build_config("default", {"model": "resnet34"}, sets)
