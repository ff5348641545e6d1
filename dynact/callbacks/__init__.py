"""Lightning callbacks: :class:`EAFOCallback` measures activations while a model trains,
logs their entropy and applies EAFO updates to dynamic activations."""

from dynact.callbacks.eafo_callback import EAFOCallback

__all__ = ["EAFOCallback"]
