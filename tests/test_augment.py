"""Augmentation keeps wafer maps valid: values in {0,1,2}, die counts under dihedral transforms, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from maps_util import blob_wafers

from waferlab.data.augment import Augmenter, balance_by_rotation, dihedral, rotate_nearest
from waferlab.errors import WaferlabError


def wafers(n: int = 16, size: int = 32, seed: int = 0, fail: float = 0.2) -> torch.Tensor:
    """Round wafers with an off-centre blob of failures, so every transform is visible."""
    return torch.from_numpy(blob_wafers(n, size, seed, fail))


def all_dihedral(x: np.ndarray) -> list[np.ndarray]:
    rots = [np.rot90(x, k) for k in range(4)]
    return rots + [np.fliplr(r) for r in rots]


def test_dihedral_matches_torch_rot90_and_flips():
    x = torch.arange(2 * 5 * 5, dtype=torch.uint8).reshape(2, 5, 5)
    for k in range(4):
        for fv in (False, True):
            for fh in (False, True):
                expect = torch.rot90(x, k, dims=(1, 2))
                if fv:
                    expect = expect.flip(1)
                if fh:
                    expect = expect.flip(2)
                got = dihedral(x, torch.full((2,), k), torch.full((2,), fv), torch.full((2,), fh))
                torch.testing.assert_close(got, expect)


def test_dihedral_only_keeps_die_counts_and_is_one_of_the_eight():
    maps = wafers(24)
    aug = Augmenter(max_rotation=0.0, die_flip=0.0, generator=torch.Generator().manual_seed(0))
    out = aug(maps)
    assert out.dtype == torch.uint8 and out.shape == maps.shape
    for v in (0, 1, 2):
        torch.testing.assert_close((out == v).sum((1, 2)), (maps == v).sum((1, 2)))
    changed = 0
    for a, b in zip(maps.numpy(), out.numpy()):
        assert any(np.array_equal(b, t) for t in all_dihedral(a))
        changed += not np.array_equal(a, b)
    assert changed >= 12  # with 8 equally likely transforms most samples change


def test_full_augmentation_keeps_values_and_wafer_shape():
    maps = wafers(32, size=48)
    out = Augmenter(generator=torch.Generator().manual_seed(1))(maps)
    assert out.dtype == torch.uint8 and set(out.unique().tolist()) <= {0, 1, 2}
    dies_in, dies_out = (maps > 0).sum((1, 2)).float(), (out > 0).sum((1, 2)).float()
    assert ((dies_out - dies_in).abs() / dies_in).max() < 0.05  # a round wafer stays round under rotation
    assert not torch.equal(out, maps)
    assert maps.max() <= 2  # input untouched


def test_small_rotation_moves_the_pattern_by_about_the_angle():
    x = torch.zeros(1, 41, 41, dtype=torch.uint8)
    x[0, 20, 20:41] = 2  # a ray pointing right from the centre
    rotated = rotate_nearest(x, torch.tensor([90.0]))
    ys, xs = torch.nonzero(rotated[0] == 2, as_tuple=True)
    assert (xs == 20).all() and int(ys.numel()) >= 20  # now a vertical ray
    same = rotate_nearest(x, torch.tensor([0.0]))
    torch.testing.assert_close(same, x)


def test_die_flip_rate_close_to_p_and_no_die_untouched():
    maps = wafers(64, size=48, fail=0.0)
    p = 0.1
    out = Augmenter(rot90=False, flips=False, max_rotation=0.0, die_flip=p,
                    generator=torch.Generator().manual_seed(2))(maps)
    on = maps > 0
    torch.testing.assert_close(out == 0, maps == 0)  # no die stays no die, no die appears
    rate = ((out != maps) & on).sum().item() / on.sum().item()
    assert abs(rate - p) < 0.01
    assert set(out[on].unique().tolist()) == {1, 2}


def test_reproducible_with_a_seeded_generator():
    maps = wafers(8)
    a = Augmenter(generator=torch.Generator().manual_seed(7))(maps)
    b = Augmenter(generator=torch.Generator().manual_seed(7))(maps)
    c = Augmenter(generator=torch.Generator().manual_seed(8))(maps)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_single_map_empty_batch_non_square_and_eval():
    one = wafers(1)
    out = Augmenter(generator=torch.Generator().manual_seed(0))(one)
    assert out.shape == (1, 32, 32) and set(out.unique().tolist()) <= {0, 1, 2}
    empty = torch.zeros(0, 32, 32, dtype=torch.uint8)
    assert Augmenter()(empty).shape == (0, 32, 32)
    rect = torch.randint(0, 3, (6, 20, 30), dtype=torch.uint8)
    out = Augmenter(max_rotation=0.0, die_flip=0.0, generator=torch.Generator().manual_seed(0))(rect)
    assert out.shape == rect.shape  # only 0/180 degrees for non-square maps
    torch.testing.assert_close((out == 2).sum((1, 2)), (rect == 2).sum((1, 2)))
    aug = Augmenter().eval()
    maps = wafers(4)
    assert torch.equal(aug(maps), maps)


def test_bad_input_and_options():
    with pytest.raises(WaferlabError, match="uint8"):
        Augmenter()(torch.zeros(2, 8, 8))
    with pytest.raises(WaferlabError, match="uint8"):
        Augmenter()(torch.zeros(8, 8, dtype=torch.uint8))
    with pytest.raises(WaferlabError, match="die_flip"):
        Augmenter(die_flip=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_with_cpu_or_cuda_generator():
    maps = wafers(16)
    kwargs = dict(max_rotation=0.0, die_flip=0.05)
    on_gpu = Augmenter(generator=torch.Generator().manual_seed(0), **kwargs)(maps.cuda())
    on_cpu = Augmenter(generator=torch.Generator().manual_seed(0), **kwargs)(maps)
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), on_cpu)  # same draws, same result on either device
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = Augmenter(generator=gen)(maps.cuda())
    assert out.is_cuda and out.dtype == torch.uint8 and set(out.unique().tolist()) <= {0, 1, 2}
    out = Augmenter()(maps.cuda())  # global CUDA generator
    assert out.is_cuda and set(out.unique().tolist()) <= {0, 1, 2}


# ------------------------------------------------------------------------------------- offline balancing
def test_balance_by_rotation_reaches_targets_with_transformed_copies():
    maps = wafers(30, size=24).numpy()
    labels = np.array([0] * 20 + [1] * 7 + [2] * 3)
    out, lab, src = balance_by_rotation(maps, labels, {1: 35, 2: 45, 0: 10}, seed=0, return_source=True)
    counts = np.bincount(lab)
    assert counts.tolist() == [20, 35, 45]  # class 0 already above its target: unchanged
    np.testing.assert_array_equal(out[:30], maps)  # originals first, untouched
    assert set(np.unique(out).tolist()) <= {0, 1, 2} and out.dtype == np.uint8
    assert (labels[src] == lab).all()
    for i in range(30, len(out)):
        options = all_dihedral(maps[src[i]])
        is_dihedral = any(np.array_equal(out[i], t) for t in options)
        if i < 30 + 7 * 3 or lab[i] == 1:  # the first 7 rounds use the 7 non-identity dihedral transforms
            assert is_dihedral and not np.array_equal(out[i], maps[src[i]])
    # class 2: 3 originals, 42 copies -> later rounds rotate by small angles as well
    later = np.flatnonzero(lab == 2)[-9:]
    assert not any(np.array_equal(out[i], maps[src[i]]) for i in later)


def test_balance_by_rotation_is_seeded_and_validates():
    maps = wafers(5, size=16).numpy()
    labels = np.array([0, 0, 1, 1, 1])
    a = balance_by_rotation(maps, labels, {0: 40}, seed=1)
    b = balance_by_rotation(maps, labels, {0: 40}, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    assert (a[1] == 0).sum() == 40
    with pytest.raises(WaferlabError, match="square"):
        balance_by_rotation(np.zeros((2, 4, 5), np.uint8), [0, 1], {0: 3})
    with pytest.raises(WaferlabError, match="labels"):
        balance_by_rotation(maps, [0, 1], {0: 3})


# ------------------------------------------------------------------------------- domain randomisation
def _only(**options) -> Augmenter:
    """An Augmenter with the geometry and die flips off and ``options`` on (seeded)."""
    base = dict(rot90=False, flips=False, max_rotation=0.0, die_flip=0.0)
    return Augmenter(generator=torch.Generator().manual_seed(3), **{**base, **options})


def test_domain_options_are_seeded_and_keep_shape_dtype_and_values():
    maps = wafers(16, size=48)
    opts = dict(rescale=0.5, edge_loss=0.2, background_fail=0.05, fail_dropout=0.5)
    a = Augmenter(generator=torch.Generator().manual_seed(5), **opts)(maps)
    b = Augmenter(generator=torch.Generator().manual_seed(5), **opts)(maps)
    c = Augmenter(generator=torch.Generator().manual_seed(6), **opts)(maps)
    assert a.dtype == torch.uint8 and a.shape == maps.shape and set(a.unique().tolist()) <= {0, 1, 2}
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    # all off (their defaults): the same draws, so the same maps as an Augmenter without the options
    plain = Augmenter(generator=torch.Generator().manual_seed(5))(maps)
    torch.testing.assert_close(plain, Augmenter(generator=torch.Generator().manual_seed(5), rescale=0.0,
                                                edge_loss=0.0, background_fail=0.0, fail_dropout=0.0)(maps))


@pytest.mark.parametrize("option", [dict(rescale=1.0), dict(background_fail=0.3), dict(fail_dropout=0.8)])
def test_pattern_options_keep_the_no_die_outline(option):
    maps = wafers(16, size=48)
    out = _only(**option)(maps)
    torch.testing.assert_close(out == 0, maps == 0)
    assert not torch.equal(out, maps)


def test_rescale_thickens_a_thin_line_like_a_coarser_grid_does():
    from waferlab.data.augment import rescale_through_grid

    maps = wafers(8, size=48, fail=0.0)
    maps[maps == 2] = 1
    maps[:, 24, 8:40] = 2  # a one-die scratch
    coarse = rescale_through_grid(maps, torch.full((8,), 12))  # a 12-die grid: a die is 4 pixels of 48
    assert ((coarse[:, :, 20] == 2).sum(1) == 4).all()
    out = _only(rescale=1.0, rescale_min=12)(maps)  # grids of 12..47 dies: 1 to 4 pixels wide, never lost
    width = (out[:, :, 20] == 2).sum(1)
    assert (width >= 1).all() and width.float().mean() > 1.5
    assert torch.equal(_only(rescale=0.0, rescale_min=12)(maps), maps)
    # rescale_min above the map's size: nothing to resample through
    assert torch.equal(_only(rescale=1.0, rescale_min=48)(maps), maps)


def test_rescale_through_grid_leaves_maps_of_grid_zero_alone():
    from waferlab.data.augment import rescale_through_grid

    maps = wafers(4, size=32)
    out = rescale_through_grid(maps, torch.tensor([0, 8, 0, 16]))
    assert torch.equal(out[[0, 2]], maps[[0, 2]])
    assert not torch.equal(out[1], maps[1])


def test_background_fail_turns_only_good_dies_failed_at_up_to_the_rate():
    maps = wafers(64, size=48, fail=0.0)
    out = _only(background_fail=0.2)(maps)
    assert not ((maps == 2) & (out != 2)).any()  # fails stay failed
    new = ((maps == 1) & (out == 2)).sum((1, 2)).float() / (maps == 1).sum((1, 2)).float()
    assert new.max() <= 0.25 and 0.05 < new.mean() < 0.15  # per-map rates from U(0, 0.2)
    assert new.std() > 0.03  # the rate varies from map to map


def test_fail_dropout_turns_only_failed_dies_good():
    maps = wafers(64, size=48, fail=0.3)
    out = _only(fail_dropout=0.6)(maps)
    assert not ((maps == 1) & (out != 1)).any()
    dropped = ((maps == 2) & (out == 1)).sum((1, 2)).float() / (maps == 2).sum((1, 2)).float()
    assert dropped.max() <= 0.65 and 0.2 < dropped.mean() < 0.4


def test_edge_loss_removes_edge_dies_only():
    from waferlab.data.augment import edge_dies

    maps = wafers(32, size=48)
    out = _only(edge_loss=0.5)(maps)
    gone = (maps > 0) & (out == 0)
    edge = edge_dies(maps)
    assert gone.any() and not (gone & ~edge).any()  # only edge dies disappear
    assert torch.equal(out[out > 0], maps[out > 0])  # the dies that stay keep their state
    assert not ((maps == 0) & (out > 0)).any()
    share = gone.sum().item() / edge.sum().item()
    assert 0.15 < share < 0.35  # per-map rates from U(0, 0.5)


def test_edge_dies_are_the_ring_next_to_no_die():
    m = torch.zeros(1, 7, 7, dtype=torch.uint8)
    m[0, 1:6, 1:6] = 1
    ring = edge_dies_of(m)
    assert ring.sum().item() == 16 and not ring[0, 2:5, 2:5].any()
    full = torch.ones(1, 3, 3, dtype=torch.uint8)  # the grid's border counts as an edge too
    assert edge_dies_of(full).sum().item() == 8


def edge_dies_of(m: torch.Tensor) -> torch.Tensor:
    from waferlab.data.augment import edge_dies

    return edge_dies(m)


@pytest.mark.parametrize("options, needle", [
    (dict(rescale=1.5), "rescale"), (dict(rescale_min=1), "rescale_min"), (dict(rescale_min=2.5), "integer"),
    (dict(background_fail=-0.1), "background_fail"), (dict(fail_dropout="a"), "fail_dropout"),
    (dict(edge_loss=2), "edge_loss"), (dict(rot90="yes"), "true or false"), (dict(spin=3), "allowed: rot90"),
])
def test_bad_options_are_one_line_errors(options, needle):
    with pytest.raises(WaferlabError, match=needle):
        Augmenter(**options)
