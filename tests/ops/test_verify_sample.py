"""verify_sample: lossless multi-draft rejection sampling of a draft tree.

Contract: deterministic given the uniforms (children tried in increasing node index, child i
accepted iff uniforms[b, i] < residual p(tokens[i]), a rejected child zeroed and p
renormalised, bonus by inverse CDF with uniforms[b, 0] over the residual in token-id order);
the Triton kernel equals the reference exactly on tie-free random inputs; statistically, the
emitted tokens follow the processed target distribution (chi-square, p-value > 1e-3 at fixed
seeds, and the same test rejects a deliberately wrong scheme).
"""

from __future__ import annotations

import pytest
import torch

from conftest import requires_triton, triton_device
from trees import make_tree
from eagle2_kernels.ops import DraftTree, verify_sample
from eagle2_kernels.ops.sampling import process_logits, sample_from_probs
from eagle2_kernels.ops.verify_sample.reference import verify_sample as ref_verify_sample

ALPHA = 1e-3  # significance of the chi-square tests


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; tokens of probability 0 must never be drawn."""
    counts, probs = counts.double(), probs.double()
    zero = probs == 0
    assert counts[zero].sum() == 0, "a token with probability 0 was emitted"
    expected = probs[~zero] * counts.sum()
    stat = ((counts[~zero] - expected) ** 2 / expected).sum()
    dof = int((~zero).sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


def run(tree, logits, u, temperature=1.0, top_p=1.0, top_k=0, backend="reference"):
    return verify_sample(tree, logits, torch.as_tensor(u, dtype=torch.float32).reshape(tree.tokens.shape),
                         temperature, top_p, top_k, backend=backend)


# ---------------------------------------------------------------- hand-made cases (reference)


def test_single_node_bonus_by_inverse_cdf():
    tree = make_tree([[-1], [-1]], [[5], [5]])
    logits = torch.zeros(2, 1, 4)  # uniform: cumulative 0.25, 0.5, 0.75, 1
    path, n, bonus = run(tree, logits, [[0.6], [0.25]])
    assert path.tolist() == [[0], [0]] and n.tolist() == [1, 1]
    assert bonus.tolist() == [2, 1]  # the first cumulative value strictly above u


def test_accept_then_leaf_bonus_from_leaf_distribution():
    tree = make_tree([-1, 0], [7, 2])
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = torch.tensor([0.0, 3.0, 0.0, 0.0])  # node 1 strongly predicts token 1
    path, n, bonus = run(tree, logits, [0.5, 0.2])  # 0.2 < p(2) = 0.25: accepted
    assert path.tolist() == [[0, 1]] and n.tolist() == [2]
    assert bonus.tolist() == [int(sample_from_probs(logits[0, 1].softmax(-1), torch.tensor(0.5)))] == [1]


def test_strict_less_than_and_renormalisation():
    # root children: node 1 token 0, node 2 token 1, uniform p = 1/4 over V = 4
    tree = make_tree([[-1, 0, 0]] * 3, [[9, 0, 1]] * 3)
    logits = torch.zeros(3, 3, 4)
    u = [
        [0.0, 0.25, 0.3],  # 0.25 < 0.25 fails -> reject; residual 1/3: 0.3 < 1/3 -> accept node 2
        [0.0, 0.0, 0.9],  # u = 0 < 0.25 -> accept node 1 (node 2 is never tried)
        [0.0, 0.5, 0.34],  # reject node 1; 0.34 >= 1/3 -> reject node 2 too
    ]
    path, n, bonus = run(tree, logits, u)
    assert path.tolist() == [[0, 2, -1], [0, 1, -1], [0, -1, -1]]
    assert n.tolist() == [2, 2, 1]
    # row 3: residual [0, 0, 1/2, 1/2]; u0 = 0 -> token 2 (zero-probability ids are skipped)
    assert bonus[2].item() == 2


def test_all_children_rejected_bonus_from_residual():
    tree = make_tree([[-1, 0, 0]] * 4, [[0, 1, 3]] * 4)
    logits = torch.zeros(4, 3, 4)
    # rejecting 1 then 3 leaves [1/2, 0, 1/2, 0]
    u = [[0.4, 0.9, 0.9], [0.6, 0.9, 0.9], [0.0, 0.9, 0.9], [0.99, 0.9, 0.9]]
    path, n, bonus = run(tree, logits, u)
    assert n.tolist() == [1, 1, 1, 1] and (path[:, 1:] == -1).all()
    assert bonus.tolist() == [0, 2, 0, 2]


def test_children_tried_in_node_order_not_token_order():
    tree = make_tree([-1, 0, 0], [0, 3, 1])
    logits = torch.zeros(1, 3, 4)
    path, n, _ = run(tree, logits, [0.5, 0.1, 0.1])  # both acceptable: node 1 comes first
    assert path.tolist() == [[0, 1, -1]] and n.tolist() == [2]


def test_rejected_subtree_is_skipped():
    #   0 -> 1 -> 3, 0 -> 2 -> 4 ; node 1 rejected, node 3 (u = 0) must not be accepted
    tree = make_tree([-1, 0, 0, 1, 2], [0, 1, 2, 3, 0])
    logits = torch.zeros(1, 5, 4)
    path, n, bonus = run(tree, logits, [0.1, 0.99, 0.0, 0.0, 0.99])
    assert path.tolist() == [[0, 2, -1, -1, -1]] and n.tolist() == [2]
    # node 4 (token 0) rejected at node 2: residual [0, 1/3, 1/3, 1/3]; u0 = 0.1 -> token 1
    assert bonus.tolist() == [1]


def test_zero_probability_children_never_accepted_and_do_not_renormalise():
    # top_k = 2 keeps tokens 2 and 3 (p = 1/(1+e), e/(1+e)); node 1 holds token 0 (removed)
    tree = make_tree([[-1, 0, 0]] * 2, [[0, 0, 3]] * 2)
    logits = torch.tensor([0.0, 0.0, 1.0, 2.0]).expand(2, 3, 4).clone()
    p3 = float(process_logits(logits[0, 0], 1.0, top_k=2)[3])
    u = [[0.0, 0.0, p3 - 1e-4], [0.0, 0.0, p3 + 1e-4]]
    path, n, bonus = run(tree, logits, u, top_k=2)
    # p3 is not renormalised by the zero-probability rejection: p3 + 1e-4 is rejected
    assert path.tolist() == [[0, 2, -1], [0, -1, -1]] and n.tolist() == [2, 1]
    assert bonus[1].item() == 2  # only token 2 remains


def test_out_of_vocab_tokens_have_probability_zero():
    tree = make_tree([[-1, 0, 0, 0]] * 2, [[0, 4, -3, 1]] * 2)
    logits = torch.zeros(2, 4, 4)
    path, n, _ = run(tree, logits, [[0.5, 0.0, 0.0, 0.2], [0.5, 0.0, 0.0, 0.3]])
    assert path[:, :2].tolist() == [[0, 3], [0, -1]] and n.tolist() == [2, 1]


def test_processing_applies_at_every_node_and_to_the_bonus():
    # temperature / top-p / top-k reach the acceptance test and the residual bonus draw alike
    gen = torch.Generator().manual_seed(5)
    tree = make_tree([[-1, 0, 1]] * 64, [[0, 2, 5]] * 64)
    logits = torch.randn(1, 3, 8, generator=gen).expand(64, -1, -1).contiguous()
    u = torch.rand(64, 3, generator=gen)
    args = (0.6, 0.8, 5)
    path, n, bonus = verify_sample(tree, logits, u, *args, backend="reference")
    probs = process_logits(logits[0], *args).double()
    for b in range(64):
        p = probs[0].clone()
        node = 0
        for child in (1, 2):
            tok = int(tree.tokens[b, child])
            if u[b, child] < p[tok]:
                node, p = child, probs[child].clone()
            else:
                if p[tok] > 0:
                    p[tok] = 0
                    p /= p.sum()
                break
        assert int(n[b]) == node + 1 and int(bonus[b]) == int(sample_from_probs(p, u[b, 0]))


@pytest.mark.parametrize("token_dtype", [torch.int32, torch.int64], ids=["tok32", "tok64"])
@pytest.mark.parametrize("parent_dtype", [torch.int32, torch.int64], ids=["par32", "par64"])
def test_integer_dtypes_and_batch_independence(token_dtype, parent_dtype):
    gen = torch.Generator().manual_seed(2)
    parents, tokens = random_tree(3, 9, 12, gen)
    logits = torch.randn(3, 9, 12, generator=gen)
    tokens = likely_tokens(parents, tokens, logits)
    u = torch.rand(3, 9, generator=gen)
    tree = make_tree(parents, tokens, token_dtype=token_dtype, parent_dtype=parent_dtype)
    whole = verify_sample(tree, logits, u, 0.9, backend="reference")
    for b in range(3):
        one = make_tree(parents[b], tokens[b])
        single = verify_sample(one, logits[b : b + 1], u[b : b + 1], 0.9, backend="reference")
        for w, s in zip(whole, single):
            assert torch.equal(w[b], s[0])
    assert all(t.dtype == torch.int64 for t in whole)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        pytest.param(dict(temperature=0.0), ValueError, "verify_greedy", id="temp0"),
        pytest.param(dict(top_p=0.0), ValueError, "top_p", id="topp0"),
        pytest.param(dict(top_k=-2), ValueError, "top_k", id="topk-neg"),
        pytest.param(dict(uniforms=torch.rand(1, 3, dtype=torch.float64)), TypeError, "float32", id="u-fp64"),
        pytest.param(dict(uniforms=torch.rand(1, 2)), ValueError, r"\[B, T\]", id="u-shape"),
        pytest.param(dict(uniforms=[[0.1, 0.2, 0.3]]), TypeError, "torch.Tensor", id="u-list"),
        pytest.param(dict(logits=torch.zeros(1, 3)), ValueError, r"\[B, T, V\]", id="logits-rank"),
        pytest.param(dict(logits=torch.zeros(2, 3, 4)), ValueError, r"\[B, T, V\]", id="logits-B"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = dict(uniforms=torch.rand(1, 3), logits=torch.zeros(1, 3, 4), temperature=1.0, top_p=1.0, top_k=0)
    args.update(kwargs)
    tree = make_tree([-1, 0, 0], [0, 1, 2])
    with pytest.raises(exc, match=match):
        verify_sample(tree, args["logits"], args["uniforms"], args["temperature"], args["top_p"], args["top_k"],
                      backend="reference")


# ---------------------------------------------------------------- random trees, Triton vs reference


def random_tree(B, T, V, gen):
    """Random parents-first trees (parent of i uniform in [0, i), capped so siblings fit in V)."""
    parents = torch.full((B, T), -1, dtype=torch.int64)
    tokens = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        count: dict[int, int] = {}
        for i in range(1, T):
            p = int(torch.randint(0, i, (), generator=gen))
            while count.get(p, 0) >= V:
                p = (p + 1) % i
            count[p] = count.get(p, 0) + 1
            parents[b, i] = p
            tokens[b, i] = int(torch.randint(0, V, (), generator=gen))
    return parents, tokens


def likely_tokens(parents, tokens, logits, keep_random=0.2, gen=None):
    """Children of node p get p's most likely tokens in node order (distinct), some random ones."""
    B, T = parents.shape
    out = tokens.clone()
    for b in range(B):
        order = {}
        for i in range(1, T):
            p = int(parents[b, i])
            if p not in order:
                order[p] = logits[b, p].float().argsort(descending=True, stable=True)[: T + 1].tolist()
            ranked = order[p]
            out[b, i] = ranked.pop(0) if len(ranked) > 1 else ranked[0]
        # distinct siblings: re-check and fall back to unused tokens
        for p in set(parents[b, 1:].tolist()):
            kids = (parents[b] == p).nonzero().flatten().tolist()
            used = set()
            for k in kids:
                t = int(out[b, k])
                while t in used:
                    t = (t + 1) % logits.shape[-1]
                used.add(t)
                out[b, k] = t
    return out


