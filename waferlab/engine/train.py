"""``train(cfg)``: data module + model + Lightning fit into a :class:`~waferlab.engine.run.Run`, then the kept
weights, curves and the final evaluation through the one prediction function."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from waferlab.engine.config import TrainConfig, data_label
from waferlab.engine.datamodule import SplitData, WaferDataModule, describe, load_split_data
from waferlab.engine.run import Run
from waferlab.errors import WaferlabError

__all__ = ["train", "load_split_data", "SplitData", "protocol_card"]


def _note(msg: str) -> None:
    print(f"waferlab: {msg}", file=sys.stderr)


def _is_rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


@dataclass(frozen=True)
class Hardware:
    """Where training runs: Lightning's accelerator and precision, and the device evaluation uses."""

    accelerator: str
    precision: str
    device: str

    @classmethod
    def resolve(cls, cfg: TrainConfig) -> Hardware:
        """bf16-mixed on a GPU, 32-true on CPU unless set; the device choice is predict's."""
        from waferlab.engine.predict import resolve_device

        accel = cfg.accelerator
        if accel == "auto":
            accel = "gpu" if resolve_device(None).type == "cuda" else "cpu"
        if accel in ("gpu", "cuda"):
            resolve_device("cuda")  # one-line error when there is none
        precision = cfg.precision or ("bf16-mixed" if accel in ("gpu", "cuda") else "32-true")
        return cls(accel, precision, "cpu" if accel == "cpu" else "cuda")


def _loggers(run: Run, resume: bool) -> list[Any]:
    """CSV (and TensorBoard) step logs under ``logs/``; a resumed run logs into ``logs/resume-N/`` (Lightning
    would delete the killed part's ``metrics.csv``)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    version = f"resume-{len(list(run.logs.glob('resume-*'))) + 1}" if resume else ""
    loggers: list[Any] = [CSVLogger(save_dir=str(run.path), name="logs", version=version)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(save_dir=str(run.logs), name="tb", version=""))
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


def _callbacks(cfg: TrainConfig, run: Run, has_val: bool, extra: list[Any]) -> tuple[list[Any], Any]:
    """Checkpointing (last after every epoch, best by val macro-F1), BN handling, progress; and the
    callback whose file holds the weights to keep."""
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from waferlab.engine.callbacks import EpochLines, FreezeBN, PreciseBN, SeedStep

    # last.ckpt after EVERY epoch (what --resume continues from). Lightning's save_last=True writes it only
    # when the monitored checkpoint improves, which would make a resumed run redo epochs.
    last = ModelCheckpoint(dirpath=str(run.checkpoints), filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    keep = last
    if cfg.checkpoint == "best" and has_val:
        # weights only: resuming reads last.ckpt, and the optimizer's moments would double a ResNet34's file
        keep = ModelCheckpoint(dirpath=str(run.checkpoints), filename="best", monitor="val_macro_f1",
                               mode="max", save_top_k=1, enable_version_counter=False, save_weights_only=True)
    cbs: list[Any] = [*dict.fromkeys([keep, last]), SeedStep(cfg.seed)]
    if cfg.freeze_bn:
        cbs.append(FreezeBN())
    if cfg.precise_bn_batches > 0:
        cbs.append(PreciseBN(cfg.precise_bn_batches, cfg.batch_size, cfg.seed))
    cbs.append(TQDMProgressBar() if cfg.bars else EpochLines())
    return cbs + list(extra), keep


def _trainer(cfg: TrainConfig, hw: Hardware, run: Run, callbacks: list[Any], has_val: bool,
             resume: bool) -> Any:
    import lightning as L

    strategy: Any = cfg.strategy
    if strategy == "ddp" and hw.accelerator == "cpu":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    return L.Trainer(
        accelerator=hw.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
        precision=hw.precision, max_epochs=cfg.epochs,
        deterministic=True if hw.accelerator == "cpu" else ("warn" if cfg.deterministic else False),
        benchmark=False if cfg.deterministic else None, callbacks=callbacks, logger=_loggers(run, resume),
        default_root_dir=str(run.path), enable_progress_bar=cfg.bars, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, log_every_n_steps=10,
        limit_val_batches=None if has_val else 0)


def _build_model(cfg: TrainConfig, classes: tuple[str, ...], hw: Hardware) -> Any:
    """The registered model, from ``cfg.init``'s weights when given (head rebuilt if the classes differ)."""
    import torch

    from waferlab.data.encode import num_channels
    from waferlab.models import create_model

    model = create_model(cfg.model, num_classes=len(classes), in_chans=num_channels(cfg.encoding),
                         pretrained=cfg.pretrained, head=cfg.head, encoding=cfg.encoding, **cfg.model_options)
    if cfg.init:
        _init_from(model, Run.open(cfg.init), classes)
    return model.to(memory_format=torch.channels_last) if hw.accelerator != "cpu" else model


