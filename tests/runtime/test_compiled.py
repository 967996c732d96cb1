"""Compiled decode forwards: lossless with compile on.

The default path is one AOTInductor graph per model kept on disk (models/compiled_aot.py; its
cache across processes is tested in test_compiled_cache.py); the per-process torch.compile
path (models/compiled.py: frozen, one graph per bucket, padded rows) is what
EAGLE2_KERNELS_COMPILE_CACHE=0 selects and what the AOT path falls back to, tested here by the
bucket cases. Each compilation costs seconds even for these tiny models (an AOT one ~15 s the
first time, then a load), so the cases share one decoder per target; the rest of the suite
runs eagerly (conftest sets EAGLE2_KERNELS_COMPILE=0, which only "auto" honours).
"""

from __future__ import annotations

import functools
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import DecodeConfig, EagleDraftHead, TreeSpecDecoder  # noqa: E402
from eagle2_kernels.models.compiled import CompiledForward, _bit_words  # noqa: E402
from eagle2_kernels.models.target import DecodeContext  # noqa: E402
from eagle2_kernels.ops.tree import pack_bits  # noqa: E402
from local_models import PROMPT, build_local  # noqa: E402
from tiny_models import (  # noqa: E402
    first_prompt_pvalues,
    hf_greedy,
    prompt,
    sampling_setup,
    tiny_target,
    trained_setup,
)
from tolerances import FP32, FP32_COMPILED  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="Inductor needs a C++ compiler on CPU")
BUCKETS = (1, 4, 8)


@functools.lru_cache(maxsize=None)
def _decoder(arch: str, adaptive: bool):
    model, head, _ = trained_setup(arch)
    cfg = DecodeConfig(total_tokens=8, depth=3, top_k=4, adaptive=adaptive, compile=True, compile_buckets=BUCKETS)
    return TreeSpecDecoder(model, head, config=cfg)


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_greedy_equals_plain_greedy_fp32(arch, adaptive):
    model, head, prompts = trained_setup(arch)
    dec = _decoder(arch, adaptive)
    assert dec.compile_status.startswith("compiled"), dec.compile_status
    assert dec.head_compile_status.startswith("compiled"), dec.head_compile_status  # the head's step too
    cases = [prompts[0:1], prompts[1:2], prompt(model.config.vocab_size, 9, 5)]
    for ids in cases:
        out = dec.generate(ids, max_new_tokens=40)
        assert torch.equal(out.sequences, hf_greedy(model, ids, 40)), (arch, adaptive)
    # Long accepted paths were compacted through the compiled verify, and the plain loop
    # (n = 1, its own bucket) is exact too.
    assert max(out.stats.accept_lengths) >= 3 or adaptive
    ids = prompts[2:3]
    assert torch.equal(dec.generate_plain(ids, max_new_tokens=20).sequences, hf_greedy(model, ids, 20))


# Window (Mistral), window + hybrid layers + softcaps (Gemma-2), window + sinks + MoE (GPT-OSS);
# tests/runtime/test_any_model.py covers all six local architectures eagerly.
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gpt_oss"])
def test_compiled_local_attention_equals_plain_greedy_fp32(arch):
    """Sliding windows, hybrid local/global layers, softcaps and sinks reach the compiled
    operator per layer: exact past the window."""
    model = build_local(arch)
    ids = prompt(model.config.vocab_size, PROMPT, 5)
    cfg = DecodeConfig(total_tokens=8, depth=3, top_k=4, adaptive=False, compile=True, compile_buckets=(8,))
    dec = TreeSpecDecoder(model, EagleDraftHead.from_target(model), config=cfg)
    assert dec.compile_status.startswith("compiled"), dec.compile_status
    assert torch.equal(dec.generate(ids, max_new_tokens=24).sequences, hf_greedy(model, ids, 24)), arch


@pytest.mark.parametrize("aot", [False, True], ids=["buckets", "aot"])
def test_padded_bucket_rows_leave_real_rows_alone(aot, monkeypatch):
    """Per process (buckets), a forward over 5 tokens runs the 8-token graph; the AOT graph runs
    it unpadded. Either way its logits and features equal the eager forward's, and it writes
    the 5 real slots exactly where the eager one does."""
    if not aot:
        monkeypatch.setenv("EAGLE2_KERNELS_COMPILE_CACHE", "0")
    model = tiny_target("llama")
    dec = TreeSpecDecoder(model, None, config=DecodeConfig(total_tokens=8, depth=3, top_k=4, compile=True,
                                                          compile_buckets=(8,)))
    ad = dec._state.adapter
    torch.manual_seed(3)
    # A tree over 5 nodes: 0 -> 1, 2; 1 -> 3; 3 -> 4.
    parents = [-1, 0, 0, 1, 3]
    bits = torch.zeros(5, 5, dtype=torch.bool)
    for i, p in enumerate(parents):
        bits[i, i] = True
        while p >= 0:
            bits[i, p] = True
            p = parents[p]
    mask = pack_bits(bits).view(1, 5, -1)
    depth = torch.tensor([[0, 1, 1, 2, 3]])
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    prefix = torch.randint(0, model.config.vocab_size, (1, 11))
    outs = []
    for compiled in (False, True):
        cache = ad.new_cache(1, 40)
        cache.set_length(0)
        saved, ad.compiled = ad.compiled, (ad.compiled if compiled else None)
        try:
            ad.forward(prefix, torch.arange(11).view(1, 11), DecodeContext(cache, 0, None, 11))
            cache.set_length(11)
            logits, feats = ad.forward(ids, depth + 11, DecodeContext(cache, 11, mask, 5))
        finally:
            ad.compiled = saved
        outs.append((logits, feats, cache.kv[:, :, :, :16].clone()))
    (l0, f0, kv0), (l1, f1, kv1) = outs
    # The compiled forward ran (an AOT graph was loaded or built; else the bucket graph).
    assert ad.compiled.source in ("loaded", "built") if aot else isinstance(ad.compiled, CompiledForward)
    assert l1.shape == l0.shape == (1, 5, model.config.vocab_size)
    torch.testing.assert_close(l1, l0, **FP32_COMPILED)
    torch.testing.assert_close(f1, f0, **FP32_COMPILED)
    torch.testing.assert_close(kv1, kv0, **FP32)


