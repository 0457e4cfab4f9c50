"""The one prediction path: maps in, scaled logits / calibrated probabilities / pooled features out.

Every consumer (training's final evaluation, ``evaluate``, ``explain``, the faithfulness scores, ``predict``,
calibration) goes through :func:`predict` (or :func:`predict_probs`), so device choice, the autocast policy,
batching, resizing, encoding and the logit scale / temperature are decided in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from waferlab.data.cache import LEGACY_RESIZE
from waferlab.errors import WaferlabError

if TYPE_CHECKING:
    import torch
    from torch import nn

AUTOCAST_POLICIES = ("auto", "off", "bf16")  # auto: bf16 on CUDA, full precision elsewhere
AUTOCAST_HELP = ("precision of the forward pass: auto = bf16 autocast on CUDA, float32 elsewhere; off = "
                 "float32 everywhere, TF32 off too (rows move with --batch-size or --chunk-size only by "
                 "float32 rounding, as an ONNX export's do); bf16 = bf16 autocast on any device")


@dataclass(frozen=True)
class InputSpec:
    """What a trained model expects and how to read its outputs (built from a run by ``Run.spec``)."""

    image_size: int
    encoding: str
    class_names: tuple[str, ...]  # the output names: classes, or labels of a multilabel run
    logit_scale: float = 1.0  # cosine heads output similarities; softmax(scale * cos) is the distribution
    task: str = "multiclass"  # multiclass: probs = softmax; multilabel: one sigmoid per label
    resize: str = LEGACY_RESIZE  # how maps of another size are shrunk (waferlab.data.cache.RESIZE_RULES)


@dataclass
class PredictOptions:
    """How to predict: device (None = CUDA when available), batch size, autocast, temperature, extras."""

    device: str | None = None
    batch_size: int = 256
    autocast: str = "auto"
    temperature: float = 1.0  # from calibration; divides the scaled logits before the softmax
    progress: bool = False
    features: bool = False  # also return the pooled output of the model's ``cam_target_layer`` (avg | max)
    tta: bool = False  # average over the DIHEDRAL_VIEWS views of each map (test-time augmentation, 8x cost)

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST_POLICIES:
            raise WaferlabError(f"autocast: {self.autocast!r} is not one of {', '.join(AUTOCAST_POLICIES)}")
        if self.batch_size < 1:
            raise WaferlabError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.temperature > 0:
            raise WaferlabError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class Prediction:
    """``logits`` (N, K) already multiplied by the logit scale; ``probs`` = softmax(logits / T), or for a
    multilabel run sigmoid(logits / T) per label (rows then do not sum to 1). With test-time augmentation
    both are the means over the views (so ``probs`` is not exactly softmax(logits / T) then)."""

    logits: np.ndarray
    probs: np.ndarray
    features: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The one place that decides the device: the given one, else CUDA when available, else CPU."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise WaferlabError(f"--device: invalid device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WaferlabError(f"device {device!r} requested but no CUDA device is available")
    return dev


def _use_bf16(policy: str, dev: torch.device) -> bool:
    return policy == "bf16" or (policy == "auto" and dev.type == "cuda")


def prepare_batch(maps: torch.Tensor, spec: InputSpec, dev: torch.device) -> torch.Tensor:
    """uint8 maps (B, H, W) -> the encoded float input at the run's size on ``dev``."""
    import torch

    from waferlab.data.encode import encode, resize_maps

    batch = maps.to(dev, non_blocking=True).to(torch.uint8)
    if batch.shape[-1] != spec.image_size or batch.shape[-2] != spec.image_size:
        batch = resize_maps(batch, spec.image_size, spec.resize)
    x = encode(batch, spec.encoding)
    return x.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x


#: Test-time augmentation's views: the 8 symmetries of the square (4 rotations by 90 degrees, each also
#: mirrored); wafer patterns are rotation-invariant up to the notch, which the maps do not carry.
DIHEDRAL_VIEWS = 8
TTA_HELP = (f"test-time augmentation: average the probabilities (and logits, features) over the "
            f"{DIHEDRAL_VIEWS} rotated/mirrored views of each map ({DIHEDRAL_VIEWS}x the compute; the run's "
            f"temperature and thresholds were fitted without it)")


def dihedral_view(x: torch.Tensor, t: int) -> torch.Tensor:
    """The ``t``-th (0..7) of the :data:`DIHEDRAL_VIEWS` symmetries of the last two (square) dims:
    ``t % 4`` quarter turns (counter-clockwise, like ``torch.rot90``), then a left-right mirror if t >= 4."""
    import torch

    if not 0 <= t < DIHEDRAL_VIEWS:
        raise WaferlabError(f"dihedral view {t}: expected 0..{DIHEDRAL_VIEWS - 1}")
    x = torch.rot90(x, t % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if t >= 4 else x


def add_autocast_flag(parser: Any) -> None:
    """``--autocast`` on a command's argparse parser, built from :data:`AUTOCAST_POLICIES`."""
    parser.add_argument("--autocast", choices=AUTOCAST_POLICIES, default=AUTOCAST_POLICIES[0],
                        help=AUTOCAST_HELP)


def add_tta_flag(parser: Any) -> None:
    """``--tta`` on a command's argparse parser: the same flag and help for evaluate and predict."""
    parser.add_argument("--tta", action="store_true", help=TTA_HELP)


def input_maps(maps: Any, spec: InputSpec) -> np.ndarray:
    """uint8 maps (N, H, W) as the network sees them: shrunk to the run's size with its rule (what the scores
    that read the maps themselves describe, ``waferlab.deploy.ood.MAP_METHODS``)."""
    import torch

    from waferlab.data.encode import resize_maps

    t = _as_maps(maps).to(torch.uint8)
    if t.shape[-1] == spec.image_size and t.shape[-2] == spec.image_size:
        return t.numpy()
    return resize_maps(t, spec.image_size, spec.resize).numpy()


def _as_maps(maps: Any) -> torch.Tensor:
    import torch

    t = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(maps))
    if t.dim() != 3:
        raise WaferlabError(f"predict: expected maps of shape (N, H, W), got {tuple(t.shape)}")
    return t