SAMPLE_CASES = [
    pytest.param(1, 1, 7, torch.float32, (1.0, 1.0, 0), 8, id="B1-T1-V7-fp32"),
    pytest.param(3, 2, 16, torch.float32, (0.8, 1.0, 0), 4, id="B3-T2-V16-depth1-fp32"),
    pytest.param(4, 7, 33, torch.float32, (1.0, 0.9, 0), 16, id="B4-T7-V33-topp-fp32"),
    pytest.param(4, 13, 50, torch.float16, (0.7, 1.0, 8), 16, id="B4-T13-V50-topk-fp16"),
    pytest.param(3, 45, 40, torch.float32, (1.2, 0.95, 20), 64, id="B3-T45-V40-W2-fp32"),
    pytest.param(2, 60, 100, torch.float16, (0.5, 0.9, 30), 32, id="B2-T60-V100-all-fp16"),
]


@requires_triton
@pytest.mark.parametrize("B,T,V,dtype,params,block_v", SAMPLE_CASES)
def test_triton_matches_reference(B, T, V, dtype, params, block_v):
    from eagle2_kernels.ops.verify_sample.kernel import verify_sample as triton_verify_sample

    dev = triton_device()
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + V)
    parents, tokens = random_tree(B, T, V, gen)
    logits = (torch.randn(B, T, V, generator=gen) * 2).to(dtype)
    tokens = likely_tokens(parents, tokens, logits)
    tree = make_tree(parents, tokens, device=dev)
    logits = logits.to(dev)
    for rep in range(3):
        u = torch.rand(B, T, generator=gen).to(dev)
        expected = ref_verify_sample(tree, logits, u, *params)
        got = verify_sample(tree, logits, u, *params, backend="triton")
        small = triton_verify_sample(tree, logits, u, *params, block_v=block_v)  # many V blocks
        for name, e, g, s in zip(("path", "accept_len", "bonus"), expected, got, small):
            assert g.dtype == torch.int64 and g.device == logits.device, name
            assert torch.equal(g, e), f"{name}: {g.tolist()} != {e.tolist()}"
            assert torch.equal(s, e), f"{name} (BLOCK_V={block_v}): {s.tolist()} != {e.tolist()}"


