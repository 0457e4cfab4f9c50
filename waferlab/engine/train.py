"""``train(cfg)``: data -> split -> Lightning fit -> best/last weights -> test metrics, in one run dir."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from waferlab.engine.config import TrainConfig, dump_yaml
from waferlab.errors import WaferlabError


@dataclass
class SplitData:
    """The prepared maps (one array) plus row indices of each part."""

    data: Any  # PreparedData
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.data.class_names)


def _note(msg: str) -> None:
    print(f"waferlab: {msg}", file=sys.stderr)


def load_split_data(cfg: TrainConfig) -> SplitData:
    """Read ``cfg.data`` (any source or a cache), select the class set, cap, split, balance the train part."""
    from waferlab.data.cache import is_cache, load_cache, load_prepared
    from waferlab.data.splits import assign_splits, select_classes

    if not cfg.data:
        raise WaferlabError("no training data given (--data SRC)")
    if not Path(cfg.data).exists():
        raise WaferlabError(f"data not found: {cfg.data}")
    # a cache is kept at its own size (batches are resized on the device); other sources are prepared at S
    p = load_cache(cfg.data) if is_cache(cfg.data) else load_prepared(cfg.data, cfg.image_size,
                                                                       progress=cfg.progress)
    p = select_classes(p, cfg.class_set)
    if cfg.max_maps is not None and len(p) > cfg.max_maps:
        rng = np.random.default_rng(cfg.seed)
        p = p.subset(np.sort(rng.choice(len(p), cfg.max_maps, replace=False)))
    parts = assign_splits(p, cfg.split, fractions=tuple(cfg.fractions), seed=cfg.seed)
    train = np.flatnonzero(parts == "train")
    val = np.flatnonzero(parts == "val")
    test = np.flatnonzero(parts == "test")
    if len(train) == 0:
        raise WaferlabError(f"{cfg.data}: the {cfg.split} split left no training maps ({len(p)} maps in all)")
    if cfg.balance_targets:
        p, train = _balance(p, train, cfg)
    return SplitData(p, train, val, test)


def _balance(p: Any, train: np.ndarray, cfg: TrainConfig) -> tuple[Any, np.ndarray]:
    """Offline balancing by rotation of the TRAINING part only; copies are appended to the data."""
    from dataclasses import replace

    from waferlab.data.augment import balance_by_rotation

    ids = {name: i for i, name in enumerate(p.class_names)}
    unknown = [k for k in cfg.balance_targets if k not in ids]
    if unknown:
        raise WaferlabError(f"config balance_targets: unknown classes {unknown}; known: {', '.join(ids)}")
    targets = {ids[k]: int(v) for k, v in cfg.balance_targets.items()}
    maps, labels, src = balance_by_rotation(p.maps[train], p.labels[train], targets, seed=cfg.seed,
                                            return_source=True)
    extra = len(maps) - len(train)
    if extra <= 0:
        return p, train
    rows = train[np.asarray(src[len(train):])]
    grown = p.subset(np.concatenate([np.arange(len(p)), rows]))
    grown = replace(grown, maps=np.concatenate([p.maps, maps[len(train):]]))
    grown.labels = np.concatenate([p.labels, labels[len(train):]])
    return grown, np.concatenate([train, np.arange(len(p), len(p) + extra)])


def _is_rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _resolve_hardware(cfg: TrainConfig) -> tuple[str, str]:
    """(accelerator, precision): bf16-mixed on a GPU, 32-true on CPU unless set."""
    import torch

    accel = cfg.accelerator
    if accel == "auto":
        accel = "gpu" if torch.cuda.is_available() else "cpu"
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise WaferlabError("--accelerator gpu requested but no CUDA device is available")
    precision = cfg.precision or ("bf16-mixed" if accel in ("gpu", "cuda") else "32-true")
    return accel, precision


def _loggers(out: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="logs", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(save_dir=str(out), name="tb", version=""))
    return loggers


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    for pattern in (".*does not have many workers.*", ".*number of training batches.*",
                    ".*smaller than the logging interval.*", ".*LeafSpec.*", ".*is deprecated.*",
                    ".*Checkpoint directory .* exists and is not empty.*", ".*isinstance.*treespec.*",
                    ".*have no `val_dataloader`.*"):
        warnings.filterwarnings("ignore", message=pattern)


def train(cfg: TrainConfig, resume: bool = False, callbacks: list[Any] | None = None) -> Path | None:
    """Train ``cfg.model`` on ``cfg.data`` into ``cfg.out``; returns the run dir (``None`` on non-zero ranks).

    ``resume`` continues from ``OUT/checkpoints/last.ckpt``. ``callbacks`` are extra Lightning callbacks
    (tests use one to simulate a crash).
    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from waferlab.data.encode import num_channels
    from waferlab.engine.module import WaferClassifier
    from waferlab.engine.run import save_weights
    from waferlab.engine.sampling import IndexBatchSampler, index_loader
    from waferlab.io import seed_everything, versions, write_json, write_text
    from waferlab.models import create_model, model_spec

    model_spec(cfg.model)  # an unknown model fails before any data is read
    if not cfg.out:
        raise WaferlabError("no output directory given (--out DIR)")
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume and not last.is_file():
        raise WaferlabError(f"--resume: no checkpoint to resume from at {last}")
    _quiet_lightning()
    accel, precision = _resolve_hardware(cfg)
    seed_everything(cfg.seed)
    split = load_split_data(cfg)
    classes = split.class_names
    in_chans = num_channels(cfg.encoding)
    model = create_model(cfg.model, num_classes=len(classes), in_chans=in_chans,
                         pretrained=cfg.pretrained, head=cfg.head, **cfg.model_options)
    if accel != "cpu":
        model = model.to(memory_format=torch.channels_last)
    counts = np.bincount(split.data.labels[split.train], minlength=len(classes))
    module = WaferClassifier(model, cfg, torch.from_numpy(np.ascontiguousarray(split.data.maps)),
                             torch.from_numpy(split.data.labels.astype(np.int64)), counts)

    module.train_indices = torch.as_tensor(np.asarray(split.train, dtype=np.int64))
    has_val = cfg.has_val and len(split.val) > 0
    # last.ckpt after EVERY epoch (what --resume continues from). Lightning's save_last=True writes it only
    # when the monitored checkpoint improves, which would make a resumed run redo epochs.
    last_cb = ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1,
                              enable_version_counter=False)
    ckpt_cb = last_cb
    if cfg.checkpoint == "best" and has_val:
        ckpt_cb = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor="val_macro_f1", mode="max",
                                  save_top_k=1, enable_version_counter=False)
    strategy: Any = cfg.strategy
    if strategy == "ddp" and accel == "cpu":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    trainer = L.Trainer(
        accelerator=accel, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
        precision=precision, max_epochs=cfg.epochs, deterministic=True if accel == "cpu" else (
            "warn" if cfg.deterministic else False),
        benchmark=False if cfg.deterministic else None,
        callbacks=[*dict.fromkeys([ckpt_cb, last_cb]), *(callbacks or [])], logger=_loggers(out),
        default_root_dir=str(out),
        enable_progress_bar=cfg.progress, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, log_every_n_steps=10,
        limit_val_batches=None if has_val else 0,
    )
    rank, world = trainer.global_rank, trainer.world_size
    train_sampler = IndexBatchSampler(split.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                      rank=rank, world=world)
    if len(train_sampler) == 0:
        raise WaferlabError(f"{cfg.data}: too few training maps ({len(split.train)}) for {world} processes")
    train_sampler.epoch_fn = lambda: trainer.current_epoch
    module.steps_per_epoch = len(train_sampler)
    val_loader = None
    if has_val:
        val_loader = index_loader(IndexBatchSampler(split.val, cfg.eval_batch_size, shuffle=False,
                                                    rank=rank, world=world))

    if _is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # a fresh run must not pick up or mix with an older run's checkpoints
        write_text(out / "config.yaml", dump_yaml(cfg))
        write_json(out / "classes.json", list(classes))
        write_text(out / "seed", f"{cfg.seed}\n")
        _note(f"training {cfg.model} on {len(split.train)} maps ({len(split.val)} val, "
              f"{len(split.test)} test), "
              f"{len(classes)} classes, {cfg.image_size}px {cfg.encoding}, {cfg.epochs} epochs, {accel} "
              f"{precision}, {world} process(es) -> {out}")
    trainer.fit(module, train_dataloaders=index_loader(train_sampler), val_dataloaders=val_loader,
                ckpt_path=str(last) if resume else None)
    if not trainer.is_global_zero:
        return None

    chosen = "last epoch"
    if ckpt_cb is not last_cb and ckpt_cb.best_model_path:
        state = torch.load(ckpt_cb.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        chosen = f"best validation macro-F1 ({float(ckpt_cb.best_model_score):.4f})"
    model = module.model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    save_weights(model, out / "model.safetensors")
    write_json(out / "versions.json", versions())
    _write_curves(module.history, out)
    _evaluate_after_training(model, cfg, split, out, chosen)
    return out


def _write_curves(history: list[dict[str, float]], out: Path) -> None:
    """curves.csv (epoch, train_loss, val_loss, val_macro_f1, val_accuracy, lr) and curves.png."""
    from waferlab.io import write_text

    cols = ["epoch", "train_loss", "val_loss", "val_macro_f1", "val_accuracy", "lr"]
    lines = [",".join(cols)]
    for row in history:
        lines.append(",".join(str(int(row[c])) if c == "epoch" else f"{row.get(c, float('nan')):.6g}"
                              for c in cols))
    write_text(out / "curves.csv", "\n".join(lines) + "\n")
    from waferlab.engine.report import plot_curves

    plot_curves(out / "curves.csv", out / "curves.png")


def protocol_card(cfg: TrainConfig, split: SplitData | None = None, **extra: Any) -> dict[str, Any]:
    """The protocol facts a report must show next to its numbers."""
    card: dict[str, Any] = {
        "model": cfg.model, "data": cfg.data, "class_set": cfg.class_set, "split": cfg.split,
        "fractions": "/".join(f"{f:g}" for f in cfg.fractions), "image_size": cfg.image_size,
        "encoding": cfg.encoding, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer, "lr": cfg.lr, "loss": cfg.loss, "augment": cfg.augment, "seed": cfg.seed,
    }
    if split is not None:
        card["n_train"], card["n_val"], card["n_test"] = len(split.train), len(split.val), len(split.test)
    card.update(extra)
    return card


def _evaluate_after_training(model: Any, cfg: TrainConfig, split: SplitData, out: Path, chosen: str) -> None:
    """Metrics of the kept weights on the test part (the val part if there is no test part)."""
    from waferlab.engine.metrics import compute_metrics
    from waferlab.engine.predict import PredictOptions, predict_probs
    from waferlab.engine.report import write_evaluation
    from waferlab.engine.run import Run

    part_name, rows = "test", split.test
    if len(rows) == 0:
        part_name, rows = ("val", split.val) if len(split.val) else ("train", split.train)
        _note(f"no test part: metrics.json is computed on the {part_name} part")
    run = Run.open(out)
    info = run.info
    device = "cpu" if cfg.accelerator == "cpu" else None
    probs = predict_probs(model, split.data.maps[rows], run.spec(),
                          PredictOptions(device=device, batch_size=cfg.eval_batch_size))
    metrics = compute_metrics(split.data.labels[rows], probs, info.class_names)
    metrics["evaluated_on"] = part_name
    card = protocol_card(cfg, split, evaluated_on=part_name, weights=chosen)
    write_evaluation(metrics, out, f"{cfg.model} on {Path(cfg.data).name} ({part_name} part)", card)
    _note(f"{part_name} accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} -> {out}")
