"""``kv_compact_paged``: the accepted path's KV moved behind the prefix in a paged pool."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._checks import (INT_DTYPES, check_block_table, check_device,
                                        check_index_vector, check_rank)
from eagle2_kernels.ops._dispatch import dispatch

__all__ = ["kv_compact_paged"]

_NAME = "kv_compact_paged"


def kv_compact_paged(
    kv_pages: torch.Tensor,
    block_table: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """``kv_compact`` at the logical level of a paged pool: every layer's K and V, in place.

    After a verify step the tree's T nodes sit at logical positions prefix_len[b] + 0..T-1 of
    sequence b (reached through its block-table row: page ``block_table[b, pos // page_size]``,
    slot ``pos % page_size``). For each j < accept_len[b], logical prefix_len[b] + j receives
    what logical prefix_len[b] + path[b, j] held, bit-exact, in all N page tensors and heads at
    once (one launch on Triton). Every source is read before any destination is written, so
    overlapping moves (path [0, 2, 3]) are safe. Nothing else changes; the caller frees or
    reuses the pages past the new length.

    Precondition (not checked on Triton): the slots a sequence reads and writes are not those of
    another sequence of the batch (tree pages are private; copy-on-write of shared prefix pages
    is the engine's business), and every page reached lies in [0, num_blocks).

    Args:
        kv_pages: [N, num_blocks, page_size, Hkv, Dh] any dtype, any strides, modified in
            place. N = 2 x layers when all layers live in one allocation (one launch for the
            model); an engine with one tensor per layer calls once per layer with N = 2:
            vLLM's (2, num_blocks, page_size, Hkv, Dh) as is, FlashInfer's NHD
            (num_blocks, 2, page_size, Hkv, Dh) as ``kv.transpose(0, 1)``, HND
            (num_blocks, 2, Hkv, page_size, Dh) as ``kv.transpose(0, 1).transpose(2, 3)``.
        block_table: [B, max_blocks] int32 (int64 accepted), on the device of ``kv_pages``.
        prefix_len: [B] int32/int64.
        path: [B, T] int32/int64 accepted node indices from the root (path[b, 0] = 0), -1 after
            accept_len[b] entries (the output of ``verify_greedy`` / ``verify_sample``).
        accept_len: [B] int32/int64 in [0, T]. The Triton path never reads the index tensors on
            the host (graph-capturable).
        backend: ``"reference"``, ``"triton"`` or ``"ext"``; default by device. There is no
            native kernel: on CPU (``ext`` included) the reference runs (it moves only the
            accepted rows, a few per sequence).

    Returns:
        ``kv_pages`` (the same tensor object).

    Example:
        >>> kv = torch.arange(8.0).reshape(1, 4, 2, 1, 1)   # 4 pages of 2 slots, values = slot id
        >>> table = torch.tensor([[2, 0, 3]])               # logical 0..5 -> slots 4 5 0 1 6 7
        >>> _ = kv_compact_paged(kv, table, torch.tensor([1]), torch.tensor([[0, 2, 3]]),
        ...                      torch.tensor([3]))
        >>> kv.flatten().tolist()                           # logical 2, 3 <- logical 3, 4
        [1.0, 6.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    """
    _check(kv_pages, block_table, prefix_len, path, accept_len)
    out = dispatch(_NAME, kv_pages, backend, kv_pages, block_table, prefix_len, path, accept_len)
    return kv_pages if out is None else out


def _check(kv_pages, block_table, prefix_len, path, accept_len) -> None:
    check_rank(_NAME, "kv_pages", kv_pages, "[N, num_blocks, page_size, Hkv, Dh]")
    dev = kv_pages.device
    check_rank(_NAME, "path", path, "[B, T]", INT_DTYPES)
    check_device(_NAME, "path", path, dev, "kv_pages")
    B = path.shape[0]
    check_block_table(_NAME, block_table, B, dev, "kv_pages")
    check_index_vector(_NAME, "prefix_len", prefix_len, B, dev, "kv_pages")
    check_index_vector(_NAME, "accept_len", accept_len, B, dev, "kv_pages")
