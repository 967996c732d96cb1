"""``remap_slots``: commit an accepted path in a token-granular pool by remapping slot ids."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._checks import (INT_DTYPES, check_block_table, check_index_vector,
                                        check_int, check_rank)
from eagle2_kernels.ops._dispatch import dispatch

__all__ = ["remap_slots"]

_NAME = "remap_slots"


def remap_slots(
    req_to_token: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
    tree_len: int | None = None,
    update: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slot ids of the accepted path and the slots to free, without moving any KV.

    The page-size-1 way of committing a round (SGLang's): ``req_to_token[b, pos]`` is the pool
    slot holding sequence b's logical position ``pos`` (a block table with pages of one
    token). After a verify step the tree's nodes 0..tree_len-1 sit at positions
    prefix_len[b] + node. Instead of copying the accepted nodes' KV behind the prefix
    (``kv_compact_paged``), their slot ids are written there and the rejected nodes' slots
    are handed back to the allocator.

    Args:
        req_to_token: [B, max_context] int32 (int64 accepted) slot ids; row b may be a view
            of an engine's larger table (``table[req_pool_indices]`` is a copy: pass the rows
            in place, or set ``update=False`` and write ``accepted_slots`` back yourself).
        prefix_len: [B] int32/int64 committed lengths (the tree starts there).
        path: [B, T] int32/int64 accepted node indices from the root, -1 after accept_len[b]
            entries (``verify_greedy`` / ``verify_sample`` output); distinct nodes.
        accept_len: [B] int32/int64 in [0, min(T, tree_len)].
        tree_len: Python int, the tree's node count; default T (= path.shape[1]).
        update: write the accepted slots into ``req_to_token`` (in place, every source read
            before any write): ``req_to_token[b, prefix_len[b] + j] = accepted_slots[b, j]``
            for j < accept_len[b]. Positions from prefix_len[b] + accept_len[b] on keep their
            stale ids (the caller's new length, prefix_len + accept_len, says they are unused).
        backend: ``"reference"``, ``"triton"`` or ``"ext"``; default by device. No native
            kernel: on CPU (``ext`` included) the reference runs.

    Returns:
        accepted_slots: [B, T], dtype of ``req_to_token``: slot of path node j, -1 padded.
        free_slots: [B, tree_len], same dtype: the slots of the tree nodes not on the path, in
            increasing node order, -1 padded (``free_slots[free_slots >= 0]`` is the flat list
            for a free-list allocator; that filter reads the device).
        num_free: [B] int64, tree_len - accept_len[b].
        The Triton path reads nothing on the host (graph-capturable).

    Example:
        >>> table = torch.tensor([[40, 41, 42, 50, 51, 52, 53, -1]], dtype=torch.int32)
        >>> acc, free, n = remap_slots(table, torch.tensor([3]), torch.tensor([[0, 2, -1, -1]]),
        ...                            torch.tensor([2]))
        >>> acc.tolist(), free.tolist(), n.tolist(), table.tolist()
        ([[50, 52, -1, -1]], [[51, 53, -1, -1]], [2], [[40, 41, 42, 50, 52, 52, 53, -1]])
    """
    if tree_len is None and isinstance(path, torch.Tensor) and path.dim() == 2:
        tree_len = path.shape[1]
    if tree_len is None and isinstance(path, torch.Tensor) and path.dim() == 2:
        tree_len = path.shape[1]
    _check(req_to_token, prefix_len, path, accept_len, tree_len, update)
    return dispatch(_NAME, req_to_token, backend, req_to_token, prefix_len, path, accept_len,
                    tree_len, update)


def _check(req_to_token, prefix_len, path, accept_len, tree_len, update) -> None:
    check_rank(_NAME, "path", path, "[B, T]", INT_DTYPES)
    B, dev = path.shape[0], path.device
    check_block_table(_NAME, req_to_token, B, dev, "path", name="req_to_token")
    check_index_vector(_NAME, "prefix_len", prefix_len, B, dev, "path")
    check_index_vector(_NAME, "accept_len", accept_len, B, dev, "path")
    max_context = req_to_token.shape[1]
    check_int(_NAME, "tree_len", tree_len, 0, max_context, f"max_context={max_context}")
    if not isinstance(update, bool):
        raise TypeError(f"{_NAME}: update must be a bool, got {update!r}")
