"""Triton kernel for ``kv_compact_paged``: one launch moves the accepted path in every layer.

The dense ``kv_compact`` decomposition over a paged pool: one program per (n, b, kv head,
block of head-dim columns) loads every accepted source row of its (n, b, head) into registers,
waits at a block barrier, then stores them to the destination rows, so no store overwrites a
row another thread of the program has yet to read (path [0, 2, 3]). Source and destination
rows are found through the sequence's block-table row (int64 page offsets). Programs own
disjoint (n, b, head, column) tiles, and sequences own disjoint slots (the op's
precondition), so programs never race. The data moves as same-width integers: bit-exact for
every dtype, and no interpreter bf16 arithmetic.
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
def _kv_compact_paged_kernel(
    kv_ptr,
    table_ptr,
    prefix_ptr,
    path_ptr,
    accept_ptr,
    stride_kv_n,
    stride_kv_page,
    stride_kv_slot,
    stride_kv_h,
    stride_kv_d,
    stride_table_b,
    stride_table_m,
    stride_path_b,
    stride_path_t,
    B,
    HKV,
    T,
    DH,
    PAGE_SIZE,
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
    # Rows already in place (the root, and any leading run 0, 1, 2, ... of the path).
    moved = row_ok & (node != offs_t)
    tile_ok = moved[:, None] & (offs_d[None, :] < DH)

    # [BLOCK_T] physical rows of the logical source and destination slots
    table_row = table_ptr + b * stride_table_b
    src = prefix + node
    dst = prefix + offs_t
    src_page = tl.load(table_row + (src // PAGE_SIZE) * stride_table_m, mask=moved, other=0)
    dst_page = tl.load(table_row + (dst // PAGE_SIZE) * stride_table_m, mask=moved, other=0)
    src_row = src_page.to(tl.int64) * stride_kv_page + (src % PAGE_SIZE) * stride_kv_slot
    dst_row = dst_page.to(tl.int64) * stride_kv_page + (dst % PAGE_SIZE) * stride_kv_slot

    base = kv_ptr + n * stride_kv_n + h * stride_kv_h
    cols = offs_d[None, :] * stride_kv_d
    # [BLOCK_T, BLOCK_D]
    rows = tl.load(base + src_row[:, None] + cols, mask=tile_ok)
    # Every thread of the program has read its source rows before any destination is written.
    tl.debug_barrier()
    tl.store(base + dst_row[:, None] + cols, rows, mask=tile_ok)


def kv_compact_paged(
    kv_pages: torch.Tensor,
    block_table: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
) -> torch.Tensor:
    """Triton launcher of ``kv_compact_paged`` (see ``eagle2_kernels.ops.kv_compact_paged``)."""
    if kv_pages.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"kv_compact_paged (triton): kv_pages is on {kv_pages.device}; the Triton kernel "
            "needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is "
            "imported"
        )
    N, _, page_size, Hkv, Dh = kv_pages.shape
    B, T = path.shape
    if kv_pages.numel() == 0 or T == 0 or B == 0:
        return kv_pages
    bits = kv_pages.view(_BITS_DTYPE[kv_pages.element_size()])
    block_t = triton.next_power_of_2(T)
    block_d = min(triton.next_power_of_2(Dh), max(16, _TILE_ELEMS // block_t))
    grid = (N * B * Hkv, triton.cdiv(Dh, block_d))
    _kv_compact_paged_kernel[grid](
        kv_ptr=bits,
        table_ptr=block_table,
        prefix_ptr=prefix_len,
        path_ptr=path,
        accept_ptr=accept_len,
        stride_kv_n=bits.stride(0),
        stride_kv_page=bits.stride(1),
        stride_kv_slot=bits.stride(2),
        stride_kv_h=bits.stride(3),
        stride_kv_d=bits.stride(4),
        stride_table_b=block_table.stride(0),
        stride_table_m=block_table.stride(1),
        stride_path_b=path.stride(0),
        stride_path_t=path.stride(1),
        B=B,
        HKV=Hkv,
        T=T,
        DH=Dh,
        PAGE_SIZE=page_size,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return kv_pages
