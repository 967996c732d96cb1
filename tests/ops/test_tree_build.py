"""tree_build: rerank to the T-1 best candidates (ties to the lower index), candidate-order
numbering, parents, depth and the packed ancestor mask; errors eagerly and as a flag."""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import requires_triton, triton_device
from eagle2_kernels.ops.tree import DraftTree, mask_words, pack_bits, unpack_bits
from eagle2_kernels.ops.tree_build import tree_build

# ----------------------------------------------------------------------------- oracle


def oracle(cand_tokens, cand_scores, cand_parents, root_tokens, T) -> DraftTree:
    """Python loops: the semantics written out one candidate and one node at a time."""
    B, C = cand_scores.shape
    W = mask_words(T)
    tokens = torch.empty(B, T, dtype=torch.int64)
    parents = torch.empty(B, T, dtype=torch.int32)
    depth = torch.empty(B, T, dtype=torch.int32)
    mask = torch.empty(B, T, W, dtype=torch.int32)
    ancestors = torch.zeros(T, T, dtype=torch.bool)
    for b in range(B):
        s = cand_scores[b].float().tolist()
        kept = sorted(sorted(range(C), key=lambda c: (-s[c], c))[: T - 1])
        node_of = {c: m + 1 for m, c in enumerate(kept)}
        tok = [int(root_tokens[b])] + [int(cand_tokens[b, c]) for c in kept]
        par = [-1]
        for c in kept:
            p = int(cand_parents[b, c])
            assert p == -1 or p in node_of, "oracle: inputs must be closed under ancestors"
            par.append(0 if p == -1 else node_of[p])
        dep = [0]
        for i in range(1, T):
            dep.append(dep[par[i]] + 1)
        ancestors.zero_()
        for i in range(T):
            j = i
            while j != -1:
                ancestors[i, j] = True
                j = par[j]
        mask[b] = pack_bits(ancestors)
        tokens[b] = torch.tensor(tok)
        parents[b] = torch.tensor(par)
        depth[b] = torch.tensor(dep)
    return DraftTree(tokens, parents, depth, mask)


def assert_tree_equal(got: DraftTree, want: DraftTree):
    dtypes = {"tokens": torch.int64, "parents": torch.int32, "depth": torch.int32, "mask": torch.int32}
    for name, dtype in dtypes.items():
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == dtype, f"{name}: {g.dtype}"
        assert torch.equal(g.cpu(), w), f"{name}:\n{g}\n!=\n{w}"


def draft_candidates(B, K, D, seed, V=1000, ties=False):
    """Candidates as the draft loop makes them: root expansion (K children of the root),
    then D expansions of the K best frontier nodes, each into K children; a child's score
    is its parent's plus a log-probability (<= 0). With ``ties``, log-probs are coarse so
    that equal scores are common."""
    g = torch.Generator().manual_seed(seed)

    def logp(n):
        if ties:
            return -torch.randint(0, 3, (B, n), generator=g).float() * 0.5
        return torch.log(torch.rand(B, n, generator=g) * 0.9 + 0.05)

    tokens = [torch.randint(0, V, (B, K), generator=g)]
    scores = [logp(K)]
    parents = [torch.full((B, K), -1)]
    offset = 0
    frontier_scores, frontier = scores[0], torch.arange(K).expand(B, K)
    for _ in range(D):
        tokens.append(torch.randint(0, V, (B, K * K), generator=g))
        child = frontier_scores.repeat_interleave(K, 1) + logp(K * K)
        scores.append(child)
        parents.append((offset + frontier).repeat_interleave(K, 1))
        offset += scores[-2].shape[1]
        # next frontier: the K best children (ties to the lower index), as tree_expand does
        best = [sorted(range(K * K), key=lambda i: (-float(child[b, i]), i))[:K] for b in range(B)]
        idx = torch.tensor(best)
        frontier_scores, frontier = child.gather(1, idx), idx
    return torch.cat(tokens, 1), torch.cat(scores, 1), torch.cat(parents, 1)


# ------------------------------------------------------------------- mask-word packing


def test_pack_bits_hand_made_words():
    """ops.tree.pack_bits, which the oracle above and the package share: bit j -> word j // 32,
    bit j % 32, bit 31 the sign bit; unpack_bits inverts it."""
    bits = torch.zeros(2, 40, dtype=torch.bool)
    bits[0, [0, 2]] = True           # word 0 = 0b101
    bits[1, [31, 32, 39]] = True     # word 0 = -2**31, word 1 = 1 + 2**7
    words = pack_bits(bits)
    assert words.dtype == torch.int32 and words.tolist() == [[5, 0], [-(2**31), 129]]
    assert torch.equal(unpack_bits(words, 40), bits)
    assert pack_bits(torch.ones(1, 32, dtype=torch.bool)).tolist() == [[-1]]


