"""The LightningModule: gathers each index batch from the in-memory maps on the device, augments (training
batches only), resizes and encodes there, then runs the model, the loss and the in-loop metrics."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from waferlab.engine.config import TrainConfig
from waferlab.engine.sampling import derive_seed


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class WaferClassifier(L.LightningModule):
    """Trains ``model`` on maps held in memory as one uint8 tensor; batches are index tensors."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, maps: torch.Tensor, labels: torch.Tensor,
                 class_counts: np.ndarray, criterion: nn.Module | None = None) -> None:
        super().__init__()
        from waferlab.losses import build_loss

        self.model = model
        self.cfg = cfg
        self.num_classes = int(len(class_counts))
        self.criterion = criterion if criterion is not None else build_loss(
            cfg.loss, self.num_classes, class_counts=np.asarray(class_counts), **cfg.loss_options)
        expects = getattr(self.criterion, "expects", "logits")
        if (expects == "cosine") != (cfg.head == "cosine"):
            from waferlab.errors import WaferlabError

            raise WaferlabError(f"loss {cfg.loss!r} expects {expects} outputs but head is {cfg.head!r}; "
                                f"use {'--set head=cosine' if expects == 'cosine' else 'a linear head'}")
        self._maps_host = maps
        self._labels_host = labels
        self._maps: torch.Tensor = maps
        self._labels: torch.Tensor = labels
        self.augmenter = None
        if cfg.augment:
            from waferlab.data.augment import Augmenter

            try:
                self.augmenter = Augmenter(**cfg.augment_options)
            except TypeError as exc:
                from waferlab.errors import WaferlabError

                raise WaferlabError(f"config augment_options: {exc} (allowed: rot90, flips, max_rotation, "
                                    "die_flip)") from None
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_f1 = MulticlassF1Score(self.num_classes, average="macro")
        self.val_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.history: list[dict[str, float]] = []
        self.steps_per_epoch = 1
        self._row_done_epoch = -1
        #: training rows (indices into ``maps``), used by precise-BN recalibration
        self.train_indices: torch.Tensor | None = None

    # ---- data on the device -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Move the uint8 maps to the training device once; optionally compile the model."""
        self._maps = self._maps_host.to(self.device, non_blocking=True)
        self._labels = self._labels_host.to(self.device, non_blocking=True)
        if self.cfg.compile and "_compiled" not in self.__dict__:
            self.__dict__["_compiled"] = torch.compile(self.model)

    def on_fit_start(self) -> None:
        if self._maps.device != self.device:
            self._maps = self._maps_host.to(self.device)
            self._labels = self._labels_host.to(self.device)

    def gather(self, idx: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Index batch -> (encoded float inputs, int64 labels) on the device."""
        from waferlab.data.encode import encode, resize_maps

        idx = idx.to(self._maps.device)
        maps = self._maps.index_select(0, idx)
        labels = self._labels.index_select(0, idx)
        if train and self.augmenter is not None:
            epoch = self.trainer.current_epoch if self._trainer is not None else 0
            step = self.trainer.global_step if self._trainer is not None else 0
            gen = torch.Generator(device=maps.device)
            gen.manual_seed(derive_seed(self.cfg.seed, epoch, step, _rank(), 104729))
            maps = _augment(self.augmenter, maps, gen)
        if maps.shape[-1] != self.cfg.image_size or maps.shape[-2] != self.cfg.image_size:
            maps = resize_maps(maps, self.cfg.image_size)
        x = encode(maps, self.cfg.encoding)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, torch.Tensor) and batch.dtype == torch.int64 and batch.dim() == 1:
            return self.gather(batch, train=bool(self._trainer is not None and self.trainer.training))
        return batch

    # ---- steps ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__.get("_compiled", self.model)(x)

    def train(self, mode: bool = True) -> WaferClassifier:
        """Standard ``train()``, except that ``freeze_bn`` keeps BatchNorm layers on their running stats."""
        super().train(mode)
        if mode:
            self._freeze_bn()
        return self

    def _freeze_bn(self) -> None:
        if self.cfg.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def on_train_epoch_start(self) -> None:
        self._freeze_bn()  # Lightning does not call train() at fit start; validation restores these modes
        # Dropout & co. draw from the global RNG: reseed it per (seed, epoch, rank) so a resumed run
        # replays an epoch exactly as the uninterrupted run did.
        torch.manual_seed(derive_seed(self.cfg.seed, self.current_epoch, _rank(), 15485863))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.cfg.precise_bn_batches > 0 and batch_idx == self.trainer.num_training_batches - 1:
            self.recalibrate_bn()

    @torch.no_grad()
    def recalibrate_bn(self) -> None:
        """Precise BN: recompute BatchNorm running statistics with the epoch's final weights.

        Running averages lag behind fast-changing weights; on small maps (a 1x1 grid in the last stages)
        an evaluated model then squashes every input to nearly the same output. This averages the batch
        statistics of ``precise_bn_batches`` training batches (no augmentation) with the current weights,
        before validation and checkpointing (Wu & Johnson, "Rethinking BatchNorm", 2021).
        """
        bns = [m for m in self.model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        if not bns or self.train_indices is None or len(self.train_indices) < 2:
            return
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the recalibration batches
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.current_epoch, _rank(), 7727))
        rows = self.train_indices[torch.randperm(len(self.train_indices), generator=gen)]
        rows = rows[: self.cfg.precise_bn_batches * self.cfg.batch_size]
        for chunk in rows.split(self.cfg.batch_size):
            if len(chunk) > 1:
                x, _ = self.gather(chunk, train=False)
                self(x)
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.criterion(self(x), y)
        self.train_loss.update(loss.detach(), weight=len(y))
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.val_loss.update(self.criterion(out.float(), y), weight=len(y))
        pred = out.argmax(1)
        self.val_f1.update(pred, y)
        self.val_acc.update(pred, y)

    def on_validation_epoch_end(self) -> None:
        f1 = self.val_f1.compute()
        acc = self.val_acc.compute()
        loss = self.val_loss.compute()
        for m in (self.val_f1, self.val_acc, self.val_loss):
            m.reset()
        self.log("val_macro_f1", f1, prog_bar=True)
        self.log("val_accuracy", acc)
        self.log("val_loss", loss)
        if self.trainer.sanity_checking:
            return
        self._append_row({"val_loss": float(loss), "val_macro_f1": float(f1), "val_accuracy": float(acc)})

    def on_train_epoch_end(self) -> None:
        if self._row_done_epoch != self.current_epoch:  # no validation this epoch
            self._append_row({})

    def _append_row(self, val: dict[str, float]) -> None:
        train_loss = float(self.train_loss.compute()) if self.train_loss.update_count else float("nan")
        self.train_loss.reset()
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else float("nan")
        row = {"epoch": self.current_epoch + 1, "train_loss": train_loss, "val_loss": float("nan"),
               "val_macro_f1": float("nan"), "val_accuracy": float("nan"), "lr": float(lr)}
        row.update(val)
        self.history.append(row)
        self._row_done_epoch = self.current_epoch
        self.log("train_loss", train_loss)

    # history travels in the checkpoint so a resumed run's curves are complete
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["waferlab_history"] = [dict(r) for r in self.history]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = [dict(r) for r in checkpoint.get("waferlab_history", [])]

    # ---- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=cfg.lr)
        elif cfg.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=cfg.lr)
        else:
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        if cfg.scheduler == "none":
            return opt
        total = max(1, cfg.epochs * self.steps_per_epoch)
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        floor = cfg.min_lr / cfg.lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup, floor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``floor`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def _augment(augmenter: Any, maps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Run the data layer's Augmenter with a per-step generator (derived from seed, epoch, step, rank)."""
    augmenter.generator = gen
    return augmenter(maps)
