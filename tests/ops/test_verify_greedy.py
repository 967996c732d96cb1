"""verify_greedy: greedy acceptance of a draft tree.

Contract: node i > 0 accepted iff its parent is accepted and tokens[i] == argmax(logits[parent])
(ties to the lower token id); path [B, T] int64 padded with -1, accept_len [B] int64 counting
the root, bonus [B] int64 = argmax at the deepest accepted node. Exact (integer) outputs, so
the Triton kernel must equal the reference bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from eagle2_kernels.ops import DraftTree, verify_greedy
from eagle2_kernels.ops.verify_greedy.reference import verify_greedy as ref_verify_greedy
from conftest import requires_triton, triton_device
from trees import make_tree


def logits_with_argmax(argmax_per_row, vocab, runner_up=None):
    """[1, T, V] logits whose row t has its maximum at argmax_per_row[t]."""
    T = len(argmax_per_row)
    logits = torch.randn(1, T, vocab) * 0.1
    for t, a in enumerate(argmax_per_row):
        logits[0, t, a] = 5.0
    return logits


def random_tree(B, T, V, gen, max_children=None):
    """Random parents-first trees with distinct sibling tokens."""
    parents = torch.full((B, T), -1, dtype=torch.int64)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    for b in range(B):
        used: dict[int, set] = {}
        for i in range(1, T):
            while True:
                p = int(torch.randint(0, i, (), generator=gen))
                if len(used.get(p, ())) < min(V, max_children or V):
                    break
            siblings = used.setdefault(p, set())
            t = int(torch.randint(0, V, (), generator=gen))
            while t in siblings:
                t = (t + 1) % V
            siblings.add(t)
            parents[b, i] = p
            tokens[b, i] = t
    return parents, tokens


def greedy_friendly_logits(parents, tokens, V, gen, p_match=0.7, dtype=torch.float32, ties=False):
    """Logits where each node's first child often holds the argmax, so paths get long."""
    B, T = parents.shape
    logits = torch.randn(B, T, V, generator=gen)
    if ties:  # integer logits: many exact ties
        logits = torch.randint(0, 3, (B, T, V), generator=gen).float()
    for b in range(B):
        for i in range(1, T):
            p = int(parents[b, i])
            if float(torch.rand((), generator=gen)) < p_match:
                logits[b, p, int(tokens[b, i])] = logits[b, p].max() + (0.0 if ties else 1.0)
    return logits.to(dtype)


def check_invariants(tree, logits, path, accept_len, bonus):
    B, T = tree.tokens.shape
    assert path.dtype == accept_len.dtype == bonus.dtype == torch.int64
    assert path.shape == (B, T) and accept_len.shape == (B,) and bonus.shape == (B,)
    best = logits.float().argmax(-1)
    for b in range(B):
        n = int(accept_len[b])
        assert 1 <= n <= T
        nodes = path[b, :n].tolist()
        assert nodes[0] == 0 and (path[b, n:] == -1).all()
        for prev, node in zip(nodes, nodes[1:]):
            assert int(tree.parents[b, node]) == prev
            assert int(tree.tokens[b, node]) == int(best[b, prev])
        last = nodes[-1]
        assert int(bonus[b]) == int(best[b, last])
        # maximal: no child of the last node matches its argmax
        for i in range(T):
            if int(tree.parents[b, i]) == last:
                assert int(tree.tokens[b, i]) != int(best[b, last])


# ---------------------------------------------------------------- hand-made trees (reference)


def test_single_node_tree():
    tree = make_tree([-1], [42])
    logits = logits_with_argmax([3], 8)
    path, n, bonus = verify_greedy(tree, logits, backend="reference")
    assert path.tolist() == [[0]] and n.tolist() == [1] and bonus.tolist() == [3]


def test_chain_fully_accepted():
    # root -> 1 -> 2 -> 3, every token is the parent's argmax
    tree = make_tree([-1, 0, 1, 2], [9, 4, 6, 1])
    logits = logits_with_argmax([4, 6, 1, 7], 10)
    path, n, bonus = verify_greedy(tree, logits, backend="reference")
    assert path.tolist() == [[0, 1, 2, 3]] and n.tolist() == [4] and bonus.tolist() == [7]


def test_chain_rejected_midway():
    tree = make_tree([-1, 0, 1, 2], [9, 4, 6, 1])
    logits = logits_with_argmax([4, 5, 1, 7], 10)  # node 1 predicts 5, node 2 holds 6
    path, n, bonus = verify_greedy(tree, logits, backend="reference")
    assert path.tolist() == [[0, 1, -1, -1]] and n.tolist() == [2] and bonus.tolist() == [5]


def test_root_rejected_everything():
    tree = make_tree([-1, 0, 0, 0], [0, 1, 2, 3])
    logits = logits_with_argmax([7, 1, 2, 3], 8)
    path, n, bonus = verify_greedy(tree, logits, backend="reference")
    assert path.tolist() == [[0, -1, -1, -1]] and n.tolist() == [1] and bonus.tolist() == [7]


