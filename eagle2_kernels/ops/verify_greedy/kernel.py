"""Triton kernels for ``verify_greedy``: a split argmax over every tree row, then the walk.

1. ``_row_argmax_kernel``, grid (B * T, S): program (row, s) scans columns
   ``[s * CHUNK, (s + 1) * CHUNK)`` of one logits row, keeping a per-lane running maximum and
   its first index, and writes the chunk's (max, first argmax). Splitting V over S programs
   keeps the GPU busy when B * T is small (B = 1, T = 60 is the common decode case).
2. ``_greedy_walk_kernel``, grid (B,): one program per sequence walks the nodes in index order
   (children follow their parent), reducing the S partials of the current node to its argmax
   (ties to the lower token id: the lowest index among the equal maxima) and accepting the
   first child whose token matches. No host reads: CUDA-graph capturable.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from eagle2_kernels.ops.tree import DraftTree

# Larger than any vocabulary index: "no index yet".
_NO_INDEX = tl.constexpr(2**31 - 1)


@triton.jit
def _row_argmax_kernel(
    logits_ptr,
    part_val_ptr,
    part_idx_ptr,
    stride_logits_b,
    stride_logits_t,
    stride_logits_v,
    T,
    V,
    CHUNK,
    NUM_SPLITS,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # over B * T
    split = tl.program_id(1).to(tl.int64)  # over NUM_SPLITS chunks of V
    b = row // T
    t = row % T
    base = logits_ptr + b * stride_logits_b + t * stride_logits_t
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, V)

    best_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_V], _NO_INDEX, tl.int32)
    for start in range(lo, hi, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < hi
        # [BLOCK_V]
        x = tl.load(base + offs * stride_logits_v, mask=valid, other=float("-inf")).to(tl.float32)
        # strictly greater keeps the first index per lane; the first valid value always enters
        upd = valid & ((x > best_val) | (best_idx == _NO_INDEX))
        best_val = tl.where(upd, x, best_val)
        best_idx = tl.where(upd, offs.to(tl.int32), best_idx)
    chunk_max = tl.max(best_val, axis=0)
    chunk_idx = tl.min(tl.where(best_val == chunk_max, best_idx, _NO_INDEX), axis=0)
    tl.store(part_val_ptr + row * NUM_SPLITS + split, chunk_max)
    tl.store(part_idx_ptr + row * NUM_SPLITS + split, chunk_idx)


@triton.jit
def _node_argmax(part_val_ptr, part_idx_ptr, row, NUM_SPLITS, S_PAD: tl.constexpr):
    """Argmax of one tree row from its NUM_SPLITS chunk partials (ties to the lower index)."""
    offs_s = tl.arange(0, S_PAD)
    ok = offs_s < NUM_SPLITS
    # [S_PAD]
    vals = tl.load(part_val_ptr + row * NUM_SPLITS + offs_s, mask=ok, other=float("-inf"))
    idxs = tl.load(part_idx_ptr + row * NUM_SPLITS + offs_s, mask=ok, other=_NO_INDEX)
    row_max = tl.max(vals, axis=0)
    return tl.min(tl.where(vals == row_max, idxs, _NO_INDEX), axis=0)


@triton.jit
def _greedy_walk_kernel(
    tokens_ptr,
    parents_ptr,
    part_val_ptr,
    part_idx_ptr,
    path_ptr,
    accept_len_ptr,
    bonus_ptr,
    stride_tokens_b,
    stride_tokens_t,
    stride_parents_b,
    stride_parents_t,
    stride_path_b,
    T,
    NUM_SPLITS,
    T_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid.to(tl.int64)
    offs_t = tl.arange(0, T_PAD)
    # [T_PAD] the path is kept in registers and stored once
    path = tl.where(offs_t == 0, 0, -1).to(tl.int64)
    cur = pid * 0  # current (deepest accepted) node
    n_acc = pid * 0 + 1
    best = _node_argmax(part_val_ptr, part_idx_ptr, b * T, NUM_SPLITS, S_PAD)
    for i in range(1, T):
        par = tl.load(parents_ptr + b * stride_parents_b + i * stride_parents_t)
        tok = tl.load(tokens_ptr + b * stride_tokens_b + i * stride_tokens_t)
        if (par == cur) & (tok == best):
            path = tl.where(offs_t == n_acc, i, path)
            n_acc += 1
            cur = i
            best = _node_argmax(part_val_ptr, part_idx_ptr, b * T + i, NUM_SPLITS, S_PAD)
    tl.store(path_ptr + b * stride_path_b + offs_t, path, mask=offs_t < T)
    tl.store(accept_len_ptr + b, n_acc.to(tl.int64))
    tl.store(bonus_ptr + b, best.to(tl.int64))


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _plan(batch: int, num_nodes: int, vocab: int, device: torch.device, block_v: int | None):
    """Block size and V split: about 4 programs per SM on a GPU, one chunk per row on CPU."""
    if block_v is None:
        block_v = min(triton.next_power_of_2(vocab), 4096 if device.type == "cpu" else 2048)
    blocks = triton.cdiv(vocab, block_v)
    if device.type == "cuda":
        target = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        splits = min(blocks, max(1, triton.cdiv(target, batch * num_nodes)))
    else:
        splits = 1
    return block_v, splits


def launch(
    tree: DraftTree,
    target_logits: torch.Tensor,
    num_splits: int | None = None,
    block_v: int | None = None,
):
    """``verify_greedy`` with an explicit V split / block size (tests use it on small V)."""
    tokens, parents = tree.tokens, tree.parents
    B, T = tokens.shape
    V = target_logits.shape[-1]
    device = target_logits.device
    block_v, splits = _plan(B, T, V, device, block_v)
    if num_splits is not None:
        splits = num_splits
    blocks = triton.cdiv(V, block_v)
    splits = max(1, min(splits, blocks))
    chunk = triton.cdiv(blocks, splits) * block_v
    splits = triton.cdiv(V, chunk)  # no empty chunk

    part_val = torch.empty((B * T, splits), dtype=torch.float32, device=device)
    part_idx = torch.empty((B * T, splits), dtype=torch.int32, device=device)
    grid_rows = (B * T, splits)
    _row_argmax_kernel[grid_rows](
        logits_ptr=target_logits,
        part_val_ptr=part_val,
        part_idx_ptr=part_idx,
        stride_logits_b=target_logits.stride(0),
        stride_logits_t=target_logits.stride(1),
        stride_logits_v=target_logits.stride(2),
        T=T,
        V=V,
        CHUNK=chunk,
        NUM_SPLITS=splits,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )

    path = torch.empty((B, T), dtype=torch.int64, device=device)
    accept_len = torch.empty((B,), dtype=torch.int64, device=device)
    bonus = torch.empty((B,), dtype=torch.int64, device=device)
    grid_walk = (B,)
    _greedy_walk_kernel[grid_walk](
        tokens_ptr=tokens,
        parents_ptr=parents,
        part_val_ptr=part_val,
        part_idx_ptr=part_idx,
        path_ptr=path,
        accept_len_ptr=accept_len,
        bonus_ptr=bonus,
        stride_tokens_b=tokens.stride(0),
        stride_tokens_t=tokens.stride(1),
        stride_parents_b=parents.stride(0),
        stride_parents_t=parents.stride(1),
        stride_path_b=path.stride(0),
        T=T,
        NUM_SPLITS=splits,
        T_PAD=triton.next_power_of_2(T),
        S_PAD=triton.next_power_of_2(splits),
        num_warps=1,
    )
    return path, accept_len, bonus


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor):
    """Triton launcher of ``verify_greedy`` (see ``eagle2_kernels.ops.verify_greedy``)."""
    return launch(tree, target_logits)
