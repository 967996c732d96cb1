"""The native CPU backend (eagle2_kernels._C via each op's native.py) against the torch
references: integer outputs and KV moves bit-exact, floats within each op's contract, on
hand-made edge cases and seeded random ones."""

from __future__ import annotations

import pytest
import torch

from eagle2_kernels._backend import ext_available
from eagle2_kernels.ops.kv_compact.reference import kv_compact as ref_kv_compact
from eagle2_kernels.ops.tree import DraftTree, mask_words
from eagle2_kernels.ops.tree_attention.reference import tree_attention as ref_tree_attention
from eagle2_kernels.ops.tree_build.reference import tree_build as ref_tree_build
from eagle2_kernels.ops.tree_expand.reference import tree_expand as ref_tree_expand
from eagle2_kernels.ops.verify_greedy.reference import verify_greedy as ref_verify_greedy
from eagle2_kernels.ops.verify_sample.reference import verify_sample as ref_verify_sample
from tolerances import FP32, FP32_ABS, FP32_ACCUM

# Every test here needs the extension; that it is built at all is checked by
# tests/ops/test_library.py::test_extension_is_built, which this module-wide skip cannot hide.
requires_ext = pytest.mark.skipif(not ext_available(), reason="native extension not built")


if ext_available():
    from eagle2_kernels.ops.kv_compact import native as native_kv_compact
    from eagle2_kernels.ops.tree_attention import native as native_tree_attention
    from eagle2_kernels.ops.tree_build import native as native_tree_build
    from eagle2_kernels.ops.tree_expand import native as native_tree_expand
    from eagle2_kernels.ops.verify_greedy import native as native_verify_greedy
    from eagle2_kernels.ops.verify_sample import native as native_verify_sample

pytestmark = requires_ext


# ------------------------------------------------------------------------------ helpers


def random_candidates(B, C, seed, tie_levels=0):
    """Candidates in generation order with scores that never exceed their parent's (so the
    kept set is closed under ancestors). With ``tie_levels`` the log-prob steps are coarse,
    which makes many equal scores."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.full((B, C), -1, dtype=torch.int64)
    scores = torch.zeros(B, C)
    for c in range(C):
        p = torch.randint(-1, c, (B,), generator=g) if c > 0 else torch.full((B,), -1)
        step = torch.rand(B, generator=g)
        if tie_levels:
            step = (step * tie_levels).floor() / tie_levels
        base = torch.where(p < 0, torch.zeros(B), scores.gather(1, p.clamp(min=0)[:, None])[:, 0])
        parents[:, c] = p
        scores[:, c] = base - step
    tokens = torch.randint(0, 50000, (B, C), generator=g)
    roots = torch.randint(0, 50000, (B,), generator=g)
    return tokens, scores, parents, roots


def random_tree(B, T, seed) -> DraftTree:
    C = max(T - 1, 2 * T)
    tokens, scores, parents, roots = random_candidates(B, C, seed)
    return ref_tree_build(tokens, scores, parents, roots, T)


def assert_same(got, want, names):
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert torch.equal(g, w), f"{name}:\n{g}\n!=\n{w}"


# ---------------------------------------------------------------------------- tree_expand


EXPAND_CASES = [
    pytest.param(1, 1, 50, 1, torch.float32, False, id="B1-R1-V50-K1-fp32"),
    pytest.param(1, 1, 3000, 8, torch.float32, False, id="B1-R1-V3000-K8-root"),
    pytest.param(2, 8, 8192, 8, torch.float32, True, id="B2-R8-V8192-K8-d2t"),
    pytest.param(3, 5, 1500, 10, torch.float16, False, id="B3-R5-V1500-K10-fp16"),
    pytest.param(2, 4, 2049, 6, torch.bfloat16, True, id="B2-R4-V2049-K6-bf16-d2t"),
    pytest.param(1, 3, 7, 7, torch.float32, False, id="B1-R3-V7-K7-full"),
]


@pytest.mark.parametrize("B,R,V,K,dtype,d2t", EXPAND_CASES)
def test_tree_expand_matches_reference(B, R, V, K, dtype, d2t):
    g = torch.Generator().manual_seed(V + K)
    logits = (torch.randn(B, R, V, generator=g) * 3).to(dtype)
    # Parents far apart: cross-row comparisons of child scores are clear-cut.
    parent_scores = -5.0 * torch.arange(R, dtype=torch.float32).repeat(B, 1) - torch.rand(B, R, generator=g)
    mapping = torch.randperm(100_000, generator=g)[:V] if d2t else None
    got = native_tree_expand.tree_expand(logits, parent_scores, K, mapping)
    want = ref_tree_expand(logits, parent_scores, K, mapping)
    assert torch.equal(got[0], want[0]), "child_tokens"
    torch.testing.assert_close(got[1], want[1], **FP32_ACCUM)
    assert torch.equal(got[2], want[2]), "next_index"
    torch.testing.assert_close(got[3], want[3], **FP32_ACCUM)
    assert [t.dtype for t in got] == [torch.int64, torch.float32, torch.int64, torch.float32]
    # next_scores are exactly the chosen child scores
    assert torch.equal(got[3], got[1].reshape(B, R * K).gather(1, got[2]))


@pytest.mark.parametrize("V", [40, 3000])
def test_tree_expand_ties_go_to_lower_id(V):
    """Integer logits in a few levels: many equal values straddle the top-k cut."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randint(0, 4, (2, 3, V), generator=g).float()
    logits[1, 2] = 1.0  # a constant row: the K lowest ids
    logits[0, 1, :5] = float("-inf")
    parent_scores = torch.tensor([[0.0, -10.0, -20.0], [-1.0, -11.0, -21.0]])
    got = native_tree_expand.tree_expand(logits, parent_scores, 9)
    want = ref_tree_expand(logits, parent_scores, 9)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[0][1, 2], torch.arange(9))
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], **FP32_ABS)


