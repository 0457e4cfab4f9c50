"""Turn uint8 wafer-map batches (0 no die, 1 good, 2 failed) into model input tensors, on their own device."""

from __future__ import annotations

from typing import TYPE_CHECKING

from waferlab.data.cache import LEGACY_RESIZE
from waferlab.errors import WaferlabError

if TYPE_CHECKING:  # torch is imported in the functions, so the CLI can list ENCODINGS without it
    import torch

#: Input encodings: one-hot {no die, good, failed} (default), gray (value/2), the study's gray-to-RGB.
ENCODINGS: tuple[str, ...] = ("onehot", "gray", "rgb")
_CHANNELS = {"onehot": 3, "gray": 1, "rgb": 3}
#: The attention study's gray-to-RGB pixel values for 0/1/2, scaled to [0, 1].
RGB_LEVELS = (0.0, 127.0 / 255.0, 1.0)


def num_channels(encoding: str) -> int:
    """Number of input channels an encoding produces."""
    try:
        return _CHANNELS[encoding]
    except KeyError:
        raise WaferlabError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}") from None


def _as_batch(maps: torch.Tensor) -> torch.Tensor:
    import torch

    if not isinstance(maps, torch.Tensor):
        maps = torch.as_tensor(maps)
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() == 2:
        maps = maps.unsqueeze(0)
    if maps.dim() != 3:
        raise WaferlabError(f"wafer-map batch must be (N,H,W), got shape {tuple(maps.shape)}")
    if maps.dtype != torch.uint8:
        raise WaferlabError(f"wafer-map batch must be uint8 with values 0/1/2, got {maps.dtype}")
    return maps


def encode(maps: torch.Tensor, encoding: str = "onehot") -> torch.Tensor:
    """Encode a uint8 (N,H,W) batch as float32 (N,C,H,W) on the same device.

    ``onehot``: 3 channels (no die, good, failed); ``gray``: 1 channel value/2; ``rgb``: 3 equal
    channels 0/127/255 scaled to [0,1], as the attention study fed its ImageNet backbones.
    """
    import torch

    channels = num_channels(encoding)
    maps = _as_batch(maps)
    if encoding == "onehot":
        return torch.stack([maps == 0, maps == 1, maps == 2], dim=1).to(torch.float32)
    if encoding == "gray":
        return (maps.to(torch.float32) * 0.5).unsqueeze(1)
    levels = torch.tensor(RGB_LEVELS, dtype=torch.float32, device=maps.device)
    gray = levels[maps.long().clamp_(0, 2)].unsqueeze(1)
    return gray.expand(-1, channels, -1, -1).contiguous()


def resize_maps(maps: torch.Tensor, size: int | tuple[int, int], rule: str = LEGACY_RESIZE,
                mask: bool = False) -> torch.Tensor:
    """Resize a uint8 (N,H,W) batch on its device with ``rule``, exactly as ``resize_stack`` does on the CPU.

    ``nearest``: pixel-centre sampling; ``failkeep``: see :data:`waferlab.data.cache.RESIZE_RULES`;
    ``mask``: a 0/1 pattern mask (``failkeep`` tests its 1 cells, as it tests failed dies).
    """
    import torch
    import torch.nn.functional as F

    from waferlab.data.cache import check_resize

    maps = _as_batch(maps)
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    check_resize(rule)
    if tuple(maps.shape[-2:]) == out_hw:
        return maps
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *out_hw))
    resized = F.interpolate(maps.unsqueeze(1).to(torch.float32), size=out_hw, mode="nearest-exact")
    near = resized.squeeze(1).round_().to(torch.uint8)
    h, w = maps.shape[-2:]
    if rule == "nearest" or (h <= out_hw[0] and w <= out_hw[1]):
        return near
    hits = maps == (1 if mask else 2)
    keep = (_block_counts(hits, out_hw) >= _threshold(h, w, out_hw, maps.device)) | (
        _block_counts(_diagonal_runs(hits), out_hw) > 0)
    if mask:
        return keep.to(torch.uint8)
    return torch.where(near == 0, near, 1 + keep.to(torch.uint8))


def _diagonal_runs(hits: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`waferlab.data.cache.diagonal_runs`."""
    import torch.nn.functional as F

    down = hits[:, :-2, :-2] & hits[:, 2:, 2:]
    up = hits[:, :-2, 2:] & hits[:, 2:, :-2]
    mid = hits[:, 1:-1, 1:-1] & (down | up)
    return F.pad(mid, (1, 1, 1, 1))


def _block_counts(hits: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """int32 true cells per ``block_bounds`` block (prefix sums); the torch side of ``cache._failkeep``."""
    import torch

    from waferlab.data.cache import block_bounds

    out = hits.to(torch.int32)
    for axis, n_out in ((1, out_hw[0]), (2, out_hw[1])):
        bounds = block_bounds(out.shape[axis], n_out)  # cached, read-only: copied into the tensors
        start, end = (torch.tensor(b.copy(), device=hits.device) for b in bounds)
        zero = torch.zeros_like(out.narrow(axis, 0, 1))
        cum = torch.cat([zero, out.cumsum(axis, dtype=torch.int32)], dim=axis)
        out = cum.index_select(axis, end) - cum.index_select(axis, start)
    return out


def _threshold(h: int, w: int, out_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    import torch

    from waferlab.data.cache import failkeep_threshold

    return torch.as_tensor(failkeep_threshold(h, w, out_hw), device=device)
