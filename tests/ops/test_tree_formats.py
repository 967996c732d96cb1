"""Tree interchange: DraftTree <-> SGLang retrive_*, FlashInfer custom_mask, TensorRT-LLM packed
mask. Each forward converter is checked against an independent, loop-based rebuild of the
engine's own construction (SGLang's build_tree child-list insertion, numpy.packbits with
bitorder="little", TensorRT-LLM's bit-string packing), then both ways round-trip."""

from __future__ import annotations

import random

import pytest
import torch

from trees import make_tree
from tolerances import FP32_ABS

import eagle2_kernels.ops as ops
from eagle2_kernels.ops import tree_formats as tf

np = pytest.importorskip("numpy")


def random_parents(T: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, T)]


def chain(T: int) -> list[int]:
    return [-1] + list(range(T - 1))


def star(T: int) -> list[int]:
    return [-1] + [0] * (T - 1)


def batch_tree(parent_lists, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = len(parent_lists[0])
    tokens = torch.randint(0, 1000, (len(parent_lists), T), generator=g)
    return make_tree(parent_lists, tokens)


def built_tree(B=3, T=13, seed=0):
    """A real tree from tree_build (children in candidate = decreasing-score order)."""
    g = torch.Generator().manual_seed(seed)
    C = max(30, T + 10)
    parents = torch.full((B, C), -1, dtype=torch.int64)
    scores = torch.zeros(B, C)
    for c in range(C):
        p = torch.randint(-1, c, (B,), generator=g) if c else torch.full((B,), -1)
        base = torch.where(p < 0, torch.zeros(B), scores.gather(1, p.clamp(min=0)[:, None])[:, 0])
        parents[:, c] = p
        scores[:, c] = base - torch.rand(B, generator=g)
    tokens = torch.stack([torch.randperm(4 * C, generator=g)[:C] for _ in range(B)])  # distinct
    return ops.tree_build(tokens, scores, parents, torch.arange(B), T, backend="reference")


# id -> per-sequence parent lists, from a seeded rng
TREES = {
    "one-node": lambda rng: [[-1]],
    "two-chain": lambda rng: [chain(2)],
    "star-T9": lambda rng: [star(9)],
    "chain-T33-W2": lambda rng: [chain(33)],
    "random-T32-B3": lambda rng: [random_parents(32, rng) for _ in range(3)],
    "random-T70-W3-B2": lambda rng: [random_parents(70, rng) for _ in range(2)],
    "random-T17-B2": lambda rng: [random_parents(17, rng) for _ in range(2)],
    "mixed-T31-B3": lambda rng: [chain(31), star(31), random_parents(31, rng)],
}


def tree_case(name: str):
    return batch_tree(TREES[name](random.Random(name)), seed=len(name))


CASE_IDS = list(TREES)


def assert_same_tree(a, b):
    for field in ("tokens", "parents", "depth", "mask"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and torch.equal(x, y), field


def test_readme_example_values():
    # The example tree of the README's "Tree formats" table, prefix length 2.
    tree = tf.tree_from_parents(torch.tensor([[5, 6, 7, 8]]), torch.tensor([[-1, 0, 0, 1]]))
    assert tree.mask.flatten().tolist() == [0b0001, 0b0011, 0b0101, 0b1011]
    assert [x.tolist() for x in tf.to_sglang(tree)] == [
        [[0, 1, 2, 3]], [[1, 3, -1, -1]], [[-1, 2, -1, -1]]]
    mask, ptr = tf.to_flashinfer_custom_mask(tree, [2])
    assert mask.tolist() == [0xC7, 0x73, 0xBD] and ptr.tolist() == [0, 3]
    assert tf.to_sglang_tree_mask(tree, "qlen_only_bitpacking").tolist() == [1, 3, 5, 11]


# ----------------------------------------------------------------------------- constructors


@pytest.mark.parametrize("name", CASE_IDS)
def test_tree_from_parents_matches_loop_construction(name):
    tree = tree_case(name)
    assert_same_tree(tf.tree_from_parents(tree.tokens, tree.parents), tree)
    assert_same_tree(tf.tree_from_mask(tree.mask, tree.tokens), tree)


def test_tree_from_parents_and_mask_reject_bad_input():
    tok = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"parents\[0, 2\]"):
        tf.tree_from_parents(tok, torch.tensor([[-1, 0, 2]]))
    with pytest.raises(ValueError, match="root"):
        tf.tree_from_parents(tok, torch.tensor([[0, 0, 0]]))
    with pytest.raises(TypeError, match="parents"):
        tf.tree_from_parents(tok, torch.tensor([[-1.0, 0, 0]]))
    good = make_tree([-1, 0, 1], [0, 0, 0]).mask
    # The ops' rule: a wrong dtype is a TypeError, a wrong shape a ValueError.
    with pytest.raises(TypeError, match="mask must be int32"):
        tf.tree_from_mask(good.long(), tok)
    with pytest.raises(ValueError, match="mask must be"):
        tf.tree_from_mask(good[:, :2], tok)
    for bad, why in [
        (good & ~torch.tensor([0, 1 << 0, 0], dtype=torch.int32)[None, :, None], "orphan row 1"),
        (good | torch.tensor([0, 0, 1 << 3], dtype=torch.int32)[None, :, None], "bit past T"),
        (good | torch.tensor([0, 1 << 2, 0], dtype=torch.int32)[None, :, None], "bit past row"),
        # row 2 = {1, 2}: parent 1, but the root is missing from its ancestor set
        (good & ~torch.tensor([0, 0, 1 << 0], dtype=torch.int32)[None, :, None], "not closed"),
        (good & ~torch.tensor([0, 1 << 1, 0], dtype=torch.int32)[None, :, None], "no self bit"),
    ]:
        with pytest.raises(ValueError, match="tree_from_mask"):
            tf.tree_from_mask(bad, tok)


# ----------------------------------------------------------------------------- SGLang


def sglang_links(parents: list[int]):
    """SGLang's build_tree insertion, rebuilt: nodes i = T-1 .. 1 are pushed to the front of
    their parent's child list, so lists end up in increasing node index."""
    T = len(parents)
    nxt_tok, nxt_sib = [-1] * T, [-1] * T
    for i in range(T - 1, 0, -1):
        p = parents[i]
        if nxt_tok[p] != -1:
            nxt_sib[i] = nxt_tok[p]
        nxt_tok[p] = i
    return nxt_tok, nxt_sib


def sglang_greedy_walk(nxt_tok, nxt_sib, tokens, predict):
    """SGLang's verify_tree_greedy on one request: the accepted node indices from the root."""
    path, cur = [0], 0
    while True:
        child = nxt_tok[cur]
        while child != -1 and tokens[child] != predict[cur]:
            child = nxt_sib[child]
        if child == -1:
            return path
        path.append(child)
        cur = child


@pytest.mark.parametrize("name", CASE_IDS)
def test_to_sglang_matches_build_tree_insertion(name):
    tree = tree_case(name)
    B, T = tree.tokens.shape
    idx, nxt_tok, nxt_sib = tf.to_sglang(tree)
    assert all(t.dtype == torch.int64 and t.shape == (B, T) for t in (idx, nxt_tok, nxt_sib))
    assert idx.flatten().tolist() == list(range(B * T))
    for b in range(B):
        want_tok, want_sib = sglang_links(tree.parents[b].tolist())
        assert nxt_tok[b].tolist() == want_tok and nxt_sib[b].tolist() == want_sib


@pytest.mark.parametrize("name", CASE_IDS)
def test_sglang_round_trips(name):
    tree = tree_case(name)
    idx, nxt_tok, nxt_sib = tf.to_sglang(tree)
    back = tf.from_sglang(nxt_tok, nxt_sib, tree.tokens, retrive_index=idx)
    assert_same_tree(back, tree)
    # int32 links work as well, and links -> tree -> links is the identity.
    again = tf.to_sglang(tf.from_sglang(nxt_tok.int(), nxt_sib.int(), tree.tokens))
    assert torch.equal(again[1], nxt_tok) and torch.equal(again[2], nxt_sib)


def test_from_sglang_any_sibling_order():
    # Root's children 1, 2, 3 linked as 3 -> 1 -> 2; node 1's children 4, 5 as 5 -> 4.
    parents = [-1, 0, 0, 0, 1, 1]
    nxt_tok = torch.tensor([[3, 5, -1, -1, -1, -1]])
    nxt_sib = torch.tensor([[-1, 2, -1, 1, -1, 4]])
    tokens = torch.arange(6)[None]
    tree = tf.from_sglang(nxt_tok, nxt_sib, tokens)
    assert tree.parents.tolist() == [parents]
    assert_same_tree(tree, make_tree(parents, tokens))


def test_sglang_greedy_walk_equals_verify_greedy():
    # SGLang's verify walk over our links accepts the same path as verify_greedy.
    tree = built_tree(B=4, T=20, seed=3)
    B, T = tree.tokens.shape
    _, nxt_tok, nxt_sib = tf.to_sglang(tree)
    g = torch.Generator().manual_seed(0)
    # Target logits whose argmax is a random child's token (any sibling, so the walk follows
    # sibling links) at 90% of the inner nodes, noise elsewhere.
    logits = torch.randn(B, T, 120, generator=g)
    rng = random.Random(0)
    for b in range(B):
        for i in range(T):
            kids = [j for j in range(T) if int(tree.parents[b, j]) == i]
            if kids and rng.random() < 0.9:
                logits[b, i, int(tree.tokens[b, rng.choice(kids)])] = 50.0
    path, accept_len, _ = ops.verify_greedy(tree, logits, backend="reference")
    predict = logits.argmax(-1)
    for b in range(B):
        walk = sglang_greedy_walk(nxt_tok[b].tolist(), nxt_sib[b].tolist(),
                                  tree.tokens[b].tolist(), predict[b].tolist())
        assert walk == path[b, : int(accept_len[b])].tolist()
    assert int(accept_len.max()) > 2  # the walks went deep somewhere


@pytest.mark.parametrize(
    "nxt_tok, nxt_sib, match",
    [
        pytest.param([1, 2, -1], [-1, 2, -1], "linked 2 times", id="node-linked-twice"),
        pytest.param([1, -1, -1], [-1, -1, -1], "linked 0 times", id="node-unreached"),
        pytest.param([-1, -1, -1], [-1, 2, 1], "parent", id="sibling-cycle"),
        pytest.param([2, -1, 1], [-1, -1, -1], "parent", id="child-before-parent"),
        pytest.param([1, 3, -1], [-1, -1, -1], "outside", id="link-out-of-range"),
        pytest.param([1, 0, -1], [-1, 2, -1], "root", id="root-linked"),
    ],
)
def test_from_sglang_rejects_non_trees(nxt_tok, nxt_sib, match):
    with pytest.raises(ValueError, match=match):
        tf.from_sglang(torch.tensor([nxt_tok]), torch.tensor([nxt_sib]), torch.zeros(1, 3).long())


def test_from_sglang_checks_retrive_index():
    tree = tree_case("random-T32-B3")
    idx, nt, ns = tf.to_sglang(tree)
    with pytest.raises(ValueError, match="retrive_index"):
        tf.from_sglang(nt, ns, tree.tokens, retrive_index=idx.flip(1))


def sglang_kernel_tree_mask(parent_lists, prefixes, mode):
    """SGLang's build_tree_efficient mask writes, rebuilt thread by thread: the buffer is
    pre-filled (True, or 0 when bit-packed); row tid sets its root column, clears the other
    tree columns, then sets the column of each node on its way up from tid."""
    T = len(parent_lists[0])
    if mode == "qlen_only_bitpacking":
        nbytes = 1 if T <= 8 else (2 if T <= 16 else 4)
        buf = [0] * (len(parent_lists) * T * nbytes)
        for b, parents in enumerate(parent_lists):
            for tid in range(T):
                row = (b * T + tid) * nbytes
                buf[row] |= 1
                n = tid
                while n > 0:
                    buf[row + n // 8] |= 1 << (n % 8)
                    n = parents[n]
        return buf
    full = mode == "full"
    sizes = [T * ((P if full else 0) + T) for P in prefixes]
    buf = [True] * sum(sizes)
    for b, parents in enumerate(parent_lists):
        P = prefixes[b] if full else 0
        seg = sum(sizes[:b])
        for tid in range(T):
            base = seg + (P + T) * tid + P  # column of the root
            buf[base] = True
            for i in range(1, T):
                buf[base + i] = False
            n = tid
            while n > 0:
                buf[base + n] = True
                n = parents[n]
    return buf


@pytest.mark.parametrize("mode", ["full", "qlen_only", "qlen_only_bitpacking"])
@pytest.mark.parametrize(
    "name, prefixes",
    [("one-node", [3]), ("two-chain", [0]), ("star-T9", [4]), ("random-T32-B3", [0, 7, 30]),
     ("mixed-T31-B3", [1, 2, 3]), ("random-T17-B2", [5, 0])],
)
def test_sglang_tree_mask_matches_build_tree_and_round_trips(name, prefixes, mode):
    tree = tree_case(name)
    got = tf.to_sglang_tree_mask(tree, mode, prefix_len=prefixes)
    want = sglang_kernel_tree_mask(tree.parents.tolist(), prefixes, mode)
    assert got.dtype == (torch.uint8 if mode == "qlen_only_bitpacking" else torch.bool)
    assert got.tolist() == want
    assert_same_tree(tf.from_sglang_tree_mask(got, mode, tree.tokens, prefix_len=prefixes), tree)


def test_sglang_tree_mask_limits():
    with pytest.raises(ValueError, match="32"):
        tf.to_sglang_tree_mask(tree_case("chain-T33-W2"), "qlen_only_bitpacking")
    with pytest.raises(ValueError, match="prefix_len"):
        tf.to_sglang_tree_mask(tree_case("star-T9"), "full")
    with pytest.raises(ValueError, match="mode"):
        tf.to_sglang_tree_mask(tree_case("star-T9"), "packed")
    tree = tree_case("star-T9")
    packed = tf.to_sglang_tree_mask(tree, "qlen_only_bitpacking")
    bad = packed.clone()
    bad[1] |= 0b10  # row 0, node 9: past T = 9
    with pytest.raises(ValueError, match="past node"):
        tf.from_sglang_tree_mask(bad, "qlen_only_bitpacking", tree.tokens)
    with pytest.raises(ValueError, match="uint8"):
        tf.from_sglang_tree_mask(packed[:-1], "qlen_only_bitpacking", tree.tokens)


# ----------------------------------------------------------------------------- FlashInfer


def flashinfer_expected(parent_lists, prefixes, packed):
    """Request by request: the [T, P + T] bool matrix from parent walks, flattened query-major,
    numpy.packbits(bitorder="little") per request (FlashInfer's segment_packbits semantics)."""
    segs = []
    for parents, P in zip(parent_lists, prefixes):
        T = len(parents)
        mat = np.zeros((T, P + T), dtype=bool)
        mat[:, :P] = True
        for i in range(T):
            j = i
            while j >= 0:
                mat[i, P + j] = True
                j = parents[j]
        flat = mat.reshape(-1)
        segs.append(np.packbits(flat, bitorder="little") if packed else flat)
    indptr = np.concatenate([[0], np.cumsum([s.size for s in segs])])
    return np.concatenate(segs), indptr


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "bool"])
@pytest.mark.parametrize(
    "name, prefixes",
    [
        ("one-node", [0]),
        ("one-node", [7]),
        ("two-chain", [3]),
        ("star-T9", [1]),
        ("chain-T33-W2", [5]),
        ("random-T32-B3", [0, 13, 100]),
        ("random-T70-W3-B2", [1, 6]),
        ("mixed-T31-B3", [2, 0, 9]),
    ],
)
def test_flashinfer_custom_mask_matches_packbits_and_round_trips(name, prefixes, packed):
    tree = tree_case(name)
    mask, indptr = tf.to_flashinfer_custom_mask(tree, torch.tensor(prefixes), packed=packed)
    want, want_ptr = flashinfer_expected(tree.parents.tolist(), prefixes, packed)
    assert mask.dtype == (torch.uint8 if packed else torch.bool)
    assert indptr.dtype == torch.int32 and indptr.tolist() == want_ptr.tolist()
    assert mask.numpy().tolist() == want.tolist()
    back = tf.from_flashinfer_custom_mask(mask, indptr, prefixes, tree.tokens)
    assert_same_tree(back, tree)


