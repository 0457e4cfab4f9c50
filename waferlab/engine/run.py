"""The run directory: :class:`Run` alone writes and reads its files (layout: :data:`RUN_LAYOUT`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from waferlab.data.cache import LEGACY_RESIZE
from waferlab.engine.predict import InputSpec
from waferlab.errors import WaferlabError

if TYPE_CHECKING:  # torch is imported where weights are read or written; the CLI lists RUN_LAYOUT without it
    import torch
    from torch import nn


@dataclass
class RunInfo:
    """What a run dir says about its model: enough to rebuild it and feed it correctly encoded maps."""

    model_name: str
    class_names: tuple[str, ...]
    image_size: int
    encoding: str
    in_chans: int
    head: str
    model_options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    logit_scale: float = 1.0
    run_dir: str = ""
    task: str = "multiclass"  # multilabel: class_names are the labels, each with its own sigmoid
    resize: str = LEGACY_RESIZE  # the rule that shrinks maps to image_size (waferlab.data.cache.RESIZE_RULES)


def logit_scale_of(cfg: Any) -> float:
    """Softmax temperature applied to a cosine head's outputs (Circle loss's gamma), 1 for a linear head."""
    if getattr(cfg, "logit_scale", None):
        return float(cfg.logit_scale)
    if getattr(cfg, "head", "linear") == "cosine":
        from waferlab.models.heads import DEFAULT_COSINE_SCALE

        return float(getattr(cfg, "loss_options", {}).get("gamma", DEFAULT_COSINE_SCALE))
    return 1.0


RUN_FORMAT = 1  # bumped when the layout below changes incompatibly; written to ``run.json``

# The run-directory layout: every file a run may hold, written and read only through :class:`Run`.
RUN_LAYOUT: dict[str, str] = {
    "run.json": "format version, status (running/finished), start and end times",
    "model.safetensors": "the kept weights (best validation macro-F1 or the last epoch)",
    "config.yaml": "the fully resolved training config",
    "classes.json": "class names (a multilabel run: label names), in output order",
    "versions.json": "python, torch, lightning and waferlab versions, host",
    "seed": "the seed, one line",
    "curves.csv": "per-epoch train/val loss, val macro-F1 and accuracy, learning rate",
    "curves.png": "the same as a figure",
    "metrics.json": "metrics on the test part (or val/train when there is none), with the protocol card",
    "report.md": "the per-run Markdown report",
    "confusion_matrix.png": "counts",
    "confusion_matrix_normalized.png": "row-normalised",
    "reliability.png": "reliability diagram",
    "calibration.json": "temperature and ECE before/after, fitted on the validation part",
    "thresholds.json": "operating point (P(none) threshold) and unknown-pattern threshold",
    "label_thresholds.json": "multilabel runs: per-label decision thresholds (best F1 on the val part)",
    "ood.json": "method and settings of the unknown-pattern score",
    "ood.safetensors": "its statistics (k-NN feature and descriptor banks, or class means and whitener)",
    "trust.md": "report of calibration, operating point and unknown-pattern threshold",
    "calibration.png": "reliability diagrams before and after temperature scaling",
    "timing.json": "training wall time and inference maps/s",
    "checkpoints/": "Lightning checkpoints: best.ckpt (weights) and last.ckpt (what --resume continues from)",
    "logs/": "Lightning CSV step logs (tb/ with tensorboard installed); resume-N/: after the Nth resume",
    "exports/": "exported models (model.onnx)",
}
REQUIRED = ("model.safetensors", "config.yaml", "classes.json")


class Run:
    """A run directory: the only code that writes or reads its files (layout in :data:`RUN_LAYOUT`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """Path of a layout entry; an unknown name is a bug (add it to ``RUN_LAYOUT`` first)."""
        if name not in RUN_LAYOUT:
            raise KeyError(f"{name!r} is not part of the run-directory layout")
        return self.path / name.rstrip("/")

    # --- opening and creating -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Run:
        """An existing, finished run; one-line errors for a missing directory or missing files."""
        run = cls(path)
        if not run.path.is_dir():
            raise WaferlabError(f"run directory not found: {run.path}")
        for name in REQUIRED:
            if not (run.path / name).is_file():
                raise WaferlabError(f"{run.path}: not a finished waferlab run ({name} missing)")
        status = run.read_json("run.json") if (run.path / "run.json").is_file() else {}
        fmt = status.get("format", RUN_FORMAT)
        if not isinstance(fmt, int) or fmt > RUN_FORMAT:
            raise WaferlabError(f"{run.file('run.json')}: field 'format': run format {fmt!r} is newer than "
                                f"this waferlab understands ({RUN_FORMAT}); upgrade waferlab")
        return run

    @classmethod
    def check_new(cls, path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Run:
        """What :meth:`create` would refuse, refused now, touching nothing (before any data is read)."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise WaferlabError(f"{run.path}: exists and is not a directory")
        if resume:
            if not run.last_checkpoint.is_file():
                raise WaferlabError(f"--resume: no checkpoint to resume from at {run.last_checkpoint}")
        elif run.path.is_dir() and any(run.path.iterdir()) and not overwrite:
            what = "a finished run" if run.is_finished() else "an unfinished run or other files"
            raise WaferlabError(f"{run.path}: already holds {what}; pass --overwrite to replace it "
                                f"or --resume to continue it")
        return run

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Run:
        """A run directory to train into. A finished run is data: refused unless ``overwrite``/``resume``."""
        import shutil

        run = cls.check_new(path, overwrite=overwrite, resume=resume)
        if not resume and run.path.is_dir():
            for name in RUN_LAYOUT:  # remove only what a run writes, never a user's other files
                target = run.path / name.rstrip("/")
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    def is_finished(self) -> bool:
        """All required files present (and ``run.json`` says finished when it exists)."""
        if not all((self.path / n).is_file() for n in REQUIRED):
            return False
        if (self.path / "run.json").is_file():
            return self.read_json("run.json").get("status") == "finished"
        return True

    def drop_checkpoints(self) -> int:
        """Delete ``checkpoints/`` of a finished run (``model.safetensors`` holds its weights; the Lightning
        checkpoints only serve ``--resume``, and ``last.ckpt`` carries the optimizer state); bytes freed."""
        import shutil

        if not self.is_finished():
            raise WaferlabError(f"{self.path}: not a finished run; its checkpoints are what --resume needs")
        if not self.checkpoints.is_dir():
            return 0
        freed = sum(f.stat().st_size for f in self.checkpoints.rglob("*") if f.is_file())
        shutil.rmtree(self.checkpoints)
        return freed

    # --- generic JSON / text --------------------------------------------------------------------
    def read_json(self, name: str) -> Any:
        """A JSON file of the layout; a corrupt file is a one-line error naming it."""
        path = self.file(name)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise WaferlabError(f"{path}: missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WaferlabError(f"{path}: unreadable JSON ({exc})") from None

    def write_json(self, name: str, obj: Any) -> None:
        """Write a JSON file of the layout atomically."""
        from waferlab.io import write_json

        write_json(self.file(name), obj)

    def has(self, name: str) -> bool:
        return self.file(name).exists()

    def label_thresholds(self) -> dict[str, float] | float:
        """A multilabel run's decision thresholds: its fitted ``label_thresholds.json``, else 0.5 for all."""
        from waferlab.engine.metrics import MULTILABEL_THRESHOLD

        if not self.has("label_thresholds.json"):
            return MULTILABEL_THRESHOLD
        return {str(k): float(v) for k, v in self.read_json("label_thresholds.json")["thresholds"].items()}

    # --- status ---------------------------------------------------------------------------------
    def mark(self, status: str) -> None:
        """Record ``running`` at start and ``finished`` at the end, with the format version and times."""
        import time

        record = self.read_json("run.json") if self.has("run.json") else {}
        record.update({"format": RUN_FORMAT, "status": status})
        record.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if status == "finished":
            record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write_json("run.json", record)

    # --- what training writes -------------------------------------------------------------------
    def write_start(self, cfg: Any, class_names: tuple[str, ...] | list[str]) -> None:
        """config.yaml, classes.json, seed and run.json (running), before the first epoch."""
        from waferlab.engine.config import dump_yaml
        from waferlab.io import write_text

        write_text(self.file("config.yaml"), dump_yaml(cfg))
        self.write_json("classes.json", list(class_names))
        write_text(self.file("seed"), f"{cfg.seed}\n")
        self.mark("running")

    def write_weights(self, model: nn.Module) -> None:
        """model.safetensors, atomically."""
        from safetensors.torch import save_model

        from waferlab.io import atomic_path

        with atomic_path(self.file("model.safetensors")) as tmp:
            save_model(model, str(tmp))

    def write_evaluation(self, metrics: dict[str, Any], title: str, card: dict[str, Any]) -> None:
        """metrics.json, report.md and the confusion / reliability figures of the kept weights."""
        from waferlab.engine.report import write_evaluation

        write_evaluation(metrics, self.path, title, card)

    def write_versions(self) -> None:
        from waferlab.io import versions

        self.write_json("versions.json", versions())

    def write_curves(self, history: list[dict[str, float]]) -> None:
        """curves.csv (epoch, train_loss, val_loss, val_macro_f1, val_accuracy, lr) and curves.png."""
        from waferlab.engine.report import plot_curves
        from waferlab.io import write_text

        lines = [",".join(CURVE_COLUMNS)]
        for row in history:
            lines.append(",".join(str(int(row[c])) if c == "epoch" else f"{row.get(c, float('nan')):.6g}"
                                  for c in CURVE_COLUMNS))
        write_text(self.file("curves.csv"), "\n".join(lines) + "\n")
        plot_curves(self.file("curves.csv"), self.file("curves.png"))

    def read_curves(self) -> list[dict[str, float]]:
        """The rows of curves.csv as dicts (empty when the run has none)."""
        import csv

        if not self.has("curves.csv"):
            return []
        with self.file("curves.csv").open(encoding="utf-8") as fh:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]

    def read_metrics(self) -> dict[str, Any]:
        return self.read_json("metrics.json")

    # --- what consumers read --------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.file("checkpoints/")

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def logs(self) -> Path:
        return self.file("logs/")

    @property
    def info(self) -> RunInfo:
        """What the run says about its model (config.yaml + classes.json), no weights."""
        from waferlab.data.encode import num_channels

        values = self.config_values()
        cfg = self.config()
        classes = self.read_json("classes.json")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise WaferlabError(f"{self.file('classes.json')}: expected a JSON list of class names")
        return RunInfo(model_name=cfg.model, class_names=tuple(classes), image_size=int(cfg.image_size),
                       encoding=cfg.encoding, resize=cfg.resize, in_chans=num_channels(cfg.encoding),
                       head=cfg.head, model_options=dict(cfg.model_options), config=values,
                       logit_scale=logit_scale_of(cfg), run_dir=str(self.path), task=cfg.task)

    def config_values(self) -> dict[str, Any]:
        """config.yaml as a plain dict (empty when absent); a corrupt file is a one-line error.

        A run written before the ``resize`` key was shrunk with nearest: the key is filled in as such."""
        import yaml

        from waferlab.data.cache import LEGACY_RESIZE, check_resize

        if not self.has("config.yaml"):
            return {}
        try:
            values = yaml.safe_load(self.file("config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise WaferlabError(f"{self.file('config.yaml')}: unreadable YAML ({type(exc).__name__})"
                                ) from None
        if not isinstance(values, dict):
            raise WaferlabError(f"{self.file('config.yaml')}: expected a mapping of key: value")
        values.setdefault("resize", LEGACY_RESIZE)
        check_resize(values["resize"], f"{self.file('config.yaml')}: field 'resize'")
        return values

    def config(self) -> Any:
        """The run's :class:`~waferlab.engine.config.TrainConfig` (keys of newer versions ignored)."""
        from waferlab.engine.config import TrainConfig

        known = set(TrainConfig.__dataclass_fields__)
        return TrainConfig(**{k: v for k, v in self.config_values().items() if k in known})

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    def spec(self) -> InputSpec:
        """The input contract of the run's model (size, resize rule, encoding, classes, logit scale, task)."""
        i = self.info
        return InputSpec(image_size=i.image_size, encoding=i.encoding, class_names=i.class_names,
                         resize=i.resize, logit_scale=i.logit_scale, task=i.task)

    def temperature(self) -> float:
        """The fitted temperature from calibration.json, 1 when the run has not been calibrated."""
        return float(self.read_json("calibration.json").get("temperature", 1.0)) if self.has(
            "calibration.json") else 1.0

    def build_model(self) -> nn.Module:
        """A fresh, randomly initialised model with the run's architecture."""
        from waferlab.models import create_model

        info = self.info
        return create_model(info.model_name, num_classes=len(info.class_names), in_chans=info.in_chans,
                            pretrained=None, head=info.head, encoding=info.encoding, **info.model_options)

    def read_weights(self) -> dict[str, torch.Tensor]:
        """The tensors of model.safetensors (CPU); a corrupt file is a one-line error."""
        from safetensors.torch import load_file

        try:
            return load_file(str(self.file("model.safetensors")))
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file becomes one clear line
            raise WaferlabError(f"{self.file('model.safetensors')}: cannot load weights ({exc})") from None

    def load_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The run's model with its trained weights, in eval mode on ``device``."""
        from safetensors.torch import load_model

        model = self.build_model()
        try:
            missing, unexpected = load_model(model, str(self.file("model.safetensors")), strict=False)
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file becomes one clear line
            raise WaferlabError(f"{self.file('model.safetensors')}: cannot load weights ({exc})") from None
        if missing or unexpected:
            raise WaferlabError(f"{self.file('model.safetensors')}: weights do not fit model "
                                f"{self.info.model_name!r} (missing {list(missing)[:3]}, "
                                f"unexpected {list(unexpected)[:3]})")
        return model.to(device).eval()


CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_macro_f1", "val_accuracy", "lr")


# Kept for callers not yet moved to :class:`Run` (explain): thin aliases, no logic of their own.
