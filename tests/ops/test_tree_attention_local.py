"""Local attention in the tree-attention ops: sliding window, logit softcap, attention sinks.

Every backend (reference, Triton dense and paged, native C++ and its SIMD variants) against an
independent float64 truth written in terms of POSITIONS, as transformers defines the window:
tree node n sits at position prefix + depth(n) and sees the keys at positions p with
p > position - window (itself and window - 1 before it). The ops only get the packed mask, so
these tests also pin down that "the last `window` visible slots of a row" is that window.
Odd windows: 1, not a multiple of any block, longer than the prefix, deeper than the tree.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import eagle2_kernels.ops as ops
from eagle2_kernels._backend import ext_available
from eagle2_kernels.ops.tree import pack_bits
from eagle2_kernels.ops.tree_attention.reference import tree_attention as ref_tree_attention
from conftest import requires_triton, triton_device
from tolerances import EXACT, FP32_ACCUM, FP32_TIGHT, FP64, HALF

requires_ext = pytest.mark.skipif(not ext_available(), reason="native extension not built")


# ----------------------------------------------------------------------------- helpers


def tree_parents(kind: str, T: int, rng: random.Random) -> list[int]:
    """parents[0] = -1, parents[i] < i: a random tree, a chain (a causal prompt) or a bushy
    2-ary tree."""
    if kind == "chain":
        return [-1] + list(range(T - 1))
    if kind == "binary":
        return [-1] + [(i - 1) // 2 for i in range(1, T)]
    return [-1] + [rng.randrange(max(0, i - 4), i) for i in range(1, T)]


def path(parents: list[int], n: int) -> list[int]:
    """n and its ancestors, root first."""
    out = []
    while n >= 0:
        out.append(n)
        n = parents[n]
    return out[::-1]


def make_case(B, Hq, Hkv, Dh, prefixes, T, Tq, kind, seed, dtype=torch.float32, extra=3):
    """q [B, Hq, Tq, Dh] for the last Tq nodes of each sequence's tree of T nodes, dense caches,
    the packed ancestor-or-self mask, prefix_len, and the parent lists."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    L = max(prefixes) + T + extra
    q = torch.randn(B, Hq, Tq, Dh, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, Dh, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, Dh, generator=g, dtype=torch.float64)
    parents = [tree_parents(kind, T, rng) for _ in range(B)]
    bits = torch.zeros(B, Tq, max(32, 32 * math.ceil(T / 32)), dtype=torch.bool)
    for b in range(B):
        for r, n in enumerate(range(T - Tq, T)):
            bits[b, r, path(parents[b], n)] = True
    mask = pack_bits(bits)
    prefix_len = torch.tensor(prefixes, dtype=torch.int32)
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), prefix_len=prefix_len, mask=mask,
                T=T, parents=parents)


def position_truth(c, window=None, softcap=None, sinks=None, scale=None):
    """float64 attention from positions: node n at prefix + depth(n); key at position p
    visible iff it is a prefix slot or an ancestor-or-self, and p > position - window."""
    q, k, v = (c[x].double() for x in ("q", "k", "v"))
    B, Hq, Tq, Dh = q.shape
    Hkv = k.shape[1]
    T = c["T"]
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    out = torch.zeros(B, Hq, Tq, Dh, dtype=torch.float64)
    for b in range(B):
        P = int(c["prefix_len"][b])
        for r, n in enumerate(range(T - Tq, T)):
            anc = path(c["parents"][b], n)
            pos = P + len(anc) - 1
            # (slot, position) of every key the row may see, prefix then its path
            keys = [(s, s) for s in range(P)] + [(P + a, P + d) for d, a in enumerate(anc)]
            if window is not None:
                keys = [(s, p) for s, p in keys if p > pos - window]
            idx = torch.tensor([s for s, _ in keys], dtype=torch.long)
            for h in range(Hq):
                kvh = h // (Hq // Hkv)
                s = (k[b, kvh, idx] @ q[b, h, r]) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                if sinks is not None:
                    s = torch.cat([s, sinks[h].double().view(1)])
                p = torch.softmax(s, 0)[: len(keys)]
                out[b, h, r] = p @ v[b, kvh, idx]
    return out


