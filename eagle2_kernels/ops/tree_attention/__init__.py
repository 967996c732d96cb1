"""``tree_attention``: attention over a static KV cache prefix plus a packed-mask tree region."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._checks import (check_attention, check_device, check_heads,
                                        check_index_vector, check_int, check_scale, check_tree_mask,
                                        describe)
from eagle2_kernels.ops._dispatch import dispatch

__all__ = ["tree_attention"]

_NAME = "tree_attention"


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
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
    """Attention of Tq query rows over a cache prefix and a tree region (GQA, packed mask).

    Serves the verify forward (Tq = tree_len = T: every tree node against the committed prefix
    and its ancestors), each draft expansion (Tq = K new frontier nodes, tree_len = nodes
    written so far), and a causal prefill (Tq = tree_len = prompt length with a
    lower-triangular mask, prefix 0).

    Visibility: query row i of sequence b sees every cache slot s < prefix_len[b], and slot
    prefix_len[b] + j for j < tree_len iff bit j of tree_mask[b, i] is set (word j // 32,
    bit j % 32; bit 31 is the sign bit of the int32 word). Bits at j >= tree_len and words
    past ceil(tree_len / 32) are ignored. Query head h reads kv head h // (Hq // Hkv).

    Args:
        q: [B, Hq, Tq, Dh] float16 / bfloat16 / float32, any strides. The Triton path takes
            any Dh <= 256 (padded to a power of two >= 16 inside the kernel).
        k_cache: [B, Hkv, Lmax, Dh], same dtype and device as ``q``; any strides, e.g. the view
            ``cache[2 * layer]`` of a [2 * layers, B, Hkv, Lmax, Dh] tensor.
        v_cache: [B, Hkv, Lmax, Dh], like ``k_cache``.
        prefix_len: [B] int32 or int64 on the device of ``q``; prefix_len[b] + tree_len must
            not exceed Lmax. The Triton path never reads it on the host (graph-capturable).
        tree_mask: [B, Tq, W] int32 with W >= ceil(tree_len / 32).
        tree_len: Python int >= 0, the tree slots written after each prefix.
        scale: softmax scale; default 1 / sqrt(Dh).
        backend: ``"reference"``, ``"triton"`` or ``"ext"``; default by device (see
            ``eagle2_kernels._backend``).
        window: sliding-window attention, an int >= 1, or None (no window). Row i keeps only
            the last ``window`` of the slots it sees, in slot order (its prefix slots, then its
            tree slots). With the masks of this package (each row marks its root path, parents
            before children: a verify tree, a causal prefill, one decode token) row i is the
            token at position prefix + depth_i and this is transformers' sliding window: it
            sees the keys at positions p with p > prefix + depth_i - window, ``window``
            positions including itself. Slots outside the window are skipped, not read: the
            kernels start (and split) the prefix at prefix - window.
        softcap: attention-logit soft-capping (Gemma-2), a float > 0, or None: the scores
            q.k * scale become softcap * tanh(score / softcap) before the mask and softmax.
        sinks: attention sinks (GPT-OSS), a [Hq] float tensor (any float dtype, device of
            ``q``) of per-head logits, or None: exp(sinks[h]) is added to the softmax
            denominator of every row of head h (a key that has no value); not scaled or
            capped.

    Returns:
        out: [B, Hq, Tq, Dh], the dtype and layout (strides) of ``q``. Scores and softmax are
        float32. A query row that sees no slot at all (prefix 0 and an empty mask row) is all
        zeros, not NaN. The Triton path multiplies float16/bfloat16 tiles on the tensor cores
        with float32 accumulation and rounds the probabilities to the cache dtype before the
        second product, as flash attention does.

    Example:
        >>> B, Hq, Hkv, Dh, L = 1, 4, 2, 16, 8
        >>> q = torch.randn(B, Hq, 2, Dh)
        >>> k, v = torch.randn(B, Hkv, L, Dh), torch.randn(B, Hkv, L, Dh)
        >>> mask = torch.tensor([[[0b01], [0b11]]], dtype=torch.int32)  # node 1 is a child of 0
        >>> out = tree_attention(q, k, v, torch.tensor([3]), mask, tree_len=2)
        >>> out.shape
        torch.Size([1, 4, 2, 16])
    """
    _check(q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale)
    check_window_softcap_sinks(_NAME, q, window, softcap, sinks)
    return dispatch(_NAME, q, backend, q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale,
                    window, softcap, sinks)


def check_window_softcap_sinks(fn: str, q: torch.Tensor, window, softcap, sinks) -> None:
    """The optional local-attention arguments of the tree-attention ops (shared with paged)."""
    if window is not None:
        check_int(fn, "window", window, 1, 2**31 - 1, hint=" (or None for no window)")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"{fn}: softcap must be a float or None, got {softcap!r}")
        if not 0.0 < float(softcap) < float("inf"):
            raise ValueError(f"{fn}: softcap={softcap} must be a finite number > 0 (or None)")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
            got = sinks.dtype if isinstance(sinks, torch.Tensor) else describe(sinks)
            raise TypeError(f"{fn}: sinks must be a float tensor [Hq] or None, got {got}")
        if tuple(sinks.shape) != (q.shape[1],):
            raise ValueError(f"{fn}: sinks has shape {tuple(sinks.shape)}; expected [Hq={q.shape[1]}]")
        check_device(fn, "sinks", sinks, q.device, "q")


def _check(q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale) -> None:
    B, Hq, Tq, Dh = check_attention(_NAME, q, k_cache, v_cache, "[B, Hkv, Lmax, Dh]")
    Bk, Hkv, Lmax, Dk = k_cache.shape
    if Bk != B:
        raise ValueError(f"{_NAME}: k_cache has batch {Bk}, q has B={B}")
    check_heads(_NAME, Hq, Hkv, Dh, Dk)
    check_index_vector(_NAME, "prefix_len", prefix_len, B, q.device, "q")
    check_int(_NAME, "tree_len", tree_len, 0, Lmax, f"Lmax={Lmax}")
    check_tree_mask(_NAME, tree_mask, B, Tq, tree_len, q.device, "q")
    check_scale(_NAME, scale)
