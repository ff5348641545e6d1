"""Shared test fixtures."""

import pytest

from dynact.kernels import dispatch as _kernels


@pytest.fixture(autouse=True)
def _restore_kernel_mode():
    """Tests switch the kernel path with ``dynact.kernels.dispatch.MODE = ...``; put it back after each."""
    mode = _kernels.MODE
    yield
    _kernels.MODE = mode
