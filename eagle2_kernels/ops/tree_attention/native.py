"""Native CPU ``tree_attention`` (``eagle2_kernels._C``): online softmax over key blocks,
parallel over sequences and heads.

Same signature and numerical contract as ``reference.py``; importing this module imports the
extension, so the dispatch imports it only when ``ext_available()`` said yes.
"""

from __future__ import annotations

import torch

from eagle2_kernels._native import extension

_C = extension()  # ImportError with the reason when the extension is missing


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Native ``tree_attention``: q [B, Hq, Tq, Dh], caches [B, Hkv, Lmax, Dh], prefix_len [B],
    tree_mask [B, Tq, W] int32 -> out [B, Hq, Tq, Dh] in the dtype and layout of q (optional
    sliding window, softcap and sinks [Hq] as in the reference)."""
    return _C.tree_attention(
        q, k_cache, v_cache, prefix_len, tree_mask, int(tree_len),
        None if scale is None else float(scale),
        None if window is None else int(window),
        None if softcap is None else float(softcap),
        sinks,
    )
