"""Pure-torch tree attention: the specification of ``tree_attention``.

Readable rather than fast: one sequence at a time, a dense visibility matrix, softmax in
float32. It is also the CPU path when the native extension is not built.
"""

from __future__ import annotations

import math

import torch

from eagle2_kernels.ops.tree import unpack_bits


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of Tq queries over a cache prefix plus a masked tree region.

    Args:
        q: [B, Hq, Tq, Dh] float queries.
        k_cache, v_cache: [B, Hkv, Lmax, Dh] (any strides), same dtype as ``q``.
        prefix_len: [B] int32/int64, number of committed cache slots of each sequence.
        tree_mask: [B, Tq, W] int32 packed visibility of the tree slots.
        tree_len: number of tree slots (same for the batch), stored right after the prefix.
        scale: softmax scale, default 1/sqrt(Dh).
        window: sliding window (int >= 1) or None: each row keeps only the LAST ``window`` of
            the slots it would otherwise see, in slot order (prefix slots, then its tree
            slots). For a row that sees its root path (ancestors and itself, parents before
            children) this is the window over positions: the query at position prefix + depth
            sees the keys at positions > prefix + depth - window.
        softcap: logit soft-capping (Gemma-2) or None: score = softcap * tanh(score / softcap),
            score = q.k * scale, before the mask.
        sinks: [Hq] float per-head sink logits (GPT-OSS) or None: exp(sinks[h]) joins the
            softmax denominator of every row of head h (a key with no value).

    Returns:
        [B, Hq, Tq, Dh] in the dtype and layout of ``q``. Query row i of sequence b attends to
        slots s < prefix_len[b] and to slot prefix_len[b] + j (j < tree_len) iff bit j of
        tree_mask[b, i] is set (then, with ``window``, only the last ``window`` of those); a
        row that sees no slot at all is all zeros.
    """
    B, Hq, Tq, Dh = q.shape
    Hkv, Lmax = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(Dh)
    # float32 compute (float64 stays float64 so that tests can build an exact truth).
    cdt = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    visible_tree = unpack_bits(tree_mask, tree_len)  # [B, Tq, tree_len]
    for b in range(B):
        prefix = int(prefix_len[b])
        total = prefix + tree_len
        if prefix < 0 or total > Lmax:
            raise ValueError(
                f"prefix_len[{b}]={prefix} with tree_len={tree_len} needs slots 0..{total - 1}, "
                f"but the cache holds Lmax={Lmax} slots"
            )
        # GQA: query head h reads kv head h // group.
        k = k_cache[b, :, :total].to(cdt).repeat_interleave(group, dim=0)  # [Hq, L, Dh]
        v = v_cache[b, :, :total].to(cdt).repeat_interleave(group, dim=0)  # [Hq, L, Dh]
        scores = torch.matmul(q[b].to(cdt), k.transpose(-1, -2)) * scale  # [Hq, Tq, L]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        visible = torch.cat(
            [torch.ones(Tq, prefix, dtype=torch.bool, device=q.device), visible_tree[b]], dim=1
        )  # [Tq, L]
        if window is not None:
            # Visible slots at or after each slot, per row: keep the last `window` of them.
            after = visible.flip(-1).cumsum(-1).flip(-1)
            visible = visible & (after <= window)
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            # The sink is one more logit per head in the denominator, with no value.
            sink = sinks.to(cdt).view(Hq, 1, 1).expand(Hq, Tq, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        # A row with no visible key gives 0/0 = NaN in softmax; define it as zeros.
        probs = torch.where(visible.any(dim=-1)[:, None], probs, torch.zeros_like(probs))
        out[b] = torch.matmul(probs, v).to(q.dtype)
    return out