def test_wide_tree_later_sibling():
    # root has 5 children; the 4th (node 4) holds the argmax
    tree = make_tree([-1, 0, 0, 0, 0, 0], [0, 10, 11, 12, 13, 14])
    logits = logits_with_argmax([13, 0, 0, 0, 2, 0], 16)
    path, n, bonus = verify_greedy(tree, logits, backend="reference")
    assert path.tolist() == [[0, 4, -1, -1, -1, -1]] and n.tolist() == [2] and bonus.tolist() == [2]


def test_deeper_branch_needs_accepted_parent():
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    #   |         |
    #   6         7
    # argmax(root) = token of node 2; node 3 matches argmax of node 1, but node 1 is rejected.
    parents = [-1, 0, 0, 1, 1, 2, 3, 5]
    tokens = [0, 20, 21, 30, 31, 32, 40, 41]
    am = [21, 30, 32, 40, 0, 41, 0, 9]
    tree = make_tree(parents, tokens)
    path, n, bonus = verify_greedy(tree, logits_with_argmax(am, 64), backend="reference")
    assert path.tolist() == [[0, 2, 5, 7, -1, -1, -1, -1]] and n.tolist() == [4] and bonus.tolist() == [9]


def test_argmax_ties_go_to_lower_token():
    tree = make_tree([-1, 0, 0], [0, 7, 3])  # node 1 holds 7, node 2 holds 3
    logits = torch.zeros(1, 3, 10)
    logits[0, 0, 3] = logits[0, 0, 7] = 2.0  # tie between 3 and 7 -> argmax 3
    logits[0, 2, 5] = logits[0, 2, 6] = 1.0  # tie at node 2 -> bonus 5
    path, n, bonus = verify_greedy(tree, logits, backend="reference")
    assert path.tolist() == [[0, 2, -1]] and n.tolist() == [2] and bonus.tolist() == [5]


def test_all_minus_inf_row_argmax_is_zero():
    tree = make_tree([-1, 0], [0, 0])
    logits = torch.full((1, 2, 6), float("-inf"))
    logits[0, 1, 4] = 0.0
    path, n, bonus = verify_greedy(tree, logits, backend="reference")
    assert path.tolist() == [[0, 1]] and n.tolist() == [2] and bonus.tolist() == [4]


def test_batch_sequences_independent():
    gen = torch.Generator().manual_seed(3)
    parents, tokens = random_tree(4, 12, 9, gen)
    logits = greedy_friendly_logits(parents, tokens, 9, gen)
    tree = make_tree(parents.tolist(), tokens.tolist())
    path, n, bonus = verify_greedy(tree, logits, backend="reference")
    check_invariants(tree, logits, path, n, bonus)
    for b in range(4):
        one = make_tree(parents[b].tolist(), tokens[b].tolist())
        p1, n1, b1 = verify_greedy(one, logits[b : b + 1], backend="reference")
        assert torch.equal(p1[0], path[b]) and int(n1) == int(n[b]) and int(b1) == int(bonus[b])


@pytest.mark.parametrize("token_dtype", [torch.int32, torch.int64], ids=["tok32", "tok64"])
@pytest.mark.parametrize("parent_dtype", [torch.int32, torch.int64], ids=["par32", "par64"])
def test_integer_dtypes(token_dtype, parent_dtype):
    tree = make_tree([-1, 0, 1], [5, 2, 3], token_dtype=token_dtype, parent_dtype=parent_dtype)
    path, n, bonus = verify_greedy(tree, logits_with_argmax([2, 3, 1], 4), backend="reference")
    assert path.tolist() == [[0, 1, 2]] and n.tolist() == [3] and bonus.tolist() == [1]


def test_random_trees_invariants():
    gen = torch.Generator().manual_seed(11)
    for T, V in [(7, 5), (45, 30), (60, 100)]:
        parents, tokens = random_tree(3, T, V, gen)
        logits = greedy_friendly_logits(parents, tokens, V, gen, p_match=0.8)
        tree = make_tree(parents.tolist(), tokens.tolist())
        check_invariants(tree, logits, *verify_greedy(tree, logits, backend="reference"))


def _tree_1():
    return make_tree([-1], [0])


@pytest.mark.parametrize(
    "make_args,exc,match",
    [
        pytest.param(lambda: (_tree_1(), torch.zeros(1, 2, 4)), ValueError, r"\[B, T, V\]", id="logits-T"),
        pytest.param(lambda: (_tree_1(), torch.zeros(1, 4)), ValueError, r"\[B, T, V\]", id="logits-rank"),
        pytest.param(lambda: (_tree_1(), torch.zeros(1, 1, 4, dtype=torch.long)), TypeError, "float", id="logits-int"),
        pytest.param(lambda: (_tree_1(), torch.zeros(1, 1, 0)), ValueError, "V = 0", id="logits-V0"),
        pytest.param(
            lambda: (DraftTree(torch.zeros(1, 1), torch.full((1, 1), -1), None, None), torch.zeros(1, 1, 4)),
            TypeError,
            "tree.tokens must be int32 or int64",
            id="tokens-float",
        ),
        pytest.param(
            lambda: (DraftTree(torch.zeros(1, 2, dtype=torch.long), torch.full((1, 1), -1), None, None), torch.zeros(1, 2, 4)),
            ValueError,
            "tree.parents shape",
            id="parents-shape",
        ),
        pytest.param(
            lambda: (DraftTree(torch.zeros(2, dtype=torch.long), torch.full((2,), -1), None, None), torch.zeros(1, 2, 4)),
            ValueError,
            r"\[B, T\]",
            id="tokens-rank",
        ),
    ],
)
def test_bad_inputs(make_args, exc, match):
    tree, logits = make_args()
    with pytest.raises(exc, match=match):
        verify_greedy(tree, logits, backend="reference")


