"""Explanations of wafer-map classifiers: CAMs (pytorch-grad-cam), faithfulness and localisation scores."""

from waferlab.explain.cam import METHODS, compute_cams, parse_methods, postprocess, predict
from waferlab.explain.faithfulness import faithfulness, perturbation_curves, relevance_ranks, road_scores
from waferlab.explain.localization import localisation
from waferlab.explain.scores import score_model

__all__ = [
    "METHODS", "compute_cams", "faithfulness", "localisation", "parse_methods", "perturbation_curves",
    "postprocess", "predict", "relevance_ranks", "road_scores", "score_model",
]