def test_tree_expand_equal_children_across_rows_tie_to_lower_flat_index():
    logits = torch.randn(1, 1, 100).repeat(1, 3, 1)  # three identical rows, same parents
    got = native_tree_expand.tree_expand(logits, torch.zeros(1, 3), 4)
    want = ref_tree_expand(logits, torch.zeros(1, 3), 4)
    assert torch.equal(got[2], want[2])
    assert got[2].tolist() == [[0, 4, 8, 1]]


def test_tree_expand_random_loop():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        B, R = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        V = int(torch.randint(8, 5000, (1,), generator=g))
        K = int(torch.randint(1, min(V, 12) + 1, (1,), generator=g))
        logits = torch.randn(B, R, V, generator=g) * 4
        parent_scores = -3.0 * torch.arange(R).float().repeat(B, 1)
        got = native_tree_expand.tree_expand(logits, parent_scores, K)
        want = ref_tree_expand(logits, parent_scores, K)
        assert torch.equal(got[0], want[0]), trial
        assert torch.equal(got[2], want[2]), trial
        torch.testing.assert_close(got[1], want[1], **FP32_ACCUM)


def test_tree_expand_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k=9"):
        native_tree_expand.tree_expand(torch.randn(1, 1, 8), torch.zeros(1, 1), 9)


# ----------------------------------------------------------------------------- tree_build


BUILD_CASES = [
    pytest.param(1, 1, 2, 0, id="B1-C1-T2"),
    pytest.param(2, 40, 12, 0, id="B2-C40-T12"),
    pytest.param(3, 64, 33, 0, id="B3-C64-T33-bit31"),
    pytest.param(2, 120, 70, 0, id="B2-C120-T70-W3"),
    pytest.param(2, 30, 31, 0, id="B2-C30-T31-all-kept"),
    pytest.param(4, 264, 16, 3, id="B4-C264-T16-ties"),
    pytest.param(2, 80, 60, 2, id="B2-C80-T60-W2-ties"),
]


@pytest.mark.parametrize("B,C,T,tie_levels", BUILD_CASES)
@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_tree_build_matches_reference(B, C, T, tie_levels, int_dtype):
    tokens, scores, parents, roots = random_candidates(B, C, seed=C * T, tie_levels=tie_levels)
    tokens, parents, roots = tokens.to(int_dtype), parents.to(int_dtype), roots.to(int_dtype)
    got = native_tree_build.tree_build(tokens, scores, parents, roots, T)
    want = ref_tree_build(tokens, scores, parents, roots, T)
    names = ("tokens", "parents", "depth", "mask")
    assert_same([getattr(got, n) for n in names], [getattr(want, n) for n in names], names)
    assert got.mask.shape == (B, T, mask_words(T))