@requires_triton
def test_triton_hand_cases_match():
    # the renormalisation / zero-probability / out-of-vocab cases, through the kernel
    dev = triton_device()
    tree = make_tree([[-1, 0, 0, 0, 1]] * 4, [[9, 0, 1, 7, 2]] * 4, device=dev, token_dtype=torch.int32)
    logits = torch.zeros(4, 5, 4, device=dev)
    u = torch.tensor(
        [[0.1, 0.25, 0.3, 0.0, 0.9], [0.7, 0.0, 0.9, 0.0, 0.1], [0.2, 0.5, 0.34, 0.0, 0.0], [0.99, 0.9, 0.9, 0.0, 0.0]],
        device=dev,
    )
    expected = ref_verify_sample(tree, logits, u, 1.0)
    assert expected[0][:, :3].tolist() == [[0, 2, -1], [0, 1, 4], [0, -1, -1], [0, -1, -1]]
    got = verify_sample(tree, logits, u, 1.0, backend="triton")
    for e, g in zip(expected, got):
        assert torch.equal(g, e)


@requires_triton
def test_triton_float_guard_and_repeated_sibling_tokens():
    from eagle2_kernels.ops.verify_sample.kernel import launch_on_probs

    dev = triton_device()
    # sequence b has the same probability row at every node
    tree = make_tree([[-1, 0, 0]] * 3, [[0, 1, 1]] * 3, device=dev)
    rows = torch.tensor([[0.5, 0.25, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    probs = rows[:, None, :].expand(3, 3, 4).contiguous().to(dev)
    u = torch.tensor([[0.9, 0.0, 0.0], [0.99, 0.5, 0.0], [0.2, 0.5, 0.0]], device=dev)
    path, n, bonus = launch_on_probs(tree, probs, u, block_v=2)
    # 0: node 1 accepted (0 < 0.25); at the leaf 0.9 exceeds the row sum 0.75: last nonzero id 1
    # 1: node 1 rejected (0.5 >= 0.5), residual [1, 0, 0, 0]; node 2 repeats token 1: p = 0
    # 2: node 1 rejected (0.5 >= 0.25); node 2 repeats token 1, now 0: rejected even at u = 0
    assert path.tolist() == [[0, 1, -1], [0, -1, -1], [0, -1, -1]] and n.tolist() == [2, 1, 1]
    assert bonus.tolist() == [1, 0, 0]
    assert probs[1, 0, 1] == 0 and probs[2, 0, 1] == 0  # rejected entries zeroed in place
    # the reference agrees on the repeated-token rule
    ref = ref_verify_sample(make_tree([[-1, 0, 0]] * 2, [[0, 1, 1]] * 2), torch.zeros(2, 3, 4),
                            torch.tensor([[0.2, 0.5, 0.0], [0.9, 0.5, 0.0]]), 1.0)
    assert ref[1].tolist() == [1, 1] and ref[2].tolist() == [0, 3]


# ---------------------------------------------------------------- statistics


#            0
#        /   |   \        node 3 holds a token removed by top-k (probability 0)
#       1    2    3
#      / \   |
#     4   5  6
#     |
#     7
STAT_PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]
STAT_PARAMS = (0.8, 0.95, 7)  # temperature, top_p, top_k
STAT_V = 10
N_SAMPLES = 20_000


@pytest.fixture(scope="module")
def stat_setup():
    gen = torch.Generator().manual_seed(1234)
    logits = torch.randn(len(STAT_PARENTS), STAT_V, generator=gen) * 1.2
    probs = process_logits(logits, *STAT_PARAMS)
    ranked = probs.argsort(dim=-1, descending=True, stable=True)
    tokens = [0] * len(STAT_PARENTS)
    tokens[1], tokens[2], tokens[3] = int(ranked[0, 0]), int(ranked[0, 1]), int(ranked[0, -1])
    tokens[4], tokens[5] = int(ranked[1, 0]), int(ranked[1, 2])
    tokens[6] = int(ranked[2, 1])
    tokens[7] = int(ranked[4, 0])
    assert probs[0, tokens[3]] == 0  # removed by top-k
    one = make_tree(STAT_PARENTS, tokens)
    tree = DraftTree(*(x.expand(N_SAMPLES, *x.shape[1:]) for x in (one.tokens, one.parents, one.depth, one.mask)))
    u = torch.rand(N_SAMPLES, len(STAT_PARENTS), generator=gen)
    batch_logits = logits.expand(N_SAMPLES, -1, -1)
    path, n, bonus = verify_sample(tree, batch_logits, u, *STAT_PARAMS, backend="reference")
    return dict(logits=logits, probs=probs, tokens=torch.tensor(tokens), tree=tree, u=u, path=path, n=n, bonus=bonus)


def emitted(setup, k):
    """The k-th emitted token (k = 1: first) and whether it exists (the round emits n tokens)."""
    path, n, bonus, tokens = setup["path"], setup["n"], setup["bonus"], setup["tokens"]
    node = path[:, k].clamp(min=0)
    tok = torch.where(n > k, tokens[node], bonus)
    return tok, n >= k


def test_first_token_follows_processed_root_distribution(stat_setup):
    first, _ = emitted(stat_setup, 1)
    counts = torch.bincount(first, minlength=STAT_V)
    assert chi2_pvalue(counts, stat_setup["probs"][0]) > ALPHA
    # the acceptance path is exercised: some first tokens come from accepted children
    assert (stat_setup["n"] >= 2).float().mean() > 0.3 and (stat_setup["n"] >= 4).any()
    # and the same test rejects the distribution without temperature / top-k / top-p
    wrong = stat_setup["logits"][0].softmax(-1)
    assert chi2_pvalue(counts, wrong) < ALPHA


@pytest.mark.parametrize("node", [1, 2, 4], ids=["after-node1", "after-node2", "after-node4"])
def test_next_token_conditional_on_accepted_node(stat_setup, node):
    # given that the path goes through `node`, the token after it follows p at `node`
    path, tree = stat_setup["path"], stat_setup["tree"]
    depth = int(tree.depth[0, node])
    through = path[:, depth] == node
    assert through.sum() > 1000
    nxt, _ = emitted(stat_setup, depth + 1)
    counts = torch.bincount(nxt[through], minlength=STAT_V)
    assert chi2_pvalue(counts, stat_setup["probs"][node]) > ALPHA


def test_wrong_scheme_is_detected(stat_setup):
    # a classic bug: trying later siblings against p WITHOUT renormalising after a rejection
    probs = stat_setup["probs"].double()
    u = stat_setup["u"]
    kids = [1, 2, 3]
    p = probs[0].expand(N_SAMPLES, -1).clone()
    first = torch.full((N_SAMPLES,), -1, dtype=torch.long)
    for k in kids:
        tok = int(stat_setup["tokens"][k])
        take = (first < 0) & (u[:, k] < probs[0, tok])
        first = torch.where(take, tok, first)
        p[:, tok] = 0
    p = p / p.sum(-1, keepdim=True)
    first = torch.where(first < 0, sample_from_probs(p, u[:, 0]), first)
    counts = torch.bincount(first, minlength=STAT_V)
    assert chi2_pvalue(counts, stat_setup["probs"][0]) < ALPHA


@requires_triton
def test_triton_matches_reference_on_statistical_tree(stat_setup):
    dev = triton_device()
    m = 64  # a slice of the statistical batch: the kernel reproduces it draw for draw
    t = stat_setup["tree"]
    tree = DraftTree(*(x[:m].to(dev) for x in (t.tokens, t.parents, t.depth, t.mask)))
    logits = stat_setup["logits"].expand(m, -1, -1).to(dev)
    got = verify_sample(tree, logits, stat_setup["u"][:m].to(dev), *STAT_PARAMS, backend="triton")
    for name, g in zip(("path", "n", "bonus"), got):
        assert torch.equal(g.cpu(), stat_setup[name][:m]), name


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
    reaches the Triton kernels), with and without top-k / top-p."""
    dev = triton_device()
    gen = torch.Generator().manual_seed(V)
    parents, tokens = random_tree(4, 60, V, gen)
    logits = (torch.randn(4, 60, V, generator=gen) * 3).to(dtype)
    tokens = likely_tokens(parents, tokens, logits)
    tree = make_tree(parents, tokens, device=dev)
    logits = logits.to(dev)
    for params in [(1.0, 1.0, 0), (0.7, 0.9, 50)]:
        u = torch.rand(4, 60, generator=gen).to(dev)
        expected = ref_verify_sample(tree, logits, u, *params)
        got = verify_sample(tree, logits, u, *params, backend="triton")
        for e, g in zip(expected, got):
            assert torch.equal(g, e)


# ---------------------------------------------------------------- GPU compilation without a GPU

_COMPILE_SCRIPT = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("skip:", exc); sys.exit(77)
import os
import shutil

# Skip only when no ptxas exists at all (Triton's bundled one, the TRITON_PTXAS*_PATH
# overrides, or one on PATH); a compile error once ptxas is there is a failure, even when its
# message mentions ptxas (that is the error this test exists to catch).
_bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_candidates = [os.environ.get("TRITON_PTXAS_PATH"), os.environ.get("TRITON_PTXAS_BLACKWELL_PATH"),
               os.path.join(_bundled, "ptxas"), os.path.join(_bundled, "ptxas-blackwell"), shutil.which("ptxas")]
if not any(c and os.path.isfile(c) and os.access(c, os.X_OK) for c in _candidates):
    print("skip: no ptxas (neither Triton's bundled one nor one on PATH)"); sys.exit(77)
from eagle2_kernels.ops.verify_greedy import kernel as g
from eagle2_kernels.ops.verify_sample import kernel as s

i32, i64 = "i32", "i64"
kernels = [
    (g._row_argmax_kernel, dict(logits_ptr="*bf16", part_val_ptr="*fp32", part_idx_ptr="*i32",
        stride_logits_b=i64, stride_logits_t=i64, stride_logits_v=i32, T=i32, V=i32, CHUNK=i32,
        NUM_SPLITS=i32, BLOCK_V="constexpr"), dict(BLOCK_V=2048), 8),
    (g._greedy_walk_kernel, dict(tokens_ptr="*i64", parents_ptr="*i32", part_val_ptr="*fp32",
        part_idx_ptr="*i32", path_ptr="*i64", accept_len_ptr="*i64", bonus_ptr="*i64",
        stride_tokens_b=i32, stride_tokens_t=i32, stride_parents_b=i32, stride_parents_t=i32,
        stride_path_b=i32, T=i32, NUM_SPLITS=i32, T_PAD="constexpr", S_PAD="constexpr"),
        dict(T_PAD=64, S_PAD=4), 1),
    (s._sample_walk_kernel, dict(tokens_ptr="*i64", parents_ptr="*i32", probs_ptr="*fp32",
        rowsum_ptr="*fp64", uniforms_ptr="*fp32", path_ptr="*i64", accept_len_ptr="*i64",
        bonus_ptr="*i64", stride_tokens_b=i32, stride_tokens_t=i32, stride_parents_b=i32,
        stride_parents_t=i32, stride_probs_b=i64, stride_probs_t=i32, stride_rowsum_b=i32,
        stride_rowsum_t=i32, stride_uniforms_b=i32, stride_uniforms_t=i32, stride_path_b=i32,
        T=i32, V=i32, T_PAD="constexpr", BLOCK_V="constexpr"), dict(T_PAD=64, BLOCK_V=2048), 8),
]
for fn, sig, consts, warps in kernels:
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    except TypeError as exc:  # an older ASTSource API
        print("skip:", exc); sys.exit(77)
    for cap in (90,):
        triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps})
print("compiled")
"""


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="triton not installed")
def test_kernels_compile_for_gpu():
    # The interpreter does not see everything the GPU compiler rejects (non-constexpr globals,
    # type mismatches between branches): compile the verify kernels for sm_90 here.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout
