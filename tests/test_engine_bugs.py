"""Issue-8 bugs a new user hits first, each pinned by a test that failed before its fix."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

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
