"""Moved to :mod:`dynact.kernels.dispatch`; this old name is an alias of that very module.

Kept only while the experiments layer (``dynact.compare``) still reads the kernel mode through
it; delete it once nothing imports ``dynact._kernels``. The other old private modules are gone
(see docs/layout.md).
"""

import sys

from dynact.kernels import dispatch

sys.modules[__name__] = dispatch
