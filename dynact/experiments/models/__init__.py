"""The paper's models (ViT-Tiny, DeiT-Tiny, TNT-Small on timm) and the Lightning training module.

- :func:`vit_tiny`, :func:`deit_tiny`, :func:`tnt_small`: timm models with any registered
  MLP activation (``act=``); :func:`create_model` builds one by name.
- :class:`ImageClassifier`: cross-entropy (plus DeiT's hard distillation), AdamW, warm-up +
  cosine schedule per step, top-1/top-5 accuracy.
"""

from dynact.experiments.models.classifier import ImageClassifier
from dynact.experiments.models.vit import create_model, deit_tiny, model_names, tnt_small, vit_tiny

__all__ = ["ImageClassifier", "create_model", "deit_tiny", "model_names", "tnt_small", "vit_tiny"]
