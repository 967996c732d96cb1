"""tree_attention: reference on hand-made cases, Triton vs an independent float64 truth.

Numerical contract: max abs error of an implementation against a float64 truth is at most
2x that of the same-precision plain-torch composite (matmul in the input dtype, softmax in
float32, probabilities rounded to the input dtype) plus a floor (fp32 1e-5, fp16 1e-3,
bf16 1e-2). Visibility is pinned down exactly by the hand-made cases.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from eagle2_kernels.ops.tree import pack_bits, unpack_bits
from eagle2_kernels.ops.tree_attention.reference import tree_attention as ref_tree_attention
from conftest import requires_triton, triton_device
from tolerances import FP16, FP32_ABS, FP32_TIGHT

import eagle2_kernels.ops as ops

FLOORS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------- helpers


def pack_rows(rows: list[list[int]], words: int) -> torch.Tensor:
    """Pack lists of visible tree-slot indices into int32 words (bit j -> word j//32, j%32)."""
    bits = torch.zeros(len(rows), 32 * words, dtype=torch.bool)
    for i, js in enumerate(rows):
        bits[i, js] = True
    return pack_bits(bits)


def ancestor_rows(parents: list[int]) -> list[list[int]]:
    """Row i lists i and all its ancestors (parents[0] = -1, parents[i] < i)."""
    rows = []
    for i in range(len(parents)):
        js, n = [], i
        while n >= 0:
            js.append(n)
            n = parents[n]
        rows.append(js)
    return rows


def random_parents(T: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, T)]


def full_tree_parents(k: int, depth: int) -> list[int]:
    """A complete k-ary tree of the given depth, breadth-first (parents first)."""
    parents, level = [-1], [0]
    for _ in range(depth):
        nxt = []
        for p in level:
            for _ in range(k):
                parents.append(p)
                nxt.append(len(parents) - 1)
        level = nxt
    return parents


