"""The native graph operators of the compiled CPU forward: the AVX2 bf16-weight linear
(``eagle2::linear_bf16w``), the measured choice of it per machine, and the native
cache-writing tree attention (``eagle2::cache_tree_attention_cpu``) against the Python one."""

from __future__ import annotations

import json

import pytest
import torch

from eagle2_kernels import _native
from eagle2_kernels.models import matmul
from tests.tiny_models import tiny_model
from tests.trees import make_tree

needs_kernel = pytest.mark.skipif(not matmul.available(), reason="needs the native extension on an AVX2 + FMA CPU")
needs_native = pytest.mark.skipif(not _native.available(), reason="needs the native extension")


def _reference(x, w, b):
    """fp32 products and sums, one rounding to x's dtype: the operator's contract."""
    y = x.float().reshape(-1, x.shape[-1]) @ w.float().t()
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 256, 257])  # 257+: torch's fp32 GEMM
@pytest.mark.parametrize("out_in", [(1, 1), (7, 9), (37, 576), (100, 64), (3, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_bf16w_is_an_fp32_accumulated_product(rows, out_in, dtype):
    o, i = out_in
    gen = torch.Generator().manual_seed(rows * 1000 + o)
    w = torch.randn(o, i, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, i, generator=gen).to(dtype)
    b = torch.randn(o, generator=gen).to(torch.bfloat16)
    for bias in (None, b):
        got = matmul.linear_bf16w(x, w, bias)
        ref = _reference(x, w, bias)
        assert got.dtype == dtype and got.shape == ref.shape
        exact = (x.float() @ w.float().t() + (0 if bias is None else bias.float()))
        # Only the order of the fp32 sum differs: fp32 output within fp32 rounding of the sum;
        # bf16 output within one bf16 step of the correctly rounded product.
        scale = (x.float().abs() @ w.float().abs().t()).clamp_min(1e-6) + (0 if bias is None else bias.float().abs())
        err = ((got.float() - exact).abs() / scale).max().item()
        assert err <= (2e-6 * max(1, i) ** 0.5 if dtype == torch.float32 else 2 ** -7), err
        if dtype == torch.bfloat16:
            assert ((got.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-30 + scale * 1e-6).all()


@needs_kernel
def test_linear_bf16w_row_results_do_not_depend_on_the_row_count():
    """A row's output is bit-identical alone or among others (up to the 256 rows the
    streaming kernel takes): a verify forward over a tree computes each token's logits
    exactly as a one-token forward does, so speculation cannot change the output. (Up to 4
    rows the weights are widened in registers, beyond that once per block into a buffer.)"""
    w = torch.randn(300, 580).to(torch.bfloat16)  # 580: a tail after the 8-wide steps
    x = torch.randn(256, 580).to(torch.bfloat16)
    full = matmul.linear_bf16w(x, w)
    for lo, hi in ((0, 1), (5, 6), (3, 7), (3, 11), (64, 128), (255, 256)):
        assert torch.equal(matmul.linear_bf16w(x[lo:hi], w), full[lo:hi])


@needs_kernel
def test_linear_bf16w_shapes_batch_dims_and_errors():
    w = torch.randn(10, 16).to(torch.bfloat16)
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    y = matmul.linear_bf16w(x, w)
    assert y.shape == (2, 3, 10) and torch.equal(y.reshape(6, 10), matmul.linear_bf16w(x.reshape(6, 16), w))
    assert matmul.linear_bf16w(x[:, :0], w).shape == (2, 0, 10)
    with pytest.raises(TypeError, match="bfloat16"):
        matmul.linear_bf16w(x, w.float())
    with pytest.raises(ValueError, match="in-features"):
        matmul.linear_bf16w(x[..., :15], w)
    with pytest.raises(TypeError, match="float32"):
        matmul.linear_bf16w(x.double(), w)


def test_choice_is_torch_without_bf16_linears_and_follows_the_override(monkeypatch):
    fp32 = tiny_model("llama", vocab_size=96)
    assert matmul.bf16_linears(fp32) == [] and matmul.choice(fp32) == "torch"
    bf16 = tiny_model("llama", vocab_size=96).to(torch.bfloat16)
    assert len(matmul.bf16_linears(bf16)) == len([m for m in bf16.modules() if isinstance(m, torch.nn.Linear)])
    monkeypatch.setenv("EAGLE2_KERNELS_MATMUL", "torch")
    assert matmul.choice(bf16) == "torch"
    monkeypatch.setenv("EAGLE2_KERNELS_MATMUL", "eagle2")
    assert matmul.choice(bf16) == ("eagle2" if matmul.available() else "torch")


@needs_kernel
def test_choice_is_measured_once_per_machine_and_kept_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE2_KERNELS_CACHE", str(tmp_path))
    monkeypatch.delenv("EAGLE2_KERNELS_MATMUL", raising=False)
    monkeypatch.setattr(matmul, "_CHOICES", {})
    calls = []
    timed = matmul._time_kernels

    def spy(shapes, *a, **k):
        calls.append(shapes)
        return timed(shapes, *a, **k)

    monkeypatch.setattr(matmul, "_time_kernels", spy)
    model = tiny_model("qwen2", vocab_size=96).to(torch.bfloat16)
    first = matmul.choice(model)
    (record,) = list((tmp_path / "matmul").glob("*.json"))
    saved = json.loads(record.read_text())
    assert saved["choice"] == first and set(saved["ms"]) == {"torch", "eagle2"} and len(calls) == 1
    assert first == ("eagle2" if saved["ms"]["eagle2"] < 0.9 * saved["ms"]["torch"] else "torch")
    # Another process (an empty in-memory table) reads the file, whatever it says.
    monkeypatch.setattr(matmul, "_CHOICES", {})
    saved["choice"] = "torch" if first == "eagle2" else "eagle2"
    record.write_text(json.dumps(saved))
    assert matmul.choice(model) == saved["choice"] and len(calls) == 1


@needs_kernel
def test_patched_linears_run_the_kernel_and_are_restored():
    model = tiny_model("llama", vocab_size=96).to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    linears = matmul.bf16_linears(model)
    with torch.no_grad():
        before = model(ids).logits
        with matmul.patched(linears):
            inside = model(ids).logits
            lin = linears[0]
            probe = torch.randn(3, lin.in_features).to(torch.bfloat16)
            assert torch.equal(lin(probe), matmul.linear_bf16w(probe, lin.weight, lin.bias))
            assert torch.equal(matmul.linear(probe, lin.weight), matmul.linear_bf16w(probe, lin.weight))
        after = model(ids).logits
    assert all("forward" not in m.__dict__ for m in linears)
    assert torch.equal(before, after)
    # Same math up to the order of fp32 sums: close, bf16-level differences at most.
    assert (inside.float() - before.float()).norm() <= 0.05 * before.float().norm()
    probe = torch.randn(3, linears[0].in_features).to(torch.bfloat16)
    assert torch.equal(matmul.linear(probe, linears[0].weight), torch.nn.functional.linear(probe, linears[0].weight))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("local", [{}, {"window": 3}, {"softcap": 5.0}])
def test_native_cache_attention_equals_the_python_operator(dtype, local):
    from eagle2_kernels.models.compiled import cache_tree_attention, native_op

    op = native_op("cache_tree_attention_cpu")
    assert op is not None
    B, Hq, Hkv, n, Dh, L, cap = 3, 4, 2, 5, 16, 2, 32
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, n, Dh, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, n, Dh, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, n, Dh, generator=gen).to(dtype)
    kv = torch.randn(2 * L, B, Hkv, cap, Dh, generator=gen).to(dtype)
    lengths = torch.tensor([0, 7, 20], dtype=torch.int32)
    mask = make_tree([[-1, 0, 0, 1, 2]] * B, [[0] * n] * B).mask
    kv_py, kv_c = kv.clone(), kv.clone()
    want = cache_tree_attention(q, k, v, kv_py, 1, lengths, mask, 0.25, **local)
    got = op(q, k, v, kv_c, 1, lengths, mask, 0.25, **local)
    assert torch.equal(kv_c, kv_py) and torch.equal(got, want)
    with pytest.raises(ValueError, match="does not fit"):
        op(q, k, v, kv_c, 1, torch.tensor([0, 7, 30], dtype=torch.int32), mask, 0.25)


@needs_native
def test_native_head_attention_equals_the_python_operator():
    from eagle2_kernels.models.compiled import native_op
    from eagle2_kernels.models.compiled_head import head_cache_attention
    from eagle2_kernels.ops.tree import pack_bits

    op = native_op("head_cache_attention_cpu")
    assert op is not None
    B, Hq, Hkv, n, Dh, cap = 2, 4, 2, 3, 8, 24
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, h, n, Dh, generator=gen) for h in (Hq, Hkv, Hkv))
    kv = torch.randn(2, B, Hkv, cap, Dh, generator=gen)
    lengths = torch.tensor([4, 9], dtype=torch.int32)
    tree_len = torch.tensor(5)  # two earlier tree rows, then these three at slots +2 .. +4
    slot = lengths.to(torch.int64) + 2
    mask = pack_bits(torch.ones(n, 5, dtype=torch.bool).tril(diagonal=2)).expand(B, n, -1).contiguous()
    kv_py, kv_c = kv.clone(), kv.clone()
    want = head_cache_attention(q, k, v, kv_py, slot, lengths, mask, tree_len, 0.3)
    got = op(q, k, v, kv_c, slot, lengths, mask, tree_len, 0.3)
    assert torch.equal(kv_c, kv_py) and torch.equal(got, want)
    with pytest.raises(ValueError, match="does not fit"):
        op(q, k, v, kv_c, torch.tensor([4, 22]), lengths, mask, tree_len, 0.3)