def args(c, device="cpu"):
    return [c[x].to(device) for x in ("q", "k", "v", "prefix_len", "mask")] + [c["T"]]


def local_kw(window, softcap, with_sinks, Hq, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    sinks = torch.randn(Hq, generator=g).to(device) if with_sinks else None
    return dict(window=window, softcap=softcap, sinks=sinks)


# id, B, Hq, Hkv, Dh, prefixes, T, Tq, tree kind, window, softcap, sinks
CASES = [
    ("w1-random", 2, 4, 2, 16, [20, 5], 9, 9, "random", 1, None, False),
    ("w2-chain-deeper-than-window", 1, 2, 1, 16, [12], 7, 7, "chain", 2, None, False),
    ("w5-binary", 2, 4, 4, 16, [40, 3], 15, 15, "binary", 5, None, False),
    ("w37-random-2words", 2, 4, 2, 16, [80, 30], 40, 40, "random", 37, None, False),
    ("w8-causal-prefill-P0", 1, 2, 2, 16, [0], 45, 45, "chain", 8, None, False),
    ("w-longer-than-prefix", 2, 2, 1, 16, [6, 0], 5, 5, "random", 1000, None, False),
    ("w6-draft-rows", 2, 4, 2, 16, [30, 9], 12, 3, "random", 6, None, False),
    ("softcap-only", 2, 4, 2, 16, [25, 4], 6, 6, "random", None, 3.0, False),
    ("sinks-only", 2, 4, 2, 16, [25, 0], 6, 6, "random", None, None, True),
    ("w7-softcap-sinks", 2, 4, 2, 16, [50, 2], 10, 10, "random", 7, 20.0, True),
]
IDS = [c[0] for c in CASES]


def build(case, dtype=torch.float32):
    _, B, Hq, Hkv, Dh, prefixes, T, Tq, kind, window, softcap, sinks = case
    c = make_case(B, Hq, Hkv, Dh, prefixes, T, Tq, kind, seed=T * 7 + B, dtype=dtype)
    return c, local_kw(window, softcap, sinks, Hq, seed=T)


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_is_the_position_window(case):
    c, kw = build(case, dtype=torch.float64)
    out = ref_tree_attention(*args(c), None, kw["window"], kw["softcap"], kw["sinks"])
    torch.testing.assert_close(out, position_truth(c, **kw), **FP64)


def test_reference_window_by_hand():
    # One query at position 5 (prefix 5, tree root only), window 3: it sees positions 3, 4, 5
    # with equal scores (q = 0), so the output is the mean of those three values.
    q = torch.zeros(1, 1, 1, 4)
    k = torch.randn(1, 1, 6, 4)
    v = torch.arange(24, dtype=torch.float32).view(1, 1, 6, 4)
    mask = torch.ones(1, 1, 1, dtype=torch.int32)
    out = ref_tree_attention(q, k, v, torch.tensor([5]), mask, 1, None, 3)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 3:6].mean(0))
    # window 1: only itself
    out = ref_tree_attention(q, k, v, torch.tensor([5]), mask, 1, None, 1)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 5])


def test_reference_sink_shrinks_weights_by_hand():
    # Two equal-score keys and a sink of logit 0 with scores 0: each key gets 1/3.
    q = torch.zeros(1, 1, 1, 2)
    k = torch.zeros(1, 1, 2, 2)
    v = torch.tensor([[[[3.0, 0.0], [0.0, 3.0]]]])
    mask = torch.ones(1, 1, 1, dtype=torch.int32)
    out = ref_tree_attention(q, k, v, torch.tensor([1]), mask, 1, None, None, None, torch.zeros(1))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1.0, 1.0]))


# ----------------------------------------------------------------------------- triton


