"""``tree_attention``: attention over a static KV cache prefix plus a packed-mask tree region."""

from __future__ import annotations

import torch

from eagle2_kernels._backend import device_guard, select_backend

__all__ = ["tree_attention"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.int32, torch.int64)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
    backend: str | None = None,
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
    name = select_backend(q, backend)
    if name == "reference":
        from eagle2_kernels.ops.tree_attention.reference import tree_attention as impl
    elif name == "triton":
        from eagle2_kernels.ops.tree_attention.kernel import tree_attention as impl
    else:
        from eagle2_kernels import _native

        impl = _native.tree_attention
    with device_guard(q):
        return impl(q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale)


def _check(q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("prefix_len", prefix_len), ("tree_mask", tree_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"tree_attention: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
    if q.dim() != 4:
        raise ValueError(f"tree_attention: q must be [B, Hq, Tq, Dh], got shape {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"tree_attention: q has dtype {q.dtype}; valid: float16, bfloat16, float32")
    B, Hq, Tq, Dh = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4:
            raise ValueError(
                f"tree_attention: {name} must be [B, Hkv, Lmax, Dh], got shape {tuple(c.shape)}"
            )
        if c.dtype != q.dtype:
            raise TypeError(f"tree_attention: {name} has dtype {c.dtype}, q has {q.dtype}")
        if c.device != q.device:
            raise ValueError(f"tree_attention: {name} is on {c.device}, q on {q.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"tree_attention: k_cache {tuple(k_cache.shape)} and v_cache "
            f"{tuple(v_cache.shape)} differ in shape"
        )
    _, Hkv, Lmax, Dk = k_cache.shape
    if k_cache.shape[0] != B:
        raise ValueError(f"tree_attention: k_cache has batch {k_cache.shape[0]}, q has B={B}")
    if Dk != Dh:
        raise ValueError(f"tree_attention: cache head dim {Dk} != q head dim Dh={Dh}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"tree_attention: Hq={Hq} must be a multiple of Hkv={Hkv}")
    if prefix_len.shape != (B,) or prefix_len.dtype not in _INT_DTYPES:
        raise ValueError(
            f"tree_attention: prefix_len must be [B={B}] int32/int64, got shape "
            f"{tuple(prefix_len.shape)} dtype {prefix_len.dtype}"
        )
    if prefix_len.device != q.device:
        raise ValueError(f"tree_attention: prefix_len is on {prefix_len.device}, q on {q.device}")
    if isinstance(tree_len, bool) or not isinstance(tree_len, int):
        raise TypeError(f"tree_attention: tree_len must be a Python int, got {tree_len!r}")
    if not 0 <= tree_len <= Lmax:
        raise ValueError(f"tree_attention: tree_len={tree_len} is not in [0, Lmax={Lmax}]")
    if tree_mask.dim() != 3 or tree_mask.dtype != torch.int32:
        raise ValueError(
            f"tree_attention: tree_mask must be [B, Tq, W] int32, got shape "
            f"{tuple(tree_mask.shape)} dtype {tree_mask.dtype}"
        )
    words = (tree_len + 31) // 32
    if tree_mask.shape[0] != B or tree_mask.shape[1] != Tq or tree_mask.shape[2] < words:
        raise ValueError(
            f"tree_attention: tree_mask has shape {tuple(tree_mask.shape)}; expected "
            f"[B={B}, Tq={Tq}, W>={words}] for tree_len={tree_len}"
        )
    if tree_mask.device != q.device:
        raise ValueError(f"tree_attention: tree_mask is on {tree_mask.device}, q on {q.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"tree_attention: scale must be a float or None, got {scale!r}")