def test_tree_build_half_scores():
    tokens, scores, parents, roots = random_candidates(2, 50, seed=3, tie_levels=4)
    got = native_tree_build.tree_build(tokens, scores.half(), parents, roots, 20)
    want = ref_tree_build(tokens, scores.half(), parents, roots, 20)
    assert torch.equal(got.mask, want.mask) and torch.equal(got.tokens, want.tokens)


def test_tree_build_dropped_parent_raises_like_reference():
    tokens = torch.tensor([[5, 6, 7], [1, 2, 3]])
    scores = torch.tensor([[-3.0, -1.0, -0.5], [-0.1, -0.2, -0.3]])  # seq 0: child 2 beats parent 0
    parents = torch.tensor([[-1, -1, 0], [-1, 0, 1]])
    roots = torch.tensor([9, 9])
    flags = {}
    for name, fn in (("ext", native_tree_build.tree_build), ("ref", ref_tree_build)):
        flag = torch.full((2,), -7, dtype=torch.int32)
        with pytest.raises(ValueError, match="in sequence 0 a kept candidate's parent was not kept"):
            fn(tokens, scores, parents, roots, 3, flag)
        flags[name] = flag
    assert flags["ext"].tolist() == flags["ref"].tolist() == [1, 0]


def test_tree_build_invalid_parent_raises_like_reference():
    tokens = torch.tensor([[5, 6, 7]])
    scores = torch.tensor([[-1.0, -2.0, -3.0]])
    parents = torch.tensor([[-1, 2, 0]])  # candidate 1 names a later candidate
    for fn in (native_tree_build.tree_build, ref_tree_build):
        flag = torch.zeros(1, dtype=torch.int32)
        with pytest.raises(ValueError, match=r"cand_parents\[0, 1\] = 2 is invalid"):
            fn(tokens, scores, parents, torch.tensor([0]), 4, flag)
        assert flag.tolist() == [2]


def test_tree_build_ok_flag_is_zero():
    tokens, scores, parents, roots = random_candidates(3, 20, seed=5)
    flag = torch.full((3,), 5, dtype=torch.int32)
    native_tree_build.tree_build(tokens, scores, parents, roots, 8, flag)
    assert flag.tolist() == [0, 0, 0]


# ------------------------------------------------------------------------- tree_attention


def attention_error(fn, q, k, v, prefix, mask, tree_len, scale=None):
    """Max abs error of ``fn`` against the float64 reference."""
    truth = ref_tree_attention(q.double(), k.double(), v.double(), prefix, mask, tree_len, scale)
    return (fn(q, k, v, prefix, mask, tree_len, scale).double() - truth).abs().max().item()


ATTN_CASES = [
    pytest.param(1, 9, 3, 16, 64, 200, 16, torch.float32, id="B1-Hq9-Hkv3-T16-P200-fp32"),
    pytest.param(2, 4, 4, 8, 32, 70, 40, torch.float32, id="B2-MHA-Tq8-tree40-W2"),
    pytest.param(2, 8, 2, 5, 16, 33, 5, torch.float32, id="B2-GQA4-Tq5-odd"),
    pytest.param(1, 2, 1, 3, 64, 130, 1, torch.float32, id="B1-tree1"),
    pytest.param(1, 3, 1, 7, 40, 150, 9, torch.float32, id="B1-Dh40-rows21"),
    pytest.param(1, 2, 2, 20, 64, 64, 64, torch.float32, id="prefill-P0-tree64"),
    pytest.param(2, 4, 2, 16, 64, 90, 16, torch.float16, id="B2-T16-fp16"),
    pytest.param(2, 4, 2, 16, 64, 90, 16, torch.bfloat16, id="B2-T16-bf16"),
]


