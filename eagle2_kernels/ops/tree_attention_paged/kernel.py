"""Triton kernel for ``tree_attention_paged``: the dense kernel's decomposition over paged K/V.

Same work split as ``ops/tree_attention/kernel.py``: the G = Hq // Hkv query heads of a kv
head are folded with the Tq query rows into M = G * Tq rows; grid (row blocks, B * Hkv,
splits); an online softmax walks the logical slots [0, prefix_len + tree_len), first the
prefix (all visible), then the tree slots (per the packed mask); long contexts are split over
up to NUM_SPLITS programs, the splits used computed on the device from prefix_len, and merged
by the dense op's combine kernel (the partial-result layout is the same). The sliding window,
softcap and sinks are the dense kernel's (its visibility helpers are shared): with a window
the pages before prefix_len - window are not read.

What differs is the address of a key: for a block of BLOCK_N logical slots the program loads
their pages from the sequence's block-table row (one int per slot, cached in L1 since
neighbouring slots share a page) and forms int64 row offsets page * stride_page + slot *
stride_slot, so any page layout (vLLM, FlashInfer NHD/HND views) is read in place. The per-block
step is not shared with the dense kernel because there the rows are a strided range and here
they are gathered; the online-softmax arithmetic is the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle2_kernels.ops.tree_attention.kernel import (_add_sink, _interpreted, _key_range,
                                                   _row_tree_counts, _tanh, _tree_block_visible,
                                                   combine_splits, plan_launch, split_buffers)



@triton.jit
def _paged_block(
    acc,
    m_i,
    l_i,
    q,
    k_head_ptr,
    v_head_ptr,
    table_row_ptr,
    offs_n,
    col_ok,
    visible,
    offs_d,
    d_ok,
    stride_table_m,
    stride_k_page,
    stride_k_slot,
    stride_k_d,
    stride_v_page,
    stride_v_slot,
    stride_v_d,
    PAGE_SIZE,
    qk_scale,
    cap_out,
    EVEN_D: tl.constexpr,
    COMPUTE_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """One online-softmax step over BLOCK_N logical slots; returns the updated (acc, m, l)."""
    # [BLOCK_N] physical page and slot of each logical slot (masked columns read page 0).
    page = tl.load(table_row_ptr + (offs_n // PAGE_SIZE) * stride_table_m, mask=col_ok, other=0)
    page = page.to(tl.int64)
    slot = (offs_n % PAGE_SIZE).to(tl.int64)
    k_rows = page * stride_k_page + slot * stride_k_slot
    v_rows = page * stride_v_page + slot * stride_v_slot
    if EVEN_D:
        k_mask = col_ok[None, :]
        v_mask = col_ok[:, None]
    else:
        k_mask = d_ok[:, None] & col_ok[None, :]
        v_mask = col_ok[:, None] & d_ok[None, :]
    # [BLOCK_D, BLOCK_N]: K transposed
    kt = tl.load(k_head_ptr + k_rows[None, :] + offs_d[:, None] * stride_k_d, mask=k_mask,
                 other=0.0)
    # [BLOCK_N, BLOCK_D]
    v = tl.load(v_head_ptr + v_rows[:, None] + offs_d[None, :] * stride_v_d, mask=v_mask,
                other=0.0)
    if COMPUTE_FP32:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    # [BLOCK_M, BLOCK_N] scores in log2 units
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if HAS_SOFTCAP:
        s = _tanh(s) * cap_out  # qk_scale = scale / softcap, cap_out = softcap * log2(e)
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
def _tree_attention_paged_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    prefix_ptr,
    mask_ptr,
    sinks_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_t,
    stride_q_d,
    stride_k_page,
    stride_k_slot,
    stride_k_h,
    stride_k_d,
    stride_v_page,
    stride_v_slot,
    stride_v_h,
    stride_v_d,
    stride_table_b,
    stride_table_m,
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
    PAGE_SIZE,
    TREE_LEN,
    NUM_SPLITS,
    MIN_CHUNK,
    WINDOW,
    qk_scale,
    cap_out,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    EVEN_D: tl.constexpr,
    COMPUTE_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    kvh = pid_bh % HKV

    prefix = tl.load(prefix_ptr + b).to(tl.int32)
    # Splits actually used for this sequence, and this program's slot range [lo, hi).
    key_lo, total, n_splits = _key_range(prefix, TREE_LEN, WINDOW, NUM_SPLITS, MIN_CHUNK, HAS_WINDOW)
    if pid_s >= n_splits:
        return
    chunk = tl.cdiv(tl.cdiv(total - key_lo, n_splits), BLOCK_N) * BLOCK_N
    lo = key_lo + pid_s * chunk
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
    k_head = k_ptr + kvh * stride_k_h
    v_head = v_ptr + kvh * stride_v_h
    table_row = table_ptr + b * stride_table_b
    mask_rows = mask_ptr + b * stride_mask_b + t * stride_mask_t  # [BLOCK_M] pointers

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Prefix slots: visible to every row (with a window: from prefix + n_i - WINDOW on).
    p_lo = lo
    n_vis = tl.zeros([BLOCK_M], dtype=tl.int32)
    row_first = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_WINDOW:
        n_vis = _row_tree_counts(mask_rows, stride_mask_w, row_ok, TREE_LEN, BLOCK_M)
        row_first = prefix + n_vis - WINDOW
        p_lo = tl.maximum(lo, tl.min(tl.where(row_ok, row_first, total), axis=0))
    p_end = tl.minimum(hi, prefix)
    for start in range(p_lo, p_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < p_end
        visible = row_ok[:, None] & col_ok[None, :]
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] >= row_first[:, None])
        acc, m_i, l_i = _paged_block(
            acc, m_i, l_i, q, k_head, v_head, table_row, offs_n, col_ok, visible, offs_d, d_ok,
            stride_table_m, stride_k_page, stride_k_slot, stride_k_d,
            stride_v_page, stride_v_slot, stride_v_d, PAGE_SIZE, qk_scale, cap_out,
            EVEN_D, COMPUTE_FP32, DOT_PRECISION, HAS_SOFTCAP,
        )
    # Tree slots: logical prefix + j is visible to row t iff bit j of tree_mask[b, t] is set.
    for start in range(tl.maximum(lo, prefix), hi, BLOCK_N):
        offs_n, col_ok, visible = _tree_block_visible(
            mask_rows, stride_mask_w, row_ok, start, prefix, hi, TREE_LEN, n_vis, WINDOW,
            BLOCK_M, BLOCK_N, NUM_WORDS, HAS_WINDOW,
        )
        acc, m_i, l_i = _paged_block(
            acc, m_i, l_i, q, k_head, v_head, table_row, offs_n, col_ok, visible, offs_d, d_ok,
            stride_table_m, stride_k_page, stride_k_slot, stride_k_d,
            stride_v_page, stride_v_slot, stride_v_d, PAGE_SIZE, qk_scale, cap_out,
            EVEN_D, COMPUTE_FP32, DOT_PRECISION, HAS_SOFTCAP,
        )

    if n_splits == 1:
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            acc, m_i, l_i = _add_sink(acc, m_i, l_i, sink)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + b * stride_out_b + h[:, None] * stride_out_h + t[:, None] * stride_out_t
            + offs_d[None, :] * stride_out_d,
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        # Partials as the dense op lays them out: acc [NUM_SPLITS, B, Hq, Tq, Dh],
        # (m, l) [2, NUM_SPLITS, B, Hq, Tq], float32.
        row = ((pid_s * B + b) * (HKV * GROUP) + h) * TQ + t
        tl.store(part_acc_ptr + row[:, None] * DH + offs_d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_ml_ptr + row, m_i, mask=row_ok)
        tl.store(part_ml_ptr + NUM_SPLITS * B * HKV * GROUP * TQ + row, l_i, mask=row_ok)


def tree_attention_paged(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher of ``tree_attention_paged`` (see ``eagle2_kernels.ops.tree_attention_paged``)."""
    return launch(q, k_pages, v_pages, block_table, prefix_len, tree_mask, tree_len, scale,
                  window=window, softcap=softcap, sinks=sinks)


