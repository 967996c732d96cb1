"""Triton kernels for ``tree_attention`` (flash-decoding style, GQA-grouped, packed tree mask).

Work decomposition. The G = Hq // Hkv query heads that share a kv head are folded with the Tq
query rows into M = G * Tq rows (row r is head g = r // Tq, query t = r % Tq), so each K/V
block is read once for all of them. Grid: (row blocks of M, B * Hkv, splits); row blocks are
the fastest-varying program id so the programs that read the same K/V run side by side and
share it through L2.

Each program walks its share of the key slots [0, prefix_len + tree_len) with an online
softmax (base-2 exponentials, scale folded in): first the prefix slots, all visible, then the
tree slots, visible per the packed mask bit of each query row. For long contexts the slots are
split across up to NUM_SPLITS programs (flash-decoding); the number of splits actually used is
computed on the device from prefix_len (never read on the host), so that short prefixes do not
pay for the partial-result round trip: S = clamp(ceil(total / MIN_CHUNK), 1, NUM_SPLITS). With
S = 1 the program writes the normalised output directly; otherwise every split stores its
unnormalised accumulator with its row max and sum, and a small combine kernel merges them.

Rows that see no slot keep max = -inf and sum = 0 and are written as zeros.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    offs_n,
    col_ok,
    visible,
    offs_d,
    d_ok,
    stride_k_l,
    stride_k_d,
    stride_v_l,
    stride_v_d,
    qk_scale,
    EVEN_D: tl.constexpr,
    COMPUTE_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over a block of key slots; returns the updated (acc, m, l)."""
    # The head-dim mask only when BLOCK_D > Dh: a loop-invariant [BLOCK_D, BLOCK_N] mask tile
    # would be hoisted out of the loop and cost registers.
    if EVEN_D:
        k_mask = col_ok[None, :]
        v_mask = col_ok[:, None]
    else:
        k_mask = d_ok[:, None] & col_ok[None, :]
        v_mask = col_ok[:, None] & d_ok[None, :]
    # [BLOCK_D, BLOCK_N]: K transposed
    kt = tl.load(k_base + offs_n[None, :] * stride_k_l + offs_d[:, None] * stride_k_d,
                 mask=k_mask, other=0.0)
    # [BLOCK_N, BLOCK_D]
    v = tl.load(v_base + offs_n[:, None] * stride_v_l + offs_d[None, :] * stride_v_d,
                mask=v_mask, other=0.0)
    if COMPUTE_FP32:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    # [BLOCK_M, BLOCK_N] scores in log2 units
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps max -inf; subtract 0 instead to avoid inf - inf.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _tree_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    prefix_ptr,
    mask_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_t,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_l,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_l,
    stride_v_d,
    stride_mask_b,
    stride_mask_t,
    stride_mask_w,
    stride_out_b,
    stride_out_h,
    stride_out_t,
    stride_out_d,
    B,
    HKV,
    TQ,
    DH,
    TREE_LEN,
    NUM_SPLITS,
    MIN_CHUNK,
    qk_scale,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    EVEN_D: tl.constexpr,
    COMPUTE_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Row offsets stay int32 (rows * strides within one sequence's q/out are small); the
    # batch and kv-head offsets are int64.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    kvh = pid_bh % HKV

    prefix = tl.load(prefix_ptr + b).to(tl.int32)
    total = prefix + TREE_LEN
    # Splits actually used for this sequence, and this program's slot range [lo, hi).
    n_splits = tl.minimum(tl.maximum(tl.cdiv(total, MIN_CHUNK), 1), NUM_SPLITS)
    if pid_s >= n_splits:
        return
    chunk = tl.cdiv(tl.cdiv(total, n_splits), BLOCK_N) * BLOCK_N
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, total)

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < GROUP * TQ
    t = offs_r % TQ
    h = kvh * GROUP + offs_r // TQ  # query head of each row
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DH

    # [BLOCK_M, BLOCK_D]
    q = tl.load(
        q_ptr + b * stride_q_b + h[:, None] * stride_q_h + t[:, None] * stride_q_t
        + offs_d[None, :] * stride_q_d,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if COMPUTE_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_k_b + kvh * stride_k_h
    v_base = v_ptr + b * stride_v_b + kvh * stride_v_h
    mask_rows = mask_ptr + b * stride_mask_b + t * stride_mask_t  # [BLOCK_M] pointers

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Prefix slots: visible to every row.
    p_end = tl.minimum(hi, prefix)
    for start in range(lo, p_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < p_end
        visible = row_ok[:, None] & col_ok[None, :]
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, offs_n, col_ok, visible, offs_d, d_ok,
            stride_k_l, stride_k_d, stride_v_l, stride_v_d, qk_scale,
            EVEN_D, COMPUTE_FP32, DOT_PRECISION,
        )
    # Tree slots: slot prefix + j is visible to row t iff bit j of tree_mask[b, t] is set.
    # A block of BLOCK_N slots spans at most NUM_WORDS mask words; load each as a [BLOCK_M]
    # vector and pick per column, instead of gathering a [BLOCK_M, BLOCK_N] tile of words.
    num_words = tl.cdiv(TREE_LEN, 32)
    for start in range(tl.maximum(lo, prefix), hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < hi
        j = offs_n - prefix  # tree slot index of each column
        first = (start - prefix) // 32
        words = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for w in tl.static_range(NUM_WORDS):
            # [BLOCK_M]
            word_ok = row_ok & (tl.full([BLOCK_M], w, tl.int32) + first < num_words)
            word = tl.load(mask_rows + (first + w) * stride_mask_w, mask=word_ok, other=0)
            words = tl.where((j // 32 - first == w)[None, :], word[:, None], words)
        bits = (words >> (j % 32)[None, :]) & 1
        visible = row_ok[:, None] & col_ok[None, :] & (bits != 0)
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, offs_n, col_ok, visible, offs_d, d_ok,
            stride_k_l, stride_k_d, stride_v_l, stride_v_d, qk_scale,
            EVEN_D, COMPUTE_FP32, DOT_PRECISION,
        )

    if n_splits == 1:
        # Rows that saw nothing have acc = 0 and l = 0: write zeros.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + b * stride_out_b + h[:, None] * stride_out_h + t[:, None] * stride_out_t
            + offs_d[None, :] * stride_out_d,
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        # Partials: acc [NUM_SPLITS, B, Hq, Tq, Dh], (m, l) [2, NUM_SPLITS, B, Hq, Tq], float32.
        row = ((pid_s * B + b) * (HKV * GROUP) + h) * TQ + t
        tl.store(part_acc_ptr + row[:, None] * DH + offs_d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_ml_ptr + row, m_i, mask=row_ok)
        tl.store(part_ml_ptr + NUM_SPLITS * B * HKV * GROUP * TQ + row, l_i, mask=row_ok)


@triton.jit
def _tree_attention_combine_kernel(
    part_acc_ptr,
    part_ml_ptr,
    prefix_ptr,
    out_ptr,
    stride_out_b,
    stride_out_h,
    stride_out_t,
    stride_out_d,
    B,
    HQ,
    TQ,
    DH,
    TREE_LEN,
    NUM_SPLITS,
    MIN_CHUNK,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    prefix = tl.load(prefix_ptr + b).to(tl.int32)
    n_splits = tl.minimum(tl.maximum(tl.cdiv(prefix + TREE_LEN, MIN_CHUNK), 1), NUM_SPLITS)
    if n_splits == 1:
        return  # the attention kernel wrote the output itself

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < TQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DH
    row0 = (b * HQ + h) * TQ + offs_t  # row of split 0
    split_rows = B * HQ * TQ
    l_base = part_ml_ptr + NUM_SPLITS * split_rows

    m_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        m_s = tl.load(part_ml_ptr + s * split_rows + row0, mask=t_ok, other=float("-inf"))
        m_max = tl.maximum(m_max, m_s)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    for s in range(0, n_splits):
        row = s * split_rows + row0
        w = tl.math.exp2(tl.load(part_ml_ptr + row, mask=t_ok, other=float("-inf")) - m_use)
        l_sum += w * tl.load(l_base + row, mask=t_ok, other=0.0)
        # [BLOCK_T, BLOCK_D]
        part = tl.load(part_acc_ptr + row[:, None] * DH + offs_d[None, :],
                       mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        acc += w[:, None] * part
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    tl.store(
        out_ptr + b * stride_out_b + h * stride_out_h + offs_t[:, None] * stride_out_t
        + offs_d[None, :] * stride_out_d,
        out.to(out_ptr.dtype.element_ty),
        mask=t_ok[:, None] & d_ok[None, :],
    )


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class LaunchPlan(NamedTuple):
    """Block sizes, split policy and precision of one tree-attention launch (dense or paged)."""

    scale: float
    group: int
    block_m: int
    block_n: int
    block_d: int
    num_m: int
    num_warps: int
    min_chunk: int
    num_splits: int
    compute_fp32: bool
    precision: str


def plan_launch(fn, q, Hkv, capacity, scale, num_splits, min_chunk, block_m, block_n) -> LaunchPlan:
    """The launch policy shared by ``tree_attention`` and ``tree_attention_paged`` (see
    ``launch``); ``capacity`` is the most slots a sequence can have (Lmax, or max_blocks *
    page_size), which caps the splits statically so that CUDA graphs can be captured."""
    B, Hq, Tq, Dh = q.shape
    if Dh > 256:
        raise ValueError(f"{fn} (triton): head dim Dh={Dh} > 256 is not supported")
    if scale is None:
        scale = 1.0 / math.sqrt(Dh)
    group = Hq // Hkv
    rows = group * Tq
    interp = _interpreted() or q.device.type != "cuda"
    block_d = max(16, triton.next_power_of_2(Dh))
    if block_m is None:
        block_m = min(128, max(16, triton.next_power_of_2(rows)))
    if block_n is None:
        block_n = 128 if interp else (64 if block_d <= 128 else 32)
    num_m = triton.cdiv(rows, block_m)
    num_warps = 8 if block_m * block_d >= 128 * 128 else 4
    if min_chunk is None:
        min_chunk = max(512, 4 * rows)
    if num_splits is None:
        if interp:
            num_splits = 1
        else:
            index = q.device.index if q.device.index is not None else torch.cuda.current_device()
            resident = _sm_count(index) * (1 if num_warps == 8 else 2)
            programs = num_m * B * Hkv
            num_splits = max(1, min(resident // programs, triton.cdiv(capacity, min_chunk), 64))
    min_chunk = max(int(min_chunk), 1)
    # fp16/bf16 go through the tensor cores with fp32 accumulation; fp32 inputs (and all
    # inputs under the interpreter, whose bf16 arithmetic is wrong) are multiplied in fp32.
    compute_fp32 = interp or q.dtype == torch.float32
    precision = "ieee" if q.dtype == torch.float32 or interp else "tf32"
    return LaunchPlan(scale, group, block_m, block_n, block_d, num_m, num_warps, min_chunk,
                      num_splits, compute_fp32, precision)


def split_buffers(plan: LaunchPlan, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 partial results of the splits: acc [S * B * Hq * Tq * Dh], (m, l) pairs."""
    if plan.num_splits == 1:
        return out, out  # never touched: every sequence takes the one-split path
    n = plan.num_splits * out[..., 0].numel()
    acc = torch.empty(n * out.shape[-1], device=out.device, dtype=torch.float32)
    return acc, torch.empty(2 * n, device=out.device, dtype=torch.float32)


def combine_splits(plan: LaunchPlan, part_acc, part_ml, prefix_len, out, tree_len: int) -> None:
    """Merge the splits' partial results into ``out`` (nothing to do with one split)."""
    if plan.num_splits == 1:
        return
    B, Hq, Tq, Dh = out.shape
    block_t = min(64, max(16, triton.next_power_of_2(Tq)))
    grid = (B * Hq, triton.cdiv(Tq, block_t))
    _tree_attention_combine_kernel[grid](
        part_acc_ptr=part_acc,
        part_ml_ptr=part_ml,
        prefix_ptr=prefix_len,
        out_ptr=out,
        stride_out_b=out.stride(0),
        stride_out_h=out.stride(1),
        stride_out_t=out.stride(2),
        stride_out_d=out.stride(3),
        B=B,
        HQ=Hq,
        TQ=Tq,
        DH=Dh,
        TREE_LEN=tree_len,
        NUM_SPLITS=plan.num_splits,
        MIN_CHUNK=plan.min_chunk,
        BLOCK_T=block_t,
        BLOCK_D=plan.block_d,
        num_warps=4,
    )


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton launcher of ``tree_attention`` (see ``eagle2_kernels.ops.tree_attention``)."""
    return launch(q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale)


def launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    min_chunk: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """``tree_attention`` with the block sizes and split policy overridable (tests, tuning).

    Defaults: BLOCK_M = next power of two of G * Tq, in [16, 128]; BLOCK_N = 64 (32 for
    Dh > 128; 128 under the interpreter, where large blocks are faster). Each split covers at
    least ``min_chunk`` = max(512, 4 * G * Tq) slots, so that its partial result (G * Tq * Dh
    floats, written and read back once) stays small next to the K/V it reads. The split cap
    ``num_splits`` is sized from the capacity Lmax (static, so CUDA graphs can be captured) and
    keeps the grid within one wave of resident programs (1 per SM for 8-warp programs, 2 for
    4-warp ones); the splits a sequence actually uses follow from its prefix_len on the device.
    """
    if q.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            f"tree_attention (triton): tensors are on {q.device}; the Triton kernel needs CUDA "
            "tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        )
    B, Hq, Tq, Dh = q.shape
    Hkv, Lmax = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    plan = plan_launch("tree_attention", q, Hkv, Lmax, scale, num_splits, min_chunk, block_m, block_n)
    part_acc, part_ml = split_buffers(plan, out)

    grid = (plan.num_m, B * Hkv, plan.num_splits)
    _tree_attention_kernel[grid](
        q_ptr=q,
        k_ptr=k_cache,
        v_ptr=v_cache,
        prefix_ptr=prefix_len,
        mask_ptr=tree_mask,
        out_ptr=out,
        part_acc_ptr=part_acc,
        part_ml_ptr=part_ml,
        stride_q_b=q.stride(0),
        stride_q_h=q.stride(1),
        stride_q_t=q.stride(2),
        stride_q_d=q.stride(3),
        stride_k_b=k_cache.stride(0),
        stride_k_h=k_cache.stride(1),
        stride_k_l=k_cache.stride(2),
        stride_k_d=k_cache.stride(3),
        stride_v_b=v_cache.stride(0),
        stride_v_h=v_cache.stride(1),
        stride_v_l=v_cache.stride(2),
        stride_v_d=v_cache.stride(3),
        stride_mask_b=tree_mask.stride(0),
        stride_mask_t=tree_mask.stride(1),
        stride_mask_w=tree_mask.stride(2),
        stride_out_b=out.stride(0),
        stride_out_h=out.stride(1),
        stride_out_t=out.stride(2),
        stride_out_d=out.stride(3),
        B=B,
        HKV=Hkv,
        TQ=Tq,
        DH=Dh,
        TREE_LEN=tree_len,
        NUM_SPLITS=plan.num_splits,
        MIN_CHUNK=plan.min_chunk,
        qk_scale=plan.scale * _LOG2E,
        GROUP=plan.group,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_D=plan.block_d,
        NUM_WORDS=(plan.block_n + 31) // 32 + 1,
        EVEN_D=plan.block_d == Dh,
        COMPUTE_FP32=plan.compute_fp32,
        DOT_PRECISION=plan.precision,
        num_warps=plan.num_warps,
        num_stages=2,
    )
    combine_splits(plan, part_acc, part_ml, prefix_len, out, tree_len)
    return out