# ----------------------------------------------------------------------------- reference


def test_reference_hand_made():
    #            cand: 0     1     2     3     4     5
    tokens = torch.tensor([[11, 12, 13, 14, 15, 16]])
    scores = torch.tensor([[-0.5, -0.2, -3.0, -0.9, -0.4, -1.0]])
    parents = torch.tensor([[-1, -1, -1, 0, 1, 4]])
    tree = tree_build(tokens, scores, parents, torch.tensor([7]), 5, backend="reference")
    # keep the 4 best: 1 (-0.2), 4 (-0.4), 0 (-0.5), 3 (-0.9); in candidate order 0, 1, 3, 4
    assert tree.tokens.tolist() == [[7, 11, 12, 14, 15]]
    assert tree.parents.tolist() == [[-1, 0, 0, 1, 2]]
    assert tree.depth.tolist() == [[0, 1, 1, 2, 2]]
    assert tree.mask.tolist() == [[[0b1], [0b11], [0b101], [0b1011], [0b10101]]]
    assert tree.mask.shape == (1, 5, 1)


def test_reference_ties_keep_the_lower_candidate_index():
    tokens = torch.arange(6).view(1, 6) + 100
    scores = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    parents = torch.tensor([[-1, -1, 0, 1, 2, -1]])
    tree = tree_build(tokens, scores, parents, torch.tensor([0]), 4, backend="reference")
    assert tree.tokens.tolist() == [[0, 100, 101, 102]]
    assert tree.parents.tolist() == [[-1, 0, 0, 1]]
    # the cut falls inside a group of equal scores: the lower indices 2 and 3, not 4 and 5
    scores = torch.tensor([[0.0, -0.5, -1.0, -1.0, -1.0, -1.0]])
    tree = tree_build(tokens, scores, parents, torch.tensor([0]), 5, backend="reference")
    assert tree.tokens.tolist() == [[0, 100, 101, 102, 103]]


def test_reference_single_node_and_all_candidates():
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]], dtype=torch.int32)
    scores = torch.tensor([[-2.0, -1.0, -3.0], [-0.1, -0.2, -0.3]])
    parents = torch.tensor([[-1, -1, 1], [-1, 0, 1]], dtype=torch.int32)
    roots = torch.tensor([1, 2], dtype=torch.int32)
    one = tree_build(tokens, scores, parents, roots, 2, backend="reference")
    assert one.tokens.tolist() == [[1, 6], [2, 8]] and one.parents.tolist() == [[-1, 0]] * 2
    full = tree_build(tokens, scores, parents, roots, 4, backend="reference")
    assert full.tokens.tolist() == [[1, 5, 6, 7], [2, 8, 9, 10]]
    assert full.parents.tolist() == [[-1, 0, 0, 2], [-1, 0, 1, 2]]
    assert full.depth.tolist() == [[0, 1, 1, 2], [0, 1, 2, 3]]
    assert full.mask[..., 0].tolist() == [[1, 3, 5, 13], [1, 3, 7, 15]]


def test_reference_chain_sets_bit_31_and_second_word():
    C = 40
    tokens = torch.arange(C).view(1, C)
    scores = -torch.arange(C, dtype=torch.float32).view(1, C) * 0.01
    parents = (torch.arange(C) - 1).view(1, C)  # a chain: candidate c's parent is c - 1
    tree = tree_build(tokens, scores, parents, torch.tensor([0]), C + 1, backend="reference")
    assert tree.mask.shape == (1, C + 1, 2)
    assert tree.depth[0].tolist() == list(range(C + 1))
    assert tree.mask[0, 30].tolist() == [2**31 - 1, 0]
    assert tree.mask[0, 31].tolist() == [-1, 0]  # bits 0..31 set: all ones as int32
    assert tree.mask[0, 33].tolist() == [-1, 0b11]
    assert_tree_equal(tree, oracle(tokens, scores, parents, torch.tensor([0]), C + 1))


