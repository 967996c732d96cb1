"""The one loader of the native CPU extension ``eagle2_kernels._C`` (sources in ``csrc/``).

The extension is imported on first use, once per process, and never when the package is
imported: a pure-Python install (``EAGLE2_KERNELS_BUILD_EXT=0``) or a build that failed
leaves the ops on their torch references. ``available()`` says whether it loaded,
``unavailable_reason()`` why not (the ImportError's message: no compiled module, or one
built against another torch), and ``extension()`` returns the module for the ops'
``native.py`` wrappers, raising ImportError with that reason when it is missing.

Example:
    >>> from eagle2_kernels import _native
    >>> _native.available() or print("ops on the torch reference:", _native.unavailable_reason())
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

__all__ = ["MODULE", "available", "extension", "unavailable_reason"]

MODULE = "eagle2_kernels._C"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str | None]:
    # (module, None) when it imports, else (None, why); cached so the import is tried once.
    try:
        return importlib.import_module(MODULE), None
    except ImportError as exc:
        return None, str(exc) or type(exc).__name__


def available() -> bool:
    """True when the native extension imports."""
    return _load()[0] is not None


def unavailable_reason() -> str | None:
    """Why the extension does not import (its ImportError's message); None when it does."""
    return _load()[1]


def extension() -> ModuleType:
    """The extension module; ImportError naming the reason when it does not import."""
    module, reason = _load()
    if module is None:
        raise ImportError(f"the native extension {MODULE} is unavailable: {reason}")
    return module