@pytest.fixture(params=["best", "avx2", "portable"])
def simd(request, monkeypatch):
    """Each tree_attention kernel of the extension (on a CPU without AVX-512 / AVX2 the
    request falls back to the next one the CPU has)."""
    if request.param == "best":
        monkeypatch.delenv("EAGLE2_KERNELS_NATIVE_SIMD", raising=False)
    else:
        monkeypatch.setenv("EAGLE2_KERNELS_NATIVE_SIMD", request.param)
    return request.param


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Dh,Lmax,tree_len,dtype", ATTN_CASES)
def test_tree_attention_contract(B, Hq, Hkv, Tq, Dh, Lmax, tree_len, dtype, simd):
    g = torch.Generator().manual_seed(Tq * Dh + tree_len)
    q = torch.randn(B, Hq, Tq, Dh, generator=g).to(dtype)
    # caches as views of a whole-model cache [2 * layers, B, Hkv, Lmax, Dh]
    cache = torch.randn(4, B, Hkv, Lmax, Dh, generator=g).to(dtype)
    k, v = cache[2], cache[3]
    prefix = torch.randint(0, Lmax - tree_len + 1, (B,), generator=g).to(torch.int32)
    prefix[0] = Lmax - tree_len  # one sequence at the end of the cache
    mask = torch.randint(-(2**31), 2**31 - 1, (B, Tq, mask_words(tree_len)), generator=g, dtype=torch.int64).to(torch.int32)
    err_ext = attention_error(native_tree_attention.tree_attention, q, k, v, prefix, mask, tree_len)
    err_ref = attention_error(ref_tree_attention, q, k, v, prefix, mask, tree_len)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert err_ext <= 2 * err_ref + floor, (err_ext, err_ref)
    out = native_tree_attention.tree_attention(q, k, v, prefix, mask, tree_len)
    assert out.dtype == dtype and out.shape == q.shape


def test_tree_attention_empty_rows_are_zero_and_scale_is_used(simd):
    q = torch.randn(2, 2, 3, 8)
    k, v = torch.randn(2, 1, 10, 8), torch.randn(2, 1, 10, 8)
    prefix = torch.tensor([0, 4])
    mask = torch.tensor([[[0], [1], [5]], [[0], [2], [7]]], dtype=torch.int32)
    got = native_tree_attention.tree_attention(q, k, v, prefix, mask, 3, 0.3)
    want = ref_tree_attention(q, k, v, prefix, mask, 3, 0.3)
    assert torch.equal(got[0, :, 0], torch.zeros(2, 8))  # prefix 0, empty mask row
    torch.testing.assert_close(got, want, **FP32)
    # tree_len 0: only the prefix
    got0 = native_tree_attention.tree_attention(q, k, v, prefix, mask, 0)
    torch.testing.assert_close(got0, ref_tree_attention(q, k, v, prefix, mask, 0), **FP32)


def test_tree_attention_keeps_layout_of_q(simd):
    q = torch.randn(1, 5, 4, 16).transpose(1, 2)  # [B, Hq=4, Tq=5, Dh] over [B, Tq, Hq, Dh] storage
    k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    mask = torch.full((1, 5, 1), -1, dtype=torch.int32)
    got = native_tree_attention.tree_attention(q, k, v, torch.tensor([10]), mask, 5)
    want = ref_tree_attention(q, k, v, torch.tensor([10]), mask, 5)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, **FP32)


def test_tree_attention_strided_float_caches(simd):
    """Caches whose head dim is not contiguous (converted per block, not read in place)."""
    q = torch.randn(2, 6, 5, 32)
    storage = torch.randn(2, 2, 3, 90, 64)
    k, v = storage[0, :, :, :, ::2], storage[1, :, :, :, ::2]
    prefix = torch.tensor([70, 3])
    mask = torch.randint(0, 2**20, (2, 5, 1), dtype=torch.int32)
    err_ext = attention_error(native_tree_attention.tree_attention, q, k, v, prefix, mask, 20)
    err_ref = attention_error(ref_tree_attention, q, k, v, prefix, mask, 20)
    assert err_ext <= 2 * err_ref + 1e-5, (err_ext, err_ref)


def test_tree_attention_rejects_cache_overflow():
    q, k = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match=r"prefix_len\[0\]=7"):
        native_tree_attention.tree_attention(q, k, k, torch.tensor([7]), torch.ones(1, 2, 1, dtype=torch.int32), 2)


