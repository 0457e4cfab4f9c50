"""The LightningDataModule: load, split, balance the training part, and serve index batches that are
gathered, augmented (training only), resized and encoded on the device."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from waferlab.engine.config import DataSource, TrainConfig, data_label, data_sources
from waferlab.engine.sampling import IndexBatchSampler, derive_seed, index_loader
from waferlab.errors import WaferlabError

#: With outlier exposure, a training batch of B known maps carries B // OUTLIER_SHARE generic anomalies.
OUTLIER_SHARE = 2


@dataclass
class SplitData:
    """The prepared maps (one array) plus row indices of each part and each row's source number."""

    data: Any  # PreparedData
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: np.ndarray | None = None  # per row: index into ``weights`` (None: one source)
    weights: tuple[float, ...] = (1.0,)
    task: str = "multiclass"

    @property
    def class_names(self) -> tuple[str, ...]:
        """The model's output names: the classes, or for a multilabel task the multi-hot label names."""
        return tuple(self.data.multi_label_names if self.task == "multilabel" else self.data.class_names)

    def targets(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """What the loss and metrics compare with: class ids (N,), or multi-hot rows (N, K) if multilabel."""
        if self.task == "multilabel":
            return np.asarray(self.data.multi_hot[rows], dtype=np.int64)
        return self.data.labels[rows]

    def epoch_rows(self, seed: int) -> np.ndarray:
        """Training rows of one epoch: each source's rows ``weight`` times (a fraction: a seeded share)."""
        if self.source is None or all(w == 1.0 for w in self.weights):
            return self.train
        parts = []
        for s, w in enumerate(self.weights):
            rows = self.train[self.source[self.train] == s]
            whole, frac = divmod(w, 1.0)
            parts += [rows] * int(whole)
            extra = int(round(frac * len(rows)))
            if extra:
                perm = np.random.default_rng(derive_seed(seed, s, 31)).permutation(len(rows))
                parts.append(np.sort(rows[perm[:extra]]))
        return np.concatenate(parts) if parts else self.train[:0]


def _load_source(src: DataSource, cfg: TrainConfig, resize: bool) -> Any:
    """One source at its own size (a cache) or at ``cfg.image_size``, restricted to the class set."""
    from waferlab.data.cache import is_cache, load_prepared
    from waferlab.data.splits import select_classes

    if not src.path.exists():
        raise WaferlabError(f"data not found: {src.path}")
    p = load_prepared(src.path, None if is_cache(src.path) and not resize else cfg.image_size,
                      progress=cfg.bars, resize=cfg.resize)
    if cfg.task == "multilabel":  # every map counts (all-zero = no defect); class_set does not apply
        p.require_multi_hot(str(src.path), "task multilabel")
        return p
    return select_classes(p, cfg.class_set)


def _split_source(p: Any, cfg: TrainConfig, where: str) -> tuple[Any, np.ndarray]:
    """Cap to ``max_maps`` and assign train/val/test parts."""
    from waferlab.data.splits import assign_splits

    if cfg.max_maps is not None and len(p) > cfg.max_maps:
        rng = np.random.default_rng(cfg.seed)
        p = p.subset(np.sort(rng.choice(len(p), cfg.max_maps, replace=False)))
    parts = assign_splits(p, cfg.split, fractions=tuple(cfg.fractions), seed=cfg.seed)
    if not np.any(parts == "train"):
        raise WaferlabError(f"{where}: the {cfg.split} split left no training maps ({len(p)} maps in all)")
    return p, parts


def source_split(src: str | Path, cfg: TrainConfig) -> tuple[Any, np.ndarray]:
    """One source split exactly as training splits it (class set, cap, seeded parts): (prepared maps, part
    name per map); a cache keeps its own size, other files are read at ``cfg.image_size``, as in training.
    Explaining a run's test part reuses it."""
    return _split_source(_load_source(DataSource(Path(src)), cfg, resize=False), cfg, str(src))


def _concat(parts: list[Any]) -> Any:
    """Several prepared sources (same size and class set) as one; lots stay distinct per source.

    Multi-hot labels are kept when every source has them under the same label names."""
    first = parts[0]
    cat = np.concatenate
    hot = None
    if all(p.multi_hot is not None and p.multi_label_names == first.multi_label_names for p in parts):
        hot = cat([p.multi_hot for p in parts])
    # one class vocabulary by name (identical after select_classes; a multilabel task's mixture names differ)
    names = tuple(dict.fromkeys(n for p in parts for n in p.class_names))
    ids = {n: i for i, n in enumerate(names)}
    labels = [np.array([ids[n] for n in p.class_names] + [-1], dtype=np.int64)[p.labels] for p in parts]
    return replace(first, maps=cat([p.maps for p in parts]), labels=cat(labels), class_names=names,
                   split=cat([p.split for p in parts]),
                   lot=cat([np.array([f"{i}:{lot}" for lot in p.lot], dtype=object)
                            for i, p in enumerate(parts)]),
                   wafer_index=cat([p.wafer_index for p in parts]),
                   orig_shape=cat([p.orig_shape for p in parts]), multi_hot=hot, masks=None,
                   source="+".join(p.source or "data" for p in parts))


def _validate_on(loaded: list[tuple[Any, np.ndarray]], cfg: TrainConfig) -> list[tuple[Any, np.ndarray]]:
    """``cfg.val_data``: its labelled maps are the validation part (appended as one more source, never
    trained on); the training sources' own validation share joins their training part."""
    val = _load_source(DataSource(Path(cfg.val_data)), cfg, resize=True)  # its labelled maps of the set
    moved = [(p, np.where(parts == "val", "train", parts)) for p, parts in loaded]
    return moved + [(val, np.full(len(val), "val", dtype=object))]


def load_split_data(cfg: TrainConfig) -> SplitData:
    """Read ``cfg.data`` (one or several sources or caches), select the class set, cap, split each source,
    balance the training part."""
    if not cfg.data:
        raise WaferlabError("no training data given (--data SRC)")
    sources = data_sources(cfg.data)
    resize = len(sources) > 1 or bool(cfg.val_data)  # several sources meet at cfg.image_size
    loaded = [_split_source(_load_source(s, cfg, resize), cfg, str(s.path)) for s in sources]
    if cfg.val_data:
        loaded = _validate_on(loaded, cfg)
        sources.append(DataSource(Path(cfg.val_data)))
    if len(loaded) == 1:
        p, parts = loaded[0]
        source = None
    else:
        p = _concat([q for q, _ in loaded])
        parts = np.concatenate([a for _, a in loaded])
        source = np.concatenate([np.full(len(q), i) for i, (q, _) in enumerate(loaded)])
        if cfg.task == "multilabel" and p.multi_hot is None:
            raise WaferlabError("task multilabel: the --data sources name their multi-hot labels differently "
                                f"({'; '.join(', '.join(q.multi_label_names) for q, _ in loaded)})")
    train, val, test = (np.flatnonzero(parts == name) for name in ("train", "val", "test"))
    if cfg.balance_targets:
        p, train, source = _balance(p, train, cfg, source)
    return SplitData(p, train, val, test, source, tuple(s.weight for s in sources), cfg.task)


def _balance(p: Any, train: np.ndarray, cfg: TrainConfig, source: np.ndarray | None
             ) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """Offline balancing by rotation of the TRAINING part only; copies are appended to the data."""
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
        return p, train, source
    rows = train[np.asarray(src[len(train):])]
    grown = p.subset(np.concatenate([np.arange(len(p)), rows]))
    grown = replace(grown, maps=np.concatenate([p.maps, maps[len(train):]]))
    grown.labels = np.concatenate([p.labels, labels[len(train):]])
    if source is not None:
        source = np.concatenate([source, source[rows]])
    return grown, np.concatenate([train, np.arange(len(p), len(p) + extra)]), source


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class WaferDataModule(L.LightningDataModule):
    """The maps as one uint8 tensor on the training device; loaders yield index batches only."""

    def __init__(self, cfg: TrainConfig, split: SplitData | None = None) -> None:
        """Load and split ``cfg.data`` (or take an already prepared ``split``)."""
        super().__init__()
        self.cfg = cfg
        self.split = split if split is not None else load_split_data(cfg)
        self.epoch_rows = self.split.epoch_rows(cfg.seed)
        self.maps = torch.from_numpy(np.ascontiguousarray(self.split.data.maps))
        targets = self.split.targets()  # class ids, or multi-hot rows (float for the multi-label losses)
        self.labels = torch.from_numpy(targets.astype(np.float32 if targets.ndim == 2 else np.int64))
        self.augmenter = _augmenter(cfg)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.split.class_names

    @property
    def train_rows(self) -> torch.Tensor:
        """The distinct training rows (what precise BN recalibrates on)."""
        return torch.as_tensor(np.asarray(self.split.train, dtype=np.int64))

    def class_counts(self) -> np.ndarray:
        """Maps per class (multilabel: per label) as the model sees them in one training epoch (for
        class-weighted losses; its length is the number of model outputs)."""
        if self.split.task == "multilabel":
            return self.split.targets(self.epoch_rows).sum(axis=0)
        return np.bincount(self.split.data.labels[self.epoch_rows], minlength=len(self.class_names))

    def setup(self, stage: str) -> None:
        """Move the uint8 maps to the training device, once."""
        dev = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.maps.device != dev:
            self.maps = self.maps.to(dev, non_blocking=True)
            self.labels = self.labels.to(dev, non_blocking=True)

    def _sampler(self, rows: np.ndarray, batch_size: int, shuffle: bool) -> IndexBatchSampler:
        t = self.trainer
        return IndexBatchSampler(rows, batch_size, shuffle=shuffle, seed=self.cfg.seed, rank=t.global_rank,
                                 world=t.world_size, epoch_fn=lambda: t.current_epoch)

    def train_dataloader(self) -> Any:
        sampler = self._sampler(self.epoch_rows, self.cfg.batch_size, shuffle=True)
        if len(sampler) == 0:
            raise WaferlabError(f"{data_label(self.cfg.data)}: too few training maps "
                                f"({len(self.epoch_rows)}) for {self.trainer.world_size} process(es)")
        return index_loader(sampler)

    def val_dataloader(self) -> Any:
        return index_loader(self._sampler(self.split.val, self.cfg.eval_batch_size, shuffle=False))

    def gather(self, idx: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Index batch -> (encoded float inputs, int64 labels) on the device."""
        from waferlab.data.encode import encode, resize_maps

        idx = idx.to(self.maps.device)
        maps = self.maps.index_select(0, idx)
        labels = self.labels.index_select(0, idx)
        if train and self.augmenter is not None:
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
            step = self.trainer.global_step if self.trainer is not None else 0
            gen = torch.Generator(device=maps.device)
            gen.manual_seed(derive_seed(self.cfg.seed, epoch, step, _rank(), 104729))
            self.augmenter.generator = gen
            maps = self.augmenter(maps)
        if maps.shape[-1] != self.cfg.image_size or maps.shape[-2] != self.cfg.image_size:
            maps = resize_maps(maps, self.cfg.image_size, self.cfg.resize)
        if train and self.cfg.outlier_exposure > 0:  # generic anomalies after the known maps (module.py)
            from waferlab.data.anomalies import paint_anomalies

            gen = torch.Generator(device=maps.device)
            step = self.trainer.global_step if self.trainer is not None else 0
            gen.manual_seed(derive_seed(self.cfg.seed, step, _rank(), 7919))
            maps = torch.cat([maps, paint_anomalies(maps[:max(1, len(maps) // OUTLIER_SHARE)], gen)])
        x = encode(maps, self.cfg.encoding)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> Any:
        x, y = self.gather(batch, train=bool(self.trainer is not None and self.trainer.training))
        if self.trainer is not None:  # e.g. 64-true: float64 inputs for the float64 model
            x = self.trainer.precision_plugin.convert_input(x)
        return x, y


def _augmenter(cfg: TrainConfig) -> Any:
    """The data layer's Augmenter for ``cfg.augment_options`` (None when augmentation is off); the options
    were checked, in the config's wording, by ``config.validate``."""
    if not cfg.augment:
        return None
    from waferlab.data.augment import Augmenter

    return Augmenter(**cfg.augment_options)


def describe(split: SplitData, cfg: TrainConfig) -> str:
    """One line naming the data a run trains on."""
    kind = "labels" if split.task == "multilabel" else "classes"
    return (f"{data_label(cfg.data)}: {len(split.train)} training maps ({len(split.val)} val, "
            f"{len(split.test)} test), {len(split.class_names)} {kind}")
