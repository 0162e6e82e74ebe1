"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """llama.cpp's threads and torch's intra-op threads share the cores: on a small, busy machine
    torch's spinning workers slow every llama.cpp step by orders of magnitude; one torch thread
    keeps the llama.cpp tests at seconds. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
