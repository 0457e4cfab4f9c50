"""``waferlab models``: list every registered model with its size and compute."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``models`` command to the top-level parser."""
    p = sub.add_parser("models", help="list the registered models with parameters and MACs",
                       description="List every registered model: family, trainable parameters (9 classes, "
                                   "3 input channels) and multiply-accumulates of one forward pass at each "
                                   "input size.")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--sizes", default="64,224",
                   help="comma-separated input sizes in pixels for the MACs columns (default 64,224)")
    p.add_argument("--model", action="append", default=None, metavar="NAME",
                   help="only this model (repeatable; default: all)")
    p.add_argument("--variants", action="store_true",
                   help="also list each model's named option variants (e.g. SP&A-Net's attention types and "
                        "composition ratios) with their exact trainable parameter counts")
    p.set_defaults(func=_models)


def _parse_sizes(text: str) -> list[int]:
    from waferlab.errors import WaferlabError

    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise WaferlabError(f"--sizes: expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 32:
        raise WaferlabError(f"--sizes: every size must be >= 32 pixels, got {text!r}")
    return sizes


def _models(args: argparse.Namespace) -> int:
    import torch

    from waferlab.models.profile import format_table, format_variants, profile_models, profile_variants
    from waferlab.models.registry import model_spec

    sizes = _parse_sizes(args.sizes)
    for name in args.model or []:
        model_spec(name)  # a clear error for an unknown name before any work
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    rows = profile_models(args.model, sizes=sizes)
    variants = profile_variants(args.model) if args.variants else []
    if args.json:
        print(json.dumps(rows + variants, indent=2))
    else:
        print(format_table(rows, sizes))
        if variants:
            print("\n" + format_variants(variants))
    return 0
