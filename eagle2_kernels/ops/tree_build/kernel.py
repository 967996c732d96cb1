"""Triton kernel for ``tree_build``: one program per sequence, no host round-trip.

Phase 1 (candidates in BLOCK_C chunks): a candidate is kept iff fewer than T-1 candidates
beat it (a higher score, or an equal score and a lower index); its node index is 1 + the
number of kept candidates before it (a running count plus a cumulative sum in the chunk).
Kept tokens are scattered to their nodes; two small scratch rows record each candidate's
node (-1 if dropped) and each node's parent candidate.
Phase 2 (after a block barrier, nodes as one [T_PAD] vector): parent node = node of the
parent candidate (0 for -1), stored; after another barrier every node walks up to the root
at once, one level per step (parents are read back from the output), setting one mask bit
per node passed and counting the steps for its depth.
Errors (a kept candidate whose parent was dropped, an invalid parent index) are written as
a per-sequence code; the launcher reads it on the host unless a CUDA graph is capturing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle2_kernels.ops.tree import DraftTree, mask_words
from eagle2_kernels.ops.tree_build.reference import (
    ERR_PARENT_DROPPED,
    ERR_PARENT_INVALID,
    raise_for_error_codes,
)


@triton.jit
def _tree_build_kernel(
    tokens_ptr,
    scores_ptr,
    parents_ptr,
    root_ptr,
    out_tokens_ptr,
    out_parents_ptr,
    out_depth_ptr,
    out_mask_ptr,
    flag_ptr,
    scratch_ptr,
    stride_tokens_b,
    stride_tokens_c,
    stride_scores_b,
    stride_scores_c,
    stride_parents_b,
    stride_parents_c,
    stride_root_b,
    C,
    T,
    W,
    BLOCK_C: tl.constexpr,
    T_PAD: tl.constexpr,
    W_PAD: tl.constexpr,
    ERR_DROPPED: tl.constexpr,
    ERR_INVALID: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    scratch = scratch_ptr + b * (C + T_PAD)  # [0, C): node of candidate; [C, C+T_PAD): parent cand.
    out_tokens = out_tokens_ptr + b * T
    zero = tl.program_id(0) * 0
    count = zero  # kept candidates so far
    err = zero

    # ---- phase 1: keep the T-1 best candidates, number them in candidate order
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        # [BLOCK_C]
        s_c = tl.load(scores_ptr + b * stride_scores_b + offs_c * stride_scores_c, mask=c_ok)
        s_c = s_c.to(tl.float32)
        rank = tl.zeros([BLOCK_C], tl.int32)
        for o0 in range(0, C, BLOCK_C):
            offs_o = o0 + tl.arange(0, BLOCK_C)
            o_ok = offs_o < C
            # [BLOCK_C]
            s_o = tl.load(scores_ptr + b * stride_scores_b + offs_o * stride_scores_c, mask=o_ok)
            s_o = s_o.to(tl.float32)
            # [BLOCK_C, BLOCK_C]: does candidate o beat candidate c?
            beats = (s_o[None, :] > s_c[:, None]) | (
                (s_o[None, :] == s_c[:, None]) & (offs_o[None, :] < offs_c[:, None])
            )
            beats = beats & o_ok[None, :]
            rank += tl.sum(beats.to(tl.int32), 1)
        kept = c_ok & (rank < T - 1)
        node = count + tl.cumsum(kept.to(tl.int32), 0)
        count += tl.sum(kept.to(tl.int32), 0)

        # [BLOCK_C]
        par = tl.load(parents_ptr + b * stride_parents_b + offs_c * stride_parents_c, mask=c_ok)
        par = par.to(tl.int32)
        invalid = c_ok & ((par < -1) | (par >= offs_c))
        err = err | (tl.max(invalid.to(tl.int32), 0) * ERR_INVALID)
        tok = tl.load(tokens_ptr + b * stride_tokens_b + offs_c * stride_tokens_c, mask=kept)
        tl.store(out_tokens + node, tok.to(tl.int64), mask=kept)
        tl.store(scratch + offs_c, tl.where(kept, node, -1), mask=c_ok)
        # An invalid parent (already reported) is recorded as -2 and then treated as the root.
        tl.store(scratch + C + node, tl.where(invalid, -2, par), mask=kept)

    # Every thread of the program must see the scratch rows written above.
    tl.debug_barrier()

    # ---- phase 2: parent nodes, depth and the packed ancestor mask
    offs_t = tl.arange(0, T_PAD)
    is_node = (offs_t >= 1) & (offs_t < T)
    # [T_PAD]
    par_cand = tl.load(scratch + C + offs_t, mask=is_node, other=-1)
    has_par = is_node & (par_cand >= 0)
    par_node = tl.load(scratch + tl.maximum(par_cand, 0), mask=has_par, other=0)
    dropped = has_par & (par_node < 0)
    err = err | (tl.max(dropped.to(tl.int32), 0) * ERR_DROPPED)
    par_node = tl.where(par_node < 0, 0, par_node)
    par_node = tl.where(offs_t == 0, -1, par_node)
    tl.store(out_parents_ptr + b * T + offs_t, par_node, mask=offs_t < T)
    tl.store(out_tokens, tl.load(root_ptr + b * stride_root_b).to(tl.int64))
    tl.store(flag_ptr + b, err)

    # Every thread must see the parents stored above before walking them.
    tl.debug_barrier()

    # Walk every node up to the root at once, one level per step, setting the bit of each
    # node passed (itself first). Parents precede children, so the walk ends within T steps
    # (in practice depth + 1 steps, about 7 for the default tree).
    offs_w = tl.arange(0, W_PAD)
    row_ok = offs_t < T
    cur = tl.where(row_ok, offs_t, -1)
    words = tl.zeros([T_PAD, W_PAD], tl.int64)
    steps = tl.zeros([T_PAD], tl.int32)
    one = tl.full([T_PAD], 1, tl.int64)
    while tl.max(cur, 0) >= 0:
        on = cur >= 0
        safe = tl.maximum(cur, 0)
        bit = one << (safe % 32).to(tl.int64)
        # [T_PAD, W_PAD]
        hit = on[:, None] & ((safe // 32)[:, None] == offs_w[None, :])
        words = words | tl.where(hit, bit[:, None], 0)
        steps += on.to(tl.int32)
        up = tl.load(out_parents_ptr + b * T + safe, mask=on, other=-1)
        cur = tl.where(on, up, -1)
    tl.store(out_depth_ptr + b * T + offs_t, steps - 1, mask=row_ok)
    # words < 2**32 hold the int32 bit patterns; bit 31 set means a negative int32
    words = tl.where(words >= 2147483648, words - 4294967296, words).to(tl.int32)
    word_ok = row_ok[:, None] & (offs_w[None, :] < W)
    tl.store(out_mask_ptr + (b * T + offs_t)[:, None] * W + offs_w[None, :], words, mask=word_ok)


def tree_build(
    cand_tokens: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    root_tokens: torch.Tensor,
    total_tokens: int,
    error_flag: torch.Tensor | None = None,
) -> DraftTree:
    """Triton launcher of ``tree_build`` (see ``eagle2_kernels.ops.tree_build``).

    With ``error_flag`` the error codes are only written there, never read on the host (no
    device sync: eager static rounds and captured graphs alike; the caller checks the flag
    later). Without it they are read on the host and an error raises ValueError, except
    while the current CUDA stream is capturing a graph (no host reads allowed: the codes are
    then lost, so pass a flag when capturing).
    """
    B, C = cand_scores.shape
    T = total_tokens
    W = mask_words(T)
    device = cand_scores.device
    t_pad = triton.next_power_of_2(T)
    if device.type == "cuda":
        block_c = min(max(triton.next_power_of_2(C), 16), 128)
    else:  # the interpreter runs whole blocks as numpy ops: fewer, larger blocks
        block_c = min(max(triton.next_power_of_2(C), 16), 1024)

    tokens = torch.empty(B, T, dtype=torch.int64, device=device)
    parents = torch.empty(B, T, dtype=torch.int32, device=device)
    depth = torch.empty(B, T, dtype=torch.int32, device=device)
    mask = torch.empty(B, T, W, dtype=torch.int32, device=device)
    flag = error_flag
    if flag is None:
        flag = torch.empty(B, dtype=torch.int32, device=device)
    scratch = torch.empty(B, C + t_pad, dtype=torch.int32, device=device)

    grid = (B,)
    _tree_build_kernel[grid](
        tokens_ptr=cand_tokens,
        scores_ptr=cand_scores,
        parents_ptr=cand_parents,
        root_ptr=root_tokens,
        out_tokens_ptr=tokens,
        out_parents_ptr=parents,
        out_depth_ptr=depth,
        out_mask_ptr=mask,
        flag_ptr=flag,
        scratch_ptr=scratch,
        stride_tokens_b=cand_tokens.stride(0),
        stride_tokens_c=cand_tokens.stride(1),
        stride_scores_b=cand_scores.stride(0),
        stride_scores_c=cand_scores.stride(1),
        stride_parents_b=cand_parents.stride(0),
        stride_parents_c=cand_parents.stride(1),
        stride_root_b=root_tokens.stride(0),
        C=C,
        T=T,
        W=W,
        BLOCK_C=block_c,
        T_PAD=t_pad,
        W_PAD=triton.next_power_of_2(W),
        ERR_DROPPED=ERR_PARENT_DROPPED,
        ERR_INVALID=ERR_PARENT_INVALID,
        num_warps=4,
    )
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if error_flag is None and not capturing:
        raise_for_error_codes(flag, cand_parents)
    return DraftTree(tokens=tokens, parents=parents, depth=depth, mask=mask)