@pytest.mark.parametrize(
    "B, K, D, T, ties",
    [
        pytest.param(1, 10, 5, 60, False, id="B1-K10-D5-T60"),
        pytest.param(2, 4, 3, 33, False, id="B2-K4-D3-T33-W2"),
        pytest.param(3, 3, 2, 13, True, id="B3-K3-D2-T13-ties"),
        pytest.param(2, 5, 4, 70, True, id="B2-K5-D4-T70-W3-ties"),
        pytest.param(1, 2, 1, 7, False, id="B1-K2-D1-T7-full"),
    ],
)
def test_reference_matches_oracle(B, K, D, T, ties):
    tokens, scores, parents = draft_candidates(B, K, D, seed=T, ties=ties)
    roots = torch.randint(0, 1000, (B,))
    want = oracle(tokens, scores, parents, roots, T)
    assert_tree_equal(tree_build(tokens, scores, parents, roots, T, backend="reference"), want)


def test_reference_random_trees_seeded():
    """Arbitrary shapes of trees (any parent < own index); a child's score is its parent's
    plus a step in {0, -0.5, -1}, so equal scores (child equal to parent too) are common."""
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        B, C = 2, int(torch.randint(1, 50, (1,), generator=g))
        parents = torch.full((B, C), -1)
        scores = torch.zeros(B, C)
        for c in range(C):
            parents[:, c] = torch.randint(-1, c, (B,), generator=g)
            step = -0.5 * torch.randint(0, 3, (B,), generator=g).float()
            p = parents[:, c : c + 1]
            base = torch.where(p >= 0, scores.gather(1, p.clamp(min=0)), 0.0)[:, 0]
            scores[:, c] = base + step
        tokens = torch.randint(0, 50, (B, C), generator=g)
        T = int(torch.randint(2, C + 2, (1,), generator=g))
        roots = torch.randint(0, 50, (B,), generator=g)
        want = oracle(tokens, scores, parents, roots, T)
        assert_tree_equal(tree_build(tokens, scores, parents, roots, T, backend="reference"), want)


def test_reference_dropped_parent_raises_and_sets_flag():
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    scores = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -2.0, -3.0]])  # b=0: child 2 beats parent 0
    parents = torch.tensor([[-1, -1, 1], [-1, -1, 0]])
    flag = torch.full((2,), 99, dtype=torch.int32)
    with pytest.raises(ValueError, match="parent was not kept"):
        tree_build(
            tokens, scores, parents, torch.tensor([0, 0]), 3, backend="reference", error_flag=flag
        )
    assert flag.tolist() == [1, 0]


@pytest.mark.parametrize(
    "bad_parent, c",
    [
        pytest.param(2, 2, id="self"),
        pytest.param(3, 2, id="later"),
        pytest.param(-2, 1, id="below-minus-1"),
    ],
)
def test_reference_invalid_parent_raises(bad_parent, c):
    parents = torch.tensor([[-1, -1, 0, 1]])
    parents[0, c] = bad_parent
    flag = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"cand_parents\[0, {c}\] = {bad_parent} is invalid"):
        tree_build(torch.zeros(1, 4, dtype=torch.int64), torch.tensor([[-1.0, -2.0, -3.0, -4.0]]),
                   parents, torch.tensor([0]), 2, backend="reference", error_flag=flag)
    assert flag.item() & 2