def launch(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int | None = None,
    min_chunk: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """``tree_attention_paged`` with the block sizes and split policy overridable (tests).

    The defaults are the dense kernel's: BLOCK_M = next power of two of G * Tq in [16, 128];
    BLOCK_N = 64 (32 for Dh > 128; 128 under the interpreter); each split covers at least
    ``min_chunk`` = max(512, 4 * G * Tq) slots; the split cap ``num_splits`` is sized from the
    block table's capacity max_blocks * page_size (static, so CUDA graphs can be captured) and
    keeps the grid within one wave of resident programs.
    """
    if q.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            f"tree_attention_paged (triton): tensors are on {q.device}; the Triton kernel needs "
            "CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        )
    B, Hq, Tq, Dh = q.shape
    page_size, Hkv = k_pages.shape[1], k_pages.shape[2]
    capacity = block_table.shape[1] * page_size
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    plan = plan_launch("tree_attention_paged", q, Hkv, capacity, scale, num_splits, min_chunk,
                       block_m, block_n, window, softcap)
    part_acc, part_ml = split_buffers(plan, out)
    sinks = None if sinks is None else sinks.contiguous()

    grid = (plan.num_m, B * Hkv, plan.num_splits)
    _tree_attention_paged_kernel[grid](
        q_ptr=q,
        k_ptr=k_pages,
        v_ptr=v_pages,
        table_ptr=block_table,
        prefix_ptr=prefix_len,
        mask_ptr=tree_mask,
        sinks_ptr=out if sinks is None else sinks,
        out_ptr=out,
        part_acc_ptr=part_acc,
        part_ml_ptr=part_ml,
        stride_q_b=q.stride(0),
        stride_q_h=q.stride(1),
        stride_q_t=q.stride(2),
        stride_q_d=q.stride(3),
        stride_k_page=k_pages.stride(0),
        stride_k_slot=k_pages.stride(1),
        stride_k_h=k_pages.stride(2),
        stride_k_d=k_pages.stride(3),
        stride_v_page=v_pages.stride(0),
        stride_v_slot=v_pages.stride(1),
        stride_v_h=v_pages.stride(2),
        stride_v_d=v_pages.stride(3),
        stride_table_b=block_table.stride(0),
        stride_table_m=block_table.stride(1),
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
        PAGE_SIZE=page_size,
        TREE_LEN=tree_len,
        NUM_SPLITS=plan.num_splits,
        MIN_CHUNK=plan.min_chunk,
        WINDOW=plan.window,
        qk_scale=plan.qk_scale,
        cap_out=plan.cap_out,
        GROUP=plan.group,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_D=plan.block_d,
        NUM_WORDS=(plan.block_n + 31) // 32 + 1,
        EVEN_D=plan.block_d == Dh,
        COMPUTE_FP32=plan.compute_fp32,
        DOT_PRECISION=plan.precision,
        HAS_WINDOW=plan.has_window,
        HAS_SOFTCAP=plan.has_softcap,
        HAS_SINKS=sinks is not None,
        num_warps=plan.num_warps,
        num_stages=2,
    )
    combine_splits(plan, part_acc, part_ml, prefix_len, out, tree_len, sinks)
    return out
