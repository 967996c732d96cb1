"""Target adapter: our forwards through transformers' attention interface reproduce the model's
own logits and features (prefill + tree with a branching mask, GQA) for Llama, Qwen2 and Mistral,
write the static cache where the model's own cache would hold its keys, and leave the model's
attention implementation untouched outside our forwards; a forward that misses our attention in
any layer raises."""

from __future__ import annotations

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
from eagle2_kernels.models.target import ATTN_NAME, DecodeContext, TargetAdapter  # noqa: E402
from tiny_models import (  # noqa: E402
    ARCHS,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_model,
)
from tolerances import FP32, FP32_TIGHT  # noqa: E402


def tiny(arch):
    # 2 layers, hidden 64, 4 query / 2 KV heads (real models: 24-80 layers, hidden 2-8k).
    return tiny_model(arch, vocab_size=211)


def _mask_rows(parents):
    """Packed ancestor-or-self masks [1, T, 1] int32 of a small tree (T <= 31)."""
    rows = []
    for i in range(len(parents)):
        bits, j = 0, i
        while j >= 0:
            bits |= 1 << j
            j = parents[j]
        rows.append([bits])
    return torch.tensor([rows], dtype=torch.int32)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_and_tree_forward_match_the_model(arch):
    model = tiny(arch)
    impl = model.config._attn_implementation
    adapter = TargetAdapter(model)
    assert model.config._attn_implementation == impl
    L = 9
    ids = torch.randint(0, 211, (1, L))
    cache = adapter.new_cache(1, 32)
    assert cache.kv.shape == (4, 1, 2, 32, 16)
    logits, feats = adapter.forward(ids, torch.arange(L)[None], DecodeContext(cache, 0, None, L))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=True)
    torch.testing.assert_close(logits, ref.logits, **FP32)
    torch.testing.assert_close(feats, ref.hidden_states[-1], **FP32)
    # The static cache holds what the model's own cache holds (rotated keys, values).
    own = ref.past_key_values
    for layer in range(2):
        k_ref, v_ref = own.layers[layer].keys, own.layers[layer].values
        torch.testing.assert_close(cache.keys(layer)[:, :, :L], k_ref, **FP32_TIGHT)
        torch.testing.assert_close(cache.values(layer)[:, :, :L], v_ref, **FP32_TIGHT)
    cache.set_length(L)
    # A tree after the prefix: root r, children a, b of r, child c of a.
    parents = [-1, 0, 0, 1]
    depth = torch.tensor([[0, 1, 1, 2]])
    tokens = torch.randint(0, 211, (1, 4))
    logits_t, feats_t = adapter.forward(
        tokens, depth + L, DecodeContext(cache, L, _mask_rows(parents), 4)
    )
    # Each node must equal a plain forward of its own branch.
    for node, branch in [(1, [0, 1]), (2, [0, 2]), (3, [0, 1, 3])]:
        seq = torch.cat([ids, tokens[:, branch]], 1)
        with torch.no_grad():
            out = model(seq, output_hidden_states=True)
        torch.testing.assert_close(logits_t[0, node], out.logits[0, -1], **FP32)
        torch.testing.assert_close(feats_t[0, node], out.hidden_states[-1][0, -1], **FP32)
    assert model.config._attn_implementation == impl
    # logits_to_keep=1 keeps only the last position's logits, all features.
    lg1, f1 = adapter.forward(ids, torch.arange(L)[None], DecodeContext(cache, 0, None, L), logits_to_keep=1)
    assert lg1.shape == (1, 1, 211) and f1.shape == (1, L, 64)


def test_attention_function_outside_a_decoder_forward_is_refused():
    model = tiny("llama")
    TargetAdapter(model)
    model.set_attn_implementation(ATTN_NAME)
    try:
        with pytest.raises(RuntimeError, match="only runs inside a TreeSpecDecoder forward"):
            with torch.no_grad():
                model(torch.tensor([[1, 2, 3]]))
    finally:
        model.set_attn_implementation("sdpa")


def test_scoped_switch_restores_even_on_error():
    model = tiny("qwen2")
    adapter = TargetAdapter(model)
    before = model.config._attn_implementation
    cache = adapter.new_cache(1, 8)
    with pytest.raises(ValueError, match="exceeds the capacity"):
        adapter.forward(torch.zeros(1, 12, dtype=torch.long), torch.arange(12)[None],
                        DecodeContext(cache, 0, None, 12))
    assert model.config._attn_implementation == before
    with pytest.raises(TypeError, match="transformers causal LM"):
        TargetAdapter(torch.nn.Linear(2, 2))


class _OwnAttention(torch.nn.Module):
    """Stands in for a layer whose attention transformers binds some other way: it never calls
    the registered attention function."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def test_a_forward_that_misses_our_attention_raises(monkeypatch):
    model = tiny("mistral")
    adapter = TargetAdapter(model)
    cache = adapter.new_cache(1, 16)
    ids = torch.randint(0, 211, (1, 5))
    ctx = DecodeContext(cache, 0, None, 5)
    adapter.forward(ids, torch.arange(5)[None], ctx)
    assert ctx.calls == 2  # one call per layer
    # The switch reaches no layer (as if transformers bound attention differently): the model
    # would run its own attention and leave our cache unwritten.
    monkeypatch.setattr(adapter, "scoped", contextlib.nullcontext)
    with pytest.raises(RuntimeError, match=r"attention 0 times in one forward, but it has 2 layers"):
        adapter.forward(ids, torch.arange(5)[None], DecodeContext(cache, 0, None, 5))
    monkeypatch.undo()
    # One layer of two misses it.
    monkeypatch.setattr(model.model.layers[1], "self_attn", _OwnAttention())
    with pytest.raises(RuntimeError, match=r"attention 1 times in one forward, but it has 2 layers"):
        adapter.forward(ids, torch.arange(5)[None], DecodeContext(cache, 0, None, 5))