def test_reference_clean_run_clears_flag():
    flag = torch.full((1,), 7, dtype=torch.int32)
    tree_build(torch.tensor([[3, 4]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1, 0]]),
               torch.tensor([0]), 3, backend="reference", error_flag=flag)
    assert flag.tolist() == [0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(
            dict(total_tokens=1), ValueError, r"total_tokens=1 must be in \[2, C \+ 1 = 5\]", id="T1"
        ),
        pytest.param(dict(total_tokens=6), ValueError, r"total_tokens=6", id="T>C+1"),
        pytest.param(dict(total_tokens=3.0), TypeError, "total_tokens must be a Python int", id="T-float"),
        pytest.param(
            dict(cand_tokens=torch.zeros(1, 3, dtype=torch.int64)),
            ValueError,
            r"cand_tokens must have shape \[B, C\] = \[1, 4\]",
            id="tokens-shape",
        ),
        pytest.param(
            dict(cand_tokens=torch.zeros(1, 4)), TypeError, "cand_tokens must be int32 or int64", id="tokens-dtype"
        ),
        pytest.param(
            dict(cand_scores=torch.zeros(4)), ValueError, r"cand_scores must be a \[B, C\]", id="scores-rank"
        ),
        pytest.param(
            dict(cand_parents=torch.zeros(1, 4, dtype=torch.int16)), TypeError, "cand_parents", id="parents-dtype"
        ),
        pytest.param(
            dict(root_tokens=torch.zeros(2, dtype=torch.int64)),
            ValueError,
            r"root_tokens must have shape \[B\] = \[1\]",
            id="root-shape",
        ),
        pytest.param(
            dict(error_flag=torch.zeros(1, dtype=torch.int64)), TypeError, "error_flag must be int32", id="flag-dtype"
        ),
        pytest.param(
            dict(error_flag=torch.zeros(2, dtype=torch.int32)),
            ValueError,
            r"error_flag must have shape \[B\]",
            id="flag-shape",
        ),
    ],
)
def test_input_errors(kwargs, error, match):
    args = dict(
        cand_tokens=torch.zeros(1, 4, dtype=torch.int64),
        cand_scores=torch.zeros(1, 4),
        cand_parents=torch.tensor([[-1, 0, 1, 2]]),
        root_tokens=torch.zeros(1, dtype=torch.int64),
        total_tokens=3,
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        tree_build(**args)


# ----------------------------------------------------------------------------- triton


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Fresh outputs start as NaN / -7777 so that any slot the kernel skips shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        t.fill_(float("nan") if t.is_floating_point() else -7777)
        return t

    monkeypatch.setattr(torch, "empty", empty)


@requires_triton
@pytest.mark.parametrize(
    "B, K, D, T, ties, score_dtype, int_dtype",
    [
        pytest.param(1, 10, 5, 60, False, torch.float32, torch.int64, id="B1-K10-D5-T60-C510"),
        pytest.param(2, 4, 3, 33, True, torch.float32, torch.int32, id="B2-K4-D3-T33-W2-ties-i32"),
        pytest.param(3, 3, 2, 13, True, torch.float16, torch.int64, id="B3-K3-D2-T13-fp16"),
        pytest.param(1, 5, 4, 101, False, torch.float32, torch.int64, id="B1-K5-D4-T101-W4"),
        pytest.param(2, 2, 1, 2, False, torch.float32, torch.int64, id="B2-K2-D1-T2-one-node"),
        pytest.param(1, 10, 5, 300, True, torch.float32, torch.int64, id="B1-K10-D5-T300-W10"),
        pytest.param(1, 2, 2, 11, False, torch.float32, torch.int32, id="B1-K2-D2-T11-full"),
    ],
)
def test_triton_matches_oracle(B, K, D, T, ties, score_dtype, int_dtype, poisoned_empty):
    device = triton_device()
    tokens, scores, parents = draft_candidates(B, K, D, seed=T + 1, ties=ties)
    scores = scores.to(score_dtype)
    roots = torch.randint(0, 1000, (B,))
    want = oracle(tokens, scores, parents, roots, T)
    flag = torch.full((B,), 5, dtype=torch.int32, device=device)
    got = tree_build(
        tokens.to(int_dtype).to(device),
        scores.to(device),
        parents.to(int_dtype).to(device),
        roots.to(int_dtype).to(device),
        T,
        backend="triton",
        error_flag=flag,
    )
    assert_tree_equal(got, want)
    assert flag.tolist() == [0] * B


@requires_triton
def test_triton_chain_and_strided_inputs():
    device = triton_device()
    C = 40
    wide = torch.zeros(1, C, 2)
    wide[..., 1] = -torch.arange(C, dtype=torch.float32) * 0.01
    scores = wide[..., 1]  # stride 2
    tokens = torch.arange(C).view(1, C)
    parents = (torch.arange(C) - 1).view(1, C)
    root = torch.tensor([9], device=device)
    got = tree_build(
        tokens.to(device), scores.to(device), parents.to(device), root, 36, backend="triton"
    )
    assert_tree_equal(got, oracle(tokens, scores, parents, torch.tensor([9]), 36))


@requires_triton
def test_triton_errors_go_to_the_flag_or_raise_without_one(monkeypatch):
    device = triton_device()
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]], device=device)
    scores = torch.tensor(
        [[-1.0, -2.0, -3.0], [-1.0, -2.0, -0.5], [-1.0, -2.0, -3.0]], device=device
    )
    parents = torch.tensor([[-1, -1, 0], [-1, -1, 1], [-1, 2, 0]], device=device)
    roots = torch.zeros(3, dtype=torch.int64, device=device)
    # b=1 keeps child 2 (-0.5) of the dropped candidate 1 (-2.0); b=2 has an invalid parent
    # (candidate 1's parent is 2). With a flag the codes stay on the device: no raise, and
    # the launcher never reads them on the host (the caller checks the flag a round late).
    kernel = importlib.import_module("eagle2_kernels.ops.tree_build.kernel")

    def no_host_read(*args):
        raise AssertionError("the launcher read the error codes although a flag was passed")

    with monkeypatch.context() as m:
        m.setattr(kernel, "raise_for_error_codes", no_host_read)
        flag = torch.full((3,), 99, dtype=torch.int32, device=device)
        tree_build(tokens, scores, parents, roots, 3, backend="triton", error_flag=flag)
    assert flag.tolist() == [0, 1, 2]
    # Without a flag (eager use) the launcher raises, naming the first failing sequence.
    with pytest.raises(ValueError, match="sequence 1 a kept candidate's parent was not kept"):
        tree_build(tokens, scores, parents, roots, 3, backend="triton")
    with pytest.raises(ValueError, match=r"cand_parents\[0, 1\] = 2 is invalid"):
        tree_build(tokens[2:], scores[2:], parents[2:], roots[2:], 3, backend="triton")


