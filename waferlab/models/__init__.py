"""Model zoo: registry, the attention-ResNet34 study, SP&A-Net and timm baselines.

The model modules register themselves when the registry is first used (see ``registry.MODEL_MODULES``),
so importing this package does not import torch.
"""

from waferlab.models.registry import create_model, list_models, model_spec, register

__all__ = ["create_model", "list_models", "model_spec", "register"]