def _init_from(model: Any, source: Run, classes: tuple[str, ...]) -> None:
    """Load a finished run's weights; tensors of another shape (the classifier head) stay freshly built."""
    state = model.state_dict()
    weights = source.read_weights()
    fits = {k: v for k, v in weights.items() if k in state and state[k].shape == v.shape}
    foreign = sorted(set(weights) - set(state))
    if foreign or not fits:
        raise WaferlabError(f"--init {source.path}: its weights do not fit this model "
                            f"(unexpected {foreign[:3]}); train the same --model")
    model.load_state_dict(fits, strict=False)
    rebuilt = sorted(set(state) - set(fits))
    if rebuilt:
        _note(f"--init {source.path}: {len(fits)} tensors loaded, {len(rebuilt)} rebuilt for "
              f"{len(classes)} classes ({', '.join(rebuilt[:2])}{', ...' if len(rebuilt) > 2 else ''})")


def train(cfg: TrainConfig, resume: bool = False, callbacks: list[Any] | None = None,
          overwrite: bool = False) -> Path | None:
    """Train ``cfg.model`` on ``cfg.data`` into the run dir ``cfg.out``; returns it (``None`` on other ranks).

    An existing run is refused unless ``overwrite`` (replace it) or ``resume`` (continue from its
    ``checkpoints/last.ckpt``). ``callbacks`` are extra Lightning callbacks (tests simulate a crash).
    """
    from waferlab.engine.module import WaferClassifier
    from waferlab.io import seed_everything
    from waferlab.losses import check_loss_task
    from waferlab.models import model_spec

    model_spec(cfg.model)  # an unknown model or a loss of the wrong task fails before any data is read
    check_loss_task(cfg.loss, cfg.task)
    if not cfg.out:
        raise WaferlabError("no output directory given (--out DIR)")
    rank_zero = _is_rank_zero()
    run = Run.check_new(cfg.out, overwrite=overwrite, resume=resume) if rank_zero else Run(cfg.out)
    _quiet_lightning()
    hw = Hardware.resolve(cfg)
    seed_everything(cfg.seed)
    data = WaferDataModule(cfg)
    module = WaferClassifier(_build_model(cfg, data.class_names, hw), cfg, data.class_counts())
    has_val = cfg.has_val and len(data.split.val) > 0
    cbs, keep = _callbacks(cfg, run, has_val, callbacks or [])
    trainer = _trainer(cfg, hw, run, cbs, has_val, resume)
    if rank_zero:
        run = Run.create(cfg.out, overwrite=overwrite, resume=resume)
        run.write_start(cfg, data.class_names)
        _note(f"training {cfg.model} on {describe(data.split, cfg)}, {cfg.image_size}px ({cfg.resize}) "
              f"{cfg.encoding}, {cfg.epochs} epochs, {hw.accelerator} {hw.precision}, "
              f"{trainer.world_size} process(es) -> {run.path}")
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(run.last_checkpoint) if resume else None)
    if not trainer.is_global_zero:
        return None
    model, chosen = _kept_weights(module, keep)
    run.write_weights(model)
    run.write_versions()
    run.write_curves(module.history)
    run.write_json("timing.json", {"train_seconds": round(time.perf_counter() - started, 3)})
    _evaluate_after_training(run, model, cfg, data.split, chosen, hw)
    run.mark("finished")
    return run.path


