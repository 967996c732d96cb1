"""Pure-torch KV compaction: the specification of ``kv_compact``."""

from __future__ import annotations

import torch


def kv_compact(
    cache: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
) -> torch.Tensor:
    """Move the accepted path's tree slots right behind the prefix, in place.

    Args:
        cache: [N, B, Hkv, Lmax, Dh] any dtype (N = 2 x layers: every K and V of a model).
        prefix_len: [B] int32/int64, committed slots; the tree starts at slot prefix_len[b].
        path: [B, T] int32/int64 tree node indices from the root, padded with -1.
        accept_len: [B] int32/int64 number of valid entries of ``path`` per sequence.

    Returns:
        ``cache`` itself, after: for each b and j < accept_len[b], slot prefix_len[b] + j of
        every n and head holds what slot prefix_len[b] + path[b, j] held before the call. All
        other slots are unchanged. Sources are read before any destination is written.
    """
    N, B, Hkv, Lmax, Dh = cache.shape
    T = path.shape[1]
    for b in range(B):
        accepted = int(accept_len[b])
        prefix = int(prefix_len[b])
        if not 0 <= accepted <= T:
            raise ValueError(f"accept_len[{b}]={accepted} is not in [0, T={T}]")
        if accepted == 0:
            continue
        nodes = path[b, :accepted].to(torch.int64)
        lo, hi = int(nodes.min()), int(nodes.max())
        if lo < 0 or prefix < 0 or prefix + max(hi, accepted - 1) >= Lmax:
            raise ValueError(
                f"sequence {b}: prefix_len={prefix}, path[:{accepted}]={nodes.tolist()} reach "
                f"outside the cache slots 0..{Lmax - 1} (or contain -1 padding)"
            )
        src = prefix + nodes
        dst = prefix + torch.arange(accepted, device=cache.device)
        seq = cache[:, b]  # [N, Hkv, Lmax, Dh], a view
        rows = seq.index_select(2, src)  # a copy: every source is read before any write
        seq.index_copy_(2, dst, rows)
    return cache
