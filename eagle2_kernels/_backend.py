"""Backend selection for the ops: by tensor device, overridable by environment.

``EAGLE2_KERNELS_BACKEND=reference|triton|ext`` forces one backend for every op call.
Without it, CUDA tensors go to the Triton kernels and CPU tensors to the native
extension when it is built, else to the pure-torch reference. Nothing here touches a
GPU driver: the choice is made from ``tensor.device`` at call time.

``device_guard`` makes a CUDA input's device the current one around an op or a graph
capture: Triton launches (and ``torch.cuda.Stream()`` / ``current_stream()`` without an
argument) use the current device, which need not be the input's (a target on ``cuda:1``).
"""

from __future__ import annotations

import contextlib
import os

import torch

from eagle2_kernels import _native

BACKENDS = ("reference", "triton", "ext")
ENV_VAR = "EAGLE2_KERNELS_BACKEND"


def ext_available() -> bool:
    """True when the native extension (``eagle2_kernels._C``) imports; loaded once by
    ``eagle2_kernels._native``, whose ``unavailable_reason()`` says why it does not."""
    return _native.available()


def forced_backend() -> str | None:
    """The backend named by ``EAGLE2_KERNELS_BACKEND``, or None when unset."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def select_backend(tensor: torch.Tensor, backend: str | None = None) -> str:
    """Pick the backend that runs an op whose main input is ``tensor``.

    Args:
        tensor: the op's main input; its device decides the default.
        backend: an explicit choice (``reference``, ``triton`` or ``ext``); wins over the
            environment variable.
    """
    name = backend or forced_backend()
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
        if name == "ext" and not ext_available():
            raise RuntimeError(
                "backend 'ext' was requested but the native extension eagle2_kernels._C is not "
                "built; reinstall with EAGLE2_KERNELS_BUILD_EXT=1 and a C++ compiler"
            )
        return name
    if tensor.device.type == "cuda":
        return "triton"
    if tensor.device.type == "cpu" and ext_available():
        return "ext"
    return "reference"


_NO_GUARD = contextlib.nullcontext()  # reusable and reentrant: nothing to allocate on CPU


def device_guard(where: torch.Tensor | torch.device):
    """Context manager that makes ``where``'s device current when it is a CUDA device.

    ``torch.cuda.device(where.device)`` for a CUDA tensor (or device); a shared no-op context
    for anything else, so CPU calls pay one attribute lookup and no CUDA call.

    Example:
        >>> x = torch.ones(2)
        >>> with device_guard(x):  # CPU: nothing happens
        ...     y = x + 1
    """
    device = where.device if isinstance(where, torch.Tensor) else where
    if device.type != "cuda":
        return _NO_GUARD
    return torch.cuda.device(device)
