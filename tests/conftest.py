"""Shared test set-up: the `cuda` marker skips without a GPU; seeds are fixed per test."""

from __future__ import annotations

import os

import pytest
import torch

# Compiled forwards cost tens of seconds per model and size on 2 cores: the suite runs the
# eager path by default ("auto" honours this), and tests/runtime/test_compiled.py asks for
# compile=True explicitly on the cases that check it.
os.environ.setdefault("EAGLE2_KERNELS_COMPILE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def triton_device() -> str:
    """Device on which Triton kernels can be tested here: CUDA, or CPU under the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def triton_runs_here() -> bool:
    """Triton kernels run on a GPU, or on CPU tensors when TRITON_INTERPRET=1 was set early."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


requires_triton = pytest.mark.skipif(
    not triton_runs_here(), reason="Triton needs a GPU or TRITON_INTERPRET=1 (make test sets it)"
)
