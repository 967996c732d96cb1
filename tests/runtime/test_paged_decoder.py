"""The decoder with the target's KV in pages (``kv_block_size=``): the paged ops run end to end
(tree_attention_paged in every verify forward, kv_compact_paged at every commit) and the output
is exactly plain greedy decoding in fp32, for several page sizes, ragged batches, the adaptive,
fixed and static rounds, every op backend that runs here; sampling keeps the target's law."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import TreeSpecDecoder  # noqa: E402
from eagle2_kernels.cache import PagedKVCache, StaticKVCache  # noqa: E402
from conftest import triton_runs_here  # noqa: E402
from tiny_models import (  # noqa: E402
    first_prompt_pvalues,
    fixed,
    hf_greedy,
    one_thread,  # noqa: F401  (autouse fixture)
    prompt,
    sampling_setup,
    trained_setup,
)
from tolerances import EXACT  # noqa: E402


def _rows(model, prompts):
    vocab = model.config.vocab_size
    return [prompts[0, :6], prompts[1, :3], torch.cat([prompts[2], prompt(vocab, 5, 3)[0]])]


CASES = [pytest.param("llama", 1, {}, id="llama-page1-adaptive"),
         pytest.param("llama", 3, fixed(), id="llama-page3-fixed"),
         pytest.param("llama", 16, fixed(static_round=True), id="llama-page16-static"),
         pytest.param("qwen2", 3, {}, id="qwen2-page3-adaptive"),
         pytest.param("qwen2", 5, fixed(static_round=True), id="qwen2-page5-static"),
         pytest.param("mistral", 4, fixed(), id="mistral-page4-fixed")]


@pytest.mark.parametrize("arch, block, mode", CASES)
def test_paged_greedy_is_exact(arch, block, mode):
    model, head, prompts = trained_setup(arch)
    rows = _rows(model, prompts)
    dec = TreeSpecDecoder(model, head, total_tokens=10, depth=4, top_k=3, kv_block_size=block, **mode)
    out = dec.generate(rows, 30, eos_token_id=[])
    assert isinstance(dec._state.tcache, PagedKVCache) and dec._state.tcache.block_size == block
    lmax = max(r.numel() for r in rows)
    for b, r in enumerate(rows):
        assert out.sequences[b, lmax:].tolist() == hf_greedy(model, r[None], 30)[0, r.numel():].tolist()
    assert max(out.stats.accept_lengths[1:]) >= 6  # compaction of long paths was exercised


@pytest.mark.skipif(not triton_runs_here(), reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_paged_greedy_with_the_triton_kernels():
    model, head, prompts = trained_setup("llama")
    rows = _rows(model, prompts)[:2]
    dec = TreeSpecDecoder(model, head, **fixed(total_tokens=8, depth=3, top_k=3), kv_block_size=4, backend="triton")
    out = dec.generate(rows, 16, eos_token_id=[])
    lmax = max(r.numel() for r in rows)
    for b, r in enumerate(rows):
        assert out.sequences[b, lmax:].tolist() == hf_greedy(model, r[None], 16)[0, r.numel():].tolist()


def test_paged_sampling_keeps_the_target_law():
    model, head = sampling_setup()
    dec = TreeSpecDecoder(model, head, **fixed(total_tokens=6, depth=2, top_k=3), kv_block_size=2)
    pvalues = first_prompt_pvalues(dec, samples=500, seed=29)
    assert min(pvalues.values()) > 1e-3, pvalues


def test_paged_cache_matches_the_dense_one():
    """Writes at per-sequence and device-tensor starts, then attention and compaction: the paged
    cache gives the dense cache's results bit for bit (reference backend)."""
    torch.manual_seed(0)
    B, H, D, L, cap = 2, 2, 8, 2, 40
    dense = StaticKVCache(L, B, H, cap, D, torch.float32, "cpu")
    paged = PagedKVCache(L, B, H, cap, D, torch.float32, "cpu", block_size=3)
    assert paged.capacity >= cap and paged.block_table.shape == (B, -(-cap // 3))
    for c in (dense, paged):
        c.set_lengths([7, 11])
    for layer in range(L):
        for start in (0, [7, 11], torch.tensor([9, 13])):
            k, v = torch.randn(B, H, 5, D), torch.randn(B, H, 5, D)
            dense.write(layer, start, k, v)
            paged.write(layer, start, k, v)
    mask = torch.tensor([[[1], [3], [5], [9], [17]]] * B, dtype=torch.int32)  # a chain-ish tree
    q = torch.randn(B, 4, 5, D)
    for layer in range(L):
        a = dense.attend(layer, q, mask, 5, None, backend="reference")
        b = paged.attend(layer, q, mask, 5, None, backend="reference")
        torch.testing.assert_close(a, b, **EXACT)
    path = torch.tensor([[0, 2, 3, -1], [0, 1, 4, 3]])
    alen = torch.tensor([3, 4])
    dense.compact(path, alen, backend="reference")
    paged.compact(path, alen, backend="reference")
    for layer in range(L):
        flat = paged.pages[2 * layer].view(-1, H, D)
        for b_ in range(B):
            for pos in range(cap):
                page = int(paged.block_table[b_, pos // 3])
                torch.testing.assert_close(flat[page * 3 + pos % 3], dense.keys(layer)[b_, :, pos], **EXACT)
    with pytest.raises(ValueError, match="exceeds the capacity"):
        paged.write(0, paged.capacity - 2, k, v)
    with pytest.raises(AttributeError, match="pages"):
        paged.kv


def test_bad_block_size():
    model, head, _ = trained_setup("llama")
    with pytest.raises(ValueError, match="kv_block_size"):
        TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3, kv_block_size=0)
