"""Triton kernel for ``verify_sample``: the rejection-sampling walk and the bonus draw on device.

The logits processing (temperature, top-k, top-p: top-p needs a sort) runs first as torch ops
(``eagle2_kernels.ops.sampling.process_logits``) into a fresh float32 ``probs`` [B, T, V]
that this op owns, with float64 row sums. Then ``_sample_walk_kernel``, grid (B,), one program
per sequence:

- walks the nodes in index order (a node's children follow it), trying each child of the
  current node: accept iff ``u_i < p(x) / Z`` where ``Z`` is 1 at a freshly entered node and
  the remaining (not rejected) mass once a child was rejected; that is the renormalised
  residual of the reference, computed without a pass over V per rejection;
- zeroes a rejected child's entry of ``probs`` in place, so that the bonus draw sees the
  residual (a block barrier orders that store before later loads of the row);
- draws the bonus from the residual of the final node by inverse CDF: a float64 block-wise
  cumulative sum over V in token-id order, the first id whose cumulative value exceeds
  ``u_0`` (else the last id with nonzero probability).

No host reads: the whole op is CUDA-graph capturable for fixed shapes and parameters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle2_kernels.ops.sampling import process_logits
from eagle2_kernels.ops.tree import DraftTree

_NO_INDEX = tl.constexpr(2**31 - 1)


@triton.jit
def _sample_walk_kernel(
    tokens_ptr,
    parents_ptr,
    probs_ptr,
    rowsum_ptr,
    uniforms_ptr,
    path_ptr,
    accept_len_ptr,
    bonus_ptr,
    stride_tokens_b,
    stride_tokens_t,
    stride_parents_b,
    stride_parents_t,
    stride_probs_b,
    stride_probs_t,
    stride_rowsum_b,
    stride_rowsum_t,
    stride_uniforms_b,
    stride_uniforms_t,
    stride_path_b,
    T,
    V,
    T_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid.to(tl.int64)
    probs_b = probs_ptr + b * stride_probs_b
    offs_t = tl.arange(0, T_PAD)
    # [T_PAD] the path is kept in registers and stored once
    path = tl.where(offs_t == 0, 0, -1).to(tl.int64)
    cur = pid * 0  # current (deepest accepted) node
    n_acc = pid * 0 + 1
    mass = tl.load(rowsum_ptr + b * stride_rowsum_b).to(tl.float64)  # row sum at cur
    rejected = mass * 0.0  # probability of the children of cur rejected so far
    for i in range(1, T):
        par = tl.load(parents_ptr + b * stride_parents_b + i * stride_parents_t)
        if par == cur:
            tok = tl.load(tokens_ptr + b * stride_tokens_b + i * stride_tokens_t).to(tl.int64)
            in_vocab = (tok >= 0) & (tok < V)
            tok = tl.where(in_vocab, tok, 0)
            row = probs_b + cur.to(tl.int64) * stride_probs_t
            p_x = tl.load(row + tok).to(tl.float64)
            p_x = tl.where(in_vocab, p_x, 0.0)
            z = tl.where(rejected > 0.0, mass - rejected, 1.0)
            u = tl.load(uniforms_ptr + b * stride_uniforms_b + i * stride_uniforms_t).to(tl.float64)
            if u < p_x / z:
                path = tl.where(offs_t == n_acc, i, path)
                n_acc += 1
                cur = i
                mass = tl.load(rowsum_ptr + b * stride_rowsum_b + i * stride_rowsum_t).to(tl.float64)
                rejected = mass * 0.0
            elif p_x > 0.0:
                rejected += p_x
                tl.store(row + tok, 0.0)
                # the zero must be visible to every thread before the row is read again
                tl.debug_barrier()

    # Bonus: inverse CDF over the residual of cur, in token-id order.
    row = probs_b + cur.to(tl.int64) * stride_probs_t
    z = tl.where(rejected > 0.0, mass - rejected, 1.0)
    u0 = tl.load(uniforms_ptr + b * stride_uniforms_b).to(tl.float64)
    carry = z * 0.0
    # per-lane candidates, reduced once after the loop: one scan and one sum per block
    first = tl.full([BLOCK_V], _NO_INDEX, tl.int32)
    last_nonzero = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        # [BLOCK_V]
        q = tl.load(row + offs, mask=ok, other=0.0).to(tl.float64)
        cdf = carry + tl.cumsum(q / z, axis=0)
        first = tl.minimum(first, tl.where(ok & (cdf > u0), offs, _NO_INDEX))
        last_nonzero = tl.maximum(last_nonzero, tl.where(q > 0.0, offs, 0))
        # the block's last cumulative value, so that the cdf stays monotone across blocks
        carry = tl.sum(tl.where(tl.arange(0, BLOCK_V) == BLOCK_V - 1, cdf, 0.0), axis=0)
    first = tl.min(first, axis=0)
    last_nonzero = tl.max(last_nonzero, axis=0)
    bonus = tl.where(first == _NO_INDEX, last_nonzero, first)

    tl.store(path_ptr + b * stride_path_b + offs_t, path, mask=offs_t < T)
    tl.store(accept_len_ptr + b, n_acc.to(tl.int64))
    tl.store(bonus_ptr + b, bonus.to(tl.int64))


def launch_on_probs(
    tree: DraftTree, probs: torch.Tensor, uniforms: torch.Tensor, block_v: int | None = None
):
    """The walk on processed probabilities ``probs`` [B, T, V] float32, contiguous in V.

    ``probs`` is modified in place (rejected children's entries are zeroed).
    """
    tokens, parents = tree.tokens, tree.parents
    B, T = tokens.shape
    V = probs.shape[-1]
    if probs.dtype != torch.float32:
        raise TypeError(f"verify_sample (triton): probs must be float32, got {probs.dtype}")
    if probs.stride(-1) != 1:
        raise ValueError("verify_sample (triton): probs must be contiguous in the vocabulary dim")
    if block_v is None:
        block_v = min(triton.next_power_of_2(V), 4096 if probs.device.type == "cpu" else 2048)
    rowsum = probs.sum(dim=-1, dtype=torch.float64)  # [B, T], contiguous
    path = torch.empty((B, T), dtype=torch.int64, device=probs.device)
    accept_len = torch.empty((B,), dtype=torch.int64, device=probs.device)
    bonus = torch.empty((B,), dtype=torch.int64, device=probs.device)
    grid = (B,)
    _sample_walk_kernel[grid](
        tokens_ptr=tokens,
        parents_ptr=parents,
        probs_ptr=probs,
        rowsum_ptr=rowsum,
        uniforms_ptr=uniforms,
        path_ptr=path,
        accept_len_ptr=accept_len,
        bonus_ptr=bonus,
        stride_tokens_b=tokens.stride(0),
        stride_tokens_t=tokens.stride(1),
        stride_parents_b=parents.stride(0),
        stride_parents_t=parents.stride(1),
        stride_probs_b=probs.stride(0),
        stride_probs_t=probs.stride(1),
        stride_rowsum_b=rowsum.stride(0),
        stride_rowsum_t=rowsum.stride(1),
        stride_uniforms_b=uniforms.stride(0),
        stride_uniforms_t=uniforms.stride(1),
        stride_path_b=path.stride(0),
        T=T,
        V=V,
        T_PAD=triton.next_power_of_2(T),
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return path, accept_len, bonus


def verify_sample(
    tree: DraftTree,
    target_logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    block_v: int | None = None,
):
    """Triton launcher of ``verify_sample`` (see ``eagle2_kernels.ops.verify_sample``)."""
    # a fresh tensor owned by this call: the kernel zeroes rejected entries in place
    probs = process_logits(target_logits, temperature, top_p, top_k).contiguous()
    return launch_on_probs(tree, probs, uniforms, block_v=block_v)