# --------------------------------------------------------------------------------- verify


def planted_logits(tree: DraftTree, V, seed, follow=0.7, dtype=torch.float32):
    """Target logits whose argmax at a node is one of its children's tokens with
    probability ``follow``, so that walks go deep."""
    g = torch.Generator().manual_seed(seed)
    B, T = tree.tokens.shape
    logits = torch.randn(B, T, V, generator=g)
    for b in range(B):
        for i in range(T):
            kids = [j for j in range(T) if int(tree.parents[b, j]) == i]
            if kids and float(torch.rand(1, generator=g)) < follow:
                j = kids[int(torch.randint(len(kids), (1,), generator=g))]
                logits[b, i, int(tree.tokens[b, j]) % V] += 8.0
    return logits.to(dtype)


def small_vocab_tree(B, T, V, seed) -> DraftTree:
    tree = random_tree(B, T, seed)
    return DraftTree(tree.tokens % V, tree.parents, tree.depth, tree.mask)


GREEDY_CASES = [
    pytest.param(1, 1, 10, torch.float32, id="B1-T1-root-only"),
    pytest.param(2, 16, 3000, torch.float32, id="B2-T16-fp32"),
    pytest.param(3, 40, 700, torch.float16, id="B3-T40-fp16"),
    pytest.param(2, 25, 1029, torch.bfloat16, id="B2-T25-bf16"),
]


@pytest.mark.parametrize("B,T,V,dtype", GREEDY_CASES)
def test_verify_greedy_matches_reference(B, T, V, dtype):
    for seed in range(4):
        tree = small_vocab_tree(B, T, V, seed) if T > 1 else DraftTree(
            torch.tensor([[3]] * B), torch.tensor([[-1]] * B, dtype=torch.int32), None, None)
        logits = planted_logits(tree, V, seed, dtype=dtype)
        got = native_verify_greedy.verify_greedy(tree, logits)
        want = ref_verify_greedy(tree, logits)
        assert_same(got, want, ("path", "accept_len", "bonus"))
    # int32 trees and non-contiguous logits rows
    tree32 = DraftTree(tree.tokens.int(), tree.parents, None, None)
    wide = torch.randn(B, T, V + 5)[..., :V]
    assert_same(native_verify_greedy.verify_greedy(tree32, wide), ref_verify_greedy(tree32, wide), ("p", "a", "b"))


def test_verify_greedy_ties_and_nan():
    tree = DraftTree(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[-1, 0, 0, 1]], dtype=torch.int32), None, None)
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = logits[0, 0, 4] = 1.0  # tie at the root: argmax 2 -> node 2 accepted
    logits[0, 2, 3] = float("nan")  # NaN counts as the maximum, like torch.argmax
    got = native_verify_greedy.verify_greedy(tree, logits)
    assert_same(got, ref_verify_greedy(tree, logits), ("path", "accept_len", "bonus"))
    assert got[0].tolist() == [[0, 2, -1, -1]] and got[2].tolist() == [3]


SAMPLE_CASES = [
    pytest.param(1.0, 1.0, 0, id="t1"),
    pytest.param(0.6, 1.0, 0, id="t0.6"),
    pytest.param(1.3, 0.9, 0, id="t1.3-p0.9"),
    pytest.param(0.8, 1.0, 20, id="t0.8-k20"),
    pytest.param(1.0, 0.5, 5, id="t1-p0.5-k5"),
]


@pytest.mark.parametrize("temperature,top_p,top_k", SAMPLE_CASES)
def test_verify_sample_matches_reference(temperature, top_p, top_k):
    """Seeded walks equal the reference's; in every case some walks accept drafted nodes and
    some reject all of the root's children (residual bonus), so both branches are compared."""
    B, T, V = 3, 20, 500
    lengths = []
    for seed in range(4):
        tree = small_vocab_tree(B, T, V, seed)
        logits = planted_logits(tree, V, seed, follow=0.8)
        u = torch.rand(B, T, generator=torch.Generator().manual_seed(seed))
        got = native_verify_sample.verify_sample(tree, logits, u, temperature, top_p, top_k)
        want = ref_verify_sample(tree, logits, u, temperature, top_p, top_k)
        assert_same(got, want, ("path", "accept_len", "bonus"))
        lengths += want[1].tolist()
    assert max(lengths) >= 2 and min(lengths) == 1, lengths


