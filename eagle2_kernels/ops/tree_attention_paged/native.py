"""``tree_attention_paged`` on the CPU extension: there is no native paged kernel; the pages
of each sequence are gathered into a dense cache with one indexing copy (the reference's
``gather_pages``) and the native dense ``tree_attention`` runs on it.
"""

from __future__ import annotations

import torch

from eagle2_kernels.ops.tree_attention import native as dense_native
from eagle2_kernels.ops.tree_attention_paged import reference


def tree_attention_paged(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, Tq, Dh], pages [num_blocks, page_size, Hkv, Dh] -> out [B, Hq, Tq, Dh]."""
    return reference.tree_attention_paged(
        q, k_pages, v_pages, block_table, prefix_len, tree_mask, tree_len, scale,
        window, softcap, sinks, dense=dense_native.tree_attention,
    )
