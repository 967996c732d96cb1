"""Pure-torch ``tree_attention_paged``: the specification.

Gather each sequence's logical slots 0 .. prefix_len + tree_len - 1 out of the pages through
its block-table row into a dense [1, Hkv, L, Dh] cache, then run the dense ``tree_attention``
reference on it: the paged op is, by definition, the dense op on the gathered cache. It is
also the CPU path (with the native dense kernel in place of the dense reference when the
extension is built).
"""

from __future__ import annotations

from typing import Callable

import torch

from eagle2_kernels.ops._paged import physical_slots
from eagle2_kernels.ops.tree_attention.reference import tree_attention as dense_reference

_NAME = "tree_attention_paged"


def gather_pages(
    pages: torch.Tensor, block_row: torch.Tensor, length: int, seq: int = 0
) -> torch.Tensor:
    """Logical slots 0 .. length-1 of one sequence: pages [num_blocks, page_size, Hkv, Dh] ->
    a dense [1, Hkv, length, Dh] copy."""
    num_blocks, page_size = pages.shape[0], pages.shape[1]
    positions = torch.arange(length, device=pages.device)
    page, slot = physical_slots(_NAME, block_row, positions, page_size, num_blocks, seq)
    return pages[page, slot].permute(1, 0, 2).unsqueeze(0)  # [1, Hkv, length, Dh]


def tree_attention_paged(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
    dense: Callable = dense_reference,
) -> torch.Tensor:
    """Tree attention over a paged cache (shapes: see ``eagle2_kernels.ops.tree_attention_paged``).

    ``dense`` is the dense ``tree_attention`` implementation run on each gathered sequence
    (the reference by default; the CPU dispatch passes the native kernel).
    """
    B = q.shape[0]
    out = torch.empty_like(q)
    for b in range(B):
        prefix = int(prefix_len[b])
        if prefix < 0:
            raise ValueError(f"{_NAME}: prefix_len[{b}]={prefix} is negative")
        total = prefix + tree_len
        k = gather_pages(k_pages, block_table[b], total, b)
        v = gather_pages(v_pages, block_table[b], total, b)
        p = torch.tensor([prefix], dtype=prefix_len.dtype, device=q.device)
        out[b] = dense(q[b : b + 1], k, v, p, tree_mask[b : b + 1], tree_len, scale)[0]
    return out