def test_bad_tree_type():
    with pytest.raises(TypeError, match="DraftTree"):
        verify_greedy((torch.zeros(1, 1), torch.zeros(1, 1)), torch.zeros(1, 1, 4))


# ---------------------------------------------------------------- Triton vs reference


TRITON_CASES = [
    pytest.param(1, 1, 7, torch.float32, False, id="B1-T1-V7-fp32"),
    pytest.param(2, 2, 16, torch.float32, False, id="B2-T2-V16-depth1-fp32"),
    pytest.param(3, 7, 33, torch.float32, True, id="B3-T7-V33-ties-fp32"),
    pytest.param(2, 13, 50, torch.float16, False, id="B2-T13-V50-fp16"),
    pytest.param(2, 45, 64, torch.float32, False, id="B2-T45-V64-W2-fp32"),
    pytest.param(1, 60, 100, torch.float16, True, id="B1-T60-V100-ties-fp16"),
]


@requires_triton
@pytest.mark.parametrize("B,T,V,dtype,ties", TRITON_CASES)
def test_triton_matches_reference(B, T, V, dtype, ties):
    from eagle2_kernels.ops.verify_greedy.kernel import launch

    dev = triton_device()
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + V)
    parents, tokens = random_tree(B, T, V, gen)
    logits = greedy_friendly_logits(parents, tokens, V, gen, p_match=0.8, dtype=dtype, ties=ties)
    tree = make_tree(parents.tolist(), tokens.tolist(), device=dev)
    logits = logits.to(dev)
    expected = ref_verify_greedy(tree, logits)
    check_invariants(tree, logits, *expected)
    got = verify_greedy(tree, logits, backend="triton")
    for name, e, g in zip(("path", "accept_len", "bonus"), expected, got):
        assert g.dtype == torch.int64 and g.device == logits.device, name
        assert torch.equal(g, e), f"{name}: {g.tolist()} != {e.tolist()}"
    # V split over several programs with small blocks: partial argmaxes reduced in the walk
    split = launch(tree, logits, num_splits=3, block_v=8)
    for name, e, g in zip(("path", "accept_len", "bonus"), expected, split):
        assert torch.equal(g, e), f"split {name}: {g.tolist()} != {e.tolist()}"


@requires_triton
def test_triton_tie_across_chunks_and_strides():
    from eagle2_kernels.ops.verify_greedy.kernel import launch

    dev = triton_device()
    tree = make_tree([-1, 0, 0, 1], [0, 29, 3, 30], device=dev, token_dtype=torch.int32)
    # a non-contiguous [B, T, V] view: every second column of a wider tensor
    wide = torch.zeros(1, 4, 80)
    logits = wide[:, :, ::2]  # V = 40
    logits[0, 0, 29] = logits[0, 0, 35] = 3.0  # tie in different chunks -> 29
    logits[0, 1, 3] = logits[0, 1, 30] = 1.0  # tie in different chunks -> 3: node 3 rejected
    expected = ref_verify_greedy(tree, logits.to(dev))
    assert expected[0].tolist() == [[0, 1, -1, -1]] and expected[2].tolist() == [3]
    for splits in (1, 2, 5):
        got = launch(tree, logits.to(dev), num_splits=splits, block_v=8)
        for e, g in zip(expected, got):
            assert torch.equal(g, e)


# Real vocabularies: Llama-2 / Mistral 32000 (also on CPU under the interpreter, seconds),
# Llama-3 128256 and Qwen2 151936 (GPU only: minutes under the interpreter).
LARGE_VOCABS = [
    pytest.param(32000, id="V32000"),
    pytest.param(128256, id="V128256", marks=pytest.mark.cuda),
    pytest.param(151936, id="V151936", marks=pytest.mark.cuda),
]


@requires_triton
@pytest.mark.parametrize("V", LARGE_VOCABS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_large_vocab(V, dtype):
    """B = 4, T = 60 trees over a real vocabulary, bf16 included (on CPU this is where bf16
    reaches the Triton kernels)."""
    dev = triton_device()
    gen = torch.Generator().manual_seed(V)
    parents, tokens = random_tree(4, 60, V, gen, max_children=10)
    logits = greedy_friendly_logits(parents, tokens, V, gen, p_match=0.8, dtype=dtype)
    tree = make_tree(parents.tolist(), tokens.tolist(), device=dev)
    logits = logits.to(dev)
    expected = ref_verify_greedy(tree, logits)
    got = verify_greedy(tree, logits, backend="triton")
    for e, g in zip(expected, got):
        assert torch.equal(g, e)
