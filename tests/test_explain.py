"""Explanations: CAM shapes/ranges/masking, every method and model, memory, localisation, faithfulness,
CLI."""

from __future__ import annotations

import gc
import json
import resource
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from waferlab.cli import main
from waferlab.engine.predict import InputSpec
from waferlab.errors import WaferlabError
from waferlab.explain.cam import (
    METHODS,
    compute_cams,
    layer_has_hooks,
    parse_methods,
    postprocess,
    probabilities,
)
from waferlab.explain.faithfulness import faithfulness, perturbation_curves, relevance_ranks, road_scores
from waferlab.explain.localization import localisation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
S = 32


def _spec(n_classes: int = 3, encoding: str = "onehot", size: int = S) -> InputSpec:
    return InputSpec(image_size=size, encoding=encoding, class_names=tuple(f"c{k}" for k in range(n_classes)))


ONEHOT3 = _spec(3)
ONEHOT2 = _spec(2)


class TinyCNN(nn.Module):
    """A small GAP classifier with an 8x8 CAM layer at 32 px; two-class output is a single decision."""

    def __init__(self, in_chans: int = 3, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.cam_target_layer = self.features[-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.binary = num_classes == 2
        self.classifier = nn.Linear(2 * width, 1 if self.binary else num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.classifier(self.pool(self.features(x)).flatten(1))
        # two classes as one logit z: class 1's score is the decision itself, not a common-mode term
        return torch.cat([-z / 2, z / 2], dim=1) if self.binary else z


def _disc(n: int, size: int = S, seed: int = 0, p_fail: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    wafer = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2 < (size / 2 - 1) ** 2
    dies = rng.choice([1, 2], p=[1 - p_fail, p_fail], size=(n, size, size))
    return np.where(wafer, dies, 0).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(num_classes=3).eval()


# ----------------------------------------------------------------------------------------- CAM basics


def test_every_method_shapes_ranges_and_wafer_mask(tiny):
    maps = _disc(6)
    res = compute_cams(tiny, maps, ONEHOT3, list(METHODS), batch_size=4)
    assert set(res.cams) == set(METHODS)
    assert res.feature_hw == (8, 8)
    assert res.probs.shape == (6, 3) and np.allclose(res.probs.sum(1), 1, atol=1e-5)
    assert np.array_equal(res.targets, res.probs.argmax(1))  # default target: the predicted class
    off_wafer = maps == 0
    for name, cam in res.cams.items():
        assert cam.shape == (6, S, S) and cam.dtype == np.float32, name
        assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1, name
        assert (cam[off_wafer] == 0).all(), f"{name}: heat outside the wafer"
        peaks = cam.reshape(6, -1).max(1)
        assert np.all((np.abs(peaks - 1) < 1e-6) | (peaks == 0)), name
        assert (peaks == 1).sum() >= 5, f"{name}: CAMs are flat"
    assert not layer_has_hooks(tiny.cam_target_layer)  # the library's context manager released them


def test_explicit_targets_change_the_cam_and_gray_encoding_works():
    torch.manual_seed(1)
    model = TinyCNN(in_chans=1, num_classes=3).eval()
    maps = _disc(4, seed=3)
    gray3 = _spec(3, "gray")
    a = compute_cams(model, maps, gray3, ["gradcam"], targets=[0, 0, 0, 0]).cams["gradcam"]
    b = compute_cams(model, maps, gray3, ["gradcam"], targets=[2, 2, 2, 2]).cams["gradcam"]
    assert not np.allclose(a, b)
    with pytest.raises(WaferlabError, match="out of range"):
        compute_cams(model, maps, gray3, ["gradcam"], targets=[5, 0, 0, 0])


def test_maps_are_resized_to_the_image_size(tiny):
    maps = _disc(3, size=45)
    res = compute_cams(tiny, maps, ONEHOT3, ["gradcam"])
    assert res.cams["gradcam"].shape == (3, S, S)


def test_works_inside_no_grad_and_with_frozen_weights(tiny):
    for p in tiny.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            cam = compute_cams(tiny, _disc(2), ONEHOT3, ["gradcam++"]).cams["gradcam++"]
        assert cam.max() == 1.0
    finally:
        for p in tiny.parameters():
            p.requires_grad_(True)


def test_unknown_method_is_a_one_line_user_error():
    assert parse_methods("GradCAM, gradcam++,gradcam") == ["gradcam", "gradcam++"]
    with pytest.raises(WaferlabError, match="unknown CAM method 'fullgradx'"):
        parse_methods("gradcam,fullgradx")
    with pytest.raises(WaferlabError):
        parse_methods(" , ")


def test_cli_unknown_method_fails_before_loading_anything(tmp_path, capsys):
    code = main(["explain", str(tmp_path / "no_run"), "--data", "x.pkl", "--out", str(tmp_path / "o"),
                 "--methods", "gradcam,bogus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown CAM method 'bogus'" in err[0]


def test_postprocess_masks_and_rescales():
    maps = _disc(2)
    raw = np.random.default_rng(0).random((2, S, S)).astype(np.float32) * 0.3
    raw[0, 0, 0] = 5.0  # a peak off the wafer must not set the scale
    raw[1] = np.nan
    out = postprocess(raw, maps)
    assert (out[maps == 0] == 0).all()
    assert out[0].max() == pytest.approx(1.0) and (out[1] == 0).all()


def test_heat_is_normalised_over_the_wafer_only():
    """A no-die pixel with low raw heat must not set the minimum: the wafer's own range maps to [0, 1]."""
    maps = np.array([[[0, 1], [1, 2]]], np.uint8)
    raw = np.array([[[-9.0, 2.0], [3.0, 4.0]]], np.float32)  # the no-die corner is far below the wafer
    out = postprocess(raw, maps)
    np.testing.assert_allclose(out[0], [[0.0, 0.0], [0.5, 1.0]], atol=1e-6)
    flat = postprocess(np.full((1, 2, 2), 5.0, np.float32), maps)
    assert (flat == 0).all()  # heat constant over the wafer carries no location


def test_study_gradcampp_weights_hand_computed():
    from waferlab.explain.cam import study_gradcampp_weights

    acts = np.array([[[[1, 0], [2, 1]], [[0, 1], [0, 0]]]], np.float64)
    grads = np.array([[[[1, 1], [1, 1]], [[-1, 2], [0, 0]]]], np.float64)
    # channel 0: sum A g^3 = 4, alpha = 1/6 everywhere, weight = 4 * 1/6 * exp(0) = 2/3
    # channel 1: sum A g^3 = 8, alpha = [[1/10, 4/16], [0, 0]] (den 8 where g = 0), ReLU(g) = [[0, 2], [0, 0]]
    w = study_gradcampp_weights(acts, grads, np.array([0.0]))
    np.testing.assert_allclose(w, [[2 / 3, 0.5]], rtol=1e-6)
    scaled = study_gradcampp_weights(acts, grads, np.array([np.log(3.0)]))
    np.testing.assert_allclose(scaled, 3 * w, rtol=1e-6)


class _LinearOnInput(nn.Module):
    """Class 0's score is sum(C * x) over the encoded input; the CAM layer is the input: A = x, g = C."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.cam_target_layer = nn.Identity()
        self.register_buffer("c", c)
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.cam_target_layer(x)
        s0 = (a * self.c).flatten(1).sum(1)
        return torch.stack([s0, torch.zeros_like(s0)], 1) + self.bias


def test_study_gradcampp_method_matches_the_formula_end_to_end():
    rng = np.random.default_rng(0)
    maps = rng.choice([1, 2], size=(2, 4, 4)).astype(np.uint8)
    maps[:, 0, 0] = 0
    c = torch.from_numpy(rng.normal(size=(3, 4, 4)).astype(np.float32))
    model = _LinearOnInput(c).eval()
    cam = compute_cams(model, maps, _spec(2, size=4), ["gradcam++exp"], targets=[0, 0]).cams["gradcam++exp"]
    x = np.stack([maps == 0, maps == 1, maps == 2], 1).astype(np.float64)  # onehot: A
    g = np.broadcast_to(c.numpy().astype(np.float64), x.shape)
    expected = []
    for i in range(2):  # the formula written out per channel, independently of the implementation
        score = float((x[i] * g[i]).sum())
        raw = np.zeros((4, 4))
        for k in range(3):
            den = 2 * g[i, k] ** 2 + (x[i, k] * g[i, k] ** 3).sum()
            alpha = g[i, k] ** 2 / (np.where(den != 0, den, 1.0) + 1e-7)
            raw += (alpha * np.maximum(np.exp(score) * g[i, k], 0)).sum() * x[i, k]
        expected.append(np.maximum(raw, 0))
    np.testing.assert_allclose(cam, postprocess(np.array(expected, np.float32), maps), atol=1e-5)


@pytest.mark.parametrize("name,option,hw", [("resnet34", 8, (8, 8)), ("cbam", 16, (4, 4)),
                                            ("pan_inverse", 8, (8, 8)), ("spanet", 8, (8, 8))])
def test_output_stride_option_keeps_a_cam_grid_at_64_px(name, option, hw):
    from waferlab.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=3, output_stride=option)
    res = compute_cams(model, _disc(1, size=64), _spec(3, size=64), ["gradcam"])
    assert res.feature_hw == hw and res.cams["gradcam"].shape == (1, 64, 64)
    with pytest.raises(WaferlabError, match="output_stride"):
        create_model(name, num_classes=3, output_stride=12)


def test_every_registered_model_cam_target_layer():
    from waferlab.models import create_model, list_models

    names = list_models()
    assert names, "no models registered"
    maps = _disc(2)
    for name in names:
        torch.manual_seed(0)
        model = create_model(name, num_classes=4, in_chans=3)
        res = compute_cams(model, maps, _spec(4), ["gradcam"], batch_size=2)
        cam = res.cams["gradcam"]
        assert cam.shape == (2, S, S), name
        assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1, name
        assert (cam[maps == 0] == 0).all(), name
        assert res.feature_hw[0] >= 1, name
        assert (res.feature_hw == (1, 1)) == bool(res.notes), name  # a flat CAM layer is reported
        assert not layer_has_hooks(model.cam_target_layer), name


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class _PeakRss(threading.Thread):
    """Samples this process's resident memory every few milliseconds while a block runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_mb()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> _PeakRss:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self.join()
        self.peak = max(self.peak, _rss_mb())


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_no_memory_growth_over_1000_maps():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=3, width=32).eval()  # ~3 MB of activations per batch: a leak would show
    maps = _disc(1000, seed=5)
    compute_cams(model, maps[:100], ONEHOT3, ["gradcam"], batch_size=25)  # warm-up
    gc.collect()
    with _PeakRss() as small:
        compute_cams(model, maps[:100], ONEHOT3, ["gradcam"], batch_size=25)  # 4 CAM batches
    gc.collect()
    objects_before, rss_before = len(gc.get_objects()), _rss_mb()
    with _PeakRss() as big:
        res = compute_cams(model, maps, ONEHOT3, ["gradcam"], batch_size=25)  # 40 CAM batches
    assert res.cams["gradcam"].shape == (1000, S, S)
    del res
    for _ in range(3):
        compute_cams(model, maps[:100], ONEHOT3, ["gradcam"], batch_size=25)
    gc.collect()
    grown_objects = len(gc.get_objects()) - objects_before
    assert grown_objects < 500, f"{grown_objects} python objects leaked"
    # 1000 maps hold a 4 MB result plus temporaries; a graph or activations kept per batch would add >100 MB
    assert big.peak - small.peak < 60, f"peak RSS {small.peak:.0f} MB (100 maps) -> {big.peak:.0f} MB (1000)"
    assert _rss_mb() - rss_before < 40, f"RSS grew {_rss_mb() - rss_before:.0f} MB and stayed"
    assert not layer_has_hooks(model.cam_target_layer)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------- faithfulness units


def test_relevance_ranks_order_failed_dies_and_break_ties_at_random():
    m = np.ones((1, 4, 4), np.uint8)
    m[0, 0, :] = 2
    cam = np.zeros((1, 4, 4), np.float32)
    cam[0, 0, 3], cam[0, 0, 1] = 1.0, 0.5
    r = relevance_ranks(m, cam, seed=0)
    assert r[0, 0, 3] == 0 and r[0, 0, 1] == 1 and sorted(r[0, 0, [0, 2]]) == [2, 3]
    assert (r[0, 1:] > 1000).all()  # good dies are never touched
    zero = np.zeros((1, 1, 64), np.float32)
    big = np.full((1, 1, 64), 2, np.uint8)
    orders = {tuple(relevance_ranks(big, zero, seed=s)[0, 0]) for s in range(3)}
    assert len(orders) == 3 and tuple(range(64)) not in orders  # ties: random, not raster order


def test_curve_end_points_are_the_original_and_the_all_good_wafer(tiny):
    maps = _disc(5, seed=2)
    targets = np.array([0, 1, 2, 0, 1])
    res = compute_cams(tiny, maps, ONEHOT3, ["gradcam"], targets=targets)
    curves = perturbation_curves(tiny, maps, relevance_ranks(maps, res.cams["gradcam"]), targets, ONEHOT3,
                                 steps=10, batch_size=7)
    p_orig = probabilities(tiny, maps, ONEHOT3)[np.arange(5), targets]
    p_good = probabilities(tiny, np.minimum(maps, 1), ONEHOT3)[np.arange(5), targets]
    np.testing.assert_allclose(curves.deletion[:, 0], p_orig, atol=1e-5)
    np.testing.assert_allclose(curves.insertion[:, -1], p_orig, atol=1e-5)
    np.testing.assert_allclose(curves.deletion[:, -1], p_good, atol=1e-5)
    np.testing.assert_allclose(curves.insertion[:, 0], p_good, atol=1e-5)
    assert curves.deletion.shape == (5, 11) and np.all(np.isfinite(curves.deletion_auc()))


def test_localisation_scores_on_known_cams():
    maps = _disc(3)
    masks = np.zeros_like(maps)
    masks[:, 12:20, 12:20] = 1
    perfect = masks.astype(np.float32)
    inverse = np.where(maps > 0, 1.0 - perfect, 0.0)
    flat = np.zeros_like(perfect)
    good = localisation(perfect, masks, maps, top_fraction=64 / (maps[0] > 0).sum())
    bad = localisation(inverse, masks, maps)
    none = localisation(flat, masks, maps)
    assert np.all(good["pointing_game"] == 1) and np.allclose(good["iou_threshold"], 1)
    assert np.allclose(good["iou_top"], 1)
    assert np.all(bad["pointing_game"] == 0) and np.all(bad["iou_threshold"] == 0)
    assert np.all(none["pointing_game"] == 0) and np.all(none["iou_top"] == 0)
    area = (maps[0] > 0).sum()
    assert good["pointing_chance"][0] == pytest.approx(64 / area)
    empty = localisation(perfect, np.zeros_like(masks), maps)
    assert np.all(np.isnan(empty["pointing_game"]))  # no pattern region: not scored


def test_pointing_game_scores_a_tied_peak_by_its_share_in_the_region():
    """A plateau peak (an upsampled coarse CAM, a binary one) is not scored by its first raster pixel."""
    maps = _disc(2)
    masks = np.zeros_like(maps)
    masks[:, 16:22, 16:22] = 1
    cam = masks.astype(np.float32)
    cam[:, 6:12, 10:16] = 1.0  # an equal peak outside the region, earlier in raster order
    loc = localisation(cam, masks, maps)
    np.testing.assert_allclose(loc["pointing_game"], 0.5)
    cam[:, 6:12, 10:16] = 0.99  # a lower second mode: the single peak is inside
    np.testing.assert_allclose(localisation(cam, masks, maps)["pointing_game"], 1.0)


def test_mass_inside_iou_k_and_fail_mass_lift_on_known_cams():
    from waferlab.explain.localization import fail_mass_lift

    maps = _disc(2)
    maps[:, 12:20, 12:20] = 2  # a failed block, the pattern region
    masks = np.zeros_like(maps)
    masks[:, 12:20, 12:20] = 1
    wafer = maps > 0
    on = masks.astype(np.float32)
    off = np.where(wafer, 1.0 - on, 0.0).astype(np.float32)  # the inverted CAM
    good, bad = localisation(on, masks, maps), localisation(off, masks, maps)
    assert np.allclose(good["mass_inside"], 1) and np.allclose(good["iou_k"], 1)
    assert np.allclose(bad["mass_inside"], 0) and np.allclose(bad["iou_k"], 0)
    m, a = 64, wafer[0].sum()
    assert good["iou_k_chance"][0] == pytest.approx((m * m / a) / (2 * m - m * m / a))
    share = (maps[0] == 2).sum() / a  # failed dies: the block and the random failures of _disc
    lift_on = fail_mass_lift(on, maps)
    assert lift_on[0] == pytest.approx(1 / share)  # all heat on failed dies
    uniform = fail_mass_lift(wafer.astype(np.float32), maps)
    np.testing.assert_allclose(uniform, 1.0)  # uniform heat: no better than the failed dies' share
    assert np.isnan(fail_mass_lift(np.zeros_like(on), maps)).all()


def test_road_runs_on_wafer_inputs(tiny):
    maps = _disc(3)
    res = compute_cams(tiny, maps, ONEHOT3, ["gradcam"])
    scores = road_scores(tiny, maps, res.cams["gradcam"], res.targets, ONEHOT3, percentiles=(20, 80))
    assert scores.shape == (3,) and np.all(np.isfinite(scores)) and np.all(np.abs(scores) <= 1)


# --------------------------------------------------------------- a briefly trained model: does it point?


@pytest.fixture(scope="module")
def center_model():
    """TinyCNN trained for a few seconds on synthetic Center vs (none, Scratch) maps; held-out Center maps."""
    from waferlab.data.cache import prepare
    from waferlab.data.encode import encode
    from waferlab.data.synth import generate

    classes = ["Center", "none", "Scratch"]
    train = prepare(generate(300, seed=1, classes=classes), S)
    test = prepare(generate(150, seed=2, classes=classes), S)
    x = encode(torch.from_numpy(train.maps), "onehot")
    y = torch.from_numpy((train.labels == train.class_names.index("Center")).astype(np.int64))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyCNN(num_classes=2)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(10):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            b = perm[i:i + 32]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    is_center = test.labels == test.class_names.index("Center")
    acc = (probabilities(model, test.maps, ONEHOT2).argmax(1) == is_center).mean()
    idx = np.flatnonzero(is_center)
    return model, test.maps[idx], test.masks[idx], float(acc)


def test_trained_model_points_at_the_center_region(center_model):
    model, maps, masks, acc = center_model
    assert acc > 0.8, f"the test model did not learn (accuracy {acc:.2f})"
    res = compute_cams(model, maps, ONEHOT2, ["gradcam", "gradcam++"], targets=np.ones(len(maps), int))
    for name in ("gradcam", "gradcam++"):
        loc = localisation(res.cams[name], masks, maps)
        hit, chance = np.nanmean(loc["pointing_game"]), np.nanmean(loc["pointing_chance"])
        assert chance < 0.3
        assert hit > 2 * chance and hit > chance + 0.15, f"{name}: pointing {hit:.2f} vs chance {chance:.2f}"
        assert np.nanmean(loc["iou_top"]) > np.nanmean(loc["iou_top_chance"])


def test_cam_deletion_beats_a_random_die_order(center_model):
    model, maps, _, _ = center_model
    targets = np.ones(len(maps), int)
    cams = compute_cams(model, maps, ONEHOT2, ["gradcam"], targets=targets).cams["gradcam"]
    cam_scores = faithfulness(model, maps, cams, targets, ONEHOT2, steps=10)
    rnd = [np.nanmean(faithfulness(model, maps, None, targets, ONEHOT2, steps=10, seed=s)["deletion_auc"])
           for s in range(2)]
    assert np.nanmean(cam_scores["deletion_auc"]) < min(rnd) - 0.02
    rnd_ins = np.nanmean(faithfulness(model, maps, None, targets, ONEHOT2, steps=10)["insertion_auc"])
    assert np.nanmean(cam_scores["insertion_auc"]) > rnd_ins


# ------------------------------------- the default preset's models put the heat on the pattern (issue 11)


def _mean_heat_inside_and_outside(cams: np.ndarray, masks: np.ndarray, maps: np.ndarray
                                  ) -> tuple[float, float]:
    wafer = maps > 0
    inside = (masks > 0) & wafer
    return float(cams[inside].mean()), float(cams[wafer & ~inside].mean())


@pytest.mark.parametrize(("model", "size", "options"), [
    ("spanet", 96, {}),  # stride 32 (its official layout): a 3x3 CAM layer at 96 px
    ("pan", 32, {}),  # the study's PAN: its last GAU at stride 4, 8x8 at 32 px
])
def test_default_preset_cam_heat_sits_on_the_center_pattern(tmp_path, model, size, options):
    """After a short training with the default preset on synthetic Center/none/Loc maps, the CAM's mean heat
    on Center's true region exceeds its mean heat on the rest of the wafer, for GradCAM and GradCAM++.

    An inverted CAM (heat on the good dies around the blob, as the plain GAP models of issue 11 gave) fails.
    """
    from waferlab.data.cache import load_prepared
    from waferlab.data.synth import write_synthetic
    from waferlab.engine.config import build_config
    from waferlab.engine.run import Run
    from waferlab.engine.train import train

    classes = ["Center", "none", "Loc"]
    write_synthetic(tmp_path / "train.npz", n=300, seed=3, classes=classes)
    write_synthetic(tmp_path / "test.npz", n=30, seed=4, classes=["Center"])
    torch.set_num_threads(1)
    cfg = build_config("default", {"model": model, "data": str(tmp_path / "train.npz"),
                                   "out": str(tmp_path / "run"), "epochs": 2, "image_size": size,
                                   "batch_size": 32, "progress": False, "precise_bn_batches": 4,
                                   "model_options": options})
    assert cfg.head == "failpool"
    train(cfg)
    run = Run.open(tmp_path / "run")
    spec, net = run.spec(), run.load_model()
    test = load_prepared(str(tmp_path / "test.npz"), size)
    center = spec.class_names.index("Center")
    res = compute_cams(net, test.maps, spec, ["gradcam", "gradcam++"], targets=np.full(len(test), center))
    for name, cams in res.cams.items():
        inside, outside = _mean_heat_inside_and_outside(cams, test.masks, test.maps)
        assert inside > outside, f"{model} {name}: mean heat {inside:.2f} on the region, {outside:.2f} off"
        flipped = np.where(test.maps > 0, 1.0 - cams, 0.0)  # the check itself rejects an inverted CAM
        assert np.greater(*_mean_heat_inside_and_outside(flipped, test.masks, test.maps)) is np.False_


# ------------------------------------------------------------------------------------------- figures


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 50 and im.size[1] > 50


def test_figures_are_pngs_and_heat_covers_only_the_wafer(tmp_path, tiny):
    from waferlab.explain.figures import (
        GridRow,
        draw_overlay,
        plot_comparison,
        plot_map_overlays,
        plot_study_grid,
    )
    from waferlab.plotting import use_agg

    use_agg()
    import matplotlib.pyplot as plt

    maps = _disc(3)
    cams = compute_cams(tiny, maps, ONEHOT3, ["gradcam", "gradcam++"]).cams
    rows = [GridRow("Center", maps[0], {m: cams[m][0] for m in cams}, note="#0"), GridRow("Donut", None)]
    plot_study_grid(rows, ["gradcam", "gradcam++"], tmp_path / "grid.png", title="t")
    plot_map_overlays(maps[1], {m: cams[m][1] for m in cams}, "true A, predicted B (90%)", tmp_path / "m.png")
    cells = [[GridRow("A", maps[j], {"gradcam": cams["gradcam"][j]}, note=f"#{j}") for j in range(3)]] * 2
    plot_comparison(["run1", "run2"], cells, tmp_path / "cmp.png")
    for name in ("grid.png", "m.png", "cmp.png"):
        _assert_png(tmp_path / name)
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes leave no temp files

    fig, ax = plt.subplots()
    image = draw_overlay(ax, maps[0], np.ones((S, S), np.float32))  # heat everywhere, also off the wafer
    arr = image.get_array()
    assert np.array_equal(np.ma.getmaskarray(arr), maps[0] == 0)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run made by ``waferlab train`` on a few hundred synthetic maps (1 epoch, 32 px, a light model)."""
    pytest.importorskip("waferlab.engine.train")
    from waferlab.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("explain_e2e")
    data = root / "synth.npz"
    write_synthetic(data, n=270, seed=3)
    run = root / "run"
    code = main(["train", "--model", "mobilenetv2_100", "--data", str(data), "--out", str(run),
                 "--epochs", "1", "--image-size", str(S), "--batch-size", "64", "--no-progress",
                 "--accelerator", "cpu"])
    assert code == 0 and (run / "model.safetensors").is_file()
    return run, data


def test_cli_scores_end_to_end(trained_run, tmp_path, capsys):
    run, data = trained_run
    out = tmp_path / "explain"
    code = main(["explain", str(run), "--data", str(data), "--out", str(out), "--json",
                 "--methods", "gradcam", "--per-class", "1", "--score-per-class", "2", "--steps", "4",
                 "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "gradcam" in captured.out and "random" in captured.out  # the score table
    # mobilenetv2 downsamples 32x: at 32 px its CAM layer is 1x1, which the command must say
    assert "1x1" in captured.err
    _assert_png(out / "run" / "study_grid.png")
    figures = sorted((out / "run" / "maps").glob("map_*.png"))
    assert len(figures) == 9  # the first map of each of the 9 classes
    _assert_png(figures[0])
    doc = json.loads((out / "scores.json").read_text())
    assert list(doc["models"]) == ["run"] and doc["methods"] == ["gradcam"]
    s = doc["models"]["run"]
    assert s["cam_layer_hw"] == [1, 1] and s["notes"]
    overall = s["methods"]["gradcam"]["overall"]
    for key in ("deletion_auc", "insertion_auc", "road", "pointing_game", "pointing_chance", "iou_top"):
        assert key in overall
    assert 0 <= overall["deletion_auc"] <= 1 and 0 <= overall["insertion_auc"] <= 1
    assert overall["n_maps"] == 18
    assert overall["n_maps"] == sum(b["n_maps"] for b in s["methods"]["gradcam"]["per_class"].values())
    assert s["random_order"]["overall"]["deletion_auc"] is not None


def test_cli_comparison_grid_and_selected_maps(trained_run, tmp_path):
    run, data = trained_run
    out = tmp_path / "cmp"
    assert main(["explain", str(run), str(run), "--data", str(data), "--out", str(out), "--maps", "4,2",
                 "--methods", "gradcam,layercam", "--no-progress"]) == 0
    for name in ("run", "run_2"):
        figures = sorted(p.name for p in (out / name / "maps").glob("*.png"))
        assert len(figures) == 2
        assert figures[0].startswith("map_00002_") and figures[1].startswith("map_00004_")
    for method in ("gradcam", "layercam"):
        _assert_png(out / f"compare_{method}.png")
    assert not (out / "scores.json").exists()


def test_cli_errors_are_one_line(trained_run, tmp_path, capsys):
    run, data = trained_run
    base = ["--out", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["explain", str(run), "--data", str(data), *base, "--maps", "0,99999"], "out of range"),
        (["explain", str(tmp_path / "missing"), "--data", str(data), *base], "not found"),
        (["explain", str(run), "--data", str(tmp_path / "nope.pkl"), *base], "not found"),
        (["explain", str(run), "--data", str(data), *base, "--maps", "1,x"], "--maps"),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)


def test_test_part_explains_only_the_runs_held_out_maps(trained_run, tmp_path):
    from waferlab.engine.config import config_from_dict
    from waferlab.engine.run import Run
    from waferlab.engine.train import load_split_data
    from waferlab.explain.runner import ExplainSettings, _test_part, explain_runs

    run, data = trained_run
    info = Run.open(run).info
    split = load_split_data(config_from_dict({**info.config, "progress": False}))
    summary = explain_runs([str(run)], str(data), str(tmp_path / "tp"),
                           ExplainSettings(methods="gradcam", per_class=0, test_part=True, progress=False))
    entry = summary["runs"]["run"]
    assert entry["n_maps"] == len(split.test) < 270 and entry["selected_maps"] == []
    _assert_png(tmp_path / "tp" / "run" / "study_grid.png")
    # the explainer's own reproduction of the split picks exactly training's test maps
    mine = _test_part(str(data), Run.open(run).info.config, info.image_size, progress=False)
    np.testing.assert_array_equal(mine.maps, split.data.subset(split.test).maps)
