"""Pure-torch ``kv_compact_paged``: the specification (also the CPU path)."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._paged import physical_slots

_NAME = "kv_compact_paged"


def kv_compact_paged(
    kv_pages: torch.Tensor,
    block_table: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
) -> torch.Tensor:
    """Move the accepted path's logical slots behind the prefix in every K/V page tensor.

    Args:
        kv_pages: [N, num_blocks, page_size, Hkv, Dh] any dtype (N = 2 x layers).
        block_table: [B, max_blocks] int32/int64 pages of each sequence in logical order.
        prefix_len: [B] int32/int64; the tree starts at logical position prefix_len[b].
        path: [B, T] int32/int64 accepted node indices from the root, -1 padded.
        accept_len: [B] int32/int64 valid entries of ``path``.

    Returns:
        ``kv_pages`` itself, after: for each b and j < accept_len[b], the physical slot of
        logical prefix_len[b] + j holds (in every n and head) what the slot of logical
        prefix_len[b] + path[b, j] held before the call. Sources are read before any
        destination is written; all other slots are unchanged.
    """
    N, num_blocks, page_size = kv_pages.shape[:3]
    T = path.shape[1]
    for b in range(path.shape[0]):
        accepted = int(accept_len[b])
        prefix = int(prefix_len[b])
        if not 0 <= accepted <= T:
            raise ValueError(f"{_NAME}: accept_len[{b}]={accepted} is not in [0, T={T}]")
        if accepted == 0:
            continue
        nodes = path[b, :accepted].to(torch.int64)
        if int(nodes.min()) < 0 or prefix < 0:
            raise ValueError(
                f"{_NAME}: sequence {b}: prefix_len={prefix}, path[:{accepted}]={nodes.tolist()} "
                "(negative entries, e.g. -1 padding, inside the accepted part)"
            )
        dst = prefix + torch.arange(accepted, device=kv_pages.device)
        s_page, s_slot = physical_slots(_NAME, block_table[b], prefix + nodes, page_size,
                                        num_blocks, b)
        d_page, d_slot = physical_slots(_NAME, block_table[b], dst, page_size, num_blocks, b)
        rows = kv_pages[:, s_page, s_slot]  # [N, a, Hkv, Dh], a copy: read before any write
        kv_pages[:, d_page, d_slot] = rows
    return kv_pages