@requires_triton
@pytest.mark.parametrize("split", [False, True], ids=["one-split", "split"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_matches_position_truth(case, split):
    from eagle2_kernels.ops.tree_attention.kernel import launch

    c, kw = build(case)
    dev = triton_device()
    kw = {n: (x.to(dev) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    tune = dict(num_splits=3, min_chunk=8, block_n=16) if split else {}
    out = launch(*args(c, dev), **kw, **tune)
    torch.testing.assert_close(out.cpu().double(), position_truth(c, **kw), **FP32_ACCUM)


def poisoned(c, window):
    """The case with NaN keys and values in every slot before prefix - window: a kernel that
    reads them (even to mask them afterwards) returns NaN."""
    c = dict(c)
    c["k"], c["v"] = c["k"].clone(), c["v"].clone()
    for b, P in enumerate(c["prefix_len"].tolist()):
        c["k"][b, :, : max(P - window, 0)] = float("nan")
        c["v"][b, :, : max(P - window, 0)] = float("nan")
    return c


@requires_triton
@pytest.mark.parametrize("split", [False, True], ids=["one-split", "split"])
def test_triton_skips_slots_before_the_window(split):
    from eagle2_kernels.ops.tree_attention.kernel import launch

    case = ("w9", 2, 2, 1, 16, [300, 77], 6, 6, "random", 9, None, False)
    c, kw = build(case)
    bad = poisoned(c, 9)
    tune = dict(num_splits=4, min_chunk=4, block_n=16) if split else {}
    out = launch(*args(bad, triton_device()), window=9, **tune)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), position_truth(c, window=9), **FP32_ACCUM)


# ----------------------------------------------------------------------------- native


@pytest.fixture(params=["best", "avx2", "portable"])
def simd(request, monkeypatch):
    """Each native kernel (a CPU without AVX-512 / AVX2 falls back to the next it has)."""
    if request.param == "best":
        monkeypatch.delenv("EAGLE2_KERNELS_NATIVE_SIMD", raising=False)
    else:
        monkeypatch.setenv("EAGLE2_KERNELS_NATIVE_SIMD", request.param)
    return request.param


@requires_ext
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_native_matches_position_truth(case, simd):
    c, kw = build(case)
    out = ops.tree_attention(*args(c), backend="ext", **kw)
    torch.testing.assert_close(out.double(), position_truth(c, **kw), **FP32_ACCUM)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_native_half_dtypes_match_reference(dtype, simd):
    c, kw = build(CASES[-1], dtype=dtype)
    out = ops.tree_attention(*args(c), backend="ext", **kw)
    want = ops.tree_attention(*args(c), backend="reference", **kw)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), **HALF)


@requires_ext
def test_native_skips_slots_before_the_window(simd):
    case = ("w9", 2, 2, 1, 16, [300, 77], 6, 6, "random", 9, None, False)
    c, _ = build(case)
    out = ops.tree_attention(*args(poisoned(c, 9)), backend="ext", window=9)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), position_truth(c, window=9), **FP32_ACCUM)


# ----------------------------------------------------------------------------- paged


def paginate(dense: torch.Tensor, page_size: int, seed: int):
    """[B, Hkv, L, Dh] -> pages [num_blocks, page_size, Hkv, Dh] in a shuffled order, table."""
    B, Hkv, L, Dh = dense.shape
    per = math.ceil(L / page_size)
    order = torch.randperm(B * per, generator=torch.Generator().manual_seed(seed))
    pages = torch.full((B * per, page_size, Hkv, Dh), float("nan"), dtype=dense.dtype)
    table = order.view(B, per).to(torch.int32)
    for b in range(B):
        for i in range(per):
            chunk = dense[b, :, i * page_size:(i + 1) * page_size].permute(1, 0, 2)
            pages[table[b, i], : chunk.shape[0]] = chunk
    return pages, table


PAGED = [CASES[0], CASES[3], CASES[6], CASES[9]]


