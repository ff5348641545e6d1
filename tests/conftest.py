"""Shared test fixtures."""

import pytest

from dynact import _kernels


@pytest.fixture(autouse=True)
def _restore_kernel_mode():
    """Tests switch the kernel path with ``dynact._kernels.MODE = ...``; put it back after each."""
    mode = _kernels.MODE
    yield
    _kernels.MODE = mode
