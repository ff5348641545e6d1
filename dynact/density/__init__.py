"""Densities of pre-activations on a uniform grid: the container and its estimators.

:class:`Density` is what the EAFO numerics (:mod:`dynact.eafo`) consume: a density ``p``
and its derivative ``dp`` at the centres of ``bins`` uniform bins covering ``[lo, hi]``,
plus how much mass fell outside. It is built from data by the streaming estimators
(:class:`Histogram`, :class:`KDE`) or from an analytic density by :meth:`Density.from_pdf`.
"""

from dynact.density.estimators import KDE, Histogram, sum_states
from dynact.density.grid import MAX_BINS, MIN_BINS, Density, check_grid

__all__ = ["KDE", "MAX_BINS", "MIN_BINS", "Density", "Histogram", "check_grid", "sum_states"]
