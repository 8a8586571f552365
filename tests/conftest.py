"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one intra-op thread for a module, restored after it.

    The tiny models' ops are far too small for intra-op threads: with 2 threads on a busy 2-core machine a
    generation step is ~30× slower than with 1 (measured). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
