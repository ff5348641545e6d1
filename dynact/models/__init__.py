"""The paper's models, at their public path: they live in :mod:`dynact.experiments.models`.

``dynact.models.ImageClassifier``, ``vit_tiny``, ``deit_tiny``, ``tnt_small``, ``create_model``
and ``model_names`` keep working; the submodules moved (``dynact.models.classifier`` is now
``dynact.experiments.models.classifier``, ``dynact.models.vit`` is
``dynact.experiments.models.vit``).
"""

from dynact.experiments.models import ImageClassifier, create_model, deit_tiny, model_names, tnt_small, vit_tiny

__all__ = ["ImageClassifier", "create_model", "deit_tiny", "model_names", "tnt_small", "vit_tiny"]