def _feature_hook(model: nn.Module, store: list[torch.Tensor]):
    """Register a hook that keeps the output of ``model.cam_target_layer`` global-average-pooled and
    global-max-pooled, concatenated (N, 2C): the unknown-pattern scores choose (``ood.POOLINGS``)."""
    layer = getattr(model, "cam_target_layer", None)
    if layer is None:
        raise WaferlabError(f"model {type(model).__name__} has no cam_target_layer to take features from")

    import torch

    def hook(_module, _inp, out):
        f = out.float()
        store.append(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], 1) if f.dim() == 4
                     else torch.cat([f.flatten(1)] * 2, 1))

    return layer.register_forward_hook(hook)


@contextlib.contextmanager
def _strict_float32(on: bool) -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matmuls while ``on`` (cuDNN's default is TF32 on Ampere and
    later: 10-bit mantissas, so ``autocast off`` would not be float32); the previous flags come back after."""
    import torch

    if not on:
        yield
        return
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def _view_logits(model: nn.Module, x: torch.Tensor, spec: InputSpec, opts: PredictOptions,
                 dev: torch.device) -> np.ndarray:
    """Scaled logits (views, B, K) of an encoded batch: one view, or the 8 dihedral ones with ``opts.tta``."""
    import torch

    outs = []
    for t in range(DIHEDRAL_VIEWS if opts.tta else 1):
        bf16 = _use_bf16(opts.autocast, dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16), \
                _strict_float32(opts.autocast == "off"):
            out = model(x if t == 0 else dihedral_view(x, t))
        outs.append(out.float().reshape(len(x), -1).cpu().numpy() * spec.logit_scale)
    return np.stack(outs)


def predict(model: nn.Module, maps: Any, spec: InputSpec,
            options: PredictOptions | None = None) -> Prediction:
    """Run ``model`` (eval mode, no grad) over uint8 maps (N, H, W) in {0,1,2}, batch by batch.

    With ``options.tta`` every map is seen in its 8 dihedral views: ``probs`` is the mean of the views'
    probabilities, ``logits`` and ``features`` the mean of theirs (what the unknown-pattern scores read)."""
    import torch

    opts = options or PredictOptions()
    dev = resolve_device(opts.device)
    t = _as_maps(maps)
    was_training = model.training
    model.eval().to(dev)
    k = len(spec.class_names)
    logits = np.zeros((len(t), k), dtype=np.float32)
    probs_tta = np.zeros((len(t), k), dtype=np.float32)
    feats: list[torch.Tensor] = []
    handle = _feature_hook(model, feats) if opts.features else None
    starts = range(0, len(t), opts.batch_size)
    if opts.progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="predict", unit="batch")
    try:
        with torch.no_grad():
            for start in starts:
                x = prepare_batch(t[start:start + opts.batch_size], spec, dev)
                scaled = _view_logits(model, x, spec, opts, dev)  # (views, B, K)
                logits[start:start + len(x)] = scaled.mean(0)
                if opts.tta:
                    view_probs = probabilities(scaled.reshape(-1, k) / opts.temperature, spec.task)
                    probs_tta[start:start + len(x)] = view_probs.reshape(len(scaled), len(x), k).mean(0)
                if handle is not None and len(scaled) > 1:  # one pooled feature row per map: the views' mean
                    feats[-len(scaled):] = [torch.stack(feats[-len(scaled):]).mean(0)]
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    probs = probs_tta if opts.tta else probabilities(logits / opts.temperature, spec.task)
    features = torch.cat(feats).cpu().numpy() if feats else (np.zeros((0, 0), np.float32) if opts.features
                                                                      else None)
    return Prediction(logits=logits, probs=probs, features=features)


def predict_probs(model: nn.Module, maps: Any, spec: InputSpec, options: PredictOptions | None = None
                  ) -> np.ndarray:
    """Class probabilities (N, K) float32: :func:`predict`'s ``probs``."""
    return predict(model, maps, spec, options).probs


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    """The task's probabilities of (scaled, tempered) logits: softmax rows, or one sigmoid per label."""
    if task == "multilabel":
        return sigmoid(logits)
    if task != "multiclass":
        raise WaferlabError(f"predict: unknown task {task!r}")
    return softmax(logits)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function in float32, without overflow for large negative logits."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, numerically stable."""
    z = logits - logits.max(axis=1, keepdims=True) if logits.size else logits
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32) if logits.size else logits.astype(np.float32)