def test_flashinfer_custom_mask_drives_attention_like_tree_attention():
    # The unpacked custom_mask of request b, reshaped [T, P + T], as SDPA's boolean mask over
    # the request's prefix + tree keys gives tree_attention's output.
    tree = built_tree(B=2, T=12, seed=2)
    prefixes = [5, 0]
    mask, qk_ptr = tf.to_flashinfer_custom_mask(tree, prefixes, packed=False)
    g = torch.Generator().manual_seed(0)
    B, T, H, Dh = 2, 12, 2, 8
    q = torch.randn(B, H, T, Dh, generator=g)
    k = torch.randn(B, H, max(prefixes) + T, Dh, generator=g)
    v = torch.randn(B, H, max(prefixes) + T, Dh, generator=g)
    want = ops.tree_attention(q, k, v, torch.tensor(prefixes), tree.mask, T, backend="reference")
    for b, P in enumerate(prefixes):
        m = mask[int(qk_ptr[b]): int(qk_ptr[b + 1])].view(T, P + T)
        got = torch.nn.functional.scaled_dot_product_attention(
            q[b], k[b, :, : P + T], v[b, :, : P + T], attn_mask=m)
        torch.testing.assert_close(got, want[b], **FP32_ABS)


def test_flashinfer_little_bit_order_by_hand():
    # Root + one child, prefix 2: rows [1 1 1 0], [1 1 1 1] -> bits 0-2 and 4-7 -> 0b11110111.
    tree = make_tree([-1, 0], [4, 5])
    mask, ptr = tf.to_flashinfer_custom_mask(tree, [2])
    assert mask.tolist() == [0b11110111] and ptr.tolist() == [0, 1]
    # Two requests: each segment starts on its own byte (9 bits -> 2 bytes, then 1 byte).
    tree2 = make_tree([[-1, 0], [-1, 0]], [[1, 2], [3, 4]])
    mask, ptr = tf.to_flashinfer_custom_mask(tree2, [2, 0])
    # request 0: 8 bits = 1 byte as above; request 1 (prefix 0): rows [1 0], [1 1] -> 0b1101.
    assert ptr.tolist() == [0, 1, 2] and mask.tolist() == [0b11110111, 0b1101]
    # Prefix 3: request 0 has 2 x 5 = 10 bits (1111 0 | 11111) -> 2 bytes, then request 1's.
    mask, ptr = tf.to_flashinfer_custom_mask(tree2, [3, 0])
    assert ptr.tolist() == [0, 2, 3]
    assert mask.tolist() == [0b11101111, 0b11, 0b1101]


