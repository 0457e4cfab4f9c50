"""The LightningModule: the model, its loss, its optimizer and the in-loop metrics. Batches arrive as
(encoded inputs, labels) on the device, prepared by :class:`~waferlab.engine.datamodule.WaferDataModule`."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelExactMatch,
    MultilabelF1Score,
)

from waferlab.engine.config import TrainConfig
from waferlab.errors import WaferlabError
from waferlab.losses import batch_normaliser


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from the softmax to the uniform distribution (Hendrycks et al.'s outlier-exposure
    term): minimal when every class gets the same probability."""
    return -torch.log_softmax(logits.float(), dim=1).mean()


class WaferClassifier(L.LightningModule):
    """Trains ``model`` with ``cfg``'s loss and optimizer; logs loss, macro-F1 and accuracy per epoch.

    For ``task: multilabel`` the targets are multi-hot rows, each output is one label's logit, macro-F1 is
    over the labels at sigmoid >= 0.5 and "accuracy" is the exact-match ratio (whole label set right).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, class_counts: np.ndarray,
                 criterion: nn.Module | None = None) -> None:
        super().__init__()
        from waferlab.losses import build_loss, check_loss_task

        if criterion is None:
            check_loss_task(cfg.loss, cfg.task)
        self.model = model
        self.cfg = cfg
        self.num_classes = int(len(class_counts))
        self.criterion = criterion if criterion is not None else build_loss(
            cfg.loss, self.num_classes, class_counts=np.asarray(class_counts), **cfg.loss_options)
        expects = getattr(self.criterion, "expects", "logits")
        if (expects == "cosine") != (cfg.head == "cosine"):
            raise WaferlabError(f"loss {cfg.loss!r} expects {expects} outputs but head is {cfg.head!r}; "
                                f"use {'--set head=cosine' if expects == 'cosine' else 'a linear head'}")
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.multilabel = cfg.task == "multilabel"
        if self.multilabel:
            self.val_f1 = MultilabelF1Score(self.num_classes, average="macro")
            self.val_acc = MultilabelExactMatch(self.num_classes)
        else:
            self.val_f1 = MulticlassF1Score(self.num_classes, average="macro")
            self.val_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.history: list[dict[str, float]] = []
        self._row_done_epoch = -1

    def setup(self, stage: str) -> None:
        """Optionally compile the model (kept out of the state dict)."""
        if self.cfg.compile and "_compiled" not in self.__dict__:
            self.__dict__["_compiled"] = torch.compile(self.model)

    # ---- steps ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__.get("_compiled", self.model)(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = self.criterion(out[:len(y)], y)
        if len(out) > len(y):  # outlier exposure: the anomalies after the known maps get a flat softmax
            loss = loss + self.cfg.outlier_exposure * uniform_cross_entropy(out[len(y):])
        self.train_loss.update(loss.detach(), weight=len(y))
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=len(y))
        if self.trainer.world_size > 1:
            return loss * self._rank_share(batch_normaliser(self.criterion, y))
        return loss

    def _rank_share(self, norm: torch.Tensor) -> torch.Tensor:
        """``world * norm / global norm`` of this step, ``norm`` being what the loss's mean divides by (rows,
        or the rows' class weights for weighted_ce / focal): DDP averages the ranks' gradients of their MEAN
        losses, which is the gradient of the global batch's mean only when every rank has the same norm. A
        last, partial global batch splits unevenly (13 rows -> 7 + 6), and class weights differ between
        ranks' shards in every batch; this factor makes the averaged gradient that of the global mean."""
        total = self.trainer.strategy.reduce(norm.clone(), reduce_op="sum")
        return norm * self.trainer.world_size / total

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.val_loss.update(self.criterion(out.float(), y), weight=len(y))
        pred = torch.sigmoid(out.float()) if self.multilabel else out.argmax(1)
        target = y.int() if self.multilabel else y
        self.val_f1.update(pred, target)
        self.val_acc.update(pred, target)

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
        from waferlab.engine.optim import build_optimizer, build_scheduler

        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        opt = build_optimizer([{"params": decay, "weight_decay": self.cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], self.cfg)
        steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max(1, self.cfg.epochs))
        sched = build_scheduler(opt, self.cfg, steps_per_epoch)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}
