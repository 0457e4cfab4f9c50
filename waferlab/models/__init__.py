"""Model zoo: registry, the attention-ResNet34 study, SP&A-Net and timm baselines."""

from waferlab.models import baselines, spanet  # noqa: F401  (registers models)
from waferlab.models.registry import create_model, list_models, model_spec, register

__all__ = ["create_model", "list_models", "model_spec", "register"]