def test_two_models_of_one_shape_never_share_a_graph():
    """Compiled graphs hold frozen weights: a second decoder over another model of the same
    architecture and shapes must compile its own, not replay the first one's."""
    torch.manual_seed(5)
    a = tiny_target("llama")
    b = type(a)(a.config).eval()  # same shapes, other random weights
    ids = prompt(a.config.vocab_size, 6, 2)
    for model in (a, b, a):
        dec = TreeSpecDecoder(model, None, config=DecodeConfig(total_tokens=8, depth=3, top_k=4, compile=True,
                                                              compile_buckets=(1,)))
        assert torch.equal(dec.generate_plain(ids, max_new_tokens=12).sequences, hf_greedy(model, ids, 12))


def test_decoders_over_one_model_share_its_graphs():
    model, head, prompts = trained_setup("llama")
    a = _decoder("llama", False)
    b = TreeSpecDecoder(model, head, config=DecodeConfig(total_tokens=6, depth=2, top_k=3, compile=True,
                                                        compile_buckets=BUCKETS))
    assert b._state.adapter.compiled is a._state.adapter.compiled
    ids = prompts[3:4]
    assert torch.equal(b.generate(ids, max_new_tokens=16).sequences, hf_greedy(model, ids, 16))


def test_one_graph_per_bucket_and_no_recompile(monkeypatch):
    """Per process: sizes inside a bucket reuse its graph: after every bucket has run once,
    further forwards of any size and a grown cache compile nothing new."""
    import torch._dynamo.utils as dutils

    monkeypatch.setenv("EAGLE2_KERNELS_COMPILE_CACHE", "0")

    model = tiny_target("qwen2")
    dec = TreeSpecDecoder(model, None, config=DecodeConfig(total_tokens=8, depth=3, top_k=4, compile=True,
                                                          compile_buckets=(1, 8)))
    ad = dec._state.adapter

    def run(n, capacity):
        cache = ad.new_cache(1, capacity)
        cache.set_length(3)
        m = pack_bits(torch.tril(torch.ones(n, n, dtype=torch.bool))).view(1, n, -1)
        ids = torch.randint(0, model.config.vocab_size, (1, n))
        return ad.forward(ids, (3 + torch.arange(n)).view(1, n), DecodeContext(cache, 3, m, n))

    run(1, 32)
    run(8, 32)
    before = dutils.counters["stats"]["unique_graphs"]
    for n, cap in [(1, 32), (2, 32), (5, 48), (8, 64), (7, 100)]:
        logits, _ = run(n, cap)
        assert logits.shape[1] == n
    assert dutils.counters["stats"]["unique_graphs"] == before
    # Larger than the last bucket: the eager path.
    assert isinstance(ad.compiled, CompiledForward) and ad.compiled.bucket(9) is None


def test_compiled_sampling_keeps_the_target_law():
    model, head = sampling_setup()
    cfg = DecodeConfig(total_tokens=6, depth=2, top_k=3, adaptive=False, compile=True, compile_buckets=(1, 8))
    dec = TreeSpecDecoder(model, head, config=cfg)
    assert dec.compile_status.startswith("compiled")
    pvalues = first_prompt_pvalues(dec, samples=500, seed=31)
    assert min(pvalues.values()) > 1e-3, pvalues


def test_compile_switches_and_status(monkeypatch):
    model = tiny_target("llama")
    off = TreeSpecDecoder(model, None, config=DecodeConfig(total_tokens=8, depth=3, top_k=4, compile=False))
    assert off.compile_status == "eager (compile=False)" and off._state.adapter.compiled is None
    monkeypatch.setenv("EAGLE2_KERNELS_COMPILE", "0")
    auto = TreeSpecDecoder(model, None, config=DecodeConfig(total_tokens=8, depth=3, top_k=4))
    assert auto.compile_status == "eager (EAGLE2_KERNELS_COMPILE=0)"
    with pytest.raises(ValueError, match="compile must be"):
        DecodeConfig(compile="yes")
    with pytest.raises(ValueError, match="compile_buckets"):
        DecodeConfig(compile_buckets=(0, 4))
    # No C++ compiler: "auto" falls back with the reason, True refuses.
    monkeypatch.delenv("EAGLE2_KERNELS_COMPILE")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    fallback = TreeSpecDecoder(model, None, config=DecodeConfig(total_tokens=8, depth=3, top_k=4))
    assert "no C++ compiler" in fallback.compile_status
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        TreeSpecDecoder(model, None, config=DecodeConfig(total_tokens=8, depth=3, top_k=4, compile=True))


def test_bit_words_and_bucket_choice():
    idx = torch.tensor([0, 5, 31, 32, 63])
    words = _bit_words(idx, torch.int32).tolist()
    assert words == [1, 32, -(2**31), 1, -(2**31)]
    fwd = CompiledForward.__new__(CompiledForward)
    fwd.buckets = (1, 4, 8)
    assert [fwd.bucket(n) for n in (1, 2, 4, 5, 8, 9)] == [1, 4, 4, 8, 8, None]
