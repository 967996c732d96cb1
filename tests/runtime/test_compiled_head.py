"""Compiled draft-head steps (models/compiled_head.py): the graph computes what the head's own
tree_step and logits compute, writes the same cache slots, and decoding with it stays exact.

One AOTInductor build of the trained tiny Llama's head (fp32, ~20 s on 2 cores) in a folder of
its own, shared by the module.
"""

from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import DecodeConfig, TreeSpecDecoder  # noqa: E402
from eagle2_kernels.cache import PagedKVCache, StaticKVCache  # noqa: E402
from eagle2_kernels.models.compiled_head import CompiledHead  # noqa: E402
from eagle2_kernels.ops.tree import pack_bits  # noqa: E402
from eagle2_kernels.runtime.costmodel import CostModel  # noqa: E402
from tiny_models import hf_greedy, trained_setup  # noqa: E402
from tolerances import FP32, FP32_COMPILED  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="Inductor needs a C++ compiler on CPU")


class _Counting:
    """A runner that counts its calls."""

    def __init__(self, runner):
        self.runner, self.calls = runner, 0

    def run(self, args):
        self.calls += 1
        return self.runner.run(args)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(head, CompiledHead over it with its graph built, counting runner)."""
    _, head, _ = trained_setup("llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EAGLE2_KERNELS_CACHE", str(tmp_path_factory.mktemp("e2k_head_cache")))
        ch = CompiledHead(head)
        ch.ensure()
        assert ch.status == "step: built", ch.status
        # A second wrapper (another process would do the same) loads the stored graph.
        again = CompiledHead(head)
        again.ensure()
        assert again.status == "step: loaded", again.status
    counter = _Counting(ch._runners[False])
    ch._runners[False] = counter
    return head, ch, counter


def _cache(head, batch, lengths, capacity=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = StaticKVCache(1, batch, head.num_kv_heads, capacity, head.head_dim, torch.float32, "cpu")
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    cache.set_lengths(lengths)
    return cache


@pytest.mark.parametrize("slot_kind", ["list", "tensor"])
def test_second_level_step_matches_the_head(compiled, slot_kind):
    """The expansion's second level over a ragged batch: K=3 nodes per sequence written after
    the first level's K slots, each seeing the prefix, its level-1 parent and itself."""
    head, ch, counter = compiled
    K, lengths = 3, [7, 11]
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, K, head.hidden_size, generator=g)
    tokens = torch.randint(0, head.draft_vocab_size, (2, K), generator=g)
    positions = torch.tensor(lengths).view(2, 1) + 1 + torch.zeros(2, K, dtype=torch.int64)
    bits = torch.zeros(2, K, 2 * K, dtype=torch.bool)
    parents = [[2, 0, 0], [1, 1, 2]]  # level-1 parent of each level-2 node, per sequence
    for b in range(2):
        for i, p in enumerate(parents[b]):
            bits[b, i, p] = bits[b, i, K + i] = True
    mask = pack_bits(bits)
    slots = [n + K for n in lengths]
    slot = slots if slot_kind == "list" else torch.tensor(slots)
    outs = []
    for runner in (head, ch):
        cache = _cache(head, 2, lengths)
        before = counter.calls
        with torch.no_grad():
            hs = runner.tree_step(feats, tokens, positions, cache, slot, mask, 2 * K)
            logits = runner.logits(hs)
        outs.append((hs, logits, cache.kv.clone()))
    assert counter.calls == before + 1  # the compiled step ran (once, logits included)
    (h0, l0, kv0), (h1, l1, kv1) = outs
    torch.testing.assert_close(h1, h0, **FP32_COMPILED)
    torch.testing.assert_close(l1, l0, **FP32_COMPILED)
    torch.testing.assert_close(kv1, kv0, **FP32)