# ----------------------------------------------------------------------------- GPU


@requires_triton
@pytest.mark.parametrize("K, D, T", [pytest.param(10, 5, 60, id="K10-D5-T60"),
                                     pytest.param(16, 8, 128, id="K16-D8-T128"),
                                     pytest.param(8, 6, 64, id="K8-D6-T64"),
                                     pytest.param(10, 5, 400, id="K10-D5-T400")])
def test_triton_large_trees_match_reference(K, D, T):
    """The paper's and larger trees (up to T = 400, 13 mask words), fp32 and bf16 scores; on CPU
    under the Triton interpreter too."""
    B = 4
    dev = triton_device()
    tokens, scores, parents = draft_candidates(B, K, D, seed=K * D)
    roots = torch.randint(0, 1000, (B,))
    want = tree_build(tokens, scores, parents, roots, T, backend="reference")
    got = tree_build(tokens.to(dev), scores.to(dev), parents.to(dev), roots.to(dev), T, backend="triton")
    assert_tree_equal(got, want)
    got16 = tree_build(tokens.to(dev), scores.to(dev).bfloat16(), parents.to(dev), roots.to(dev), T,
                       backend="triton")
    want16 = tree_build(tokens, scores.bfloat16(), parents, roots, T, backend="reference")
    assert_tree_equal(got16, want16)


@pytest.mark.cuda
def test_cuda_eager_with_flag_does_not_sync():
    B, K, D, T = 2, 10, 5, 60
    tokens, scores, parents = (x.cuda() for x in draft_candidates(B, K, D, seed=4))
    roots = torch.zeros(B, dtype=torch.int64, device="cuda")
    flag = torch.zeros(B, dtype=torch.int32, device="cuda")
    tree_build(tokens, scores, parents, roots, T, error_flag=flag)  # warm-up (compiles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync raises
    try:
        tree = tree_build(tokens, scores, parents, roots, T, error_flag=flag)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flag.tolist() == [0, 0]
    assert_tree_equal(tree, tree_build(tokens.cpu(), scores.cpu(), parents.cpu(), roots.cpu(), T,
                                       backend="reference"))


@pytest.mark.cuda
def test_cuda_graph_capture_reports_errors_through_the_flag():
    B, K, D, T = 2, 10, 5, 60
    tokens, scores, parents = (x.cuda() for x in draft_candidates(B, K, D, seed=3))
    roots = torch.zeros(B, dtype=torch.int64, device="cuda")
    flag = torch.zeros(B, dtype=torch.int32, device="cuda")
    tree_build(tokens, scores, parents, roots, T, error_flag=flag)  # warm-up (compiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tree = tree_build(tokens, scores, parents, roots, T, error_flag=flag)
    graph.replay()
    torch.cuda.synchronize()
    assert flag.tolist() == [0, 0]
    want = tree_build(
        tokens.cpu(), scores.cpu(), parents.cpu(), roots.cpu(), T, backend="reference"
    )
    assert_tree_equal(tree, want)
    # a child outscoring its (now dropped) parent: replay must not raise, the flag tells
    scores[1, -1] = 1.0
    scores[1, parents[1, -1]] = -100.0
    graph.replay()
    torch.cuda.synchronize()
    assert flag.tolist() == [0, 1]
