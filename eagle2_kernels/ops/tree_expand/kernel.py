"""Triton kernels for ``tree_expand``: one fused pass over V, then two tiny merge steps.

1. ``_expand_partial_kernel``, grid (B*R, S): each program streams one slice of a row's V
   logits in BLOCK_V chunks, keeping an online max / sum-exp and a running top-K together.
   The running top-K is an unsorted list of K (value, index) slots plus its worst entry;
   a chunk only enters the list through the (usually few) elements that beat that worst
   entry, so after the first chunks most of them cost one comparison and a count.
2. ``_expand_row_kernel``, grid (B*R,): combines the S partial sum-exps into the row's
   log-sum-exp and the S partial lists into the row's sorted top-K; writes child tokens
   (mapped through draft_to_target) and child scores = parent + logit - lse.
3. ``_expand_frontier_kernel``, grid (B,): the K best of the R*K child scores.

Order everywhere: a larger value first, equal values by the lower index. Empty slots hold
(-inf, SENTINEL), so a real element (index < V < SENTINEL) always beats them, even a -inf one.
Splitting V over S programs keeps a GPU busy at B=1 (R=10 rows alone would use 10 SMs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SENTINEL = 2**31 - 1
# Programs to aim for when splitting V: enough to fill a large GPU several times over.
_TARGET_PROGRAMS = 1024


@triton.jit
def _worst_slot(top_v, top_i, offs_k, K, SENTINEL: tl.constexpr):
    """The worst of the first K slots: smallest value, then the largest index."""
    in_use = offs_k < K
    thr_v = tl.min(tl.where(in_use, top_v, float("inf")), 0)
    tied = in_use & (top_v == thr_v)
    thr_i = tl.max(tl.where(tied, top_i, -1), 0)
    slot = tl.min(tl.where(tied & (top_i == thr_i), offs_k, SENTINEL), 0)
    return thr_v, thr_i, slot


@triton.jit
def _select_top_k(v, i, offs_k, K, K_PAD: tl.constexpr, SENTINEL: tl.constexpr):
    """The K best (value, index) pairs of the candidates ``v``/``i`` in descending value, ties
    to the lower index, as [K_PAD] vectors (slots >= K are zero). Repeated max-and-remove:
    K is at most a few dozen here."""
    out_v = tl.zeros([K_PAD], tl.float32)
    out_i = tl.zeros([K_PAD], tl.int32)
    for j in range(K):
        best_v = tl.max(v, 0)
        best_i = tl.min(tl.where(v == best_v, i, SENTINEL), 0)
        out_v = tl.where(offs_k == j, best_v, out_v)
        out_i = tl.where(offs_k == j, best_i, out_i)
        taken = i == best_i
        v = tl.where(taken, float("-inf"), v)
        i = tl.where(taken, SENTINEL, i)
    return out_v, out_i


@triton.jit
def _expand_partial_kernel(
    logits_ptr,
    part_m_ptr,
    part_s_ptr,
    part_v_ptr,
    part_i_ptr,
    stride_logits_b,
    stride_logits_r,
    stride_logits_v,
    R,
    V,
    K,
    split_size,
    num_splits,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SENTINEL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    b = row // R
    r = row % R
    base = logits_ptr + b * stride_logits_b + r * stride_logits_r
    start = split * split_size
    end = tl.minimum(start + split_size, V)

    offs_k = tl.arange(0, K_PAD)
    top_v = tl.full([K_PAD], float("-inf"), tl.float32)
    top_i = tl.full([K_PAD], SENTINEL, tl.int32)
    thr_v, thr_i, slot = _worst_slot(top_v, top_i, offs_k, K, SENTINEL)
    m = tl.max(tl.full([K_PAD], float("-inf"), tl.float32), 0)  # running max (fp32 scalar)
    s = tl.sum(tl.zeros([K_PAD], tl.float32), 0)  # running sum of exp(x - m)

    for off in range(start, end, BLOCK_V):
        offs = off + tl.arange(0, BLOCK_V)
        valid = offs < end
        # [BLOCK_V]
        x = tl.load(base + offs * stride_logits_v, mask=valid, other=float("-inf")).to(tl.float32)
        idx = offs.to(tl.int32)

        # Online log-sum-exp; a chunk (or prefix) of only -inf must not produce NaN.
        new_m = tl.maximum(m, tl.max(x, 0))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe_m) + tl.sum(tl.exp(x - safe_m), 0)
        m = new_m

        # Elements that beat the current worst of the running top-K, best first.
        live = valid & ((x > thr_v) | ((x == thr_v) & (idx < thr_i)))
        n = tl.minimum(tl.sum(live.to(tl.int32), 0), K)
        for _ in range(n):
            best_v = tl.max(tl.where(live, x, float("-inf")), 0)
            best_i = tl.min(tl.where(live & (x == best_v), idx, SENTINEL), 0)
            better = (best_v > thr_v) | ((best_v == thr_v) & (best_i < thr_i))
            replace = offs_k == tl.where(better, slot, K_PAD)  # no slot when not better
            top_v = tl.where(replace, best_v, top_v)
            top_i = tl.where(replace, best_i, top_i)
            live = live & (idx != best_i)
            thr_v, thr_i, slot = _worst_slot(top_v, top_i, offs_k, K, SENTINEL)

    part = row * num_splits + split
    tl.store(part_m_ptr + part, m)
    tl.store(part_s_ptr + part, s)
    tl.store(part_v_ptr + part * K_PAD + offs_k, top_v)
    tl.store(part_i_ptr + part * K_PAD + offs_k, top_i)


@triton.jit
def _expand_row_kernel(
    part_m_ptr,
    part_s_ptr,
    part_v_ptr,
    part_i_ptr,
    parent_ptr,
    map_ptr,
    tokens_ptr,
    scores_ptr,
    stride_parent_b,
    stride_parent_r,
    stride_map_v,
    R,
    K,
    num_splits,
    S_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    HAS_MAP: tl.constexpr,
    SENTINEL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // R
    r = row % R

    # Row log-sum-exp from the per-split (max, sum-exp) pairs.
    offs_s = tl.arange(0, S_PAD)
    s_ok = offs_s < num_splits
    # [S_PAD]
    pm = tl.load(part_m_ptr + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    ps = tl.load(part_s_ptr + row * num_splits + offs_s, mask=s_ok, other=0.0)
    m = tl.max(pm, 0)
    safe_m = tl.where(m == float("-inf"), 0.0, m)
    lse = safe_m + tl.log(tl.sum(ps * tl.exp(pm - safe_m), 0))

    # The row's top-K out of the S partial lists, best first.
    offs = tl.arange(0, S_PAD * K_PAD)
    ok = offs < num_splits * K_PAD
    base = row * num_splits * K_PAD
    # [S_PAD * K_PAD]
    v = tl.load(part_v_ptr + base + offs, mask=ok, other=float("-inf"))
    i = tl.load(part_i_ptr + base + offs, mask=ok, other=SENTINEL)
    offs_k = tl.arange(0, K_PAD)
    out_v, out_i = _select_top_k(v, i, offs_k, K, K_PAD, SENTINEL)

    k_ok = offs_k < K
    parent = tl.load(parent_ptr + b * stride_parent_b + r * stride_parent_r)
    tokens = out_i.to(tl.int64)
    if HAS_MAP:
        tokens = tl.load(map_ptr + tokens * stride_map_v, mask=k_ok, other=0).to(tl.int64)
    tl.store(tokens_ptr + row * K + offs_k, tokens, mask=k_ok)
    tl.store(scores_ptr + row * K + offs_k, parent + (out_v - lse), mask=k_ok)


@triton.jit
def _expand_frontier_kernel(
    scores_ptr,
    next_index_ptr,
    next_scores_ptr,
    RK,
    K,
    RK_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    SENTINEL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, RK_PAD)
    ok = offs < RK
    # [RK_PAD]: the R*K child scores of sequence b, flat index r*K + j
    v = tl.load(scores_ptr + b * RK + offs, mask=ok, other=float("-inf"))
    i = tl.where(ok, offs, SENTINEL)
    offs_k = tl.arange(0, K_PAD)
    out_v, out_i = _select_top_k(v, i, offs_k, K, K_PAD, SENTINEL)
    k_ok = offs_k < K
    tl.store(next_index_ptr + b * K + offs_k, out_i.to(tl.int64), mask=k_ok)
    tl.store(next_scores_ptr + b * K + offs_k, out_v, mask=k_ok)


def _split_plan(rows: int, V: int, K: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_V, split_size, num_splits) for streaming V over `rows` rows with top-K."""
    if interpret:
        # The interpreter runs whole blocks as numpy ops: few, large blocks are fastest.
        block = min(triton.next_power_of_2(V), 4096)
        return block, triton.cdiv(V, block) * block, 1
    block = 1024
    chunks = triton.cdiv(V, block)
    # Enough programs to fill the GPU, but the row merge holds splits * K candidates in
    # registers: keep that product bounded (it only binds for unusually large K).
    max_splits = max(1, 4096 // triton.next_power_of_2(K))
    splits = max(1, min(chunks, _TARGET_PROGRAMS // max(rows, 1), max_splits))
    split_size = triton.cdiv(chunks, splits) * block
    return block, split_size, triton.cdiv(V, split_size)


def tree_expand(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    top_k: int,
    draft_to_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher of ``tree_expand`` (see ``eagle2_kernels.ops.tree_expand``)."""
    B, R, V = logits.shape
    block_v, split_size, _ = _split_plan(B * R, V, top_k, logits.device.type != "cuda")
    return launch(logits, parent_scores, top_k, draft_to_target, block_v, split_size)


def launch(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    top_k: int,
    draft_to_target: torch.Tensor | None,
    block_v: int,
    split_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three kernels with an explicit V split (``split_size`` a multiple of the
    power-of-two ``block_v``); exposed so that tests can exercise several splits."""
    if block_v & (block_v - 1) or split_size % block_v:
        raise ValueError(
            f"block_v={block_v} must be a power of two dividing split_size={split_size}"
        )
    B, R, V = logits.shape
    K = top_k
    device = logits.device
    rows = B * R
    splits = triton.cdiv(V, split_size)
    k_pad = max(triton.next_power_of_2(K), 2)

    part_m = torch.empty(rows, splits, dtype=torch.float32, device=device)
    part_s = torch.empty(rows, splits, dtype=torch.float32, device=device)
    part_v = torch.empty(rows, splits, k_pad, dtype=torch.float32, device=device)
    part_i = torch.empty(rows, splits, k_pad, dtype=torch.int32, device=device)
    child_tokens = torch.empty(B, R, K, dtype=torch.int64, device=device)
    child_scores = torch.empty(B, R, K, dtype=torch.float32, device=device)
    next_index = torch.empty(B, K, dtype=torch.int64, device=device)
    next_scores = torch.empty(B, K, dtype=torch.float32, device=device)

    grid_partial = (rows, splits)
    _expand_partial_kernel[grid_partial](
        logits_ptr=logits,
        part_m_ptr=part_m,
        part_s_ptr=part_s,
        part_v_ptr=part_v,
        part_i_ptr=part_i,
        stride_logits_b=logits.stride(0),
        stride_logits_r=logits.stride(1),
        stride_logits_v=logits.stride(2),
        R=R,
        V=V,
        K=K,
        split_size=split_size,
        num_splits=splits,
        K_PAD=k_pad,
        BLOCK_V=block_v,
        SENTINEL=_SENTINEL,
        num_warps=4,
    )
    has_map = draft_to_target is not None
    grid_row = (rows,)
    _expand_row_kernel[grid_row](
        part_m_ptr=part_m,
        part_s_ptr=part_s,
        part_v_ptr=part_v,
        part_i_ptr=part_i,
        parent_ptr=parent_scores,
        map_ptr=draft_to_target if has_map else child_tokens,
        tokens_ptr=child_tokens,
        scores_ptr=child_scores,
        stride_parent_b=parent_scores.stride(0),
        stride_parent_r=parent_scores.stride(1),
        stride_map_v=draft_to_target.stride(0) if has_map else 0,
        R=R,
        K=K,
        num_splits=splits,
        S_PAD=triton.next_power_of_2(splits),
        K_PAD=k_pad,
        HAS_MAP=has_map,
        SENTINEL=_SENTINEL,
        num_warps=4,
    )
    grid_frontier = (B,)
    _expand_frontier_kernel[grid_frontier](
        scores_ptr=child_scores,
        next_index_ptr=next_index,
        next_scores_ptr=next_scores,
        RK=R * K,
        K=K,
        RK_PAD=max(triton.next_power_of_2(R * K), 2),
        K_PAD=k_pad,
        SENTINEL=_SENTINEL,
        num_warps=4,
    )
    return child_tokens, child_scores, next_index, next_scores