def test_verify_sample_rejections_residual_and_out_of_vocab():
    """Node 0 has three children; the first two are rejected (their mass leaves the residual),
    a token outside [0, V) has probability 0, the bonus comes from the residual."""
    tokens = torch.tensor([[0, 1, 2, 9, 3]])
    parents = torch.tensor([[-1, 0, 0, 0, 0]], dtype=torch.int32)
    tree = DraftTree(tokens, parents, None, None)
    logits = torch.log(torch.tensor([0.1, 0.4, 0.3, 0.2])).repeat(1, 5, 1)
    for u_vals in ([0.5, 0.9, 0.9, 0.0, 0.99], [0.05, 0.5, 0.2, 0.3, 0.1], [0.99, 0.9, 0.6, 0.1, 0.99]):
        u = torch.tensor([u_vals])
        got = native_verify_sample.verify_sample(tree, logits, u, 1.0)
        assert_same(got, ref_verify_sample(tree, logits, u, 1.0), ("path", "accept_len", "bonus"))


def test_verify_sample_uniform_walk_frequencies():
    """Seed by seed, ext's walk (path, length, bonus) equals the reference's on a root with two
    children over a 3-token vocabulary, and the emitted first token follows p (both children
    accepted or rejected, the bonus from the residual); the bonus at the root of a leafless tree
    follows p too."""
    p = torch.tensor([0.5, 0.25, 0.25])
    branchy = DraftTree(torch.tensor([[0, 1, 0]]), torch.tensor([[-1, 0, 0]], dtype=torch.int32), None, None)
    leafless = DraftTree(torch.tensor([[0]]), torch.tensor([[-1]], dtype=torch.int32), None, None)
    for tree in (branchy, leafless):
        T = tree.tokens.shape[1]
        logits = torch.log(p).repeat(1, T, 1)
        counts = torch.zeros(3)
        for s in range(400):
            u = torch.rand(1, T, generator=torch.Generator().manual_seed(s))
            got = native_verify_sample.verify_sample(tree, logits, u, 1.0)
            assert_same(got, ref_verify_sample(tree, logits, u, 1.0), ("path", "accept_len", "bonus"))
            path, alen, bonus = got
            first = int(tree.tokens[0, path[0, 1]]) if int(alen) > 1 else int(bonus)
            counts[first] += 1
        assert abs(counts[0] / 400 - 0.5) < 0.08 and abs(counts[1] / 400 - 0.25) < 0.07, counts


# ----------------------------------------------------------------------------- kv_compact


KV_CASES = [
    pytest.param(torch.float32, [[0, 2, 3]], [3], id="overlap-0-2-3"),
    pytest.param(torch.float16, [[0, 1, 5, 7], [0, 3, 4, -1]], [4, 3], id="B2-fp16"),
    pytest.param(torch.bfloat16, [[0, 4, 6, -1]], [0], id="accept0-bf16"),
    pytest.param(torch.int8, [[0, 2, 1, 3]], [4], id="int8-any-order"),
    pytest.param(torch.float32, [[3, 0, 2, 1]], [4], id="permutation"),
]


@pytest.mark.parametrize("dtype,path,accept", KV_CASES)
def test_kv_compact_bit_exact(dtype, path, accept):
    path, accept = torch.tensor(path), torch.tensor(accept)
    B = path.shape[0]
    base = torch.randint(-100, 100, (6, B, 3, 20, 16), dtype=torch.int16).to(dtype)
    prefix = torch.tensor([5, 11][:B], dtype=torch.int32)
    got, want = base.clone(), base.clone()
    out = native_kv_compact.kv_compact(got, prefix, path, accept)
    ref_kv_compact(want, prefix, path, accept)
    assert out is got
    assert torch.equal(got, want)  # integer-valued data: equality is bit equality


