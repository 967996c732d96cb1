"""kv_compact_paged: bit-exact against a slot-by-slot model of the pool and against the dense
kv_compact on the cache the pages were scattered from; overlapping moves, moves across page
boundaries, strided page layouts."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import requires_triton, triton_device
from tolerances import FP32_TIGHT
from eagle2_kernels.ops.kv_compact_paged.reference import kv_compact_paged as ref_paged

import eagle2_kernels.ops as ops

INTERP_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8]
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_INTS[x.element_size()])


def random_bits(shape, dtype, seed=0) -> torch.Tensor:
    """Random bit patterns (NaN payloads and infinities included for float dtypes)."""
    g = torch.Generator().manual_seed(seed)
    ints = _INTS[torch.empty(0, dtype=dtype).element_size()]
    info = torch.iinfo(ints)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=ints).view(dtype)


def random_path(T: int, accepted: int, rng: random.Random) -> list[int]:
    nodes = [0] + sorted(rng.sample(range(1, T), accepted - 1)) if accepted else []
    return nodes + [-1] * (T - len(nodes))


def make_pool(N, B, Hkv, Dh, lengths, page_size, dtype, seed=0, layout="plain", slack=2):
    """A pool [N, num_blocks, page_size, Hkv, Dh] of random bits with shuffled pages, spare
    pages, and block-table entries past each sequence's pages set to -1."""
    rng = random.Random(seed)
    need = [math.ceil(n / page_size) for n in lengths]
    nb = sum(need) + 3
    ids = list(range(nb))
    rng.shuffle(ids)
    table = torch.full((B, max(need) + slack), -1, dtype=torch.int32)
    for b in range(B):
        for m in range(need[b]):
            table[b, m] = ids.pop()
    if layout == "plain":
        pool = random_bits((N, nb, page_size, Hkv, Dh), dtype, seed)
    elif layout == "nhd":  # FlashInfer NHD per layer: storage [nb, layers, 2, ps, Hkv, Dh]
        storage = random_bits((nb, N // 2, 2, page_size, Hkv, Dh), dtype, seed)
        pool = storage.permute(1, 2, 0, 3, 4, 5).flatten(0, 1)
    else:  # "hnd": storage [N, nb, Hkv, ps, Dh] seen as [N, nb, ps, Hkv, Dh]
        pool = random_bits((N, nb, Hkv, page_size, Dh), dtype, seed).transpose(2, 3)
    return pool, table


def expected(pool, table, prefix_len, path, accept_len):
    """Slot by slot from an untouched copy, with the page arithmetic done in Python ints."""
    before, out = pool.clone(), pool.clone()
    ps = pool.shape[2]
    for b in range(path.shape[0]):
        P = int(prefix_len[b])
        for j in range(int(accept_len[b])):
            s, d = P + int(path[b, j]), P + j
            sp, dp = int(table[b, s // ps]), int(table[b, d // ps])
            out[:, dp, d % ps] = before[:, sp, s % ps]
    return out


def gather_dense(pool, table, lengths):
    """Logical view [N, B, Hkv, max_len, Dh] of the pool (zeros past each length)."""
    N, _, ps, Hkv, Dh = pool.shape
    out = torch.zeros(N, len(lengths), Hkv, max(lengths), Dh, dtype=pool.dtype)
    for b, n in enumerate(lengths):
        for pos in range(n):
            out[:, b, :, pos] = pool[:, int(table[b, pos // ps]), pos % ps]
    return out


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("page_size", [1, 2, 3], ids=lambda p: f"page{p}")
@pytest.mark.parametrize(
    "path, accepted",
    [
        pytest.param([0, 2, 3, -1, -1, -1], 3, id="0-2-3-overlap"),
        pytest.param([0, 1, 3, -1, -1, -1], 3, id="0-1-3"),
        pytest.param([0, 3, 4, 5, -1, -1], 4, id="0-3-4-5"),
        pytest.param([0, 1, 2, 3, 4, 5], 6, id="full-chain-identity"),
        pytest.param([0, 5, -1, -1, -1, -1], 2, id="root-and-last"),
        pytest.param([0, -1, -1, -1, -1, -1], 1, id="root-only"),
        pytest.param([-1] * 6, 0, id="nothing"),
    ],
)
def test_reference_hand_made(path, accepted, page_size):
    pool, table = make_pool(4, 1, 2, 3, [2 + 6], page_size, torch.float32, seed=page_size)
    p, a, pre = torch.tensor([path]), torch.tensor([accepted]), torch.tensor([2])
    want = expected(pool, table, pre, p, a)
    out = ref_paged(pool, table, pre, p, a)
    assert out is pool and torch.equal(bits(pool), bits(want))


def test_reference_equals_dense_kv_compact_on_scattered_cache():
    rng = random.Random(0)
    for trial in range(4):
        B, T, ps = 3, rng.randrange(2, 30), rng.choice([1, 4, 7])
        prefixes = [rng.randrange(0, 25) for _ in range(B)]
        lengths = [p + T for p in prefixes]
        pool, table = make_pool(4, B, 2, 8, lengths, ps, torch.float32, seed=trial)
        dense = gather_dense(pool, table, lengths)
        accept = torch.tensor([rng.randrange(0, T + 1) for _ in range(B)])
        path = torch.tensor([random_path(T, int(a), rng) for a in accept])
        prefix = torch.tensor(prefixes)
        ops.kv_compact(dense, prefix, path, accept, backend="reference")
        ref_paged(pool, table, prefix, path, accept)
        assert torch.equal(bits(gather_dense(pool, table, lengths)), bits(dense))


def test_reference_rejects_out_of_range():
    pool, table = make_pool(2, 1, 1, 4, [6], 2, torch.float32, slack=0)
    with pytest.raises(ValueError, match="block-table row"):
        ref_paged(pool, table, torch.tensor([3]), torch.tensor([[0, 4]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="padding"):
        ref_paged(pool, table, torch.tensor([0]), torch.tensor([[0, -1]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="accept_len"):
        ref_paged(pool, table, torch.tensor([0]), torch.tensor([[0, 1]]), torch.tensor([3]))
    bad = table.clone()
    bad[0, 1] = 99
    with pytest.raises(ValueError, match="outside the pool"):
        ref_paged(pool, bad, torch.tensor([1]), torch.tensor([[0, 2]]), torch.tensor([2]))


@pytest.mark.parametrize(
    "args, exc, match",
    [
        pytest.param(dict(kv_pages=torch.zeros(2, 4, 2, 4)), ValueError, "kv_pages", id="pool-rank"),
        pytest.param(dict(kv_pages=[0.0]), TypeError, "kv_pages", id="pool-list"),
        pytest.param(dict(path=torch.zeros(1, 3)), TypeError, "path", id="path-float"),
        pytest.param(dict(path=torch.zeros(3, dtype=torch.int64)), ValueError, "path", id="path-rank"),
        pytest.param(dict(block_table=torch.zeros(2, 3, dtype=torch.int32)), ValueError, "block_table",
                     id="table-batch"),
        pytest.param(dict(block_table=torch.zeros(1, 3)), TypeError, "block_table", id="table-float"),
        pytest.param(dict(prefix_len=torch.zeros(1, dtype=torch.int16)), TypeError, "prefix_len",
                     id="prefix-int16"),
        pytest.param(dict(accept_len=torch.zeros(2, dtype=torch.int64)), ValueError, "accept_len",
                     id="accept-shape"),
    ],
)
def test_public_input_checks(args, exc, match):
    kw = dict(kv_pages=torch.zeros(2, 4, 2, 1, 4), block_table=torch.tensor([[0, 1, 2]]),
              prefix_len=torch.tensor([0]), path=torch.tensor([[0, 1, -1]]),
              accept_len=torch.tensor([2]))
    kw.update(args)
    with pytest.raises(exc, match=match):
        ops.kv_compact_paged(**kw, backend="reference")


def test_torch_op_registration():
    import eagle2_kernels  # noqa: F401  (registers the ops)

    pool, table = make_pool(4, 2, 2, 8, [9, 6], 4, torch.float32, seed=3)
    args = (table, torch.tensor([5, 2]), torch.tensor([[0, 2, -1], [0, 1, 3]]),
            torch.tensor([2, 3]))
    torch.library.opcheck(torch.ops.eagle2.kv_compact_paged.default, (pool.clone(), *args))
    a, b = pool.clone(), pool.clone()
    assert torch.ops.eagle2.kv_compact_paged(a, *args) is None
    ops.kv_compact_paged(b, *args)
    assert torch.equal(bits(a), bits(b)) and not torch.equal(bits(a), bits(pool))


def test_round_on_pages_equals_round_on_dense_cache():
    # A verify round on pages and on the dense cache: tree attention over prefix + tree,
    # greedy verify, compaction, then the next step's attention over the committed prefix.
    # The paged ops must give the dense ops' results at every step.
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Dh, T, ps = 2, 4, 2, 8, 9, 3
    prefixes = [7, 2]
    C = 20
    cand_parents = torch.full((B, C), -1, dtype=torch.int64)
    scores = torch.zeros(B, C)
    for c in range(C):
        p = torch.randint(-1, c, (B,), generator=g) if c else torch.full((B,), -1)
        base = torch.where(p < 0, torch.zeros(B), scores.gather(1, p.clamp(min=0)[:, None])[:, 0])
        cand_parents[:, c], scores[:, c] = p, base - torch.rand(B, generator=g)
    tokens = torch.randint(0, 16, (B, C), generator=g)
    tree = ops.tree_build(tokens, scores, cand_parents, torch.tensor([1, 2]), T)
    lengths = [p + T for p in prefixes]
    dense_k = torch.randn(B, Hkv, max(lengths) + 4, Dh, generator=g)
    dense_v = torch.randn(B, Hkv, max(lengths) + 4, Dh, generator=g)
    # One layer: N = 2 (K, V) page tensors and the [2, B, Hkv, L, Dh] dense cache.
    pool_k, table = make_pool(1, B, Hkv, Dh, lengths, ps, torch.float32, seed=1)
    pool_v, _ = make_pool(1, B, Hkv, Dh, lengths, ps, torch.float32, seed=1)
    pool = torch.cat([pool_k, pool_v])
    for b in range(B):
        for pos in range(lengths[b]):
            pg, sl = int(table[b, pos // ps]), pos % ps
            pool[0, pg, sl], pool[1, pg, sl] = dense_k[b, :, pos], dense_v[b, :, pos]
    dense = torch.stack([dense_k, dense_v])
    prefix = torch.tensor(prefixes)
    q = torch.randn(B, Hq, T, Dh, generator=g)
    a_dense = ops.tree_attention(q, dense[0], dense[1], prefix, tree.mask, T)
    a_paged = ops.tree_attention_paged(q, pool[0], pool[1], table, prefix, tree.mask, T)
    torch.testing.assert_close(a_paged, a_dense, **FP32_TIGHT)
    logits = torch.randn(B, T, 16, generator=g)
    for b in range(B):  # make the target agree with the deepest branch often
        for i in range(T):
            kids = (tree.parents[b] == i).nonzero().flatten()
            if len(kids):
                logits[b, i, tree.tokens[b, kids[-1]]] = 9.0
    path, accept, _ = ops.verify_greedy(tree, logits)
    assert int(accept.min()) >= 2
    ops.kv_compact(dense, prefix, path, accept)
    ops.kv_compact_paged(pool, table, prefix, path, accept)
    committed = prefix + accept
    q1 = torch.randn(B, Hq, 1, Dh, generator=g)
    none = torch.zeros(B, 1, 1, dtype=torch.int32)
    n_dense = ops.tree_attention(q1, dense[0], dense[1], committed, none, 0)
    n_paged = ops.tree_attention_paged(q1, pool[0], pool[1], table, committed, none, 0)
    torch.testing.assert_close(n_paged, n_dense, **FP32_TIGHT)


# ----------------------------------------------------------------------------- triton


@requires_triton
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_triton_overlapping_paths_bit_exact(dtype):
    # Seq 0: [0, 2, 3] (reads and writes logical p+2) with pages of 2 (moves cross pages);
    # seq 1: [0, 1, 3]; seq 2: nothing accepted; seq 3: root only.
    dev = triton_device()
    prefixes = [3, 0, 5, 9]
    pool, table = make_pool(6, 4, 2, 8, [p + 5 for p in prefixes], 2, dtype, seed=1)
    prefix = torch.tensor(prefixes, dtype=torch.int32)
    path = torch.tensor([[0, 2, 3, -1, -1], [0, 1, 3, -1, -1], [-1] * 5, [0, -1, -1, -1, -1]],
                        dtype=torch.int32)
    accept = torch.tensor([3, 3, 0, 1], dtype=torch.int32)
    want = expected(pool, table, prefix, path, accept)
    mine = pool.to(dev)
    out = ops.kv_compact_paged(mine, table.to(dev), prefix.to(dev), path.to(dev), accept.to(dev),
                               backend="triton")
    assert out is mine and torch.equal(bits(mine.cpu()), bits(want))


# id, N, B, Hkv, T, Dh, page_size, layout
SHAPES = [
    ("N4-B1-T7-Dh16-page1", 4, 1, 1, 7, 16, 1, "plain"),
    ("N6-B3-T60-Dh64-page16", 6, 3, 2, 60, 64, 16, "plain"),
    ("N2-B2-T130-Dh128-colsplit-page5", 2, 2, 2, 130, 128, 5, "plain"),
    ("N4-B2-T33-Dh48-nhd-page3", 4, 2, 3, 33, 48, 3, "nhd"),
    ("N2-B2-T9-Dh8-hnd-page4", 2, 2, 2, 9, 8, 4, "hnd"),
    ("N2-B1-T1-Dh8-page2", 2, 1, 1, 1, 8, 2, "plain"),
]


@requires_triton
@pytest.mark.parametrize("N, B, Hkv, T, Dh, page_size, layout",
                         [pytest.param(*s[1:], id=s[0]) for s in SHAPES])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_triton_random_paths(N, B, Hkv, T, Dh, page_size, layout, index_dtype):
    rng = random.Random(N * 1000 + T)
    dev = triton_device()
    prefixes = [rng.randrange(0, 20) for _ in range(B)]
    dtype = rng.choice([torch.float16, torch.float32])
    pool, table = make_pool(N, B, Hkv, Dh, [p + T for p in prefixes], page_size, dtype,
                            seed=T, layout=layout)
    accept = [rng.randrange(0, T + 1) for _ in range(B)]
    rows = [random_path(T, a, rng) for a in accept]
    if T > 2:  # sequence 0: the root, then nodes 2..T-1: each row reads the slot the next writes
        rows[0], accept[0] = [0] + list(range(2, T)) + [-1], T - 1
    path = torch.tensor(rows, dtype=index_dtype)
    prefix = torch.tensor(prefixes, dtype=index_dtype)
    accept_t = torch.tensor(accept, dtype=index_dtype)
    want = expected(pool, table, prefix, path, accept_t)
    mine = pool.to(dev)
    ops.kv_compact_paged(mine, table.to(index_dtype).to(dev), prefix.to(dev), path.to(dev),
                         accept_t.to(dev), backend="triton")
    assert torch.equal(bits(mine.cpu()), bits(want))


@requires_triton
@pytest.mark.parametrize("engine", ["vllm", "flashinfer-nhd", "flashinfer-hnd"])
def test_triton_per_layer_engine_views(engine):
    # One call per layer (N = 2) on the engine's own per-layer tensor, passed as a view.
    dev = triton_device()
    rng = random.Random(len(engine))
    nb, ps, Hkv, Dh, T = 9, 4, 2, 8, 6
    shape = {"vllm": (2, nb, ps, Hkv, Dh), "flashinfer-nhd": (nb, 2, ps, Hkv, Dh),
             "flashinfer-hnd": (nb, 2, Hkv, ps, Dh)}[engine]
    view = {"vllm": lambda kv: kv, "flashinfer-nhd": lambda kv: kv.transpose(0, 1),
            "flashinfer-hnd": lambda kv: kv.transpose(0, 1).transpose(2, 3)}[engine]
    kv = random_bits(shape, torch.float16, seed=2)
    table = torch.tensor([[4, 0, 7, -1], [1, 8, 3, 5]], dtype=torch.int32)
    prefix = torch.tensor([5, 9])
    path = torch.tensor([random_path(T, 4, rng), random_path(T, 3, rng)])
    accept = torch.tensor([4, 3])
    want = expected(view(kv), table, prefix, path, accept)
    mine = kv.to(dev)
    ops.kv_compact_paged(view(mine), table.to(dev), prefix.to(dev), path.to(dev), accept.to(dev),
                         backend="triton")
    assert torch.equal(bits(view(mine).cpu()), bits(want))


@requires_triton
def test_triton_matches_reference_randomized():
    rng = random.Random(7)
    dev = triton_device()
    for trial in range(4):
        N, B, Hkv = 2 * rng.randrange(1, 4), rng.randrange(1, 4), rng.randrange(1, 3)
        T, Dh, ps = rng.randrange(1, 50), rng.choice([8, 16, 32]), rng.choice([1, 2, 8, 16])
        prefixes = [rng.randrange(0, 40) for _ in range(B)]
        pool, table = make_pool(N, B, Hkv, Dh, [p + T for p in prefixes], ps, torch.float32,
                                seed=trial)
        accept = torch.tensor([rng.randrange(0, T + 1) for _ in range(B)])
        path = torch.tensor([random_path(T, int(a), rng) for a in accept])
        prefix = torch.tensor(prefixes)
        mine = pool.clone().to(dev)
        ref_paged(pool, table, prefix, path, accept)
        ops.kv_compact_paged(mine, table.to(dev), prefix.to(dev), path.to(dev), accept.to(dev),
                             backend="triton")
        assert torch.equal(bits(mine.cpu()), bits(pool))


@requires_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU tensors go to the interpreter only without a GPU test run")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.kv_compact_paged(torch.zeros(2, 2, 2, 1, 2), torch.tensor([[0, 1]]),
                             torch.tensor([0]), torch.tensor([[0]]), torch.tensor([1]),
                             backend="triton")


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
def test_cuda_llama_pool_bf16_no_sync_and_graph():
    # 32 layers of Llama-3-8B KV (N = 64, Hkv 8, Dh 128) in pages of 16, T = 60, batch 4.
    rng = random.Random(11)
    N, B, Hkv, Dh, T, ps = 64, 4, 8, 128, 60, 16
    prefixes = [100, 900, 0, 1000]
    pool, table = make_pool(N, B, Hkv, Dh, [p + T for p in prefixes], ps, torch.bfloat16)
    accept = torch.tensor([1, 6, T, 3])
    path = torch.tensor([random_path(T, int(a), rng) for a in accept.tolist()])
    prefix = torch.tensor(prefixes)
    want = expected(pool, table, prefix, path, accept)
    pool, table, prefix, path, accept = (x.cuda() for x in (pool, table, prefix, path, accept))
    before = pool.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.kv_compact_paged(pool, table, prefix, path, accept)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(bits(pool.cpu()), bits(want))
    pool.copy_(before)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.kv_compact_paged(pool, table, prefix, path, accept)
    pool.copy_(before)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(pool.cpu()), bits(want))
