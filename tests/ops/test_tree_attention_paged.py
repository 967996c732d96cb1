"""tree_attention_paged: against the dense op on the cache the pages were scattered from.

Each case starts from a dense per-sequence cache, scatters it into a pool of pages through a
random block table (pages shuffled, unused pages, unused slots and unused table entries
poisoned with NaN / -1), and compares the paged op with the dense ``tree_attention`` on the
original dense cache. Numerical contract (the dense op's): max abs error against a float64
truth at most 2x that of the same-precision plain composite plus a floor (fp32 1e-5,
fp16 1e-3, bf16 1e-2); the reference path is bit-identical to the dense reference.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import requires_triton, triton_device
from eagle2_kernels.ops.tree import pack_bits, unpack_bits
from eagle2_kernels.ops.tree_attention.reference import tree_attention as dense_reference
from eagle2_kernels.ops.tree_attention_paged.reference import (
    tree_attention_paged as ref_paged,
)

import eagle2_kernels.ops as ops

FLOORS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------- helpers


def ancestor_mask(parent_lists: list[list[int]], Tq: int | None = None) -> torch.Tensor:
    """Packed ancestor-or-self rows [B, Tq, W] (the last Tq nodes of each tree)."""
    T = len(parent_lists[0])
    Tq = T if Tq is None else Tq
    bits = torch.zeros(len(parent_lists), Tq, max(T, 1), dtype=torch.bool)
    for b, parents in enumerate(parent_lists):
        for r, i in enumerate(range(T - Tq, T)):
            j = i
            while j >= 0:
                bits[b, r, j] = True
                j = parents[j]
    return pack_bits(bits)


def random_parents(T: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, T)]


def paginate(dense: torch.Tensor, lengths: list[int], page_size: int, rng: random.Random,
             spare_pages: int = 3, table_slack: int = 2, layout: str = "plain"):
    """Scatter dense [B, Hkv, L, Dh] caches into pages [num_blocks, page_size, Hkv, Dh].

    Sequence b gets ceil(lengths[b] / page_size) distinct random pages; everything else (spare
    pages, slots past each length, table entries past the used ones) is NaN / -1. ``layout``
    picks how the page tensor is stored: "plain", "vllm" (k of a stacked [2, nb, ps, Hkv, Dh]),
    "nhd" (k of FlashInfer's [nb, 2, ps, Hkv, Dh]) or "hnd" ([nb, 2, Hkv, ps, Dh], transposed).
    Returns (pages view, block_table int32 [B, max_blocks]).
    """
    B, Hkv, _, Dh = dense.shape
    need = [math.ceil(n / page_size) for n in lengths]
    num_blocks = sum(need) + spare_pages
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    max_blocks = max(need) + table_slack
    table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    shape = {"plain": (num_blocks, page_size, Hkv, Dh), "vllm": (2, num_blocks, page_size, Hkv, Dh),
             "nhd": (num_blocks, 2, page_size, Hkv, Dh), "hnd": (num_blocks, 2, Hkv, page_size, Dh)}
    storage = torch.full(shape[layout], float("nan"), dtype=dense.dtype)
    pages = {"plain": lambda s: s, "vllm": lambda s: s[0], "nhd": lambda s: s[:, 0],
             "hnd": lambda s: s[:, 0].transpose(1, 2)}[layout](storage)
    for b in range(B):
        for m in range(need[b]):
            table[b, m] = ids.pop()
        for pos in range(lengths[b]):
            pages[int(table[b, pos // page_size]), pos % page_size] = dense[b, :, pos]
    return pages, table


def truth(q, k, v, prefix_len, mask, tree_len, scale=None):
    """float64 dense reference (the dense reference keeps float64 as float64)."""
    return dense_reference(q.double(), k.double(), v.double(), prefix_len, mask, tree_len, scale)


def plain_torch(q, k, v, prefix_len, mask, tree_len, scale=None):
    """The same-precision composite: matmuls in the input dtype, float32 softmax."""
    B, Hq, Tq, Dh = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    bits = unpack_bits(mask, tree_len)
    out = torch.zeros_like(q)
    for b in range(B):
        P = int(prefix_len[b])
        kk = k[b, :, : P + tree_len].repeat_interleave(Hq // Hkv, 0)
        vv = v[b, :, : P + tree_len].repeat_interleave(Hq // Hkv, 0)
        vis = torch.cat([torch.ones(Tq, P, dtype=torch.bool), bits[b]], 1)
        s = (q[b] @ kk.transpose(-1, -2)).float() * scale
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
        out[b] = (p.to(q.dtype) @ vv).to(q.dtype)
    return out


def assert_contract(out, q, k, v, prefix_len, mask, tree_len, scale=None):
    want = truth(q, k, v, prefix_len, mask, tree_len, scale)
    base = plain_torch(q, k, v, prefix_len, mask, tree_len, scale)
    err = (out.cpu().double() - want).abs().max().item()
    base_err = (base.double() - want).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * base_err + FLOORS[q.dtype], (err, base_err)


def make_case(B, Hq, Hkv, Tq, T, Dh, prefixes, page_size, dtype=torch.float32, seed=0,
              layout="plain", parents=None):
    """Dense q/k/v, the packed mask of random trees, and the paged copy of k/v."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    L = max(prefixes) + T
    q = torch.randn(B, Hq, Tq, Dh, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, Dh, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, Dh, generator=g).to(dtype)
    lists = parents or [random_parents(T, rng) for _ in range(B)]
    mask = ancestor_mask(lists, Tq)
    prefix_len = torch.tensor(prefixes, dtype=torch.int32)
    lengths = [p + T for p in prefixes]
    k_pages, table = paginate(k, lengths, page_size, random.Random(seed + 1), layout=layout)
    v_pages, table_v = paginate(v, lengths, page_size, random.Random(seed + 1), layout=layout)
    assert torch.equal(table, table_v)
    return dict(q=q, k=k, v=v, k_pages=k_pages, v_pages=v_pages, table=table,
                prefix_len=prefix_len, mask=mask, T=T)


def paged_args(c, device="cpu"):
    return [x.to(device) for x in (c["q"], c["k_pages"], c["v_pages"], c["table"],
                                   c["prefix_len"], c["mask"])]


# ----------------------------------------------------------------------------- reference

REF_CASES = [
    # id, B, Hq, Hkv, Tq, T, Dh, prefixes, page_size, layout
    ("page1-B2-T5", 2, 4, 2, 5, 5, 16, [7, 0], 1, "plain"),
    ("page3-B3-T7-odd", 3, 2, 1, 7, 7, 8, [0, 4, 11], 3, "plain"),
    ("page16-T33-W2", 1, 4, 4, 33, 33, 16, [20], 16, "plain"),
    ("draft-rows-Tq3-T10", 2, 4, 2, 3, 10, 16, [5, 17], 4, "vllm"),
    ("nhd-pages", 2, 2, 2, 4, 4, 8, [9, 2], 5, "nhd"),
    ("hnd-pages", 2, 2, 1, 6, 6, 8, [3, 30], 8, "hnd"),
    ("one-node-prefix0", 1, 2, 1, 1, 1, 8, [0], 2, "plain"),
]


@pytest.mark.parametrize(
    "B, Hq, Hkv, Tq, T, Dh, prefixes, page_size, layout",
    [pytest.param(*c[1:], id=c[0]) for c in REF_CASES],
)
def test_reference_equals_dense_reference_bitwise(B, Hq, Hkv, Tq, T, Dh, prefixes, page_size,
                                                  layout):
    c = make_case(B, Hq, Hkv, Tq, T, Dh, prefixes, page_size, layout=layout, seed=B * 7 + T)
    got = ref_paged(*paged_args(c), T)
    want = dense_reference(c["q"], c["k"], c["v"], c["prefix_len"], c["mask"], T)
    assert torch.equal(got, want)
    # The public op on CPU (native dense kernel when built, else the reference).
    cpu = ops.tree_attention_paged(*paged_args(c), T)
    assert_contract(cpu, c["q"], c["k"], c["v"], c["prefix_len"], c["mask"], T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_scale_half_dtypes_int64_indices(dtype):
    c = make_case(2, 4, 2, 6, 6, 16, [5, 12], 4, dtype=dtype, seed=3)
    q, kp, vp, table, prefix, mask = paged_args(c)
    got = ref_paged(q, kp, vp, table.long(), prefix.long(), mask, 6, scale=0.3)
    want = dense_reference(c["q"], c["k"], c["v"], c["prefix_len"], c["mask"], 6, scale=0.3)
    assert got.dtype == dtype and torch.equal(got, want)
    cpu = ops.tree_attention_paged(q, kp, vp, table, prefix, mask, 6, scale=0.3)
    assert_contract(cpu, c["q"], c["k"], c["v"], c["prefix_len"], c["mask"], 6, scale=0.3)


def decode_case(dtype=torch.float32):
    """A plain decode step: Tq = 1 query, no tree slots (tree_len 0), prefixes 0 (sees
    nothing: zeros), 1 and 29 over pages of 4."""
    c = make_case(3, 4, 2, 1, 1, 16, [0, 1, 29], 4, dtype=dtype, seed=6, parents=[[-1]] * 3)
    c["mask"].zero_()
    return c


def test_reference_decode_step_without_tree():
    c = decode_case()
    got = ops.tree_attention_paged(*paged_args(c), 0, backend="reference")
    want = dense_reference(c["q"], c["k"], c["v"], c["prefix_len"], c["mask"], 0)
    assert torch.equal(got, want) and torch.equal(got[0], torch.zeros_like(got[0]))


def test_reference_rejects_short_table_and_bad_pages():
    c = make_case(1, 2, 1, 3, 3, 8, [5], 4, seed=1, parents=[[-1, 0, 1]])
    q, kp, vp, table, prefix, mask = paged_args(c)
    with pytest.raises(ValueError, match="block-table row"):
        ref_paged(q, kp, vp, table[:, :1], prefix, mask, 3)
    bad = table.clone()
    bad[0, 1] = kp.shape[0]  # past the pool
    with pytest.raises(ValueError, match="outside the pool"):
        ref_paged(q, kp, vp, bad, prefix, mask, 3)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        pytest.param(lambda a: a.update(q=a["q"][0]), ValueError, "q", id="q-rank"),
        pytest.param(lambda a: a.update(q=a["q"].double()), TypeError, "q", id="q-fp64"),
        pytest.param(lambda a: a.update(k_pages=a["k_pages"].half()), TypeError, "k_pages", id="k-dtype"),
        pytest.param(lambda a: a.update(v_pages=a["v_pages"][:-1]), ValueError, "v_pages", id="v-shape"),
        pytest.param(lambda a: a.update(k_pages=a["k_pages"][..., :4],
                                        v_pages=a["v_pages"][..., :4]), ValueError, "head dim", id="Dh"),
        pytest.param(lambda a: a.update(k_pages=a["k_pages"][:, :, :1].expand(-1, -1, 3, -1),
                                        v_pages=a["v_pages"][:, :, :1].expand(-1, -1, 3, -1)),
                     ValueError, "Hq|Hkv", id="Hq-not-multiple"),
        pytest.param(lambda a: a.update(block_table=a["block_table"].float()), TypeError, "block_table",
                     id="table-float"),
        pytest.param(lambda a: a.update(block_table=a["block_table"][0]), ValueError, "block_table",
                     id="table-rank"),
        pytest.param(lambda a: a.update(prefix_len=a["prefix_len"][None]), ValueError, "prefix_len",
                     id="prefix-shape"),
        pytest.param(lambda a: a.update(tree_mask=a["tree_mask"].long()), TypeError, "tree_mask",
                     id="mask-int64"),
        pytest.param(lambda a: a.update(tree_len=33), ValueError, "tree_mask", id="mask-too-few-words"),
        pytest.param(lambda a: a.update(tree_len=10**6), ValueError, "tree_len", id="tree-len-too-big"),
        pytest.param(lambda a: a.update(tree_len=2.0), TypeError, "tree_len", id="tree-len-float"),
        pytest.param(lambda a: a.update(scale="x"), TypeError, "scale", id="scale-str"),
        pytest.param(lambda a: a.update(k_pages=[0.0]), TypeError, "k_pages", id="pages-list"),
    ],
)
def test_public_input_checks(change, exc, match):
    c = make_case(1, 4, 2, 2, 2, 8, [3], 4, seed=2, parents=[[-1, 0]])
    q, kp, vp, table, prefix, mask = paged_args(c)
    table = torch.cat([table, torch.zeros(1, 10, dtype=torch.int32)], 1)  # capacity 48
    args = dict(q=q, k_pages=kp, v_pages=vp, block_table=table, prefix_len=prefix,
                tree_mask=mask, tree_len=2)
    change(args)
    with pytest.raises(exc, match=match):
        ops.tree_attention_paged(**args, backend="reference")


