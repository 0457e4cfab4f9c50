"""Class activation maps of wafer-map classifiers, computed batch-wise on pytorch-grad-cam's hooks.

Every function takes the model, uint8 wafer maps (N, H, W) (numpy or torch) and the model's
:class:`~waferlab.engine.predict.InputSpec` (size, encoding, classes, logit scale), so it runs without a
run directory. Probabilities come from the one prediction function (:func:`waferlab.engine.predict.predict`).
CAMs come back at the model's input size, in [0, 1], min-max normalised over the wafer only, and exactly
zero outside it (no-die area): a heat spot where there is no die explains nothing an engineer can act on,
and a no-die corner must not set the scale of the heat on the dies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from waferlab.data.cache import LEGACY_RESIZE
from waferlab.engine.predict import InputSpec, PredictOptions, predict_probs, resolve_device
from waferlab.errors import WaferlabError
from waferlab.explain.methods import METHOD_TITLES, METHODS  # noqa: F401  (re-exported)

#: The study's GradCAM++ (seeds.md A.5) computed by waferlab rather than by pytorch-grad-cam.
STUDY_GRADCAMPP = "gradcam++exp"
#: exp(S) of the study's GradCAM++ is a positive per-map factor; S is clamped so float64 cannot overflow.
_MAX_EXP_SCORE = 700.0


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


def as_maps(maps: np.ndarray | torch.Tensor | Sequence[np.ndarray], size: int | None = None,
            rule: str = LEGACY_RESIZE, mask: bool = False) -> torch.Tensor:
    """Wafer maps (or 0/1 ``mask``-s) as a uint8 CPU tensor (N, S, S); resized with the run's ``rule`` to
    ``size`` when given and different."""
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

        t = resize_maps(t, size, rule, mask=mask)
    return t


def wafer_area(maps: np.ndarray | torch.Tensor) -> np.ndarray:
    """Boolean (N, H, W) array: True where a die exists (value 1 or 2)."""
    arr = maps.numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    return arr > 0


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a parameter-free model)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def probabilities(model: nn.Module, maps, spec: InputSpec, batch_size: int = 64,
                  device: str | torch.device | None = None) -> np.ndarray:
    """Class probabilities (N, K) through the one prediction function (the spec's size, encoding, scale)."""
    dev = resolve_device(device) if device is not None else model_device(model)
    return predict_probs(model, as_maps(maps), spec, PredictOptions(device=str(dev), batch_size=batch_size))


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
    """Min-max normalise each CAM over its wafer dies only (no-die pixels take no part) and zero the rest.

    A CAM that is constant on the wafer (e.g. from a 1x1 layer) carries no location and becomes all zero.
    """
    cams = np.nan_to_num(np.asarray(cams, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    wafer = wafer_area(maps)
    n = len(cams)
    flat, on = cams.reshape(n, -1), wafer.reshape(n, -1)
    lo = np.where(on, flat, np.inf).min(axis=1) if n else np.zeros(0, np.float32)
    hi = np.where(on, flat, -np.inf).max(axis=1) if n else np.zeros(0, np.float32)
    span = np.where(np.isfinite(hi - lo) & (hi > lo), hi - lo, np.inf)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    out = (flat - lo[:, None]) / span[:, None]
    return np.where(on, np.clip(out, 0.0, 1.0), 0.0).reshape(cams.shape).astype(np.float32)


def study_gradcampp_weights(activations: np.ndarray, grads: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Channel weights (B, C) of the study's GradCAM++ (seeds.md A.5, the exp-score variant).

    alpha = g^2 / (2 g^2 + sum_ij A g^3) (a zero denominator replaced by 1, then 1e-7 added);
    weights = sum_ij alpha * ReLU(exp(S) g), with S the explained class's pre-softmax score.
    """
    a = np.asarray(activations, dtype=np.float64)
    g = np.asarray(grads, dtype=np.float64)
    num = g ** 2
    den = 2.0 * g ** 2 + (a * g ** 3).sum(axis=(2, 3), keepdims=True)
    den = np.where(den != 0.0, den, 1.0)
    alpha = num / (den + 1e-7)
    exp_s = np.exp(np.minimum(np.asarray(scores, dtype=np.float64), _MAX_EXP_SCORE))[:, None, None, None]
    return (alpha * np.maximum(exp_s * g, 0.0)).sum(axis=(2, 3))


def _layer_cams(methods: dict, hooks, model: nn.Module, x: torch.Tensor, targets: np.ndarray
                ) -> dict[str, np.ndarray]:
    """Raw CAMs (B, h, w) of every method at the layer's resolution, after the method's ReLU, unscaled.

    One forward and one backward pass serve every method: each method's ``get_cam_image`` turns the same
    activations and gradients into its map (the study's GradCAM++ uses :func:`study_gradcampp_weights`).
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    outputs = hooks(x)
    tgt = torch.as_tensor(targets, device=outputs.device)[:, None]
    scores = outputs.reshape(len(x), -1).gather(1, tgt)[:, 0]
    model.zero_grad(set_to_none=True)
    scores.sum().backward()
    acts = hooks.activations[0].float().numpy()
    grads = hooks.gradients[0].float().numpy()
    out: dict[str, np.ndarray] = {}
    for name, cam in methods.items():
        if name == STUDY_GRADCAMPP:
            weights = study_gradcampp_weights(acts, grads, scores.detach().float().cpu().numpy())
            raw = (weights[:, :, None, None] * acts).sum(axis=1)
        else:
            tg = [ClassifierOutputTarget(int(k)) for k in targets]
            raw = cam.get_cam_image(x, cam.target_layers[0], tg, acts, grads, eigen_smooth=False)
        out[name] = np.maximum(np.asarray(raw, dtype=np.float32), 0.0)
    return out


def upsample(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of layer-resolution CAMs (B, h, w) to the map size (pixel-centre aligned)."""
    t = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[:, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def _all_cams(model: nn.Module, layer: nn.Module, names: list[str], t: torch.Tensor, spec: InputSpec,
              targets: np.ndarray, batch_size: int, dev: torch.device, progress: bool
              ) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """Every method's normalised CAMs (N, H, W) for uint8 maps ``t``, and the layer's spatial size."""
    import pytorch_grad_cam
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    from waferlab.engine.predict import prepare_batch

    out = {name: np.zeros(tuple(t.shape), np.float32) for name in names}
    hw = (0, 0)
    methods = {}
    for name in names:  # the method objects only supply get_cam_image; their own hooks go at once
        methods[name] = getattr(pytorch_grad_cam, METHODS[name])(model, [layer])
        methods[name].activations_and_grads.release()
        if name == "scorecam":
            methods[name].batch_size = batch_size
    hooks = ActivationsAndGradients(model, [layer], None)
    quiet = _quiet_scorecam() if "scorecam" in names else contextlib.nullcontext()
    try:
        with torch.enable_grad(), quiet:
            for start in _progress(range(0, len(t), batch_size), progress, "cam"):
                stop = min(start + batch_size, len(t))
                x = prepare_batch(t[start:stop], spec, dev).float().contiguous()
                x.requires_grad_(True)  # gradients reach the layer even when weights are frozen
                raws = _layer_cams(methods, hooks, model, x, targets[start:stop])
                for name, raw in raws.items():
                    hw = tuple(int(s) for s in raw.shape[-2:])
                    out[name][start:stop] = upsample(raw, tuple(t.shape[-2:]))
                # Drop this batch's activations/gradients (they hold the graph) and the parameter gradients.
                hooks.clear()
                model.zero_grad(set_to_none=True)
                del x, raws
    finally:
        hooks.release()
    return {name: postprocess(cams, t) for name, cams in out.items()}, hw  # type: ignore[return-value]


def compute_cams(
    model: nn.Module,
    maps,
    spec: InputSpec,
    methods: Sequence[str] = ("gradcam",),
    targets: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> CamResult:
    """CAMs of ``model`` for every map and method, explaining ``targets`` (default: the predicted class).

    Maps are resized to ``spec.image_size``; the CAM is taken on ``model.cam_target_layer``, batch by batch
    with hooks released afterwards (pytorch-grad-cam's context manager), so memory stays flat.
    """
    names = parse_methods(methods)
    layer = getattr(model, "cam_target_layer", None)
    if not isinstance(layer, nn.Module):
        raise WaferlabError(f"model {type(model).__name__} has no cam_target_layer to explain")
    if batch_size < 1:
        raise WaferlabError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device) if device is not None else model_device(model)
    model.to(dev).eval()
    t = as_maps(maps, spec.image_size, spec.resize)
    probs = probabilities(model, t, spec, batch_size=batch_size, device=dev)
    if targets is None:
        target_arr = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    else:
        target_arr = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(target_arr) != len(t):
            raise ValueError(f"{len(target_arr)} targets for {len(t)} maps")
    n_classes = probs.shape[1] if len(probs) else 0
    if len(target_arr) and (target_arr.min() < 0 or target_arr.max() >= n_classes):
        raise WaferlabError(f"CAM target class out of range 0..{n_classes - 1}")

    cams, hw = _all_cams(model, layer, names, t, spec, target_arr, batch_size, dev, progress)
    result = CamResult(cams=cams, targets=target_arr, probs=probs, feature_hw=hw)
    if result.feature_hw == (1, 1):
        result.notes.append(f"{type(model).__name__}: the CAM layer is 1x1 at {tuple(t.shape[-2:])} input, "
                            "so every CAM is flat (all zero); use a larger image size or a smaller "
                            "output stride")
    return result


def layer_has_hooks(layer: nn.Module) -> bool:
    """True if any forward/backward hook is still attached to ``layer`` (used to check hooks are released)."""
    return bool(layer._forward_hooks or layer._backward_hooks or layer._forward_pre_hooks)
