"""eagle2_kernels: lossless EAGLE-2 speculative decoding with fused tree kernels.

Shape letters used in every docstring of the package:

    B   batch (sequences decode independently)
    T   tree nodes, root included (``total_tokens``)
    K   top-k branching factor of the draft tree
    D   depth: expansion steps after the root expansion
    C   draft candidates (K + D*K*K)
    R   frontier rows expanded at once
    L   cache length (Lmax: its capacity)
    H   hidden size
    Hq  query heads, Hkv key/value heads, Dh head dim
    V   vocabulary (of the target, or the draft's reduced vocabulary)
    W   int32 words per packed tree-mask row, ceil(T / 32)

Importing the package needs neither triton, transformers nor the native extension, and
never touches a GPU driver; the decoder classes are imported on first use.
"""

from __future__ import annotations

from eagle2_kernels import ops
from eagle2_kernels.ops import _library  # noqa: F401  (registers torch.ops.eagle2.*)

__version__ = "0.1.0"

__all__ = ["TreeSpecDecoder", "DecodeConfig", "DraftHeadBase", "EagleDraftHead", "Eagle3DraftHead", "ops",
           "__version__"]

_LAZY = {
    "TreeSpecDecoder": "eagle2_kernels.runtime.decoder",
    "DecodeConfig": "eagle2_kernels.runtime.config",
    "DraftHeadBase": "eagle2_kernels.models.head_base",
    "EagleDraftHead": "eagle2_kernels.models.draft_head",
    "Eagle3DraftHead": "eagle2_kernels.models.eagle3_head",
}


def __getattr__(name: str):
    # Lazy so that `import eagle2_kernels` works without transformers installed.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eagle2_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
