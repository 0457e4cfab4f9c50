"""Explanations of wafer-map classifiers: CAMs (pytorch-grad-cam), faithfulness and localisation scores.

Names are imported on first use (PEP 562), so that the CLI can register ``explain`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "METHODS": "waferlab.explain.methods",
    "compute_cams": "waferlab.explain.cam",
    "parse_methods": "waferlab.explain.cam",
    "postprocess": "waferlab.explain.cam",
    "probabilities": "waferlab.explain.cam",
    "ExplainSettings": "waferlab.explain.runner",
    "explain_runs": "waferlab.explain.runner",
    "ScoreSettings": "waferlab.explain.scores",
    "fail_mass_lift": "waferlab.explain.localization",
    "faithfulness": "waferlab.explain.faithfulness",
    "perturbation_curves": "waferlab.explain.faithfulness",
    "relevance_ranks": "waferlab.explain.faithfulness",
    "road_scores": "waferlab.explain.faithfulness",
    "localisation": "waferlab.explain.localization",
    "score_model": "waferlab.explain.scores",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'waferlab.explain' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
