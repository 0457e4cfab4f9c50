"""Model size and compute: parameter counts and multiply-accumulates (MACs) at a given input size.

MACs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts the matrix-multiply-like ops
(convolutions, linear layers, matmuls, attention); each MAC is 2 FLOPs, so MACs = FLOPs / 2.
Elementwise ops, pooling and normalisation are not counted, as is usual for MAC figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass on a single ``in_chans`` x ``size`` x ``size`` input."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(1, in_chans, size, size, device=device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops()) // 2
    finally:
        model.train(was_training)


def profile_models(names: Sequence[str] | None = None, sizes: Sequence[int] = (64, 224), num_classes: int = 9,
                   in_chans: int = 3) -> list[dict[str, Any]]:
    """One row per model: name, family, trainable params and ``macs_<size>`` for every size.

    ``names`` defaults to every registered model.
    """
    from waferlab.models.registry import create_model, list_models, model_spec

    rows = []
    for name in names if names is not None else list_models():
        spec = model_spec(name)
        model = create_model(name, num_classes=num_classes, in_chans=in_chans)
        row: dict[str, Any] = {"name": name, "family": spec.family, "params": count_params(model)}
        for size in sizes:
            row[f"macs_{size}"] = count_macs(model, size, in_chans)
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]], sizes: Sequence[int] = (64, 224)) -> str:
    """A plain-text table of :func:`profile_models` rows (params in millions, MACs in millions)."""
    head = ["model", "family", "params (M)"] + [f"MACs@{s} (M)" for s in sizes]
    body = [[r["name"], r["family"], f"{r['params'] / 1e6:.3f}"]
            + [f"{r[f'macs_{s}'] / 1e6:,.1f}" for s in sizes] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = []
    for i, cells in enumerate([head, *body]):
        padded = (c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
        lines.append("  ".join(padded))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def profile_variants(names: Sequence[str] | None = None, num_classes: int = 9,
                     in_chans: int = 3) -> list[dict[str, Any]]:
    """One row per registered variant (``ModelSpec.variants``) of ``names``: name, options, params."""
    from waferlab.models.registry import create_model, list_models, model_spec

    rows = []
    for name in names if names is not None else list_models():
        for label, options in model_spec(name).variants:
            model = create_model(name, num_classes=num_classes, in_chans=in_chans, **options)
            rows.append({"name": f"{name}[{label}]", "variant_of": name, "options": dict(options),
                         "params": count_params(model)})
    return rows


def format_variants(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`profile_variants` rows (exact parameter counts)."""
    width = max([len("variant")] + [len(r["name"]) for r in rows])
    lines = [f"{'variant'.ljust(width)}  {'params':>12}", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{r['name'].ljust(width)}  {r['params']:>12,}" for r in rows]
    return "\n".join(lines)
