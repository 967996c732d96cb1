"""Triton kernel for ``remap_slots``: one program per sequence, everything in registers.

The program loads the accepted path's nodes and the slot ids of all tree positions, marks the
accepted nodes (a [BLOCK, BLOCK] comparison of path entries with node indices), compacts the
rejected nodes' slots with a prefix sum into the free list, writes both outputs, and only
after a block barrier (every read of ``req_to_token`` done) writes the accepted slots back
behind the prefix: the row is read and written in place, like ``kv_compact``'s.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _remap_slots_kernel(
    table_ptr,
    prefix_ptr,
    path_ptr,
    accept_ptr,
    accepted_ptr,
    free_ptr,
    num_free_ptr,
    stride_table_b,
    stride_table_l,
    stride_path_b,
    stride_path_t,
    T,
    TREE_LEN,
    BLOCK: tl.constexpr,
    UPDATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    accepted = tl.load(accept_ptr + b).to(tl.int64)
    prefix = tl.load(prefix_ptr + b).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    table_row = table_ptr + b * stride_table_b

    # [BLOCK] path entries i < accept_len and their slots
    row_ok = (offs < accepted) & (offs < T)
    node = tl.load(path_ptr + b * stride_path_b + offs * stride_path_t, mask=row_ok, other=-1)
    node = node.to(tl.int64)
    acc_slot = tl.load(table_row + (prefix + node) * stride_table_l, mask=row_ok, other=-1)
    # [BLOCK] per tree node j: its slot, and whether it is on the path
    in_tree = offs < TREE_LEN
    tree_slot = tl.load(table_row + (prefix + offs) * stride_table_l, mask=in_tree, other=-1)
    # [BLOCK, BLOCK]: hit[i, j] = path entry i is node j
    hit = (node[:, None] == offs[None, :]) & row_ok[:, None]
    on_path = tl.max(hit.to(tl.int32), axis=0) > 0
    rejected = in_tree & ~on_path
    count = tl.sum(rejected.to(tl.int32), axis=0)
    dest = tl.cumsum(rejected.to(tl.int32), axis=0) - 1  # rank among the rejected nodes

    tl.store(accepted_ptr + b * T + offs, tl.where(row_ok, acc_slot, -1), mask=offs < T)
    tl.store(free_ptr + b * TREE_LEN + dest, tree_slot, mask=rejected)
    tl.store(free_ptr + b * TREE_LEN + offs, tl.full([BLOCK], -1, tl.int64).to(tree_slot.dtype),
             mask=in_tree & (offs >= count))
    tl.store(num_free_ptr + b, count.to(tl.int64))
    if UPDATE:
        # Every thread has read its slots of req_to_token before any is overwritten.
        tl.debug_barrier()
        tl.store(table_row + (prefix + offs) * stride_table_l, acc_slot, mask=row_ok)


def remap_slots(
    req_to_token: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
    tree_len: int,
    update: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher of ``remap_slots`` (see ``eagle2_kernels.ops.remap_slots``)."""
    if req_to_token.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"remap_slots (triton): req_to_token is on {req_to_token.device}; the Triton kernel "
            "needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is "
            "imported"
        )
    B, T = path.shape
    dev, dtype = req_to_token.device, req_to_token.dtype
    accepted = torch.empty(B, T, dtype=dtype, device=dev)
    free = torch.empty(B, tree_len, dtype=dtype, device=dev)
    num_free = torch.empty(B, dtype=torch.int64, device=dev)
    if B == 0:
        return accepted, free, num_free
    block = triton.next_power_of_2(max(T, tree_len, 1))
    grid = (B,)
    _remap_slots_kernel[grid](
        table_ptr=req_to_token,
        prefix_ptr=prefix_len,
        path_ptr=path,
        accept_ptr=accept_len,
        accepted_ptr=accepted,
        free_ptr=free,
        num_free_ptr=num_free,
        stride_table_b=req_to_token.stride(0),
        stride_table_l=req_to_token.stride(1),
        stride_path_b=path.stride(0),
        stride_path_t=path.stride(1),
        T=T,
        TREE_LEN=tree_len,
        BLOCK=block,
        UPDATE=update,
        num_warps=4 if block <= 256 else 8,
    )
    return accepted, free, num_free