def test_torch_op_registration():
    # torch.ops.eagle2.tree_attention_paged: opcheck (schema, fake tensor, autograd
    # registration) and the public op's result.
    import eagle2_kernels  # noqa: F401  (registers the ops)

    c = make_case(2, 4, 2, 3, 3, 8, [5, 2], 4, seed=4, parents=[[-1, 0, 1]] * 2)
    args = paged_args(c)
    op = torch.ops.eagle2.tree_attention_paged
    torch.library.opcheck(op.default, (*args, 3), {"scale": 0.3})
    assert torch.equal(op(*args, 3, 0.3), ops.tree_attention_paged(*args, 3, scale=0.3))


# ----------------------------------------------------------------------------- triton

# id, B, Hq, Hkv, Tq, T, Dh, prefixes, page_size, dtype, layout, launch overrides
CASES = [
    ("verify-B1-T7-P37-page16", 1, 4, 2, 7, 7, 32, [37], 16, torch.float32, "plain", {}),
    ("page1-B2-T5-GQA", 2, 4, 2, 5, 5, 16, [7, 0], 1, torch.float32, "plain", {}),
    ("page3-odd-B3-fp16", 3, 4, 2, 9, 9, 32, [0, 1, 40], 3, torch.float16, "vllm", {}),
    ("W2-T40-MQA-page5", 2, 8, 1, 40, 40, 16, [0, 11], 5, torch.float32, "nhd", {}),
    ("Dh48-T6-hnd", 1, 2, 2, 6, 6, 48, [13], 8, torch.float32, "hnd", {}),
    ("draft-rows-Tq3-T10", 2, 4, 2, 3, 10, 32, [17, 3], 4, torch.float32, "plain", {}),
    ("split4-P200-page7", 2, 4, 2, 11, 11, 32, [0, 200], 7, torch.float32, "plain",
     dict(num_splits=4, min_chunk=16, block_n=16)),
    ("split3-tree-straddles-W2-fp16", 1, 4, 2, 35, 35, 32, [40], 16, torch.float16, "vllm",
     dict(num_splits=3, min_chunk=32, block_n=16, block_m=16)),
]


