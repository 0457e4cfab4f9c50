"""Class activation maps of wafer-map classifiers, computed batch-wise with pytorch-grad-cam.

Every function takes the model, uint8 wafer maps (N, H, W) (numpy or torch), the input encoding and,
where needed, the class to explain, so it runs without a run directory. CAMs come back at the map's
size, in [0, 1], and exactly zero outside the wafer (no-die area), because a heat spot where there is
no die explains nothing an engineer can act on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from waferlab.errors import WaferlabError
from waferlab.explain.methods import METHOD_TITLES, METHODS  # noqa: F401  (re-exported)


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Validate CAM method names (comma-separated string or list); unknown names are a user error."""
    names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    names = [m for m in names if m]
    if not names:
        raise WaferlabError(f"no CAM method given; choose from {', '.join(METHODS)}")
    for name in names:
        if name not in METHODS:
            raise WaferlabError(f"unknown CAM method {name!r}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else is checked and returned."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise WaferlabError(f"--device: invalid device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WaferlabError(f"--device {device}: CUDA is not available on this machine")
    return dev


def as_maps(maps: np.ndarray | torch.Tensor | Sequence[np.ndarray], size: int | None = None) -> torch.Tensor:
    """Wafer maps as a uint8 CPU tensor (N, S, S); resized (nearest) to ``size`` when given and different."""
    if isinstance(maps, torch.Tensor):
        t = maps.detach().to("cpu")
    else:
        arr = np.asarray(maps) if not isinstance(maps, list) else np.stack([np.asarray(m) for m in maps])
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise WaferlabError(f"wafer maps must be (N, H, W), got shape {tuple(t.shape)}")
    t = t.to(torch.uint8)
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        from waferlab.data.encode import resize_maps

        t = resize_maps(t, size)
    return t


def wafer_area(maps: np.ndarray | torch.Tensor) -> np.ndarray:
    """Boolean (N, H, W) array: True where a die exists (value 1 or 2)."""
    arr = maps.numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    return arr > 0


def _encode(maps: torch.Tensor, encoding: str) -> torch.Tensor:
    from waferlab.data.encode import encode

    return encode(maps, encoding)


def set_logit_scale(model: nn.Module, scale: float | None) -> nn.Module:
    """Record the softmax scale of a run's outputs on the model (the engine's ``RunInfo.logit_scale``)."""
    model.waferlab_logit_scale = None if scale is None else float(scale)  # type: ignore[assignment]
    return model


def outputs_to_probs(outputs: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Class probabilities from model outputs: softmax of outputs x the run's logit scale.

    Without a recorded scale: 1 for logits, ``DEFAULT_COSINE_SCALE`` for a cosine head's similarities.
    """
    from waferlab.models.heads import DEFAULT_COSINE_SCALE, is_cosine

    scale = getattr(model, "waferlab_logit_scale", None)
    if scale is None:
        scale = DEFAULT_COSINE_SCALE if is_cosine(model) else 1.0
    return torch.softmax(outputs.float().reshape(len(outputs), -1) * scale, dim=-1)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-free model (tests); treat as CPU
        return torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, maps, encoding: str, batch_size: int = 64, device=None,
            progress: bool = False) -> np.ndarray:
    """Class probabilities (N, num_classes) for uint8 maps, batch-wise, model in eval mode."""
    dev = resolve_device(device) if device is not None else _model_device(model)
    model.to(dev).eval()
    t = as_maps(maps)
    out = []
    for start in _progress(range(0, len(t), batch_size), progress, "predict"):
        x = _encode(t[start:start + batch_size].to(dev), encoding)
        out.append(outputs_to_probs(model(x), model).cpu())
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy().astype(np.float32)


@dataclass
class CamResult:
    """CAMs of one batch run: ``cams[method]`` (N, H, W) float32 in [0, 1], the explained class per map,
    the model's probabilities and the target layer's spatial size (a 1x1 layer gives flat, useless CAMs)."""

    cams: dict[str, np.ndarray]
    targets: np.ndarray
    probs: np.ndarray
    feature_hw: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False)


@contextlib.contextmanager
def _quiet_scorecam() -> Iterator[None]:
    """ScoreCAM opens a tqdm bar per image; swap it for a silent iterator while we run it."""
    import pytorch_grad_cam.score_cam as score_cam

    class _Silent:
        @staticmethod
        def tqdm(it, *args, **kwargs):
            return it

    saved = score_cam.tqdm
    score_cam.tqdm = _Silent  # type: ignore[assignment]
    try:
        yield
    finally:
        score_cam.tqdm = saved


def postprocess(cams: np.ndarray, maps: np.ndarray | torch.Tensor) -> np.ndarray:
    """Zero the heat outside the wafer and rescale each map's CAM so its wafer maximum is 1."""
    cams = np.nan_to_num(np.asarray(cams, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    cams = np.clip(cams, 0.0, None) * wafer_area(maps)
    peak = cams.reshape(len(cams), -1).max(axis=1) if len(cams) else np.zeros(0, np.float32)
    scale = np.where(peak > 0, peak, 1.0).astype(np.float32)
    return (cams / scale[:, None, None]).astype(np.float32)


def compute_cams(
    model: nn.Module,
    maps,
    encoding: str,
    methods: Sequence[str] = ("gradcam",),
    targets: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    image_size: int | None = None,
    progress: bool = False,
) -> CamResult:
    """CAMs of ``model`` for every map and method, explaining ``targets`` (default: the predicted class).

    Runs pytorch-grad-cam on ``model.cam_target_layer`` batch by batch; every CAM object is used as a
    context manager so its hooks are removed, and the graph/gradients of a batch are dropped before the
    next one, so memory stays flat over any number of maps.
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    names = parse_methods(methods)
    layer = getattr(model, "cam_target_layer", None)
    if not isinstance(layer, nn.Module):
        raise WaferlabError(f"model {type(model).__name__} has no cam_target_layer to explain")
    if batch_size < 1:
        raise WaferlabError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device) if device is not None else _model_device(model)
    model.to(dev).eval()
    t = as_maps(maps, image_size)
    probs = predict(model, t, encoding, batch_size=batch_size, device=dev)
    if targets is None:
        target_arr = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    else:
        target_arr = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(target_arr) != len(t):
            raise ValueError(f"{len(target_arr)} targets for {len(t)} maps")
    n_classes = probs.shape[1] if len(probs) else 0
    if len(target_arr) and (target_arr.min() < 0 or target_arr.max() >= n_classes):
        raise WaferlabError(f"CAM target class out of range 0..{n_classes - 1}")

    result = CamResult(cams={}, targets=target_arr, probs=probs)
    for name in names:
        cls = getattr(pytorch_grad_cam, METHODS[name])
        out = np.zeros(tuple(t.shape), np.float32)
        quiet = _quiet_scorecam() if name == "scorecam" else contextlib.nullcontext()
        finished = False
        with torch.enable_grad(), quiet, cls(model=model, target_layers=[layer]) as cam:
            if name == "scorecam":
                cam.batch_size = batch_size
            for start in _progress(range(0, len(t), batch_size), progress, name):
                stop = min(start + batch_size, len(t))
                x = _encode(t[start:stop].to(dev), encoding).float()
                if cam.uses_gradients:
                    x.requires_grad_(True)  # gradients reach the layer even when weights are frozen
                batch_targets = [ClassifierOutputTarget(int(k)) for k in target_arr[start:stop]]
                grayscale = cam(input_tensor=x, targets=batch_targets)
                acts = cam.activations_and_grads.activations
                if acts and result.feature_hw == (0, 0):
                    result.feature_hw = tuple(int(s) for s in acts[0].shape[-2:])  # type: ignore[assignment]
                out[start:stop] = grayscale
                # Drop this batch's outputs (they hold the autograd graph) and the parameter gradients.
                cam.outputs = None
                cam.activations_and_grads.clear()
                model.zero_grad(set_to_none=True)
                del x, grayscale
            finished = True
        if not finished:  # the library's __exit__ swallows an IndexError; never return partial CAMs
            raise RuntimeError(f"{name}: CAM computation stopped early (IndexError inside pytorch-grad-cam)")
        result.cams[name] = postprocess(out, t)
    if result.feature_hw == (1, 1):
        note = (f"{type(model).__name__}: the CAM layer is 1x1 at {tuple(t.shape[-2:])} input, so every CAM "
                "is flat (all zero); use a larger image size")
        result.notes.append(note)
    return result


def layer_has_hooks(layer: nn.Module) -> bool:
    """True if any forward/backward hook is still attached to ``layer`` (used to check hooks are released)."""
    return bool(layer._forward_hooks or layer._backward_hooks or layer._forward_pre_hooks)