def test_kv_compact_random_and_strided():
    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        B, T = 3, int(torch.randint(1, 20, (1,), generator=g))
        storage = torch.randn(4, B, 2, 64, 40, generator=g)
        cache = storage[..., :20]  # [N, B, Hkv, L, Dh] view: rows contiguous, slots strided
        prefix = torch.randint(0, 30, (B,), generator=g)
        accept = torch.randint(0, T + 1, (B,), generator=g)
        path = torch.full((B, T), -1)
        for b in range(B):
            nodes = torch.randperm(T, generator=g)[: int(accept[b])].sort().values
            path[b, : len(nodes)] = nodes
        got, want = cache.clone(), cache.clone()
        native_kv_compact.kv_compact(got, prefix, path, accept)
        ref_kv_compact(want, prefix, path, accept)
        assert torch.equal(got, want), trial
        strided = storage.clone()[..., ::2]  # Dh stride 2: element-wise moves
        native_kv_compact.kv_compact(strided, prefix, path, accept)
        ref = storage.clone()[..., ::2]
        ref_kv_compact(ref, prefix, path, accept)
        assert torch.equal(strided, ref), trial


def test_kv_compact_rejects_out_of_range():
    cache = torch.zeros(2, 1, 1, 8, 4)
    with pytest.raises(ValueError, match="reach"):
        native_kv_compact.kv_compact(cache, torch.tensor([5]), torch.tensor([[0, 3]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="padding"):
        native_kv_compact.kv_compact(cache, torch.tensor([0]), torch.tensor([[0, -1]]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"accept_len\[0\]=3"):
        native_kv_compact.kv_compact(cache, torch.tensor([0]), torch.tensor([[0, 1]]), torch.tensor([3]))


# ----------------------------------------------------------------------- dispatch by device


def test_public_ops_use_the_extension_on_cpu(monkeypatch):
    """Without EAGLE2_KERNELS_BACKEND, CPU tensors go to the extension."""
    monkeypatch.delenv("EAGLE2_KERNELS_BACKEND", raising=False)
    from eagle2_kernels import ops

    calls = []
    real = native_tree_expand.tree_expand
    monkeypatch.setattr(native_tree_expand, "tree_expand", lambda *a: calls.append(1) or real(*a))
    ops.tree_expand(torch.randn(1, 1, 30), torch.zeros(1, 1), 2)
    assert calls == [1]


def test_public_ops_with_backend_ext_match_reference():
    """The ``backend="ext"`` branch of every public op, against ``backend="reference"``."""
    from eagle2_kernels import ops

    tokens, scores, parents, roots = random_candidates(2, 40, seed=11)
    results = {}
    for be in ("ext", "reference"):
        flag = torch.full((2,), 9, dtype=torch.int32)
        tree = ops.tree_build(tokens, scores, parents, roots, 14, backend=be, error_flag=flag)
        g = torch.Generator().manual_seed(2)
        small = DraftTree(tree.tokens % 300, tree.parents, tree.depth, tree.mask)  # V = 300
        logits = planted_logits(small, 300, 2)
        q, kv = torch.randn(2, 4, 14, 16, generator=g), torch.randn(2, 2, 2, 50, 16, generator=g)
        cache = torch.randn(4, 2, 2, 50, 16, generator=g)
        out = [
            *ops.tree_expand(torch.randn(2, 3, 300, generator=g), -torch.rand(2, 3, generator=g), 4, backend=be),
            tree.tokens, tree.parents, tree.depth, tree.mask, flag,
            ops.tree_attention(q, kv[0], kv[1], torch.tensor([20, 30]), tree.mask, 14, backend=be),
            *ops.verify_greedy(small, logits, backend=be),
            *ops.verify_sample(small, logits, torch.rand(2, 14, generator=g), 0.9, 0.95, 40, backend=be),
            ops.kv_compact(cache, torch.tensor([5, 9]), torch.tensor([[0, 1, 3], [0, 2, -1]]),
                           torch.tensor([3, 2]), backend=be),
        ]
        results[be] = out
    for i, (a, b) in enumerate(zip(results["ext"], results["reference"])):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        if a.is_floating_point():
            torch.testing.assert_close(a, b, **FP32, msg=f"output {i}")
        else:
            assert torch.equal(a, b), i