@requires_triton
@pytest.mark.parametrize(
    "B, Hq, Hkv, Tq, T, Dh, prefixes, page_size, dtype, layout, launch_kw",
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_triton_matches_dense(B, Hq, Hkv, Tq, T, Dh, prefixes, page_size, dtype, layout,
                              launch_kw):
    c = make_case(B, Hq, Hkv, Tq, T, Dh, prefixes, page_size, dtype=dtype, layout=layout,
                  seed=T * 31 + B)
    args = paged_args(c, triton_device())
    if launch_kw:
        from eagle2_kernels.ops.tree_attention_paged.kernel import launch

        out = launch(*args, T, **launch_kw)
    else:
        out = ops.tree_attention_paged(*args, T, backend="triton")
    assert out.dtype == dtype and out.shape == (B, Hq, Tq, Dh)
    assert_contract(out, c["q"], c["k"], c["v"], c["prefix_len"], c["mask"], T)


@requires_triton
def test_triton_decode_step_without_tree():
    c = decode_case()
    out = ops.tree_attention_paged(*paged_args(c, triton_device()), 0, backend="triton")
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    assert_contract(out, c["q"], c["k"], c["v"], c["prefix_len"], c["mask"], 0)


@requires_triton
def test_triton_views_int64_indices_scale_and_empty_rows():
    # q a transposed view, int64 table and prefix, custom scale; sequence 0 has prefix 0 and a
    # mask row that sees nothing (zeros, not NaN) while its unused pages are NaN.
    dev = triton_device()
    c = make_case(2, 4, 2, 4, 4, 16, [0, 9], 3, seed=8, parents=[[-1, 0, 0, 1]] * 2)
    c["mask"][0, 0] = 0
    q = c["q"].transpose(1, 2).contiguous().transpose(1, 2)
    q_, kp, vp, table, prefix, mask = paged_args(c, dev)
    out = ops.tree_attention_paged(q.to(dev), kp, vp, table.long(), prefix.long(), mask, 4,
                                   scale=0.05, backend="triton")
    assert out.stride() == q.stride()
    assert torch.equal(out[0, :, 0].cpu(), torch.zeros(4, 16))
    assert_contract(out, q, c["k"], c["v"], c["prefix_len"], c["mask"], 4, scale=0.05)


@requires_triton
def test_triton_randomized():
    rng = random.Random(2026)
    dev = triton_device()
    for trial in range(4):
        Hkv = rng.choice([1, 2])
        Hq = Hkv * rng.choice([1, 2, 4])
        Dh = rng.choice([16, 32])
        T = rng.randrange(1, 40)
        Tq = rng.randrange(1, T + 1)
        B = rng.randrange(1, 4)
        prefixes = [rng.randrange(0, 70) for _ in range(B)]
        page_size = rng.choice([1, 2, 5, 16])
        dtype = rng.choice([torch.float32, torch.float16])
        c = make_case(B, Hq, Hkv, Tq, T, Dh, prefixes, page_size, dtype=dtype, seed=trial,
                      layout=rng.choice(["plain", "vllm", "nhd", "hnd"]))
        out = ops.tree_attention_paged(*paged_args(c, dev), T, backend="triton")
        assert_contract(out, c["q"], c["k"], c["v"], c["prefix_len"], c["mask"], T)


@requires_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU tensors go to the interpreter only without a GPU test run")
    c = make_case(1, 2, 1, 1, 1, 16, [2], 2, seed=0)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.tree_attention_paged(*paged_args(c), 1, backend="triton")


_SM90_COMPILE = """
import importlib, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)

def build(module, name, pointers, consts, num_warps):
    fn = getattr(importlib.import_module(module), name)
    sig = {n: ("constexpr" if n in consts else (pointers.get(n, pointers["*"])
           if n.endswith("_ptr") else ("fp32" if n in ("qk_scale", "cap_out") else "i32")))
           for n in fn.arg_names}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    except (TypeError, KeyError):
        sys.exit(3)  # an older signature format of the compile API
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

for local in (False, True):  # plain, and with the sliding window, softcap and sinks
    build("eagle2_kernels.ops.tree_attention_paged.kernel", "_tree_attention_paged_kernel",
          {"table_ptr": "*i32", "prefix_ptr": "*i64", "mask_ptr": "*i32", "part_acc_ptr": "*fp32",
           "part_ml_ptr": "*fp32", "*": "*bf16"},
          dict(GROUP=4, BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, NUM_WORDS=3, EVEN_D=True,
               COMPUTE_FP32=False, DOT_PRECISION="tf32", HAS_WINDOW=local, HAS_SOFTCAP=local,
               HAS_SINKS=local), 8)
build("eagle2_kernels.ops.kv_compact_paged.kernel", "_kv_compact_paged_kernel",
      {"kv_ptr": "*i16", "table_ptr": "*i32", "*": "*i64"}, dict(BLOCK_T=64, BLOCK_D=128), 4)
build("eagle2_kernels.ops.remap_slots.kernel", "_remap_slots_kernel",
      {"table_ptr": "*i32", "accepted_ptr": "*i32", "free_ptr": "*i32", "*": "*i64"},
      dict(BLOCK=64, UPDATE=True), 4)
"""


def test_paged_kernels_compile_for_sm90():
    # The interpreter accepts constructs the GPU compiler rejects: compile the three paged
    # kernels (tree_attention_paged in bf16 with Llama-sized blocks, kv_compact_paged,
    # remap_slots) for an H100 target, no GPU needed.
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


def _cuda_case(B, prefixes, page_size, dtype, seed=0):
    """Llama-3-8B attention shapes (Hq 32, Hkv 8, Dh 128), T = 60, built on the GPU."""
    T, Hq, Hkv, Dh = 60, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(seed)
    rng = random.Random(seed)
    lengths = [p + T for p in prefixes]
    need = [math.ceil(n / page_size) for n in lengths]
    nb = sum(need) + 8
    perm = torch.randperm(nb, device="cuda", generator=g)
    table = torch.full((B, max(need)), -1, dtype=torch.int32, device="cuda")
    off = 0
    for b in range(B):
        table[b, : need[b]] = perm[off: off + need[b]].int()
        off += need[b]
    k_pages = torch.randn(nb, page_size, Hkv, Dh, device="cuda", generator=g, dtype=dtype)
    v_pages = torch.randn(nb, page_size, Hkv, Dh, device="cuda", generator=g, dtype=dtype)
    q = torch.randn(B, Hq, T, Dh, device="cuda", generator=g, dtype=dtype)
    mask = ancestor_mask([random_parents(T, rng) for _ in range(B)]).cuda()
    prefix_len = torch.tensor(prefixes, dtype=torch.int32, device="cuda")
    return q, k_pages, v_pages, table, prefix_len, mask, T


def _gathered(k_pages, table, lengths):
    """Dense [B, Hkv, max(lengths), Dh] copies, the plain-torch gather."""
    ps = k_pages.shape[1]
    L = max(lengths)
    pos = torch.arange(L, device=k_pages.device)
    out = []
    for b, n in enumerate(lengths):
        p = pos.clamp(max=n - 1)
        out.append(k_pages[table[b, p // ps].long(), p % ps].permute(1, 0, 2))
    return torch.stack(out)


@pytest.mark.cuda
@pytest.mark.parametrize("prefix, page_size", [(4096, 16), (20000, 64), (3000, 1)],
                         ids=["P4k-page16", "P20k-page64", "P3k-page1"])
def test_cuda_bf16_llama_heads(prefix, page_size):
    q, kp, vp, table, prefix_len, mask, T = _cuda_case(2, [prefix, prefix // 3], page_size,
                                                      torch.bfloat16, seed=prefix)
    out = ops.tree_attention_paged(q, kp, vp, table, prefix_len, mask, T)
    lengths = [int(p) + T for p in prefix_len.tolist()]
    k, v = _gathered(kp, table, lengths), _gathered(vp, table, lengths)
    dense = ops.tree_attention(q, k, v, prefix_len, mask, T)
    want = plain_torch(q.float().cpu(), k.float().cpu(), v.float().cpu(), prefix_len.cpu(),
                       mask.cpu(), T)
    base = plain_torch(q.cpu(), k.cpu(), v.cpu(), prefix_len.cpu(), mask.cpu(), T)
    err = (out.float().cpu() - want).abs().max().item()
    base_err = (base.float() - want).abs().max().item()
    assert err <= 2 * base_err + FLOORS[torch.bfloat16]
    assert (out.float() - dense.float()).abs().max().item() <= 2 * base_err + FLOORS[torch.bfloat16]


@pytest.mark.cuda
def test_cuda_no_host_sync_and_graph_capture():
    q, kp, vp, table, prefix_len, mask, T = _cuda_case(1, [3000], 16, torch.float16, seed=3)
    table = torch.cat([table, torch.randint(0, kp.shape[0], (1, 400), device="cuda",
                                            dtype=torch.int32)], 1)
    eager = ops.tree_attention_paged(q, kp, vp, table, prefix_len, mask, T)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.tree_attention_paged(q, kp, vp, table, prefix_len, mask, T)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.tree_attention_paged(q, kp, vp, table, prefix_len, mask, T)
    prefix_len.fill_(6000)  # read on the device at replay
    graph.replay()
    torch.cuda.synchronize()
    again = ops.tree_attention_paged(q, kp, vp, table, prefix_len, mask, T)
    assert torch.equal(captured, again) and not torch.equal(captured, eager)
