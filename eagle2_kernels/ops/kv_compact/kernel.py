"""Triton kernel for ``kv_compact``: one launch moves the accepted path in every layer.

One program per (n, b, kv head, block of head-dim columns). It loads every accepted source
row of its (n, b, head) into registers, waits at a block barrier, then stores them: no store
can overwrite a row another thread of the program has yet to read (path [0, 2, 3] reads slot
p+2 and writes slot p+2). Programs own disjoint (n, b, head, column) tiles, so they never race
with each other. The data is moved as same-width integers, so the copy is bit-exact for every
dtype (NaN payloads included) and the interpreter's bf16 arithmetic is never involved.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Values of one tile kept in registers at once (elements): bounds BLOCK_T * BLOCK_D.
_TILE_ELEMS = 8192
_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _kv_compact_kernel(
    cache_ptr,
    prefix_ptr,
    path_ptr,
    accept_ptr,
    stride_cache_n,
    stride_cache_b,
    stride_cache_h,
    stride_cache_l,
    stride_cache_d,
    stride_path_b,
    stride_path_t,
    B,
    HKV,
    T,
    DH,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # over N * B * HKV
    pid_d = tl.program_id(1).to(tl.int64)  # over head-dim column blocks
    h = pid % HKV
    b = (pid // HKV) % B
    n = pid // (HKV * B)

    accepted = tl.load(accept_ptr + b).to(tl.int64)
    prefix = tl.load(prefix_ptr + b).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = (offs_t < accepted) & (offs_t < T)
    # [BLOCK_T]
    node = tl.load(path_ptr + b * stride_path_b + offs_t * stride_path_t, mask=row_ok, other=0)
    node = node.to(tl.int64)
    # Rows already in place (the root, and any prefix of the path that is 0, 1, 2, ...).
    moved = row_ok & (node != offs_t)
    tile_ok = moved[:, None] & (offs_d[None, :] < DH)

    base = cache_ptr + n * stride_cache_n + b * stride_cache_b + h * stride_cache_h
    cols = offs_d[None, :] * stride_cache_d
    # [BLOCK_T, BLOCK_D]
    rows = tl.load(base + (prefix + node)[:, None] * stride_cache_l + cols, mask=tile_ok)
    # Every thread of the program has read its source rows before any destination is written.
    tl.debug_barrier()
    tl.store(base + (prefix + offs_t)[:, None] * stride_cache_l + cols, rows, mask=tile_ok)


def kv_compact(
    cache: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
) -> torch.Tensor:
    """Triton launcher of ``kv_compact`` (see ``eagle2_kernels.ops.kv_compact``); in place."""
    if cache.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"kv_compact (triton): cache is on {cache.device}; the Triton kernel needs CUDA "
            "tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        )
    N, B, Hkv, Lmax, Dh = cache.shape
    T = path.shape[1]
    if cache.numel() == 0 or T == 0:
        return cache
    bits = cache.view(_BITS_DTYPE[cache.element_size()])
    block_t = triton.next_power_of_2(T)
    block_d = min(triton.next_power_of_2(Dh), max(16, _TILE_ELEMS // block_t))
    grid = (N * B * Hkv, triton.cdiv(Dh, block_d))
    _kv_compact_kernel[grid](
        cache_ptr=bits,
        prefix_ptr=prefix_len,
        path_ptr=path,
        accept_ptr=accept_len,
        stride_cache_n=bits.stride(0),
        stride_cache_b=bits.stride(1),
        stride_cache_h=bits.stride(2),
        stride_cache_l=bits.stride(3),
        stride_cache_d=bits.stride(4),
        stride_path_b=path.stride(0),
        stride_path_t=path.stride(1),
        B=B,
        HKV=Hkv,
        T=T,
        DH=Dh,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return cache
