"""Training configuration: one dataclass, YAML presets, and the preset < CLI flags < ``--set`` resolution."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waferlab.data.cache import DEFAULT_RESIZE, RESIZE_RULES
from waferlab.data.encode import ENCODINGS
from waferlab.data.splits import CLASS_SETS, SPLIT_METHODS
from waferlab.engine.optim import OPTIMIZERS, PLATEAU_MONITORS, SCHEDULERS
from waferlab.errors import WaferlabError
from waferlab.models.registry import HEADS

#: Heads a multi-label run can use: a sigmoid per label needs free logits (not the cosine head's).
MULTILABEL_HEADS = ("linear", "failpool")

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
#: Which weights a run keeps: the best validation macro-F1 epoch, or the last epoch.
CHECKPOINTS = ("best", "last")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64", "64-true")
#: multiclass: one class per map (softmax, class-index labels); multilabel: several defect types per map
#: (one sigmoid per label, the data's multi-hot rows, e.g. MixedWM38). Losses declare theirs in
#: waferlab.losses.LOSS_TASKS.
TASKS = ("multiclass", "multilabel")


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved resolved as ``RUN_DIR/config.yaml``."""

    model: str = "resnet34"
    model_options: dict[str, Any] = field(default_factory=dict)
    head: str = "linear"
    task: str = "multiclass"
    pretrained: str | None = None
    data: str | list[str] = ""  # one source, or a list of "PATH" / "PATH:WEIGHT" (weight: sampling share)
    init: str | None = None  # a finished run whose weights training starts from (fine-tuning)
    val_data: str | None = None  # labelled maps that are the validation part (--data's val share is trained)
    out: str = ""
    class_set: str = "all9"
    encoding: str = "onehot"
    image_size: int = 64
    resize: str = DEFAULT_RESIZE  # how maps shrink to image_size (RESIZE_RULES); a run without it: nearest
    split: str = "stratified"
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    max_maps: int | None = None
    balance_targets: dict[str, int] = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 128
    eval_batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: str = "cosine"
    t_max: int | None = None  # cosine_epoch's period in epochs (None: epochs)
    plateau_monitor: str = "val_macro_f1"
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    loss: str = "weighted_ce"
    loss_options: dict[str, Any] = field(default_factory=dict)
    logit_scale: float | None = None
    augment: bool = True
    augment_options: dict[str, Any] = field(default_factory=dict)
    outlier_exposure: float = 0.0  # weight of the outlier-exposure loss on generic anomalies (0: off)
    freeze_bn: bool = False
    precise_bn_batches: int = 0
    checkpoint: str = "best"
    seed: int = 0
    deterministic: bool = True
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    compile: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (for YAML)."""
        return dataclasses.asdict(self)

    @property
    def bars(self) -> bool:
        """Progress bars only when asked for and stderr is a terminal (a log gets one line per epoch)."""
        import sys

        return bool(self.progress and sys.stderr.isatty())

    @property
    def has_val(self) -> bool:
        """True when there is a validation part: a ``val_data`` source, or a share of the split."""
        return bool(self.val_data) or self.fractions[1] > 0


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in ``waferlab/configs``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (``default``) or a path to a YAML file -> the file's path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        if not path.is_file():
            raise WaferlabError(f"config file not found: {name_or_path}")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise WaferlabError(f"unknown config preset {name_or_path!r}; presets: {', '.join(preset_names())} "
                            "(or pass a path to a .yaml file)")
    return preset


def load_yaml(path: Path) -> Any:
    """Parse a YAML file; bad YAML is a one-line error naming the file and line (configs and study specs)."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise WaferlabError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a config YAML into a dict, checking every key against :class:`TrainConfig`."""
    try:
        raw = load_yaml(path)
    except OSError as exc:
        raise WaferlabError(f"cannot read config {path}: {exc.strerror}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WaferlabError(f"{path}: a config must be a mapping of key: value, got {type(raw).__name__}")
    for key in raw:
        _check_key(key, str(path))
    return dict(raw)


def _check_key(key: object, where: str) -> None:
    if key not in FIELD_NAMES:
        close = difflib.get_close_matches(str(key), FIELD_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise WaferlabError(f"{where}: unknown config key {key!r}{hint}")


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "model_options.width=0.5"]`` -> nested override dict (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise WaferlabError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        top, _, sub = key.partition(".")
        _check_key(top, "--set")
        if sub:
            current = out.setdefault(top, {})
            if not isinstance(current, dict):
                raise WaferlabError(f"--set {key}: {top} is not a mapping")
            current[sub] = parsed
        else:
            out[top] = parsed
    return out


def build_config(config: str | None = None, overrides: dict[str, Any] | None = None,
                 sets: list[str] | None = None) -> TrainConfig:
    """Resolve defaults < preset/YAML (``config``, default ``"default"``) < ``overrides`` < ``--set``."""
    values: dict[str, Any] = read_yaml(resolve_config_path(config or "default"))
    for key, value in (overrides or {}).items():
        _check_key(key, "override")
        if value is not None:
            if key == "loss" and value != values.get("loss"):
                values.pop("loss_options", None)  # the preset's options belong to the preset's loss
            values[key] = value
    for key, value in parse_set(sets).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """A validated config from a plain dict (e.g. a run's saved ``config.yaml``)."""
    for key in values:
        _check_key(key, where)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def _number(cfg: TrainConfig, name: str, kind: type, minimum: float | None = None,
            strict: bool = False, allow_none: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
        try:
            value = kind(value) if kind is float else int(value)
        except ValueError:
            pass
        else:
            setattr(cfg, name, value)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise WaferlabError(f"config {name}: expected a{'n integer' if kind is int else ' number'}, "
                            f"got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        op = ">" if strict else ">="
        raise WaferlabError(f"config {name} must be {op} {minimum:g}, got {value!r}")
    if kind is float:
        setattr(cfg, name, float(value))


def _choice(cfg: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise WaferlabError(f"config {name}: unknown value {value!r}; use one of {', '.join(choices)}")


def validate(cfg: TrainConfig) -> None:
    """Check every field; a bad value raises a one-line :class:`WaferlabError` naming the field."""
    _number(cfg, "epochs", int, 1)
    _number(cfg, "image_size", int, 32)
    _number(cfg, "batch_size", int, 2)  # BatchNorm cannot normalise a batch of one
    _number(cfg, "eval_batch_size", int, 1)
    _number(cfg, "lr", float, 0.0, strict=True)
    _number(cfg, "weight_decay", float, 0.0)
    _number(cfg, "momentum", float, 0.0)
    _number(cfg, "warmup_epochs", float, 0.0)
    _number(cfg, "min_lr", float, 0.0)
    _number(cfg, "seed", int, 0)
    _number(cfg, "num_nodes", int, 1)
    _number(cfg, "max_maps", int, 2, allow_none=True)
    _number(cfg, "logit_scale", float, 0.0, strict=True, allow_none=True)
    _number(cfg, "t_max", int, 1, allow_none=True)
    _number(cfg, "plateau_factor", float, 0.0, strict=True)
    _number(cfg, "plateau_patience", int, 0)
    _number(cfg, "outlier_exposure", float, 0.0)
    _number(cfg, "precise_bn_batches", int, 0)
    if cfg.outlier_exposure > 0 and (cfg.task != "multiclass" or cfg.head == "cosine"):
        raise WaferlabError(f"config outlier_exposure: needs task multiclass and free logits (head linear or "
                            f"failpool), got task {cfg.task!r}, head {cfg.head!r}")
    for name, choices in (("class_set", CLASS_SETS), ("encoding", ENCODINGS), ("resize", RESIZE_RULES),
                          ("split", SPLIT_METHODS),
                          ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS), ("checkpoint", CHECKPOINTS),
                          ("head", HEADS), ("plateau_monitor", PLATEAU_MONITORS), ("task", TASKS)):
        _choice(cfg, name, tuple(choices))
    if cfg.plateau_factor >= 1:
        raise WaferlabError(f"config plateau_factor must be < 1, got {cfg.plateau_factor:g}")
    if cfg.task == "multilabel" and cfg.head not in MULTILABEL_HEADS:
        raise WaferlabError(f"config head: task multilabel needs a head with one free logit per label "
                            f"({' or '.join(MULTILABEL_HEADS)}), got {cfg.head!r}")
    if not isinstance(cfg.model, str) or not cfg.model:
        raise WaferlabError("config model: a model name is required (see 'waferlab models')")
    for name in ("model_options", "loss_options", "augment_options", "balance_targets"):
        if not isinstance(getattr(cfg, name), dict):
            raise WaferlabError(f"config {name}: expected a mapping, got {getattr(cfg, name)!r}")
    if cfg.augment:
        from waferlab.data.augment import AugmentOptions

        AugmentOptions.parse(cfg.augment_options)
    if cfg.min_lr > cfg.lr:
        raise WaferlabError(f"config min_lr ({cfg.min_lr:g}) is larger than lr ({cfg.lr:g})")
    cfg.fractions = _checked_fractions(cfg.fractions)
    if cfg.scheduler == "plateau" and not cfg.has_val:
        raise WaferlabError("config scheduler: plateau watches the validation part, but fractions has none")
    if cfg.checkpoint == "best" and not cfg.has_val:
        cfg.checkpoint = "last"  # no validation part: nothing to select the best epoch by
    _validate_hardware(cfg)
    for name in ("nesterov", "augment", "freeze_bn", "deterministic", "compile", "progress"):
        if not isinstance(getattr(cfg, name), bool):
            raise WaferlabError(f"config {name}: expected true or false, got {getattr(cfg, name)!r}")
    if cfg.nesterov and cfg.optimizer != "sgd":
        raise WaferlabError("config nesterov: only meaningful with optimizer sgd (or use optimizer nag)")
    if cfg.init is not None and not isinstance(cfg.init, str):
        raise WaferlabError(f"config init: expected a run directory, got {cfg.init!r}")
    if cfg.val_data is not None and (not isinstance(cfg.val_data, str) or not cfg.val_data):
        raise WaferlabError(f"config val_data: expected a path to labelled maps, got {cfg.val_data!r}")
    gone = missing_data({"data": cfg.data, "val_data": cfg.val_data})
    if gone is not None:
        raise WaferlabError(f"{gone[0]} not found: {gone[1]}")


def _checked_fractions(fr: Any) -> list[float]:
    """train,val,test fractions: three non-negative numbers summing to 1 with a positive train share."""
    if (not isinstance(fr, (list, tuple)) or len(fr) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in fr)):
        raise WaferlabError(f"config fractions: expected 3 non-negative numbers train,val,test, got {fr!r}")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise WaferlabError(f"config fractions must sum to 1, got {fr!r} (sum {sum(fr):g})")
    if fr[0] <= 0:
        raise WaferlabError(f"config fractions: the train fraction must be > 0, got {fr!r}")
    return [float(x) for x in fr]


def _validate_hardware(cfg: TrainConfig) -> None:
    """devices, accelerator and precision (normalised to Lightning's string)."""
    dev = cfg.devices
    if isinstance(dev, bool) or not (isinstance(dev, int) and dev >= 1 or isinstance(dev, (str, list))):
        raise WaferlabError(f"config devices: expected a count >= 1, 'auto' or a list, got {cfg.devices!r}")
    _choice(cfg, "accelerator", ACCELERATORS)
    if cfg.precision is not None and str(cfg.precision) not in PRECISIONS:
        raise WaferlabError(f"config precision: unknown value {cfg.precision!r}; use one of "
                            f"{', '.join(PRECISIONS)}")
    if cfg.precision is not None:
        cfg.precision = str(cfg.precision)


def missing_data(values: dict[str, Any], *, required: bool = False) -> tuple[str, Path | None] | None:
    """The first training source of a config (its ``data`` entries, then ``val_data``) that is not on this
    machine, as (field, path); None when all are here. A config without ``data`` passes (validation allows
    it) unless ``required``: then it is ("data", None), as int8 calibration and study aggregation need one."""
    if required and not values.get("data"):
        return "data", None
    for src in data_sources(values["data"]) if values.get("data") else ():
        if not src.path.exists():
            return "data", src.path
    val = values.get("val_data")
    return ("val_data", Path(val)) if val and not Path(val).exists() else None


@dataclass(frozen=True)
class DataSource:
    """One training source and its sampling weight (its rows are drawn ``weight`` times per epoch)."""

    path: Path
    weight: float = 1.0


def data_label(data: str | list[str]) -> str:
    """``cfg.data`` as one short label for messages and titles: the file names joined by ``+``, with
    ``:WEIGHT`` where a source's weight is not 1."""
    return "+".join(s.path.name + (f":{s.weight:g}" if s.weight != 1 else "") for s in data_sources(data))


def data_sources(data: str | list[str]) -> list[DataSource]:
    """``cfg.data`` -> sources: ``"a.pkl"``, ``["a.pkl", "b.pkl:3"]`` (``:WEIGHT`` optional, > 0)."""
    items = [data] if isinstance(data, str) else data
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise WaferlabError(f"config data: expected a path or a list of paths, got {data!r}")
    out = []
    for item in items:
        path, _, weight = item.rpartition(":")
        try:
            w = float(weight) if path and not Path(item).exists() else None
        except ValueError:
            w = None
        if w is None:
            out.append(DataSource(Path(item)))
        elif not w > 0 or w != w or w == float("inf"):
            raise WaferlabError(f"config data: {item!r}: the weight after ':' must be a number > 0")
        else:
            out.append(DataSource(Path(path), w))
    return out


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (key order as in the dataclass)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