@pytest.mark.parametrize("backend", ["reference", "ext", "triton"])
@pytest.mark.parametrize("case", PAGED, ids=[c[0] for c in PAGED])
def test_paged_matches_position_truth(case, backend):
    if backend == "ext" and not ext_available():
        pytest.skip("native extension not built")
    if backend == "triton":
        pytest.importorskip("triton")
        from conftest import triton_runs_here

        if not triton_runs_here():
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    c, kw = build(case)
    dev = triton_device() if backend == "triton" else "cpu"
    kp, table = paginate(c["k"], 5, seed=1)
    vp, _ = paginate(c["v"], 5, seed=1)
    kw = {n: (x.to(dev) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    out = ops.tree_attention_paged(q := c["q"].to(dev), kp.to(dev), vp.to(dev), table.to(dev),
                                   c["prefix_len"].to(dev), c["mask"].to(dev), c["T"],
                                   backend=backend, **kw)
    assert out.shape == q.shape
    torch.testing.assert_close(out.cpu().double(), position_truth(c, **kw), **FP32_ACCUM)


@requires_triton
def test_paged_triton_skips_pages_before_the_window():
    from eagle2_kernels.ops.tree_attention_paged.kernel import launch

    case = ("w9", 2, 2, 1, 16, [300, 77], 6, 6, "random", 9, None, False)
    c, _ = build(case)
    bad = poisoned(c, 9)
    kp, table = paginate(bad["k"], 8, seed=2)
    vp, _ = paginate(bad["v"], 8, seed=2)
    dev = triton_device()
    out = launch(c["q"].to(dev), kp.to(dev), vp.to(dev), table.to(dev), c["prefix_len"].to(dev),
                 c["mask"].to(dev), c["T"], window=9, num_splits=3, min_chunk=4, block_n=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), position_truth(c, window=9), **FP32_ACCUM)


# ----------------------------------------------------------------------------- interface


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        pytest.param(dict(window=0), ValueError, "window", id="window-0"),
        pytest.param(dict(window=2.5), TypeError, "window", id="window-float"),
        pytest.param(dict(window=True), TypeError, "window", id="window-bool"),
        pytest.param(dict(softcap=0.0), ValueError, "softcap", id="softcap-0"),
        pytest.param(dict(softcap="50"), TypeError, "softcap", id="softcap-str"),
        pytest.param(dict(sinks=torch.zeros(3)), ValueError, "sinks", id="sinks-shape"),
        pytest.param(dict(sinks=torch.zeros(4, dtype=torch.int64)), TypeError, "sinks",
                     id="sinks-int"),
    ],
)
@pytest.mark.parametrize("op", ["dense", "paged"])
def test_input_checks(kw, exc, match, op):
    c, _ = build(CASES[0])
    with pytest.raises(exc, match=match):
        if op == "dense":
            ops.tree_attention(*args(c), backend="reference", **kw)
        else:
            kp, table = paginate(c["k"], 4, seed=0)
            vp, _ = paginate(c["v"], 4, seed=0)
            ops.tree_attention_paged(c["q"], kp, vp, table, c["prefix_len"], c["mask"], c["T"],
                                     backend="reference", **kw)


def test_torch_ops_take_the_local_arguments():
    c, kw = build(CASES[-1])
    want = ops.tree_attention(*args(c), **kw)
    got = torch.ops.eagle2.tree_attention(*args(c), None, kw["window"], kw["softcap"], kw["sinks"])
    torch.testing.assert_close(got, want, **EXACT)
    kp, table = paginate(c["k"], 4, seed=0)
    vp, _ = paginate(c["v"], 4, seed=0)
    got = torch.ops.eagle2.tree_attention_paged(c["q"], kp, vp, table, c["prefix_len"], c["mask"],
                                                c["T"], window=kw["window"], softcap=kw["softcap"],
                                                sinks=kw["sinks"])
    torch.testing.assert_close(got, want, **FP32_TIGHT)
    # the fake implementation (torch.compile, tracing) gives the shape without running
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.eagle2.tree_attention(*args(c), None, 3, 1.5, kw["sinks"])
    assert fake.shape == c["q"].shape