def test_from_flashinfer_rejects_bad_masks():
    tree = make_tree([-1, 0, 0], [1, 2, 3])
    mask, ptr = tf.to_flashinfer_custom_mask(tree, [4], packed=False)
    hidden = mask.clone()
    hidden[1] = False  # query 0 does not see prefix key 1
    with pytest.raises(ValueError, match="prefix"):
        tf.from_flashinfer_custom_mask(hidden, ptr, [4], tree.tokens)
    sibling = mask.clone()
    sibling[1 * 7 + 4 + 2] = True  # node 1 sees its sibling 2
    with pytest.raises(ValueError, match="ancestor"):
        tf.from_flashinfer_custom_mask(sibling, ptr, [4], tree.tokens)
    packed, pptr = tf.to_flashinfer_custom_mask(tree, [4])
    with pytest.raises(ValueError, match="segment 0"):
        tf.from_flashinfer_custom_mask(packed, pptr, [7], tree.tokens)  # 30 bits: 4 bytes
    with pytest.raises(ValueError, match="prefix_len"):
        tf.to_flashinfer_custom_mask(tree, [4, 1])


# ----------------------------------------------------------------------------- TensorRT-LLM


def trtllm_pack(bool_rows: list[list[bool]]) -> list[list[int]]:
    """TensorRT-LLM's getSpecDecodingPackedMask, rebuilt: the row's bits as a string with
    node 0 last, cut into 32-character chunks from the right, each read as a base-2 int32."""
    out = []
    for row in bool_rows:
        n = len(row)
        s = "".join("1" if row[n - 1 - k] else "0" for k in range(n))  # node n-1 first
        words = []
        for w in range((n + 31) // 32):
            end = n - 32 * w
            chunk = s[max(0, end - 32): end]
            v = int(chunk, 2)
            words.append(v - (1 << 32) if v >= 1 << 31 else v)
        out.append(words)
    return out


@pytest.mark.parametrize("name", CASE_IDS)
def test_trtllm_packed_mask_is_bit_identical_to_draft_tree_mask(name):
    tree = tree_case(name)
    B, T = tree.tokens.shape
    packed = tf.to_trtllm_packed_mask(tree)
    assert packed.dtype == torch.int32 and packed.shape == (B, T, (T + 31) // 32)
    assert packed.data_ptr() != tree.mask.data_ptr()
    for b in range(B):
        parents = tree.parents[b].tolist()
        rows = []
        for i in range(T):
            anc, j = set(), i
            while j >= 0:
                anc.add(j)
                j = parents[j]
            rows.append([j in anc for j in range(T)])
        assert packed[b].tolist() == trtllm_pack(rows)
    assert torch.equal(packed, tree.mask)
    assert_same_tree(tf.from_trtllm_packed_mask(packed, tree.tokens), tree)


def test_trtllm_matches_tree_build_output():
    tree = built_tree(B=2, T=40, seed=5)  # W = 2, bit 31 in use
    assert torch.equal(tf.to_trtllm_packed_mask(tree), tree.mask)
    assert_same_tree(tf.from_trtllm_packed_mask(tree.mask, tree.tokens), tree)
    assert_same_tree(tf.from_sglang(*tf.to_sglang(tree)[1:], tree.tokens), tree)


def test_converters_keep_the_device_and_skip_host_reads_where_documented():
    tree = tree_case("random-T32-B3")
    for t in tf.to_sglang(tree) + (tf.to_trtllm_packed_mask(tree),):
        assert t.device == tree.parents.device


@pytest.mark.cuda
def test_cuda_converters_match_cpu():
    tree = built_tree(B=4, T=60, seed=1)
    dev = tree.to("cuda")
    for a, b in zip(tf.to_sglang(dev), tf.to_sglang(tree)):
        assert torch.equal(a.cpu(), b)
    m, p = tf.to_flashinfer_custom_mask(dev, torch.tensor([5, 0, 300, 17], device="cuda"))
    mc, pc = tf.to_flashinfer_custom_mask(tree, [5, 0, 300, 17])
    assert torch.equal(m.cpu(), mc) and torch.equal(p.cpu(), pc)
    assert_same_tree(tf.from_sglang(*tf.to_sglang(dev)[1:], dev.tokens).to("cpu"), tree)
