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

Local attention (all off by default, each a compile-time switch so the plain kernel is
unchanged): with a sliding ``window`` the work starts at slot prefix_len - window (the splits
divide [prefix_len - window, total), and slots before it are never read); row i, whose mask
row has n_i tree bits, sees the prefix slots >= prefix_len + n_i - window and the tree slots
among its last ``window`` set bits (rank by popcount of the mask words). ``softcap`` maps the
scores through softcap * tanh(score / softcap) before the mask; ``sinks`` adds exp(sink[h]) to
the softmax denominator when a row is finished (in the combine kernel for split rows).
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
def _popc(x):
    """Set bits of each uint32 element, as int32 (SWAR: the interpreter has no popcount)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _low_bits(k):
    """uint32 mask of the k lowest bits of each element of the int32 tensor k (k >= 0; all
    32 bits for k >= 32)."""
    one = tl.full(k.shape, 1, tl.uint32)
    return tl.where(k >= 32, 0xFFFFFFFF, (one << tl.minimum(k, 31).to(tl.uint32)) - 1)


@triton.jit
def _tanh(x):
    """tanh in float32 as 1 - 2 / (e^2x + 1): saturates to +-1, never inf / inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _row_tree_counts(mask_rows, stride_mask_w, row_ok, TREE_LEN, BLOCK_M: tl.constexpr):
    """[BLOCK_M] number of tree slots each row sees (set bits among the first TREE_LEN)."""
    n = tl.zeros([BLOCK_M], dtype=tl.int32)
    for w in range(0, tl.cdiv(TREE_LEN, 32)):
        word = tl.load(mask_rows + w * stride_mask_w, mask=row_ok, other=0)
        valid = _low_bits(tl.full([BLOCK_M], TREE_LEN - 32 * w, tl.int32))
        n += _popc(word.to(tl.uint32, bitcast=True) & valid)
    return n


@triton.jit
def _key_range(prefix, TREE_LEN, WINDOW, NUM_SPLITS, MIN_CHUNK, HAS_WINDOW: tl.constexpr):
    """(first slot, end slot, splits used) of a sequence: with a window nothing before
    prefix - WINDOW is visible to any row (a row that sees no tree slot starts there)."""
    total = prefix + TREE_LEN
    first = prefix * 0
    if HAS_WINDOW:
        first = tl.maximum(prefix - WINDOW, 0)
    n_splits = tl.minimum(tl.maximum(tl.cdiv(total - first, MIN_CHUNK), 1), NUM_SPLITS)
    return first, total, n_splits


