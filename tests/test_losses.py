"""Losses: Circle loss against a hand computation, focal vs CE, class weights, the factory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from waferlab.engine.config import TASKS
from waferlab.errors import WaferlabError
from waferlab.losses import (
    LOSS_NAMES,
    LOSS_TASKS,
    AsymmetricLoss,
    CircleLoss,
    FocalLoss,
    build_loss,
    check_loss_task,
    class_weights,
)
from waferlab.models.heads import CosineClassifier


def test_circle_loss_matches_hand_computation() -> None:
    s = torch.tensor([[0.8, 0.1, -0.3], [0.2, 0.6, 0.5]])
    y = torch.tensor([0, 2])
    gamma, m = 8.0, 0.25
    # sample 1, positive class 0: alpha_p = 1.25 - 0.8 = 0.45, z0 = 8 * 0.45 * (0.8 - 0.75) = 0.18
    #   negatives: s=0.1 -> alpha_n = 0.35, z1 = 8*0.35*(0.1 - 0.25) = -0.42; s=-0.3 -> alpha_n = 0, z2 = 0
    z0, z1, z2 = 0.18, -0.42, 0.0
    loss1 = -z0 + math.log(math.exp(z0) + math.exp(z1) + math.exp(z2))
    # sample 2, positive class 2: alpha_p = 1.25 - 0.5 = 0.75, z2 = 8 * 0.75 * (0.5 - 0.75) = -1.5
    #   negatives: s=0.2 -> alpha_n=0.45, z0 = 8*0.45*(-0.05) = -0.18; s=0.6 -> 0.85, z1 = 8*0.85*0.35 =2.38
    z0, z1, z2 = -0.18, 2.38, -1.5
    loss2 = -z2 + math.log(math.exp(z0) + math.exp(z1) + math.exp(z2))
    expected = (loss1 + loss2) / 2
    got = CircleLoss(gamma=gamma, margin=m)(s, y)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_circle_loss_default_scale_and_gradients_through_cosine_head() -> None:
    torch.manual_seed(0)
    head = CosineClassifier(16, 4)
    feats = torch.randn(6, 16, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = CircleLoss()(head(feats), y)
    assert loss.item() > 0 and math.isfinite(loss.item())
    loss.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


def test_circle_loss_decreases_as_positive_similarity_grows() -> None:
    loss = CircleLoss(gamma=16)
    y = torch.tensor([1])
    low = loss(torch.tensor([[0.3, 0.2, 0.1]]), y)
    high = loss(torch.tensor([[0.3, 0.9, 0.1]]), y)
    assert high < low


def test_circle_softmax_mode_reproduces_official_variant_and_differs() -> None:
    logits = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4]])
    y = torch.tensor([0, 1])
    soft = CircleLoss(gamma=8, mode="softmax")
    assert soft.expects == "logits"
    official = CircleLoss(gamma=8, mode="cosine")(torch.softmax(logits, 1), y)  # softmax scores fed directly
    assert soft(logits, y).item() == pytest.approx(official.item(), rel=1e-6)
    assert abs(soft(logits, y).item() - CircleLoss(gamma=8)(logits, y).item()) > 1e-3


def test_circle_cosine_mode_rejects_logits() -> None:
    with pytest.raises(WaferlabError, match="cosine"):
        CircleLoss()(torch.tensor([[3.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(WaferlabError):
        CircleLoss(mode="arc")
    with pytest.raises(WaferlabError):
        CircleLoss(margin=1.5)


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 4)
    y = torch.randint(0, 4, (8,))
    assert FocalLoss(gamma=0)(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    assert FocalLoss(gamma=0, weight=w)(logits, y).item() == pytest.approx(
        F.cross_entropy(logits, y, weight=w).item(), rel=1e-6)
    # gamma > 0 down-weights easy examples: a confident correct prediction costs far less than under CE
    easy = torch.tensor([[6.0, 0.0, 0.0, 0.0]])
    assert FocalLoss(gamma=2)(easy, torch.tensor([0])) < 0.01 * F.cross_entropy(easy, torch.tensor([0]))


def test_class_weights_kinds() -> None:
    labels = [0, 0, 0, 1, -1]  # -1 (unlabeled) ignored; class 2 absent
    w = class_weights(labels, 3, "inverse")
    # 1/3 and 1/1, normalised to mean 1 over present classes -> 0.5, 1.5; absent class gets the largest
    assert torch.allclose(w, torch.tensor([0.5, 1.5, 1.5]))
    sq = class_weights(torch.tensor(labels), 3, "sqrt_inverse")
    r = 1 / math.sqrt(3)
    assert torch.allclose(sq[:2], torch.tensor([r, 1.0]) / ((r + 1) / 2))
    eff = class_weights(labels, 3, "effective", beta=0.9)
    e0, e1 = 0.1 / (1 - 0.9**3), 0.1 / (1 - 0.9)
    assert torch.allclose(eff[:2], torch.tensor([e0, e1]) / ((e0 + e1) / 2))
    assert w.dtype == torch.float32
    with pytest.raises(WaferlabError, match="kind"):
        class_weights(labels, 3, "log")
    with pytest.raises(WaferlabError, match="out of range"):
        class_weights([0, 5], 3)


def test_build_loss_factory() -> None:
    counts = [30, 10, 5]
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.1, 0.9]])
    y = torch.tensor([1, 2])
    assert build_loss("ce", 3).expects == "logits"
    wce = build_loss("weighted_ce", 3, counts)
    ref = F.cross_entropy(logits, y, weight=torch.tensor([1 / 30, 1 / 10, 1 / 5]))
    assert wce(logits, y).item() == pytest.approx(ref.item(), rel=1e-5)
    focal = build_loss("focal", 3, counts, gamma=0.0, kind="inverse")
    assert focal(logits, y).item() == pytest.approx(ref.item(), rel=1e-5)
    circle = build_loss("circle", 3, gamma=32, margin=0.1)
    assert isinstance(circle, CircleLoss) and circle.expects == "cosine" and circle.gamma == 32
    with pytest.raises(WaferlabError, match="unknown loss"):
        build_loss("hinge", 3)
    with pytest.raises(WaferlabError, match="unknown option"):
        build_loss("focal", 3, alpha=0.25)
    with pytest.raises(WaferlabError, match="class counts"):
        build_loss("weighted_ce", 3)
    with pytest.raises(WaferlabError, match="shape"):
        build_loss("weighted_ce", 3, [1, 2])


# ---------------------------------------------------------------------------------------- multi-label
_ML_LOGITS = torch.tensor([[0.0, 2.0, -1.0], [-0.5, 0.0, 3.0]])
_ML_TARGET = torch.tensor([[1, 0, 0], [0, 1, 1]])


def test_asl_matches_hand_computation() -> None:
    # L = -[y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m)], p_m = max(p - clip, 0);
    # summed over labels, averaged over maps
    # map 1: label 0 positive, p = 0.5:                (0.5)^1 * -log 0.5                 = 0.3465736
    #        label 1 negative, p = 0.8807971, p_m = 0.8307971: 0.8307971^4 * -log 0.1692029 = 0.8464150
    #        label 2 negative, p = 0.2689414, p_m = 0.2189414: 0.2189414^4 * -log 0.7810586 = 0.0005678
    # map 2: label 0 negative, p = 0.3775407, p_m = 0.3275407: 0.3275407^4 * -log 0.6724593 = 0.0045672
    #        label 1 positive, p = 0.5: 0.3465736
    #        label 2 positive, p = 0.9525741: 0.0474259 * -log 0.9525741 = 0.0474259 * 0.0485873 = 0.0023043
    expected = ((0.3465736 + 0.8464150 + 0.0005678) + (0.0045672 + 0.3465736 + 0.0023043)) / 2
    loss = build_loss("asl", 3, gamma_pos=1.0, gamma_neg=4.0, clip=0.05)
    assert isinstance(loss, AsymmetricLoss) and loss.expects == "logits"
    assert loss(_ML_LOGITS, _ML_TARGET).item() == pytest.approx(expected, abs=2e-6)
    assert expected == pytest.approx(0.7735007, abs=1e-6)


def test_bce_matches_hand_computation_and_asl_reduces_to_it() -> None:
    # -log sigmoid(x) for positives, -log(1 - sigmoid(x)) for negatives, summed per map, mean over the 2 maps
    terms = [math.log(2), math.log(1 + math.exp(2.0)), math.log(1 + math.exp(-1.0)),
             math.log(1 + math.exp(-0.5)), math.log(2), math.log(1 + math.exp(-3.0))]
    expected = sum(terms) / 2
    assert expected == pytest.approx(2.1745742, abs=1e-6)
    assert build_loss("bce", 3)(_ML_LOGITS, _ML_TARGET).item() == pytest.approx(expected, rel=1e-6)
    plain = build_loss("asl", 3, gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
    assert plain(_ML_LOGITS, _ML_TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_asl_down_weights_easy_negatives_and_has_gradients() -> None:
    x = torch.tensor([[-3.0, 0.5, 4.0]], requires_grad=True)
    y = torch.tensor([[0, 0, 1]])
    asl, bce = build_loss("asl", 3), build_loss("bce", 3)
    assert asl(x, y).item() < bce(x, y).item()
    asl(x, y).backward()
    assert x.grad[0, 0].item() == 0.0  # p = 0.047 < clip: the easy negative is discarded entirely
    assert x.grad[0, 1].item() > 0 and torch.isfinite(x.grad).all()


def test_multilabel_loss_task_checks() -> None:
    check_loss_task("asl", "multilabel")
    check_loss_task("ce", "multiclass")
    assert set(LOSS_TASKS.values()) == set(TASKS) and set(LOSS_TASKS) == set(LOSS_NAMES)
    with pytest.raises(WaferlabError, match="multiclass loss but the task is multilabel"):
        check_loss_task("weighted_ce", "multilabel")
    with pytest.raises(WaferlabError, match="unknown task"):
        check_loss_task("bce", "regression")
    with pytest.raises(WaferlabError, match="unknown option"):
        build_loss("asl", 3, gamma=2.0)
    with pytest.raises(WaferlabError, match="clip"):
        build_loss("asl", 3, clip=1.5)
    with pytest.raises(WaferlabError, match="multi-hot"):
        build_loss("bce", 3)(_ML_LOGITS, torch.tensor([0, 2]))


@pytest.mark.parametrize("name", ["ce", "weighted_ce", "focal"])
def test_rank_shares_make_ddp_average_the_global_batch_mean(name: str) -> None:
    """DDP averages the ranks' gradients; each rank's loss is a MEAN over its shard. Scaled by
    world * norm_k / sum(norm) (norm = batch_normaliser: rows, or the rows' class weights), the average of the
    shards' losses equals the global batch's loss, for a ragged split (7 + 6) with different class mixes.
    With rows as the norm, weighted_ce's shards (different class-weight sums) would not add up."""
    from waferlab.losses import batch_normaliser, build_loss

    kw = {"kind": "inverse"} if name == "focal" else {}
    crit = build_loss(name, 3, class_counts=[50, 10, 5] if name != "ce" else None, **kw)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(13, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 2, 1, 1, 2, 2, 2, 0])
    full = crit(logits.float(), y).double()
    shards = [(logits[:7], y[:7]), (logits[7:], y[7:])]
    norms = [batch_normaliser(crit, t) for _, t in shards]
    total = sum(norms)
    ddp = sum(crit(x.float(), t).double() * (2 * n / total) for (x, t), n in zip(shards, norms)) / 2
    assert float(ddp) == pytest.approx(float(full), rel=1e-6)
    rows = sum(crit(x.float(), t).double() * (2 * len(t) / 13) for x, t in shards) / 2
    if name == "ce":
        assert float(rows) == pytest.approx(float(full), rel=1e-6)
    else:  # the rows-only share (the previous fix) is wrong for weighted losses
        assert abs(float(rows) - float(full)) > 1e-3
