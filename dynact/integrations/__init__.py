"""Front doors of dynact for training frameworks other than Lightning.

- :mod:`dynact.integrations.transformers`: :class:`EAFOTrainerCallback` for Hugging Face's
  ``Trainer`` and TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ...).

Each is a thin adapter over :class:`dynact.ActivationOptimizer`; importing this package loads
no framework.
"""
