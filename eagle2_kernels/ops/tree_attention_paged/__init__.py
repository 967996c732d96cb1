"""``tree_attention_paged``: tree attention over a paged KV pool addressed by a block table."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._checks import (check_attention, check_block_table, check_heads,
                                        check_index_vector, check_int, check_scale, check_tree_mask)
from eagle2_kernels.ops._dispatch import dispatch
from eagle2_kernels.ops.tree_attention import check_window_softcap_sinks

__all__ = ["tree_attention_paged"]

_NAME = "tree_attention_paged"


def tree_attention_paged(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
    backend: str | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tree_attention`` with K/V in pages (vLLM's block-table layout) instead of a dense cache.

    Sequence b's logical position ``pos`` is slot ``pos % page_size`` of page
    ``block_table[b, pos // page_size]``. Its committed prefix is logical 0 .. prefix_len[b]-1,
    visible to every query; its ``tree_len`` tree slots follow at logical prefix_len[b] ..
    prefix_len[b] + tree_len - 1, slot j visible to query row i iff bit j of tree_mask[b, i] is
    set (word j // 32, bit j % 32; bits past tree_len ignored). Query head h reads kv head
    h // (Hq // Hkv). The result equals ``tree_attention`` on the dense cache that gathers
    those logical slots (that is the reference).

    Args:
        q: [B, Hq, Tq, Dh] float16 / bfloat16 / float32, any strides (Dh <= 256 on Triton).
        k_pages: [num_blocks, page_size, Hkv, Dh], dtype and device of ``q``, any strides (e.g.
            ``kv[0]`` of vLLM's stacked [2, num_blocks, page_size, Hkv, Dh], or FlashInfer's
            NHD ``kv[:, 0]``; its HND pages [num_blocks, Hkv, page_size, Dh] as
            ``.transpose(1, 2)``).
        v_pages: like ``k_pages``.
        block_table: [B, max_blocks] int32 (int64 accepted): the pages of each sequence in
            logical order; entries past ceil((prefix_len[b] + tree_len) / page_size) are not
            read. Pages must lie in [0, num_blocks) (the Triton path does not check).
        prefix_len: [B] int32/int64 on the device of ``q``; read on the device only (Triton).
        tree_mask: [B, Tq, W] int32, W >= ceil(tree_len / 32).
        tree_len: Python int >= 0; prefix_len[b] + tree_len <= max_blocks * page_size.
        scale: softmax scale; default 1 / sqrt(Dh).
        backend: ``"reference"``, ``"triton"`` or ``"ext"``; default by device. There is no
            native paged kernel: on CPU (``ext`` included) the pages of each sequence are
            gathered and the dense ``tree_attention`` runs on them (native when built).
        window, softcap, sinks: sliding window, logit soft-capping and attention sinks, as in
            ``tree_attention`` (the window counts logical slots; pages wholly before
            prefix_len - window are not read on Triton).

    Returns:
        out: [B, Hq, Tq, Dh], dtype and layout of ``q``; float32 softmax; a row that sees no
        slot is zeros. Long prefixes are split across programs (flash-decoding) on Triton.

    Example:
        >>> k = torch.randn(4, 2, 1, 8); v = torch.randn(4, 2, 1, 8)   # 4 pages of 2 slots
        >>> table = torch.tensor([[3, 0, 2]], dtype=torch.int32)      # logical 0-1: page 3, ...
        >>> mask = torch.tensor([[[0b01], [0b11]]], dtype=torch.int32)
        >>> out = tree_attention_paged(torch.randn(1, 2, 2, 8), k, v, table, torch.tensor([3]),
        ...                            mask, tree_len=2)
        >>> out.shape
        torch.Size([1, 2, 2, 8])
    """
    _check(q, k_pages, v_pages, block_table, prefix_len, tree_mask, tree_len, scale)
    check_window_softcap_sinks(_NAME, q, window, softcap, sinks)
    return dispatch(_NAME, q, backend, q, k_pages, v_pages, block_table, prefix_len, tree_mask,
                    tree_len, scale, window, softcap, sinks)


def _check(q, k_pages, v_pages, block_table, prefix_len, tree_mask, tree_len, scale) -> None:
    B, Hq, Tq, Dh = check_attention(_NAME, q, k_pages, v_pages, "[num_blocks, page_size, Hkv, Dh]",
                                    ("k_pages", "v_pages"))
    num_blocks, page_size, Hkv, Dk = k_pages.shape
    if num_blocks == 0 or page_size == 0:
        raise ValueError(f"{_NAME}: the pool has no slots (pages of shape {tuple(k_pages.shape)})")
    check_heads(_NAME, Hq, Hkv, Dh, Dk)
    check_block_table(_NAME, block_table, B, q.device, "q")
    check_index_vector(_NAME, "prefix_len", prefix_len, B, q.device, "q")
    capacity = block_table.shape[1] * page_size
    check_int(_NAME, "tree_len", tree_len, 0, capacity, f"max_blocks * page_size = {capacity}")
    check_tree_mask(_NAME, tree_mask, B, Tq, tree_len, q.device, "q")
    check_scale(_NAME, scale)