def test_other_calls_run_on_the_head(compiled):
    """A forced ops backend, a paged draft cache and logits of another tensor take the head's
    own code; attributes are the head's."""
    head, ch, counter = compiled
    assert ch.hidden_size == head.hidden_size and ch.draft_to_target is head.draft_to_target
    feats = torch.randn(1, 2, head.hidden_size)
    tokens = torch.tensor([[1, 2]])
    mask = pack_bits(torch.ones(2, 2, dtype=torch.bool).tril()).view(1, 2, -1)
    before = counter.calls
    with torch.no_grad():
        cache = _cache(head, 1, [4])
        ch.tree_step(feats, tokens, torch.tensor([[4, 5]]), cache, [4], mask, 2, backend="reference")
        paged = PagedKVCache(1, 1, head.num_kv_heads, 16, head.head_dim, torch.float32, "cpu", block_size=4)
        paged.set_lengths([4])
        ch.tree_step(feats, tokens, torch.tensor([[4, 5]]), paged, [4], mask, 2)
        x = torch.randn(1, 1, head.hidden_size)
        torch.testing.assert_close(ch.logits(x), head.logits(x), rtol=0, atol=0)
    assert counter.calls == before


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_decoding_with_compiled_head_steps_is_exact_fp32(compiled, adaptive):
    """Swapped into a decoder, the compiled steps draft the same trees as the head (so the same
    output and acceptance), and the output equals plain greedy decoding."""
    head, ch, counter = compiled
    model, _, prompts = trained_setup("llama")
    cfg = DecodeConfig(total_tokens=8, depth=3, top_k=4, adaptive=adaptive, compile=False)
    costs = CostModel.synthetic([0.04 + 0.004 * i for i in range(8)], draft_s=0.002)  # the same sizing
    eager = TreeSpecDecoder(model, head, config=cfg, cost_model=costs)
    dec = TreeSpecDecoder(model, head, config=cfg, cost_model=costs)
    dec._state.head = ch  # (the decoder's draft rounds read the head from its state)
    before = counter.calls
    for i in range(3):
        ids = prompts[i : i + 1]
        out, ref = dec.generate(ids, max_new_tokens=30), eager.generate(ids, max_new_tokens=30)
        assert torch.equal(out.sequences, ref.sequences) and out.stats.accept_lengths == ref.stats.accept_lengths
        assert torch.equal(out.sequences, hf_greedy(model, ids, 30))
    assert counter.calls > before


def test_compile_head_switches(monkeypatch):
    from eagle2_kernels.models.compiled_head import compile_head

    _, head, _ = trained_setup("llama")
    monkeypatch.delenv("EAGLE2_KERNELS_COMPILE", raising=False)
    monkeypatch.delenv("EAGLE2_KERNELS_COMPILE_CACHE", raising=False)
    assert compile_head(None) is None
    assert isinstance(compile_head(head, "auto"), CompiledHead) and isinstance(compile_head(head, True), CompiledHead)
    assert compile_head(head, False) is head
    monkeypatch.setenv("EAGLE2_KERNELS_COMPILE", "0")  # turns "auto" off, not True
    assert compile_head(head, "auto") is head and isinstance(compile_head(head, True), CompiledHead)
    monkeypatch.setenv("EAGLE2_KERNELS_COMPILE_CACHE", "0")  # per-process compilation: the head stays eager
    assert compile_head(head, True) is head
    monkeypatch.delenv("EAGLE2_KERNELS_COMPILE_CACHE")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler
    assert compile_head(head, True) is head


def test_decoder_drives_the_compiled_head_when_compile_is_on(monkeypatch):
    """compile on: the rounds drive a CompiledHead over the user's head (``dec.draft`` stays the
    user's) and the cost model is keyed apart from the eager head's; compile off: the head itself."""
    from eagle2_kernels import DecodeConfig, TreeSpecDecoder
    from eagle2_kernels.runtime.costmodel import cost_key

    model, head, _ = trained_setup("llama")
    monkeypatch.delenv("EAGLE2_KERNELS_COMPILE_CACHE", raising=False)
    on = TreeSpecDecoder(model, head, config=DecodeConfig(total_tokens=6, depth=2, top_k=3, compile=True))
    off = TreeSpecDecoder(model, head, config=DecodeConfig(total_tokens=6, depth=2, top_k=3, compile=False))
    assert isinstance(on._state.head, CompiledHead) and on._state.head.head is head and on.draft is head
    assert on.head_compile_status == "compiled: not loaded yet"
    assert off._state.head is head and off.head_compile_status.startswith("eager (compile off")
    assert TreeSpecDecoder(model, None, config=DecodeConfig(total_tokens=6, depth=2, top_k=3,
                                                           compile=False)).head_compile_status == "no head"
    k_on = cost_key(on._state.adapter, on._state.head, on.config, 1)["head"]
    k_off = cost_key(off._state.adapter, off._state.head, off.config, 1)["head"]
    assert k_on[0] == k_off[0] == type(head).__name__ and k_on[1:2] == ["compiled"] and k_off[1:2] == ["eager"]
