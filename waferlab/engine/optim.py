"""Optimizers and learning-rate schedules: the allowed names, declared once, and how each is built.

Torch is imported inside the builders, so the CLI can build its help from these lists without it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Optimizer name -> what it is. ``nag`` is SGD with Nesterov momentum (SP&A-Net's optimizer).
OPTIMIZERS: dict[str, str] = {
    "sgd": "SGD with momentum (nesterov: true for Nesterov)",
    "nag": "SGD with Nesterov momentum",
    "adam": "Adam",
    "adamw": "AdamW (decoupled weight decay)",
    "nadam": "NAdam (Adam with Nesterov momentum)",
}
#: Scheduler name -> what it is.
SCHEDULERS: dict[str, str] = {
    "none": "constant learning rate",
    "cosine": "per-step cosine from lr to min_lr over all epochs, after warmup_epochs of linear warm-up",
    "cosine_epoch": "per-epoch cosine annealing from lr to min_lr with period t_max epochs (default: epochs)",
    "plateau": "reduce lr by plateau_factor when plateau_monitor stalls for plateau_patience epochs",
}
#: What ``plateau`` watches -> whether larger is better.
PLATEAU_MONITORS: dict[str, str] = {"val_macro_f1": "max", "val_loss": "min"}


def build_optimizer(params: Any, cfg: Any) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``params`` (parameter groups) at ``cfg.lr``."""
    import torch

    name = cfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if name == "nadam":
        return torch.optim.NAdam(params, lr=cfg.lr)
    if name in ("sgd", "nag"):
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov or name == "nag")
    raise ValueError(f"unknown optimizer {name!r}")  # validate() rejects it first


def build_scheduler(opt: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int) -> dict[str, Any] | None:
    """Lightning's ``lr_scheduler`` entry for ``cfg.scheduler`` (``None`` for a constant rate)."""
    import torch

    name = cfg.scheduler
    if name == "none":
        return None
    if name == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch)
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        floor = cfg.min_lr / cfg.lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup, floor))
        return {"scheduler": sched, "interval": "step"}
    if name == "cosine_epoch":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.t_max or cfg.epochs,
                                                           eta_min=cfg.min_lr)
        return {"scheduler": sched, "interval": "epoch"}
    if name == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=PLATEAU_MONITORS[cfg.plateau_monitor], factor=cfg.plateau_factor,
            patience=cfg.plateau_patience, min_lr=cfg.min_lr)
        return {"scheduler": sched, "interval": "epoch", "monitor": cfg.plateau_monitor}
    raise ValueError(f"unknown scheduler {name!r}")  # validate() rejects it first


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``floor`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
