"""EagleDraftHead: the layer equals a Llama decoder layer without input norm, RoPE equals the
target's, the released format loads (bin / safetensors, with / without embed_tokens), bad
files and mismatched targets fail with clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from eagle2_kernels.models.draft_head import EagleDraftHead  # noqa: E402
from tiny_models import (  # noqa: E402
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_model,
)


def tiny_llama(rope_scaling=None, vocab=101):
    # Real Llama-3-8B: hidden 4096, 32 heads / 8 KV heads, vocab 128256; shrunk here.
    extra = {} if rope_scaling is None else {"rope_scaling": rope_scaling}
    return tiny_model("llama", vocab_size=vocab, rope_theta=5000.0, **extra)


def tiny_qwen2():
    return tiny_model("qwen2", vocab_size=97)


LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["rope-default", "rope-llama3"])
def test_rope_matches_target(scaling):
    model = tiny_llama(scaling)
    head = EagleDraftHead.from_target(model)
    pos = torch.arange(0, 200, 7).unsqueeze(0)
    x = torch.zeros(1, pos.shape[1], 64)
    cos_t, sin_t = model.model.rotary_emb(x, pos)
    cos_h, sin_h = head.rope(pos, torch.float32)
    torch.testing.assert_close(cos_h, cos_t, rtol=0, atol=0)
    torch.testing.assert_close(sin_h, sin_t, rtol=0, atol=0)
    # Still float32 frequencies after a dtype round trip of the head.
    head.to(torch.float16).to(torch.float32)
    assert head.inv_freq.dtype == torch.float32
    torch.testing.assert_close(head.rope(pos, torch.float32)[0], cos_t, rtol=0, atol=0)


def test_forward_equals_llama_layer_without_input_norm():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = tiny_llama()
    head = EagleDraftHead.from_target(model)
    cfg = LlamaConfig(**{k: v for k, v in head.config.to_dict().items() if k != "model_type"})
    cfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(cfg, 0).eval()
    layer.load_state_dict(
        {k[len("layers.0."):]: v for k, v in head.state_dict().items() if k.startswith("layers.0.")},
        strict=False,
    )
    layer.input_layernorm = torch.nn.Identity()
    b, n = 2, 9
    feats = torch.randn(b, n, 64)
    ids = torch.randint(0, 101, (b, n))
    out = head(feats, ids)
    h = head.fc(torch.cat((model.get_input_embeddings()(ids), feats), -1))
    pos = torch.arange(n).unsqueeze(0).expand(b, n)
    pe = model.model.rotary_emb(h, pos)
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None].expand(b, 1, n, n)
    ref = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Causality: the prefix's outputs do not depend on later inputs.
    out2 = head(feats[:, :5], ids[:, :5])
    torch.testing.assert_close(out2, out[:, :5], rtol=1e-5, atol=1e-5)


def test_logits_with_reduced_vocab():
    model = tiny_llama()
    d2t = torch.tensor([5, 0, 100, 17])
    head = EagleDraftHead.from_target(model, draft_to_target=d2t)
    h = torch.randn(3, 64)
    full = model.lm_head(h)
    torch.testing.assert_close(head.logits(h), full[:, d2t])
    assert head.draft_vocab_size == 4
    with pytest.raises(ValueError, match="draft_to_target ids must lie"):
        EagleDraftHead.from_target(model, draft_to_target=torch.tensor([0, 101]))


def _save_released_bin(head, model, folder, with_embed=True):
    """The released layout: pytorch_model.bin in fp32, config with "bias", embed_tokens."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.float().clone() for k, v in head.state_dict().items()}
    if with_embed:
        state["embed_tokens.weight"] = model.get_input_embeddings().weight.detach().float().clone()
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    cfg = head.config.to_dict()
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = head.config.rope_parameters["rope_theta"]
    cfg["bias"] = head.bias
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("bias", [True, False], ids=["fc-bias", "no-bias"])
def test_released_bin_and_safetensors_agree(tmp_path, bias):
    model = tiny_llama()
    head = EagleDraftHead.from_target(model, bias=bias)
    _save_released_bin(head, model, tmp_path / "bin")
    head.save_pretrained(tmp_path / "st")
    assert "embed_tokens.weight" not in __import__("safetensors.torch").torch.load_file(
        str(tmp_path / "st" / "model.safetensors")
    )
    import copy

    a = EagleDraftHead.from_pretrained(tmp_path / "bin", target=copy.deepcopy(model).half())
    assert a.fc.weight.dtype == torch.float16 and a.embed_tokens.weight.dtype == torch.float16
    a = EagleDraftHead.from_pretrained(tmp_path / "bin", target=model)
    b = EagleDraftHead.from_pretrained(tmp_path / "st" / "config.json", target=model)
    assert a.embed_tokens is not None and b.embed_tokens is None
    assert (a.fc.bias is not None) == bias
    feats, ids = torch.randn(1, 7, 64), torch.randint(0, 101, (1, 7))
    ref = head(feats, ids)
    torch.testing.assert_close(a(feats, ids), ref, rtol=0, atol=0)
    torch.testing.assert_close(b(feats, ids), ref, rtol=0, atol=0)


