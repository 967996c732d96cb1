"""``kv_compact``: move the accepted path's KV slots behind the prefix, all layers at once."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._checks import INT_DTYPES, check_device, check_index_vector, check_rank
from eagle2_kernels.ops._dispatch import dispatch

__all__ = ["kv_compact"]

_NAME = "kv_compact"


def kv_compact(
    cache: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Compact the accepted tree path of every sequence in a whole-model KV cache, in place.

    After a verify step the tree's T nodes occupy slots prefix_len[b] + 0..T-1 of every layer.
    This moves the accepted path's nodes to the slots right after the prefix, for every K and
    V tensor and every head in one launch (Triton), so the next round appends after them.

    For each b and j < accept_len[b]: slot prefix_len[b] + j <- slot prefix_len[b] + path[b, j]
    (every n, every head, bit-exact). Every source is read before any destination is written,
    so overlapping moves (path [0, 2, 3] writes slot 2 and reads slot 3 and reads slot 2 for
    j = 1) are correct. Slots not named as a destination are unchanged.

    Args:
        cache: [N, B, Hkv, Lmax, Dh] any dtype (N = 2 x layers); modified in place.
        prefix_len: [B] int32/int64, same device as ``cache``.
        path: [B, T] int32/int64 node indices of the accepted path from the root
            (path[b, 0] = 0), padded with -1 after accept_len[b] entries.
        accept_len: [B] int32/int64 in [0, T]; prefix_len[b] + max(path, accept_len - 1) must be
            < Lmax. The Triton path never reads the index tensors on the host.
        backend: ``"reference"``, ``"triton"`` or ``"ext"``; default by device.

    Returns:
        ``cache`` (the same tensor object).

    Example:
        >>> cache = torch.arange(6.0).reshape(1, 1, 1, 6, 1)
        >>> _ = kv_compact(cache, torch.tensor([1]), torch.tensor([[0, 2, 3]]), torch.tensor([3]))
        >>> cache.flatten().tolist()
        [0.0, 1.0, 3.0, 4.0, 4.0, 5.0]
    """
    _check(cache, prefix_len, path, accept_len)
    out = dispatch(_NAME, cache, backend, cache, prefix_len, path, accept_len)
    return cache if out is None else out


def _check(cache, prefix_len, path, accept_len) -> None:
    check_rank(_NAME, "cache", cache, "[N, B, Hkv, Lmax, Dh]")
    check_rank(_NAME, "path", path, "[B, T]", INT_DTYPES)
    B = cache.shape[1]
    if path.shape[0] != B:
        raise ValueError(f"{_NAME}: path has {path.shape[0]} rows, the cache has B={B}")
    check_device(_NAME, "path", path, cache.device, "cache")
    check_index_vector(_NAME, "prefix_len", prefix_len, B, cache.device, "cache")
    check_index_vector(_NAME, "accept_len", accept_len, B, cache.device, "cache")
