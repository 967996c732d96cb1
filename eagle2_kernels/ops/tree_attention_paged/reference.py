"""Pure-torch ``tree_attention_paged``: the specification.

Gather every sequence's logical slots 0 .. prefix_len + tree_len - 1 out of the pages through
its block-table row into a dense [B, Hkv, L, Dh] cache (one advanced-indexing copy), then run
the dense ``tree_attention`` on it: the paged op is, by definition, the dense op on the
gathered cache. This is also the CPU path, with the native dense kernel in place of the dense
reference when the extension is built.
"""

from __future__ import annotations

from typing import Callable

import torch

from eagle2_kernels.ops.tree_attention import reference as dense_reference

_NAME = "tree_attention_paged"


def gather_pages(
    pages: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Dense copy [B, Hkv, max(lengths), Dh] of each sequence's logical slots 0 .. lengths[b]-1.

    Args:
        pages: [num_blocks, page_size, Hkv, Dh].
        block_table: [B, max_blocks] int32/int64.
        lengths: [B] int64, each <= max_blocks * page_size.

    Slots past a sequence's length read slot 0 of page 0 (any finite or non-finite value;
    the dense op never reads past prefix_len + tree_len). ValueError when a used table entry
    is outside [0, num_blocks).
    """
    B = block_table.shape[0]
    num_blocks, page_size = pages.shape[0], pages.shape[1]
    L = int(lengths.max()) if B else 0
    pos = torch.arange(L, device=pages.device)
    used = pos[None, :] < lengths[:, None]  # [B, L]
    entry = (pos // page_size).clamp(max=max(block_table.shape[1] - 1, 0)).expand(B, L)
    page = block_table.to(torch.int64).gather(1, entry) if L else entry
    bad = used & ((page < 0) | (page >= num_blocks))
    if bool(bad.any()):
        b, i = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(
            f"{_NAME}: sequence {b}, logical position {i} maps to page {int(page[b, i])}, "
            f"outside the pool's {num_blocks} pages"
        )
    page = torch.where(used, page, 0)
    return pages[page, pos % page_size].permute(0, 2, 1, 3)  # [B, Hkv, L, Dh]


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
    dense: Callable | None = None,
) -> torch.Tensor:
    """Tree attention over a paged cache (shapes: see ``eagle2_kernels.ops.tree_attention_paged``).

    ``dense`` is the dense ``tree_attention`` implementation run on the gathered cache (the
    reference by default; the CPU dispatch passes the native kernel). ``window``, ``softcap``
    and ``sinks`` as in the dense op. With a window only the slots a row can see are needed,
    but the gather copies every slot: this is the specification, not a fast path.
    """
    lengths = prefix_len.to(torch.int64) + tree_len
    capacity = block_table.shape[1] * k_pages.shape[1]
    if bool((prefix_len < 0).any()) or bool((lengths > capacity).any()):
        b = int(torch.nonzero((prefix_len < 0) | (lengths > capacity))[0])
        raise ValueError(
            f"{_NAME}: sequence {b} needs logical positions 0..{int(lengths[b]) - 1} "
            f"(prefix_len={int(prefix_len[b])}, tree_len={tree_len}), but its block-table row "
            f"holds {block_table.shape[1]} pages of {k_pages.shape[1]} slots"
        )
    k = gather_pages(k_pages, block_table, lengths)
    v = gather_pages(v_pages, block_table, lengths)
    # Looked up at call time (not bound at import), so the dense reference can be swapped.
    dense = dense_reference.tree_attention if dense is None else dense
    return dense(q, k, v, prefix_len, tree_mask, tree_len, scale, window, softcap, sinks)
