"""Augmentation keeps wafer maps valid: values in {0,1,2}, die counts under dihedral transforms, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from waferlab.data.augment import Augmenter, balance_by_rotation, dihedral, rotate_nearest
from waferlab.errors import WaferlabError


def wafers(n: int = 16, size: int = 32, seed: int = 0, fail: float = 0.2) -> torch.Tensor:
    """Round wafers with an off-centre blob of failures, so every transform is visible."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    inside = (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        blob = (yy - g.uniform(4, size - 4)) ** 2 + (xx - g.uniform(4, size / 2)) ** 2 < 16
        fails = blob | (g.random((size, size)) < fail)
        out[i] = np.where(inside, np.where(fails, 2, 1), 0)
    return torch.from_numpy(out)


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