@triton.jit
def _tree_block_visible(
    mask_rows,
    stride_mask_w,
    row_ok,
    start,
    prefix,
    hi,
    TREE_LEN,
    n_vis,
    WINDOW,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """(offs_n, col_ok, visible) of the tree block of slots start .. start + BLOCK_N - 1.

    Slot prefix + j is visible to row t iff bit j of tree_mask[b, t] is set (and, with a
    window, fewer than WINDOW of the row's set bits come after it). A block of BLOCK_N slots
    spans at most NUM_WORDS mask words; each is loaded as a [BLOCK_M] vector and picked per
    column, instead of gathering a [BLOCK_M, BLOCK_N] tile of words.
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    col_ok = offs_n < hi
    j = offs_n - prefix  # tree slot index of each column
    first = (start - prefix) // 32
    num_words = tl.cdiv(TREE_LEN, 32)
    words = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    before = tl.zeros([BLOCK_M], dtype=tl.int32)
    rank = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    if HAS_WINDOW:
        # Set bits of the whole words before `first` (each row), then word by word.
        for w in range(0, first):
            word = tl.load(mask_rows + w * stride_mask_w, mask=row_ok, other=0)
            before += _popc(word.to(tl.uint32, bitcast=True))
    for w in tl.static_range(NUM_WORDS):
        # [BLOCK_M]
        word_ok = row_ok & (tl.full([BLOCK_M], w, tl.int32) + first < num_words)
        word = tl.load(mask_rows + (first + w) * stride_mask_w, mask=word_ok, other=0)
        here = (j // 32 - first == w)[None, :]
        words = tl.where(here, word[:, None], words)
        if HAS_WINDOW:
            rank = tl.where(here, before[:, None], rank)
            # Bits past TREE_LEN in the last word only reach columns that col_ok drops.
            before += _popc(word.to(tl.uint32, bitcast=True))
    bits = (words >> (j % 32)[None, :]) & 1
    visible = row_ok[:, None] & col_ok[None, :] & (bits != 0)
    if HAS_WINDOW:
        # rank = set bits of the row before slot j; keep the last WINDOW of its n_vis bits.
        below = words.to(tl.uint32, bitcast=True) & _low_bits(j % 32)[None, :]
        rank += _popc(below)
        visible = visible & (rank >= (n_vis - WINDOW)[:, None])
    return offs_n, col_ok, visible


@triton.jit
def _add_sink(acc, m_i, l_i, sink):
    """Fold one value-less key of logit ``sink`` (log2 units) into the online softmax."""
    m_new = tl.maximum(m_i, sink)
    alpha = tl.math.exp2(m_i - m_new)  # 0 for a row that saw nothing (m = -inf)
    return acc * alpha[:, None], m_new, l_i * alpha + tl.math.exp2(sink - m_new)


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
    cap_out,
    EVEN_D: tl.constexpr,
    COMPUTE_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
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
    # [BLOCK_M, BLOCK_N] scores in log2 units (softcap: qk_scale = scale / softcap and
    # cap_out = softcap * log2(e))
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if HAS_SOFTCAP:
        s = _tanh(s) * cap_out
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
    sinks_ptr,
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
    # Row offsets stay int32 (rows * strides within one sequence's q/out are small); the
    # batch and kv-head offsets are int64.
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
    k_base = k_ptr + b * stride_k_b + kvh * stride_k_h
    v_base = v_ptr + b * stride_v_b + kvh * stride_v_h
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
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, offs_n, col_ok, visible, offs_d, d_ok,
            stride_k_l, stride_k_d, stride_v_l, stride_v_d, qk_scale, cap_out,
            EVEN_D, COMPUTE_FP32, DOT_PRECISION, HAS_SOFTCAP,
        )
    # Tree slots: slot prefix + j is visible to row t iff bit j of tree_mask[b, t] is set.
    for start in range(tl.maximum(lo, prefix), hi, BLOCK_N):
        offs_n, col_ok, visible = _tree_block_visible(
            mask_rows, stride_mask_w, row_ok, start, prefix, hi, TREE_LEN, n_vis, WINDOW,
            BLOCK_M, BLOCK_N, NUM_WORDS, HAS_WINDOW,
        )
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, offs_n, col_ok, visible, offs_d, d_ok,
            stride_k_l, stride_k_d, stride_v_l, stride_v_d, qk_scale, cap_out,
            EVEN_D, COMPUTE_FP32, DOT_PRECISION, HAS_SOFTCAP,
        )

    if n_splits == 1:
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            acc, m_i, l_i = _add_sink(acc, m_i, l_i, sink)
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
    sinks_ptr,
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
    WINDOW,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    prefix = tl.load(prefix_ptr + b).to(tl.int32)
    _, _, n_splits = _key_range(prefix, TREE_LEN, WINDOW, NUM_SPLITS, MIN_CHUNK, HAS_WINDOW)
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
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    if HAS_SINKS:
        l_sum += tl.math.exp2(sink - m_use)
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
    window: int = 0
    has_window: bool = False
    qk_scale: float = 0.0
    cap_out: float = 1.0
    has_softcap: bool = False


def plan_launch(fn, q, Hkv, capacity, scale, num_splits, min_chunk, block_m, block_n,
                window=None, softcap=None) -> LaunchPlan:
    """The launch policy shared by ``tree_attention`` and ``tree_attention_paged`` (see
    ``launch``); ``capacity`` is the most slots a sequence can have (Lmax, or max_blocks *
    page_size), which caps the splits statically so that CUDA graphs can be captured. With a
    ``window`` a sequence reads at most window + tree slots, so the cap follows from that."""
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
            if window is not None:
                capacity = min(capacity, int(window) + Tq + capacity // 8)
            num_splits = max(1, min(resident // programs, triton.cdiv(capacity, min_chunk), 64))
    min_chunk = max(int(min_chunk), 1)
    # fp16/bf16 go through the tensor cores with fp32 accumulation; fp32 inputs (and all
    # inputs under the interpreter, whose bf16 arithmetic is wrong) are multiplied in fp32.
    compute_fp32 = interp or q.dtype == torch.float32
    precision = "ieee" if q.dtype == torch.float32 or interp else "tf32"
    # Scores leave the dot product in log2 units; with softcap they go through
    # softcap * tanh(x * scale / softcap) first, the log2 factor applied after the tanh.
    if softcap is None:
        qk_scale, cap_out = scale * _LOG2E, 1.0
    else:
        qk_scale, cap_out = scale / float(softcap), float(softcap) * _LOG2E
    return LaunchPlan(scale, group, block_m, block_n, block_d, num_m, num_warps, min_chunk,
                      num_splits, compute_fp32, precision, 0 if window is None else int(window),
                      window is not None, qk_scale, cap_out, softcap is not None)


def split_buffers(plan: LaunchPlan, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 partial results of the splits: acc [S * B * Hq * Tq * Dh], (m, l) pairs."""
    if plan.num_splits == 1:
        return out, out  # never touched: every sequence takes the one-split path
    n = plan.num_splits * out[..., 0].numel()
    acc = torch.empty(n * out.shape[-1], device=out.device, dtype=torch.float32)
    return acc, torch.empty(2 * n, device=out.device, dtype=torch.float32)


def combine_splits(plan: LaunchPlan, part_acc, part_ml, prefix_len, out, tree_len: int,
                   sinks=None) -> None:
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
        sinks_ptr=out if sinks is None else sinks,
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
        WINDOW=plan.window,
        BLOCK_T=block_t,
        BLOCK_D=plan.block_d,
        HAS_WINDOW=plan.has_window,
        HAS_SINKS=sinks is not None,
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
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher of ``tree_attention`` (see ``eagle2_kernels.ops.tree_attention``)."""
    return launch(q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale,
                  window=window, softcap=softcap, sinks=sinks)


def launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
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
    plan = plan_launch("tree_attention", q, Hkv, Lmax, scale, num_splits, min_chunk, block_m, block_n,
                       window, softcap)
    part_acc, part_ml = split_buffers(plan, out)
    sinks = None if sinks is None else sinks.contiguous()

    grid = (plan.num_m, B * Hkv, plan.num_splits)
    _tree_attention_kernel[grid](
        q_ptr=q,
        k_ptr=k_cache,
        v_ptr=v_cache,
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
