"""The one dispatch table of the ops: a backend name -> the module of the op's folder.

Every op folder ``eagle2_kernels/ops/<op>/`` holds one module per backend, each defining a
function named ``<op>`` with the reference's signature:

=============  ==============  ===============================================================
backend        module          what runs
=============  ==============  ===============================================================
``reference``  ``reference``   pure torch, the specification; CPU without the extension
``triton``     ``kernel``      the Triton kernels (the only modules that import triton)
``ext``        ``native``      the C++ CPU extension ``eagle2_kernels._C``
=============  ==============  ===============================================================

Modules are imported on first use (importing the package needs neither triton nor the
extension), and the function is looked up on the module at every call, so a test may replace
it. The backend is chosen from the main input's device by ``eagle2_kernels._backend``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from eagle2_kernels._backend import device_guard, select_backend

__all__ = ["BACKEND_MODULES", "backend_module", "dispatch"]

BACKEND_MODULES = {"reference": "reference", "triton": "kernel", "ext": "native"}


def backend_module(op: str, backend: str) -> ModuleType:
    """The module ``eagle2_kernels.ops.<op>.<reference|kernel|native>`` of ``backend``."""
    return importlib.import_module(f"eagle2_kernels.ops.{op}.{BACKEND_MODULES[backend]}")


def dispatch(op: str, where: torch.Tensor, backend: str | None, *args):
    """Run ``op`` on the backend chosen for ``where`` (its main input), under its device.

    Args:
        op: the op's name, which is also its folder and its function's name.
        where: the tensor whose device picks the backend and becomes the current device.
        backend: an explicit backend name or None (see ``_backend.select_backend``).
        *args: the op's arguments in the reference's order, already checked.
    """
    impl = getattr(backend_module(op, select_backend(where, backend)), op)
    with device_guard(where):
        return impl(*args)
