"""kv_compact: bit-exact against an independent slot-by-slot model, overlapping moves included."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import requires_triton, triton_device
from eagle2_kernels.ops.kv_compact.reference import kv_compact as ref_kv_compact

import eagle2_kernels.ops as ops

INTERP_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8]


def expected(cache: torch.Tensor, prefix_len, path, accept_len) -> torch.Tensor:
    """Slot by slot from an untouched copy: dst prefix+j <- src prefix+path[j]."""
    before = cache.clone()
    out = cache.clone()
    for b in range(cache.shape[1]):
        P = int(prefix_len[b])
        for j in range(int(accept_len[b])):
            out[:, b, :, P + j] = before[:, b, :, P + int(path[b, j])]
    return out


def random_bits_cache(shape, dtype, seed=0, device="cpu") -> torch.Tensor:
    """Random bit patterns (NaN payloads and infinities included for float dtypes)."""
    g = torch.Generator(device=device).manual_seed(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    info = torch.iinfo(ints)
    raw = torch.randint(info.min, info.max, shape, generator=g, dtype=ints, device=device)
    return raw.view(dtype)


def random_path(T: int, accepted: int, rng: random.Random) -> list[int]:
    """Increasing node indices from the root (0), padded with -1 to T."""
    nodes = [0] + sorted(rng.sample(range(1, T), accepted - 1)) if accepted else []
    return nodes + [-1] * (T - len(nodes))


def bits(x: torch.Tensor) -> torch.Tensor:
    size = x.element_size()
    return x.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize(
    "path, accepted, want",
    [
        # slot values are their index; prefix 2, tree slots 2..7 (nodes 0..5)
        pytest.param([0, 2, 3, -1, -1, -1], 3, [0, 1, 2, 4, 5, 5, 6, 7], id="0-2-3"),
        pytest.param([0, 1, 3, -1, -1, -1], 3, [0, 1, 2, 3, 5, 5, 6, 7], id="0-1-3"),
        pytest.param([0, 3, 4, 5, -1, -1], 4, [0, 1, 2, 5, 6, 7, 6, 7], id="0-3-4-5"),
        pytest.param([0, 1, 2, 3, 4, 5], 6, list(range(8)), id="full-chain-identity"),
        pytest.param([0, 5, -1, -1, -1, -1], 2, [0, 1, 2, 7, 4, 5, 6, 7], id="root-and-last"),
        pytest.param([0, -1, -1, -1, -1, -1], 1, list(range(8)), id="root-only"),
        pytest.param([-1] * 6, 0, list(range(8)), id="nothing"),
    ],
)
def test_reference_hand_made(path, accepted, want):
    cache = torch.arange(8.0).reshape(1, 1, 1, 8, 1).repeat(2, 1, 3, 1, 2)
    out = ref_kv_compact(cache, torch.tensor([2]), torch.tensor([path]), torch.tensor([accepted]))
    assert out is cache
    for n in range(2):
        for h in range(3):
            assert cache[n, 0, h, :, 0].tolist() == want and cache[n, 0, h, :, 1].tolist() == want


def test_reference_matches_slot_model_random():
    rng = random.Random(0)
    for trial in range(5):
        B, T = 3, rng.randrange(2, 40)
        cache = random_bits_cache((4, B, 2, T + 30, 8), torch.float32, seed=trial)
        prefix = torch.tensor([rng.randrange(0, 30) for _ in range(B)])
        accept = torch.tensor([rng.randrange(0, T + 1) for _ in range(B)])
        path = torch.tensor([random_path(T, int(a), rng) for a in accept])
        want = expected(cache, prefix, path, accept)
        ref_kv_compact(cache, prefix, path, accept)
        assert torch.equal(bits(cache), bits(want))


def test_reference_rejects_out_of_range():
    cache = torch.zeros(2, 1, 1, 6, 4)
    with pytest.raises(ValueError, match="path|prefix_len|cache"):
        ref_kv_compact(cache, torch.tensor([3]), torch.tensor([[0, 4]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="path|padding"):
        ref_kv_compact(cache, torch.tensor([0]), torch.tensor([[0, -1]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="accept_len"):
        ref_kv_compact(cache, torch.tensor([0]), torch.tensor([[0, 1]]), torch.tensor([3]))


@pytest.mark.parametrize(
    "args, exc, match",
    [
        pytest.param(dict(cache=torch.zeros(2, 1, 6, 4)), ValueError, "cache", id="cache-rank"),
        pytest.param(dict(path=torch.zeros(2, 3, dtype=torch.int64)), ValueError, "path",
                     id="path-batch"),
        pytest.param(dict(path=torch.zeros(1, 3)), TypeError, "path", id="path-float"),
        pytest.param(dict(prefix_len=torch.zeros(1, dtype=torch.int16)), TypeError, "prefix_len",
                     id="prefix-int16"),
        pytest.param(dict(accept_len=torch.zeros(2, dtype=torch.int64)), ValueError, "accept_len",
                     id="accept-shape"),
        pytest.param(dict(cache=[0.0]), TypeError, "cache", id="cache-list"),
    ],
)
def test_public_input_checks(args, exc, match):
    kw = dict(cache=torch.zeros(2, 1, 1, 6, 4), prefix_len=torch.tensor([0]),
              path=torch.tensor([[0, 1, -1]]), accept_len=torch.tensor([2]))
    kw.update(args)
    with pytest.raises(exc, match=match):
        ops.kv_compact(**kw, backend="reference")


# ----------------------------------------------------------------------------- triton


@requires_triton
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_triton_overlapping_paths_bit_exact(dtype):
    # Sequence 0: [0, 2, 3] (slot p+2 is read and written); sequence 1: [0, 1, 3];
    # sequence 2: nothing accepted; sequence 3: root only.
    dev = triton_device()
    cache = random_bits_cache((6, 4, 2, 16, 8), dtype, seed=1, device=dev)
    prefix = torch.tensor([3, 0, 5, 9], dtype=torch.int32, device=dev)
    path = torch.tensor([[0, 2, 3, -1, -1], [0, 1, 3, -1, -1], [-1] * 5, [0, -1, -1, -1, -1]],
                        dtype=torch.int32, device=dev)
    accept = torch.tensor([3, 3, 0, 1], dtype=torch.int32, device=dev)
    want = expected(cache.cpu(), prefix.cpu(), path.cpu(), accept.cpu())
    out = ops.kv_compact(cache, prefix, path, accept, backend="triton")
    assert out is cache
    assert torch.equal(bits(cache.cpu()), bits(want))


# id, N, B, Hkv, T, Dh, extra slots
SHAPES = [
    ("N4-B1-T7-Dh16", 4, 1, 1, 7, 16, 5),
    ("N6-B3-T60-Dh64", 6, 3, 2, 60, 64, 20),
    ("N2-B2-T130-Dh128-colsplit", 2, 2, 2, 130, 128, 4),
    ("N4-B2-T33-Dh48", 4, 2, 3, 33, 48, 0),
    ("N2-B1-T1-Dh8", 2, 1, 1, 1, 8, 3),
]


@requires_triton
@pytest.mark.parametrize("N, B, Hkv, T, Dh, extra", [pytest.param(*s[1:], id=s[0]) for s in SHAPES])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_triton_random_paths(N, B, Hkv, T, Dh, extra, index_dtype):
    rng = random.Random(N * 1000 + T)
    dev = triton_device()
    for trial in range(2):
        prefixes = [rng.randrange(0, extra + 1) for _ in range(B)]
        Lmax = max(prefixes) + T + (extra - max(prefixes))
        dtype = rng.choice([torch.float16, torch.float32])
        cache = random_bits_cache((N, B, Hkv, Lmax, Dh), dtype, seed=trial, device=dev)
        accept = [rng.randrange(0, T + 1) for _ in range(B)]
        if trial == 1:
            accept[0] = T  # the whole tree is one path (a chain)
        path = torch.tensor([random_path(T, a, rng) for a in accept], dtype=index_dtype)
        prefix_t = torch.tensor(prefixes, dtype=index_dtype)
        accept_t = torch.tensor(accept, dtype=index_dtype)
        want = expected(cache.cpu(), prefix_t, path, accept_t)
        ops.kv_compact(cache, prefix_t.to(dev), path.to(dev), accept_t.to(dev), backend="triton")
        assert torch.equal(bits(cache.cpu()), bits(want))


@requires_triton
def test_triton_strided_cache():
    # Storage [N, B, Lmax, Hkv, Dh] seen as [N, B, Hkv, Lmax, Dh]: strides, not contiguity.
    dev = triton_device()
    base = random_bits_cache((4, 2, 12, 3, 16), torch.float16, seed=3, device=dev)
    cache = base.permute(0, 1, 3, 2, 4)
    prefix = torch.tensor([2, 4], device=dev)
    path = torch.tensor([[0, 3, 4, 6], [0, 2, -1, -1]], device=dev)
    accept = torch.tensor([4, 2], device=dev)
    want = expected(cache.cpu(), prefix.cpu(), path.cpu(), accept.cpu())
    ops.kv_compact(cache, prefix, path, accept, backend="triton")
    assert torch.equal(bits(cache.cpu()), bits(want))


@requires_triton
def test_triton_matches_reference_randomized():
    rng = random.Random(7)
    dev = triton_device()
    for trial in range(4):
        N, B, Hkv = 2 * rng.randrange(1, 4), rng.randrange(1, 4), rng.randrange(1, 3)
        T, Dh = rng.randrange(1, 70), rng.choice([8, 16, 32])
        Lmax = T + rng.randrange(0, 40)
        prefix = torch.tensor([rng.randrange(0, Lmax - T + 1) for _ in range(B)])
        accept = torch.tensor([rng.randrange(0, T + 1) for _ in range(B)])
        path = torch.tensor([random_path(T, int(a), rng) for a in accept])
        cache = random_bits_cache((N, B, Hkv, Lmax, Dh), torch.float32, seed=trial)
        mine = cache.clone().to(dev)
        ref_kv_compact(cache, prefix, path, accept)
        ops.kv_compact(mine, prefix.to(dev), path.to(dev), accept.to(dev), backend="triton")
        assert torch.equal(bits(mine.cpu()), bits(cache))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
def test_cuda_llama_cache_bf16_no_sync_and_graph():
    # 32 layers of Llama-3-8B KV (N = 64, Hkv 8, Dh 128), T = 60, batch 4.
    rng = random.Random(11)
    N, B, Hkv, Lmax, Dh, T = 64, 4, 8, 1024, 128, 60
    cache = random_bits_cache((N, B, Hkv, Lmax, Dh), torch.bfloat16, seed=0, device="cuda")
    prefix = torch.tensor([100, 900, 0, Lmax - T], device="cuda")
    accept = torch.tensor([1, 6, T, 3], device="cuda")
    path = torch.tensor([random_path(T, int(a), rng) for a in accept.tolist()], device="cuda")
    want = expected(cache.cpu(), prefix.cpu(), path.cpu(), accept.cpu())
    before = cache.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.kv_compact(cache, prefix, path, accept)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(bits(cache.cpu()), bits(want))
    # Captured in a CUDA graph, replayed on the original contents: same result.
    cache.copy_(before)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.kv_compact(cache, prefix, path, accept)
    cache.copy_(before)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(cache.cpu()), bits(want))


@requires_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU tensors go to the interpreter only without a GPU test run")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.kv_compact(torch.zeros(2, 1, 1, 4, 2), torch.tensor([0]), torch.tensor([[0]]),
                       torch.tensor([1]), backend="triton")
