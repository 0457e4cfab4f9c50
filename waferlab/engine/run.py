"""A run directory: loading a trained model back (``load_run``) and batch prediction (``predict_probs``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from waferlab.errors import WaferlabError

RUN_FILES = ("model.safetensors", "config.yaml", "classes.json")


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


def logit_scale_of(cfg: Any) -> float:
    """Softmax temperature applied to a cosine head's outputs (Circle loss's gamma), 1 for a linear head."""
    if getattr(cfg, "logit_scale", None):
        return float(cfg.logit_scale)
    if getattr(cfg, "head", "linear") == "cosine":
        from waferlab.models.heads import DEFAULT_COSINE_SCALE

        return float(getattr(cfg, "loss_options", {}).get("gamma", DEFAULT_COSINE_SCALE))
    return 1.0


def read_run_info(run_dir: str | Path) -> RunInfo:
    """Read ``config.yaml`` and ``classes.json`` of a run dir (no model weights)."""
    import yaml

    from waferlab.data.encode import num_channels
    from waferlab.engine.config import TrainConfig

    run = Path(run_dir)
    if not run.is_dir():
        raise WaferlabError(f"run directory not found: {run}")
    for name in RUN_FILES:
        if not (run / name).is_file():
            raise WaferlabError(f"{run}: not a finished waferlab run ({name} missing)")
    try:
        values = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        classes = json.loads((run / "classes.json").read_text(encoding="utf-8"))
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise WaferlabError(f"{run}: unreadable config.yaml/classes.json ({type(exc).__name__})") from None
    known = {f for f in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in known})
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise WaferlabError(f"{run / 'classes.json'}: expected a JSON list of class names")
    return RunInfo(model_name=cfg.model, class_names=tuple(classes), image_size=int(cfg.image_size),
                   encoding=cfg.encoding, in_chans=num_channels(cfg.encoding), head=cfg.head,
                   model_options=dict(cfg.model_options), config=values, logit_scale=logit_scale_of(cfg),
                   run_dir=str(run))


def build_model(info: RunInfo) -> nn.Module:
    """A fresh, randomly initialised model with the run's architecture."""
    from waferlab.models import create_model

    return create_model(info.model_name, num_classes=len(info.class_names), in_chans=info.in_chans,
                        pretrained=None, head=info.head, **info.model_options)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, RunInfo]:
    """Rebuild a run's model with its trained weights (eval mode) and return it with its :class:`RunInfo`."""
    from safetensors.torch import load_model

    info = read_run_info(run_dir)
    model = build_model(info)
    try:
        missing, unexpected = load_model(model, str(Path(run_dir) / "model.safetensors"), strict=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file becomes one clear line
        raise WaferlabError(f"{Path(run_dir) / 'model.safetensors'}: cannot load weights ({exc})") from None
    if missing or unexpected:
        raise WaferlabError(f"{Path(run_dir) / 'model.safetensors'}: weights do not fit model "
                            f"{info.model_name!r} (missing {list(missing)[:3]}, "
                            f"unexpected {list(unexpected)[:3]})")
    return model.to(device).eval(), info


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's weights as safetensors, atomically."""
    from safetensors.torch import save_model

    from waferlab.io import atomic_path

    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict_probs(model: nn.Module, maps_uint8: np.ndarray | torch.Tensor, info: RunInfo,
                  batch_size: int = 256, device: str | torch.device | None = None,
                  progress: bool = False) -> np.ndarray:
    """Class probabilities (N, K) float32 for uint8 maps (N, H, W) in {0,1,2}, resized to the run's size."""
    from waferlab.data.encode import encode, resize_maps

    device = torch.device(device) if device is not None else next(model.parameters()).device
    maps = torch.as_tensor(np.asarray(maps_uint8) if not isinstance(maps_uint8, torch.Tensor) else maps_uint8)
    if maps.dim() != 3:
        raise WaferlabError(f"predict: expected maps of shape (N, H, W), got {tuple(maps.shape)}")
    maps = maps.to(torch.uint8)
    was_training = model.training
    model.eval().to(device)
    cuda = device.type == "cuda"
    out = np.zeros((len(maps), len(info.class_names)), dtype=np.float32)
    starts = range(0, len(maps), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="predict", unit="batch")
    for start in starts:
        batch = maps[start:start + batch_size].to(device, non_blocking=True)
        if batch.shape[-1] != info.image_size or batch.shape[-2] != info.image_size:
            batch = resize_maps(batch, info.image_size)
        x = encode(batch, info.encoding)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(x)
        logits = logits.float().reshape(len(x), -1) * info.logit_scale
        out[start:start + len(x)] = torch.softmax(logits, dim=1).cpu().numpy()
    model.train(was_training)
    return out