def _kept_weights(module: Any, keep: Any) -> tuple[Any, str]:
    """The model with the weights the run keeps (best checkpoint when there is one), on the CPU."""
    import torch

    chosen = "last epoch"
    if keep.monitor is not None and keep.best_model_path:
        state = torch.load(keep.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        chosen = f"best validation macro-F1 ({float(keep.best_model_score):.4f})"
    # float32 on the CPU whatever the training precision (64-true trains a float64 model)
    return module.model.to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval(), chosen


def protocol_card(cfg: TrainConfig, split: SplitData | None = None, **extra: Any) -> dict[str, Any]:
    """The protocol facts a report must show next to its numbers."""
    card: dict[str, Any] = {
        "model": cfg.model, "data": cfg.data, "class_set": cfg.class_set, "split": cfg.split,
        "fractions": "/".join(f"{f:g}" for f in cfg.fractions), "image_size": cfg.image_size,
        "resize": cfg.resize, "encoding": cfg.encoding, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer, "lr": cfg.lr, "loss": cfg.loss, "augment": cfg.augment, "seed": cfg.seed,
    }
    if cfg.init:
        card["init"] = cfg.init
    if cfg.val_data:
        card["val_data"] = cfg.val_data
    if cfg.task != "multiclass":  # class_set does not apply to multi-hot labels
        card["task"] = cfg.task
        card.pop("class_set")
    if split is not None:
        card["n_train"], card["n_val"], card["n_test"] = len(split.train), len(split.val), len(split.test)
    card.update(extra)
    return card


def _evaluate_after_training(run: Run, model: Any, cfg: TrainConfig, split: SplitData, chosen: str,
                             hw: Hardware) -> None:
    """Metrics of the kept weights on the test part (the val part if there is no test part)."""
    from waferlab.engine.metrics import compute_metrics, compute_multilabel_metrics, multilabel_summary
    from waferlab.engine.predict import PredictOptions, predict

    part_name, rows = "test", split.test
    if len(rows) == 0:
        part_name, rows = ("val", split.val) if len(split.val) else ("train", split.train)
        _note(f"no test part: metrics.json is computed on the {part_name} part")
    options = PredictOptions(device=hw.device, batch_size=cfg.eval_batch_size)
    # what the calibration files say they were fitted on
    source = f"validation part: {cfg.val_data} (--val-data)" if cfg.val_data else "validation part"
    if cfg.task == "multilabel":
        _fit_label_thresholds(run, model, split, options, source)
    probs = predict(model, split.data.maps[rows], run.spec(), options).probs
    if cfg.task == "multilabel":
        metrics = compute_multilabel_metrics(split.targets(rows), probs, run.class_names,
                                             threshold=run.label_thresholds())
        headline = multilabel_summary(metrics)
    else:
        metrics = compute_metrics(split.data.labels[rows], probs, run.class_names)
        headline = f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
    metrics["evaluated_on"] = part_name
    card = protocol_card(cfg, split, evaluated_on=part_name, weights=chosen)
    run.write_evaluation(metrics, f"{cfg.model} on {data_label(cfg.data)} ({part_name} part)", card)
    _note(f"{part_name} {headline} -> {run.path}")
    _after_training(run, model, split, options, source)


def _fit_label_thresholds(run: Run, model: Any, split: SplitData, options: Any, source: str) -> None:
    """A multilabel run's per-label thresholds (best F1 on the validation part) -> label_thresholds.json;
    without a validation part every label keeps 0.5 (evaluate and the report say which rule applied)."""
    from waferlab.engine.metrics import fit_label_thresholds
    from waferlab.engine.predict import predict

    if len(split.val) == 0:
        _note("no validation part: every label keeps the 0.5 threshold")
        return
    probs = predict(model, split.data.maps[split.val], run.spec(), options).probs
    fitted = fit_label_thresholds(split.targets(split.val), probs, run.class_names)
    run.write_json("label_thresholds.json", {"fitted_on": source, "n": int(len(split.val)),
                                             "rule": "per label, the threshold of best F1",
                                             "thresholds": fitted})
    _note("label thresholds (validation best F1): " + ", ".join(f"{k} {v:.2f}" for k, v in fitted.items()))


def _after_training(run: Run, model: Any, split: SplitData, options: Any, source: str) -> None:
    """What a deployed model needs from the validation part's predictions (logits, probs, pooled features):
    calibration.json, thresholds.json and ood.json (``waferlab.deploy.trust.fit_trust``).

    Multi-label runs are not calibrated (their per-label thresholds were fitted before; a note says so).
    """
    from waferlab.deploy.trust import TrustOptions, fit_trust
    from waferlab.engine.predict import input_maps, predict

    if run.spec().task == "multilabel":
        _note("multi-label run: no temperature calibration (per-label thresholds: label_thresholds.json)")
        return
    if len(split.val) == 0:
        _note("no validation part: the run is not calibrated (waferlab calibrate RUN --data HELD_OUT)")
        return
    val = predict(model, split.data.maps[split.val], run.spec(), replace(options, features=True))
    labels = split.targets(split.val)
    try:
        summary = fit_trust(run, val, labels, TrustOptions(source=source),
                            train=_train_features(model, split, run, options),
                            val_maps=input_maps(split.data.maps[split.val], run.spec()))
    except WaferlabError as exc:  # too few validation maps for a threshold: the run stays usable
        _note(f"not calibrated ({exc}); run waferlab calibrate RUN --data HELD_OUT")
        return
    _note(f"calibrated on {len(labels)} validation maps: temperature "
          f"{summary['calibration']['temperature']:.3g}")


def _train_features(model: Any, split: SplitData, run: Run, options: Any) -> Any:
    """Logits, labels, pooled features and maps of (a stratified sample of) the training part, un-augmented:
    what the default unknown-pattern score fits its statistics on; ``None`` when it needs none."""
    import numpy as np

    from waferlab.deploy import ood
    from waferlab.engine.predict import input_maps, predict

    if ood.DEFAULT_METHOD not in ood.FEATURE_METHODS or len(split.train) == 0:
        return None
    rows = np.unique(split.train)
    rows = rows[ood.stratified_sample(split.data.labels[rows], ood.FIT_MAPS, seed=0)]
    pred = predict(model, split.data.maps[rows], run.spec(), replace(options, features=True))
    maps = input_maps(split.data.maps[rows], run.spec()) if ood.DEFAULT_METHOD in ood.MAP_METHODS else None
    return ood.FitData(pred.logits, split.data.labels[rows], pred.features, maps)
