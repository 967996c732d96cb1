"""Native CPU ``kv_compact`` (``eagle2_kernels._C``): every layer and head in one pass,
parallel over sequences.

Same signature and (bit-exact) effect as ``reference.py``; importing this module imports the
extension, so the dispatch imports it only when ``ext_available()`` said yes.
"""

from __future__ import annotations

import torch

from eagle2_kernels._native import extension

_C = extension()  # ImportError with the reason when the extension is missing


def kv_compact(
    cache: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
) -> torch.Tensor:
    """Native ``kv_compact``, in place on cache [N, B, Hkv, Lmax, Dh]; returns ``cache``."""
    _C.kv_compact(cache, prefix_len, path, accept_len)
    return cache
