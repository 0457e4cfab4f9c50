"""Index-only batching: the DataLoader yields index tensors; the maps stay in one in-memory uint8 tensor.

Shuffling is seeded from (seed, epoch) so an epoch's order is the same in an uninterrupted run, a resumed
run and across DDP ranks (each rank takes its slice of every global batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

#: The smallest training batch a rank is given: BatchNorm in train mode needs more than one value per channel.
MIN_TRAIN_BATCH = 2


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integer parts, e.g. (seed, epoch, step, rank)."""
    state = np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class IndexBatchSampler(Sampler[torch.Tensor]):
    """Yields int64 index tensors: this rank's share of each global batch of ``batch_size * world`` rows.

    Training: shuffled with a generator seeded from (seed, epoch); a last global batch that would give some
    rank fewer than 2 rows is dropped (BatchNorm cannot normalise a batch of one; every rank runs the same
    number of steps). Evaluation: no shuffle, rows
    ``rank::world`` in order (every row seen exactly once over all ranks). ``epoch_fn`` (e.g. the
    trainer's current epoch) overrides ``set_epoch``: Lightning does not call it on a restarted epoch.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world: int = 1, epoch_fn: Callable[[], int] | None = None) -> None:
        self.indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = int(rank)
        self.world = max(1, int(world))
        self.epoch = 0
        self.epoch_fn = epoch_fn

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (restarted epochs included)."""
        self.epoch = int(epoch)

    def _batches(self) -> list[torch.Tensor]:
        idx = self.indices
        if not self.shuffle:
            mine = idx[self.rank::self.world]
            return list(mine.split(self.batch_size)) if len(mine) else []
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 7919))
        idx = idx[torch.randperm(len(idx), generator=g)]
        out = []
        global_bs = self.batch_size * self.world
        for start in range(0, len(idx), global_bs):
            chunk = idx[start:start + global_bs]
            if len(chunk) < MIN_TRAIN_BATCH * self.world:
                break
            if len(chunk) == global_bs:
                out.append(chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
            else:  # the last, partial global batch: split as evenly as possible
                out.append(torch.tensor_split(chunk, self.world)[self.rank])
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        # a generator: the order is drawn at the first next(), after Lightning has restored the epoch
        yield from self._batches()

    def __len__(self) -> int:
        n = len(self.indices)
        if not self.shuffle:
            mine = len(range(self.rank, n, self.world))
            return -(-mine // self.batch_size)
        full, rest = divmod(n, self.batch_size * self.world)
        return full + (1 if rest >= MIN_TRAIN_BATCH * self.world else 0)


class _Identity(Dataset):
    """``dataset[idx] -> idx``: the sampler's index tensor is the batch."""

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return idx

    def __len__(self) -> int:  # only informative; the sampler decides the batches
        return 0


def index_loader(sampler: IndexBatchSampler) -> DataLoader:
    """A worker-free DataLoader yielding the sampler's index tensors unchanged."""
    return DataLoader(_Identity(), sampler=sampler, batch_size=None, num_workers=0)
