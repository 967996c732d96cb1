"""Pure-torch ``kv_compact_paged``: the specification (also the CPU path)."""

from __future__ import annotations

import torch

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
        prefix_len[b] + path[b, j] held before the call. All sources are gathered (a copy)
        before any destination is written; all other slots are unchanged.
    """
    num_blocks, page_size = kv_pages.shape[1], kv_pages.shape[2]
    B, T = path.shape
    accept = accept_len.to(torch.int64)
    prefix = prefix_len.to(torch.int64)
    bad = (accept < 0) | (accept > T)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        raise ValueError(f"{_NAME}: accept_len[{b}]={int(accept[b])} is not in [0, T={T}]")
    j = torch.arange(T, device=path.device)
    valid = j[None, :] < accept[:, None]  # [B, T]: the accepted entries
    nodes = path.to(torch.int64)
    bad = (valid & (nodes < 0)).any(1) | (prefix < 0)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{_NAME}: sequence {b}: prefix_len={int(prefix[b])}, "
            f"path[:{int(accept[b])}]={nodes[b, : int(accept[b])].tolist()} (negative entries, "
            "e.g. -1 padding, inside the accepted part)"
        )
    seq = torch.arange(B, device=path.device)[:, None].expand(B, T)[valid]
    src = (prefix[:, None] + nodes)[valid]
    dst = (prefix[:, None] + j)[valid]
    s_page, s_slot = _physical(block_table, seq, src, page_size, num_blocks)
    d_page, d_slot = _physical(block_table, seq, dst, page_size, num_blocks)
    rows = kv_pages[:, s_page, s_slot]  # [N, moves, Hkv, Dh], a copy: read before any write
    kv_pages[:, d_page, d_slot] = rows
    return kv_pages


def _physical(table, seq, pos, page_size, num_blocks):
    """(page, slot) of logical positions ``pos`` of sequences ``seq`` (flat), checked."""
    entry = pos // page_size
    bad = entry >= table.shape[1]
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{_NAME}: sequence {int(seq[i])} needs logical position {int(pos[i])}, but its "
            f"block-table row holds {table.shape[1]} pages of {page_size} slots"
        )
    page = table.to(torch.int64)[seq, entry]
    bad = (page < 0) | (page >= num_blocks)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{_NAME}: sequence {int(seq[i])}, logical position {int(pos[i])} maps to page "
            f"{int(page[i])}, outside the pool's {num_blocks} pages"
        )
    return page, pos % page_size