def truth(q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale=None):
    """Independent float64 implementation: explicit per-slot bit tests, per-head GQA mapping."""
    B, Hq, Tq, Dh = q.shape
    Hkv, Lmax = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    out = torch.zeros(B, Hq, Tq, Dh, dtype=torch.float64)
    qd, kd, vd = (x.detach().cpu().double() for x in (q, k_cache, v_cache))
    words = tree_mask.cpu().tolist()
    for b in range(B):
        P = int(prefix_len[b])
        slots = []
        for i in range(Tq):
            vis = list(range(P))
            for j in range(tree_len):
                if ((words[b][i][j // 32] & 0xFFFFFFFF) >> (j % 32)) & 1:
                    vis.append(P + j)
            slots.append(vis)
        for h in range(Hq):
            kvh = h // (Hq // Hkv)
            for i in range(Tq):
                if not slots[i]:
                    continue  # nothing visible: zeros
                idx = torch.tensor(slots[i])
                s = (kd[b, kvh, idx] @ qd[b, h, i]) * scale
                p = torch.softmax(s, dim=0)
                out[b, h, i] = p @ vd[b, kvh, idx]
    return out


def plain_torch(q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale=None):
    """The same-precision baseline: dense mask, matmuls in the input dtype."""
    B, Hq, Tq, Dh = q.shape
    Hkv = k_cache.shape[1]
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    bits = unpack_bits(tree_mask, tree_len)
    out = torch.zeros_like(q)
    for b in range(B):
        P = int(prefix_len[b])
        k = k_cache[b, :, : P + tree_len].repeat_interleave(Hq // Hkv, 0)
        v = v_cache[b, :, : P + tree_len].repeat_interleave(Hq // Hkv, 0)
        vis = torch.cat([torch.ones(Tq, P, dtype=torch.bool), bits[b].cpu()], 1).to(q.device)
        s = (q[b] @ k.transpose(-1, -2)).float() * scale
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
        out[b] = (p.to(q.dtype) @ v).to(q.dtype)
    return out


def assert_contract(out, q, k, v, prefix_len, mask, tree_len, scale=None):
    want = truth(q, k, v, prefix_len, mask, tree_len, scale)
    base = plain_torch(q, k, v, prefix_len, mask, tree_len, scale)
    err = (out.cpu().double() - want).abs().max().item()
    base_err = (base.cpu().double() - want).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * base_err + FLOORS[q.dtype], (err, base_err)


def make_case(B, Hq, Hkv, Tq, Dh, prefixes, tree_len, rows_per_b, dtype=torch.float32,
              device="cpu", extra_slots=3, words=None, seed=0):
    """Random q/k/v, a cache with room for the largest prefix + tree + extra_slots."""
    g = torch.Generator().manual_seed(seed)
    Lmax = max(prefixes) + tree_len + extra_slots
    q = torch.randn(B, Hq, Tq, Dh, generator=g)
    k = torch.randn(B, Hkv, Lmax, Dh, generator=g)
    v = torch.randn(B, Hkv, Lmax, Dh, generator=g)
    W = words if words is not None else max(1, (tree_len + 31) // 32)
    mask = torch.stack([pack_rows(rows, W) for rows in rows_per_b])
    prefix_len = torch.tensor(prefixes, dtype=torch.int32)
    return [x.to(device) for x in (q.to(dtype), k.to(dtype), v.to(dtype), prefix_len, mask)]


def run_triton(case, tree_len, **launch_kw):
    """The Triton path; with ``launch_kw`` (split count, block sizes) through the kernel's
    tuning entry point ``kernel.launch`` so that the split-prefix and combine code runs under
    the interpreter. No fallback: if that entry point goes away, the tests that name a split
    or block size fail instead of silently testing the default launch."""
    if launch_kw:
        from eagle2_kernels.ops.tree_attention.kernel import launch

        return launch(*case, tree_len, **launch_kw)
    return ops.tree_attention(*case, tree_len, backend="triton")


# ----------------------------------------------------------------------------- reference


def test_reference_uniform_attention_by_hand():
    # q = 0 gives uniform weights over the visible slots: out = their mean of v. v of kv head
    # c is c + slot/100, so the output names which kv head and which slots were read.
    B, Hq, Hkv, Dh, P, T = 1, 4, 2, 2, 2, 3
    Lmax = P + T + 2
    q = torch.zeros(B, Hq, T, Dh)
    k = torch.randn(B, Hkv, Lmax, Dh)
    v = torch.zeros(B, Hkv, Lmax, Dh)
    for c in range(Hkv):
        v[0, c] = c + torch.arange(Lmax, dtype=torch.float32)[:, None] / 100
    mask = pack_rows([[0], [0, 1], [0, 2]], 1)[None]  # node 1 and node 2 are children of 0
    out = ref_tree_attention(q, k, v, torch.tensor([P]), mask, T)
    for h in range(Hq):
        c = h // 2  # GQA: heads 0,1 -> kv 0; heads 2,3 -> kv 1
        for i, slots in enumerate([[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 4]]):
            expect = c + sum(slots) / len(slots) / 100
            torch.testing.assert_close(out[0, h, i], torch.full((Dh,), expect), **FP32_TIGHT)


def test_reference_bit31_and_second_word():
    # Only bits 31 (the sign bit of word 0) and 32 (bit 0 of word 1) set; prefix 0.
    T, Dh = 33, 4
    q = torch.zeros(1, 1, 1, Dh)
    k = torch.randn(1, 1, T, Dh)
    v = torch.randn(1, 1, T, Dh)
    mask = torch.tensor([[[-(2**31), 1]]], dtype=torch.int32)
    out = ref_tree_attention(q, k, v, torch.tensor([0], dtype=torch.int32), mask, T)
    torch.testing.assert_close(out[0, 0, 0], (v[0, 0, 31] + v[0, 0, 32]) / 2)


def test_reference_row_seeing_nothing_is_zero():
    q, k, v, _, _ = make_case(1, 2, 1, 2, 8, [0], 4, [[[]]])
    mask = pack_rows([[], [0, 3]], 1)[None]
    out = ref_tree_attention(q, k, v, torch.tensor([0]), mask, 4)
    assert torch.equal(out[0, :, 0], torch.zeros(2, 8))
    assert torch.isfinite(out).all() and out[0, :, 1].abs().sum() > 0


def test_reference_ignores_bits_past_tree_len_and_extra_words():
    T = 5
    q, k, v, prefix_len, _ = make_case(2, 2, 2, 3, 8, [4, 1], T, [[[]] * 3] * 2)
    rows = [[0], [0, 1], [0, 1, 4]]
    clean = torch.stack([pack_rows(rows, 3)] * 2)
    dirty = clean.clone()
    dirty[..., 0] |= -(1 << T)  # every bit >= T of word 0
    dirty[..., 1:] = -1  # words past ceil(T/32) = 1
    a = ref_tree_attention(q, k, v, prefix_len, clean, T)
    b = ref_tree_attention(q, k, v, prefix_len, dirty, T)
    assert torch.equal(a, b)


def test_reference_matches_truth_random_trees():
    rng = random.Random(1)
    for trial in range(4):
        T = rng.choice([1, 6, 33])
        B = 2
        rows = [ancestor_rows(random_parents(T, rng)) for _ in range(B)]
        case = make_case(B, 4, 2, T, 16, [rng.randrange(0, 20) for _ in range(B)], T, rows,
                         seed=trial)
        out = ref_tree_attention(*case, T)
        torch.testing.assert_close(out.double(), truth(*case, T), **FP32_ABS)


def test_reference_scale_and_dtype_and_layout():
    T = 4
    rows = [ancestor_rows([-1, 0, 0, 1])]
    q, k, v, prefix_len, mask = make_case(1, 2, 1, T, 8, [3], T, rows, dtype=torch.float16)
    # q as a transposed view of [B, Tq, Hq, Dh]: out must keep that layout.
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = ref_tree_attention(q_t, k, v, prefix_len, mask, T, scale=0.3)
    assert out.dtype == torch.float16 and out.stride() == q_t.stride()
    want = truth(q_t, k, v, prefix_len, mask, T, scale=0.3)
    torch.testing.assert_close(out.double(), want, **FP16)


def test_reference_rejects_cache_overflow():
    q, k, v, _, mask = make_case(1, 1, 1, 2, 8, [0], 2, [[[0], [0, 1]]], extra_slots=0)
    with pytest.raises(ValueError, match="Lmax"):
        ref_tree_attention(q, k, v, torch.tensor([1]), mask, 2)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        pytest.param(lambda a: a.update(q=a["q"][0]), ValueError, "q", id="q-rank"),
        pytest.param(lambda a: a.update(q=a["q"].double()), TypeError, "q", id="q-fp64"),
        pytest.param(lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache",
                     id="k-dtype"),
        pytest.param(lambda a: a.update(v_cache=a["v_cache"][:, :, :-1]), ValueError, "v_cache", id="v-shape"),
        pytest.param(lambda a: a.update(k_cache=a["k_cache"][:, :, :, :4],
                                        v_cache=a["v_cache"][:, :, :, :4]), ValueError, "Dh|head dim",
                     id="Dh-mismatch"),
        pytest.param(lambda a: a.update(k_cache=a["k_cache"][:, :1].expand(-1, 3, -1, -1),
                                        v_cache=a["v_cache"][:, :1].expand(-1, 3, -1, -1)),
                     ValueError, "Hq|Hkv", id="Hq-not-multiple"),
        pytest.param(lambda a: a.update(prefix_len=a["prefix_len"].float()), TypeError, "prefix_len",
                     id="prefix-float"),
        pytest.param(lambda a: a.update(prefix_len=a["prefix_len"][None]), ValueError, "prefix_len",
                     id="prefix-shape"),
        pytest.param(lambda a: a.update(tree_mask=a["tree_mask"].long()), TypeError, "tree_mask",
                     id="mask-int64"),
        pytest.param(lambda a: a.update(tree_len=33), ValueError, "tree_mask", id="mask-too-few-words"),
        pytest.param(lambda a: a.update(tree_len=10**6), ValueError, "tree_len", id="tree-len-too-big"),
        pytest.param(lambda a: a.update(tree_len=2.0), TypeError, "tree_len", id="tree-len-float"),
        pytest.param(lambda a: a.update(tree_mask=a["tree_mask"][:, :1]), ValueError, "tree_mask", id="mask-rows"),
    ],
)
def test_public_input_checks(change, exc, match):
    q, k, v, prefix_len, mask = make_case(1, 4, 2, 2, 8, [3], 2, [[[0], [0, 1]]], extra_slots=40)
    args = dict(q=q, k_cache=k, v_cache=v, prefix_len=prefix_len, tree_mask=mask, tree_len=2)
    change(args)
    with pytest.raises(exc, match=match):
        ops.tree_attention(**args, backend="reference")


# ----------------------------------------------------------------------------- triton vs truth


def _trees(kind: str, T: int, B: int, rng: random.Random) -> list[list[list[int]]]:
    if kind == "chain":
        parents = [-1] + list(range(T - 1))
    elif kind == "star":
        parents = [-1] + [0] * (T - 1)
    elif kind.startswith("full"):
        k, d = map(int, kind[4:].split("x"))
        parents = full_tree_parents(k, d)
    else:
        return [ancestor_rows(random_parents(T, rng)) for _ in range(B)]
    return [ancestor_rows(parents)] * B


# id, B, Hq, Hkv, Dh, tree kind, T, prefixes, dtype, launch overrides
CASES = [
    ("verify-B1-T7-P37-Dh32-fp32", 1, 4, 2, 32, "random", 7, [37], torch.float32, {}),
    ("one-node-T1-P5", 1, 4, 2, 32, "chain", 1, [5], torch.float32, {}),
    ("depth1-star-T9-P0", 1, 2, 1, 16, "star", 9, [0], torch.float32, {}),
    ("chain-T12-B2", 2, 4, 4, 32, "chain", 12, [3, 20], torch.float32, {}),
    ("full-3x2-T13", 1, 4, 1, 64, "full3x2", 13, [9], torch.float32, {}),
    ("W2-T40-B2-MQA", 2, 8, 1, 16, "random", 40, [0, 11], torch.float32, {}),
    ("W3-T70-Dh48", 1, 2, 2, 48, "random", 70, [5], torch.float32, {}),
    ("Dh128-T5-fp16", 1, 4, 2, 128, "random", 5, [50], torch.float16, {}),
    ("T9-B3-fp16", 3, 4, 2, 32, "random", 9, [0, 1, 130], torch.float16, {}),
    ("split4-P200-B2", 2, 4, 2, 32, "random", 11,
     [0, 200], torch.float32, dict(num_splits=4, min_chunk=16, block_n=16)),
    ("split7-overshoot", 2, 2, 1, 16, "random", 3,
     [14, 61], torch.float32, dict(num_splits=7, min_chunk=1, block_n=16)),
    ("split3-tree-straddles-W2", 1, 4, 2, 32, "random", 35,
     [40], torch.float16, dict(num_splits=3, min_chunk=32, block_n=16, block_m=16)),
]


@requires_triton
@pytest.mark.parametrize(
    "B, Hq, Hkv, Dh, kind, T, prefixes, dtype, launch_kw",
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_triton_matches_truth(B, Hq, Hkv, Dh, kind, T, prefixes, dtype, launch_kw):
    rng = random.Random(T * 31 + B)
    case = make_case(B, Hq, Hkv, T, Dh, prefixes, T, _trees(kind, T, B, rng), dtype=dtype,
                     device=triton_device())
    out = run_triton(case, T, **launch_kw)
    assert out.dtype == dtype and out.shape == (B, Hq, T, Dh)
    assert_contract(out, *case, T)


@requires_triton
def test_triton_draft_expansion_rows():
    # Draft step: Tq = 3 new frontier nodes, tree_len = 10 nodes written so far; each new node
    # sees itself and its ancestors among the 10.
    parents = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 6]
    rows = ancestor_rows(parents)[7:]
    dev = triton_device()
    case = make_case(2, 4, 2, 3, 32, [17, 3], 10, [rows, rows], device=dev)
    out = ops.tree_attention(*case, 10, backend="triton")
    assert_contract(out, *case, 10)


@requires_triton
@pytest.mark.parametrize("split", [False, True], ids=["one-split", "split-prefix"])
def test_triton_causal_prefill(split):
    # Prefill: prefix 0, Tq = tree_len = 70 prompt tokens, lower-triangular mask, W = 3;
    # plus a second sequence with a committed prefix continuing causally.
    T = 70
    rows = [list(range(i + 1)) for i in range(T)]
    case = make_case(2, 2, 1, T, 16, [0, 40], T, [rows, rows], device=triton_device())
    kw = dict(num_splits=3, min_chunk=16, block_n=32) if split else {}
    out = run_triton(case, T, **kw)
    assert_contract(out, *case, T)


@requires_triton
def test_triton_long_causal_mask_many_words():
    # The last 8 rows of a 1030-token causal mask: W = 33 words, every bit 31 in use, blocks
    # that straddle words. Checked against the reference (itself pinned to the float64 truth
    # above) and against SDPA with a boolean causal mask, to keep this fast.
    T, rows = 1030, 8
    i = torch.arange(T - rows, T)[:, None]  # query rows
    j = torch.arange(33 * 32)[None, :]  # bit positions
    mask = pack_bits(j <= i)[None]
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, rows, 16, generator=g)
    k = torch.randn(1, 1, T + 5, 16, generator=g)
    v = torch.randn(1, 1, T + 5, 16, generator=g)
    prefix_len = torch.zeros(1, dtype=torch.int32)
    want = ref_tree_attention(q, k, v, prefix_len, mask, T)
    causal = torch.arange(T)[None, :] <= i
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :T].expand(1, 2, T, 16), v[:, :, :T].expand(1, 2, T, 16), attn_mask=causal)
    torch.testing.assert_close(want, sdpa, **FP32_ABS)
    dev = triton_device()
    out = ops.tree_attention(*(x.to(dev) for x in (q, k, v, prefix_len, mask)), T,
                             backend="triton")
    torch.testing.assert_close(out.cpu(), want, **FP32_ABS)


@requires_triton
def test_triton_empty_rows_zero_and_unread_slots():
    # Row 0 of sequence 0 sees nothing (prefix 0, empty mask): zeros. Slots past
    # prefix_len + tree_len are NaN-poisoned: never read. Invisible tree slots hold huge values.
    dev = triton_device()
    T = 6
    rows0 = [[], [0], [0, 1], [0, 2], [], [0, 2, 5]]
    rows1 = ancestor_rows([-1, 0, 1, 1, 0, 4])
    q, k, v, prefix_len, mask = make_case(2, 4, 2, T, 16, [0, 9], T, [rows0, rows1],
                                          extra_slots=20)
    for b in range(2):
        end = int(prefix_len[b]) + T
        k[b, :, end:] = float("nan")
        v[b, :, end:] = float("nan")
    v[0, :, 3] = 1e4  # tree slot 3 of sequence 0: nobody sees it
    case = [x.to(dev) for x in (q, k, v, prefix_len, mask)]
    out = ops.tree_attention(*case, T, backend="triton")
    assert torch.equal(out[0, :, 0].cpu(), torch.zeros(4, 16))
    assert torch.equal(out[0, :, 4].cpu(), torch.zeros(4, 16))
    # The truth never reads past prefix + tree_len either; zero the poison so it can run.
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    assert_contract(out, q, k, v, prefix_len, mask, T)


@requires_triton
def test_triton_ignores_bits_past_tree_len_and_extra_words():
    # tree_len 37 (2 words) in a mask of W = 4 words whose unused bits and words are all set.
    T = 37
    rng = random.Random(9)
    rows = ancestor_rows(random_parents(T, rng))
    dev = triton_device()
    q, k, v, prefix_len, clean = make_case(2, 2, 1, T, 16, [3, 0], T, [rows, rows], words=4,
                                           device=dev)
    dirty = clean.clone()
    dirty[..., 1] |= -(1 << (T - 32))  # bits 37.. of word 1
    dirty[..., 2:] = -1
    a = ops.tree_attention(q, k, v, prefix_len, clean, T, backend="triton")
    b = ops.tree_attention(q, k, v, prefix_len, dirty, T, backend="triton")
    assert torch.equal(a, b)
    assert_contract(a, q, k, v, prefix_len, clean, T)


@requires_triton
def test_triton_views_int64_prefix_and_scale():
    # k/v are cache[2*l] / cache[2*l+1] views of a whole-model cache; q is a transposed view of
    # [B, Tq, Hq, Dh]; prefix_len is int64; a custom scale.
    dev = triton_device()
    B, Hq, Hkv, T, Dh, layers, Lmax = 2, 4, 2, 5, 32, 3, 48
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(2 * layers, B, Hkv, Lmax, Dh, generator=g).to(dev)
    q = torch.randn(B, T, Hq, Dh, generator=g).to(dev).transpose(1, 2)
    rows = ancestor_rows([-1, 0, 1, 0, 3])
    mask = torch.stack([pack_rows(rows, 1)] * B).to(dev)
    prefix_len = torch.tensor([20, 7], dtype=torch.int64, device=dev)
    k, v = cache[2], cache[3]
    out = ops.tree_attention(q, k, v, prefix_len, mask, T, scale=0.05, backend="triton")
    assert out.stride() == q.stride()
    assert_contract(out, q, k, v, prefix_len, mask, T, scale=0.05)


@requires_triton
def test_triton_randomized():
    rng = random.Random(2024)
    dev = triton_device()
    for trial in range(5):
        Hkv = rng.choice([1, 2])
        Hq = Hkv * rng.choice([1, 2, 4])
        Dh = rng.choice([16, 32, 64])
        T = rng.randrange(1, 45)
        Tq = rng.randrange(1, T + 1)
        B = rng.randrange(1, 3)
        prefixes = [rng.randrange(0, 90) for _ in range(B)]
        dtype = rng.choice([torch.float32, torch.float16])
        rows = [ancestor_rows(random_parents(T, rng))[T - Tq:] for _ in range(B)]
        case = make_case(B, Hq, Hkv, Tq, Dh, prefixes, T, rows, dtype=dtype, device=dev,
                         seed=trial)
        kw = rng.choice([{}, dict(num_splits=rng.randrange(2, 6), min_chunk=16, block_n=16)])
        out = run_triton(case, T, **kw)
        assert_contract(out, *case, T)


@requires_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU tensors go to the interpreter only without a GPU test run")
    case = make_case(1, 2, 1, 1, 16, [2], 1, [[[0]]])
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.tree_attention(*case, 1, backend="triton")


_SM90_COMPILE = """
import importlib, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)

def build(fn, types, consts, num_warps):
    sig = {n: ("constexpr" if n in consts else types(n)) for n in fn.arg_names}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    except (TypeError, KeyError):
        sys.exit(3)  # an older signature format of the compile API
    # Kernel errors surface as triton CompilationError and fail the test.
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

K = importlib.import_module("eagle2_kernels.ops.tree_attention.kernel")
C = importlib.import_module("eagle2_kernels.ops.kv_compact.kernel")
def types(pointers, scalar=lambda n: "i32"):
    return lambda n: pointers.get(n, pointers["*"]) if n.endswith("_ptr") else scalar(n)

# Plain, and with the sliding window, softcap and sinks switched on (popcounts, tanh).
for local in (False, True):
    build(K._tree_attention_kernel,
          types({"prefix_ptr": "*i64", "mask_ptr": "*i32", "part_acc_ptr": "*fp32",
                 "part_ml_ptr": "*fp32", "*": "*bf16"},
                lambda n: "fp32" if n in ("qk_scale", "cap_out") else "i32"),
          dict(GROUP=4, BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, NUM_WORDS=3, EVEN_D=True,
               COMPUTE_FP32=False, DOT_PRECISION="tf32", HAS_WINDOW=local, HAS_SOFTCAP=local,
               HAS_SINKS=local), 8)
    build(K._tree_attention_combine_kernel,
          types({"prefix_ptr": "*i32", "out_ptr": "*bf16", "sinks_ptr": "*bf16", "*": "*fp32"}),
          dict(BLOCK_T=64, BLOCK_D=128, HAS_WINDOW=local, HAS_SINKS=local), 4)
build(C._kv_compact_kernel, types({"cache_ptr": "*i16", "*": "*i64"}),
      dict(BLOCK_T=64, BLOCK_D=128), 4)
"""


def test_kernels_compile_for_sm90():
    # The interpreter accepts constructs the GPU compiler rejects; compile the tree_attention
    # and kv_compact kernels (bf16, Llama-sized blocks) for an H100 target, no GPU needed.
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True,
                         text=True, timeout=300)
    if run.returncode == 3:
        pytest.skip("this triton has no ahead-of-time compile API (GPUTarget / ASTSource)")
    assert run.returncode == 0, run.stderr[-3000:]


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("prefix", [4096, 20000], ids=["P4k", "P20k"])
def test_cuda_bf16_llama_heads(prefix):
    # Llama-3-8B attention shapes: Hq 32, Hkv 8, Dh 128; the verify tree of T = 60.
    rng = random.Random(prefix)
    T, B = 60, 2
    rows = [ancestor_rows(random_parents(T, rng)) for _ in range(B)]
    case = make_case(B, 32, 8, T, 128, [prefix, prefix // 3], T, rows, dtype=torch.bfloat16,
                     device="cuda")
    out = ops.tree_attention(*case, T)
    # The float64 truth over 20k slots is slow per row: check against the dense plain
    # composite in float32 instead, and bf16-vs-fp32 error against the bf16 composite.
    q, k, v, prefix_len, mask = case
    want = plain_torch(q.float(), k.float(), v.float(), prefix_len.cpu(), mask.cpu(), T)
    base = plain_torch(q, k, v, prefix_len.cpu(), mask.cpu(), T)
    err = (out.float() - want).abs().max().item()
    base_err = (base.float() - want).abs().max().item()
    assert err <= 2 * base_err + FLOORS[torch.bfloat16]


@pytest.mark.cuda
def test_cuda_no_host_sync_and_graph_capture():
    rng = random.Random(3)
    T = 60
    rows = [ancestor_rows(random_parents(T, rng))]
    case = make_case(1, 32, 8, T, 128, [3000], T, rows, dtype=torch.float16, device="cuda",
                     extra_slots=5000)
    eager = ops.tree_attention(*case, T)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.tree_attention(*case, T)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.tree_attention(*case, T)
    case[3].fill_(7000)  # a new prefix length, read on the device at replay
    graph.replay()
    torch.cuda.synchronize()
    again = ops.tree_attention(*case, T)
    assert torch.equal(captured, again)
    assert not torch.equal(captured, eager)