def test_qkv_bias_head_round_trip(tmp_path):
    model = tiny_qwen2()
    head = EagleDraftHead.from_target(model)
    cfg = head.config
    cfg.qkv_bias = True
    head = EagleDraftHead(cfg, draft_to_target=torch.arange(0, 97, 3))
    head._init_weights(0.02)
    with torch.no_grad():
        head.layers[0].self_attn.q_proj.bias.normal_()
    head.attach_target(model)
    head.save_pretrained(tmp_path)
    again = EagleDraftHead.from_pretrained(tmp_path, target=model)
    assert again.qkv_bias and again.layers[0].self_attn.k_proj.bias is not None
    assert torch.equal(again.draft_to_target, head.draft_to_target)
    feats, ids = torch.randn(2, 5, 64), torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(again.logits(again(feats, ids)), head.logits(head(feats, ids)), rtol=0, atol=0)


def test_bad_files_and_targets(tmp_path):
    model = tiny_llama()
    head = EagleDraftHead.from_target(model)
    head.save_pretrained(tmp_path / "ok")
    # Missing and unexpected keys are named.
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    del state["layers.0.mlp.up_proj.weight"]
    state["layers.0.input_layernorm.weight"] = torch.ones(64)
    os.makedirs(tmp_path / "bad", exist_ok=True)
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing keys \['layers.0.mlp.up_proj.weight'\].*input_layernorm"):
        EagleDraftHead.from_pretrained(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="config.json"):
        EagleDraftHead.from_pretrained(tmp_path / "nothing")
    # Hidden size / vocab mismatch with the target.
    other = tiny_llama(vocab=99)
    with pytest.raises(ValueError, match="vocab size 101 does not match the target's vocab size 99"):
        EagleDraftHead.from_pretrained(tmp_path / "ok", target=other)
    wide = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_hidden_layers=1, vocab_size=101))
    with pytest.raises(ValueError, match="hidden size 64 does not match the target's hidden size 32"):
        head.attach_target(wide)
    fresh = EagleDraftHead(head.config)
    with pytest.raises(RuntimeError, match="no target attached"):
        fresh.logits(torch.randn(1, 64))


def test_cached_steps_equal_the_teacher_forced_forward():
    from eagle2_kernels.cache import StaticKVCache

    model = tiny_llama()
    head = EagleDraftHead.from_target(model)
    b, n = 1, 10
    feats, ids = torch.randn(b, n + 3, 64), torch.randint(0, 101, (b, n + 3))
    full = head(feats, ids)
    cache = StaticKVCache(1, b, head.num_kv_heads, 32, head.head_dim, torch.float32, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(head.prefill(feats[:, :n], ids[:, :n], cache), full[:, :n], rtol=1e-5, atol=1e-5)
        cache.set_length(n)
        # Catch-up of 3 more pairs with a causal chain mask over the tree region.
        chain = torch.tensor([[[1], [3], [7]]], dtype=torch.int32)
        out = head.tree_step(feats[:, n:], ids[:, n:], torch.arange(n, n + 3)[None], cache, n, chain, 3)
        torch.testing.assert_close(out, full[:, n:], rtol=1e-5, atol=1e-5)
        # Two sibling branches at the same position see only the prefix and themselves.
        cache.set_length(n)
        sib = torch.tensor([[[1], [2]]], dtype=torch.int32)
        pair_ids = torch.stack([ids[:, n], ids[:, n + 1]], 1)
        pair_feats = torch.stack([feats[:, n], feats[:, n + 1]], 1)
        out = head.tree_step(pair_feats, pair_ids, torch.full((1, 2), n), cache, n, sib, 2)
        alt = head(torch.cat([feats[:, :n], feats[:, n + 1 : n + 2]], 1), torch.cat([ids[:, :n], ids[:, n + 1 : n + 2]], 1))
        torch.testing.assert_close(out[:, 0], full[:, n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 1], alt[:, n], rtol=1e-5, atol=1e-5)
