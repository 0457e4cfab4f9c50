"""Training callbacks: per-epoch reseeding, precise BN, frozen BN, and one log line per epoch."""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L
import torch
from torch import nn

from waferlab.engine.sampling import derive_seed


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class SeedStep(L.Callback):
    """Dropout & co. draw from the global RNG: reseed it per (seed, epoch, batch, rank) right before each
    training step, so a resumed run replays every step exactly as the uninterrupted run did.

    Per step, not per epoch: between an epoch's start and its first step Lightning itself may draw from the
    global RNG (the DataLoader iterator's base seed), and a resumed run does so at another point than an
    uninterrupted one; a per-epoch reseed let the two runs' dropout masks differ from the first resumed step
    (a killed ghostnet_100 study cell resumed to other weights; ``tests/test_engine_repro.py``).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        torch.manual_seed(derive_seed(self.seed, trainer.current_epoch, batch_idx, _rank(), 15485863))


class FreezeBN(L.Callback):
    """Keep every BatchNorm layer on its running statistics while training (``freeze_bn``)."""

    def _freeze(self, pl_module: L.LightningModule) -> None:
        for m in _batchnorms(pl_module):
            m.eval()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._freeze(pl_module)  # Lightning does not call train() at fit start

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._freeze(pl_module)  # whatever switched modes back (e.g. a validation loop) since


class PreciseBN(L.Callback):
    """Precise BN: recompute BatchNorm running statistics with the epoch's final weights.

    Running averages lag behind fast-changing weights; on small maps (a 1x1 grid in the last stages) an
    evaluated model then squashes every input to nearly the same output. After the last training batch of
    each epoch this averages the batch statistics of ``batches`` training batches (no augmentation) with
    the current weights, before validation and checkpointing (Wu & Johnson, "Rethinking BatchNorm", 2021).
    """

    def __init__(self, batches: int, batch_size: int, seed: int) -> None:
        self.batches, self.batch_size, self.seed = int(batches), int(batch_size), int(seed)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            self.recalibrate(pl_module, trainer.datamodule, trainer.current_epoch)

    @torch.no_grad()
    def recalibrate(self, pl_module: nn.Module, data: Any, epoch: int) -> None:
        """Reset the statistics of the training-mode BatchNorm layers and average them over training rows."""
        bns = [m for m in _batchnorms(pl_module) if m.training and m.track_running_stats]
        rows = data.train_rows
        if not bns or len(rows) < 2:
            return
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the recalibration batches
        # the same rows every epoch: with unchanged weights the statistics (and validation) are unchanged,
        # so model selection sees the weights' progress, not the draw of recalibration batches
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _rank(), 7727))
        rows = rows[torch.randperm(len(rows), generator=gen)][: self.batches * self.batch_size]
        for chunk in rows.split(self.batch_size):
            if len(chunk) > 1:
                x, _ = data.gather(chunk, train=False)
                pl_module(x)
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum


class EpochLines(L.Callback):
    """One line per finished epoch on stderr (rank 0): what a log file gets instead of progress bars."""

    def __init__(self) -> None:
        self._printed = 0

    def _flush(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        history = getattr(pl_module, "history", [])
        while self._printed < len(history):
            row = history[self._printed]
            self._printed += 1
            if trainer.is_global_zero:
                values = "  ".join(f"{k} {v:.4g}" for k, v in row.items()  # no validation part: no nan
                                   if k != "epoch" and not math.isnan(v))
                print(f"waferlab: epoch {int(row['epoch'])}/{trainer.max_epochs}  {values}", file=sys.stderr)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._printed = len(getattr(pl_module, "history", []))  # a resumed run's earlier epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer, pl_module)  # a run without validation appends its row after this hook ran

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer, pl_module)
