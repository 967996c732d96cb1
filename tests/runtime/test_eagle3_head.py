"""EAGLE-3 heads: the head computes what the official layout's weights define (checked against a
re-derivation from the raw tensors), loads the official layout and its variants (.bin,
``layers.0.``, ``model.`` prefix, speculators config, explicit feature layer ids in both
spellings), round-trips through save_pretrained, fails clearly on inconsistent files, and
decodes losslessly: fp32 greedy equals transformers' greedy on 8-layer Llama, Qwen2 and Mistral
targets with full and reduced draft vocabularies and a head narrower than the target, in the
dynamic and the static round, with long accepted paths from a briefly trained head."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from eagle2_kernels import EagleDraftHead  # noqa: E402
from eagle2_kernels.models.eagle3_head import Eagle3DraftHead, feature_layers_from_config  # noqa: E402
from eagle2_kernels.models.target import DecodeContext, TargetAdapter  # noqa: E402
from eagle3_models import (  # noqa: E402
    EAGLE3_LAYERS,
    decoder,
    deep_target,
    eagle3_trained_setup,
    random_eagle3_head,
    reduced_vocab,
)
from tiny_models import (  # noqa: E402
    ARCHS,
    LONG_PATH_TREES,
    check_stats,
    hf_greedy,
    one_thread,  # noqa: F401  (autouse fixture)
    prompt,
)

OFFICIAL_KEYS = {
    "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
    "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight", "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
}


def official_files(folder, model, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, draft_ids=None,
                   seed=0, extra_config=None):
    """Write a random EAGLE-3 head for ``model`` in the official layout by hand (not through
    save_pretrained): the config of the released files (no rope_theta) and the state dict
    with d2t offsets. Returns (state dict, config dict)."""
    g = torch.Generator().manual_seed(seed)
    vocab, t_hidden = model.config.vocab_size, model.config.hidden_size
    ids = torch.arange(vocab) if draft_ids is None else torch.as_tensor(draft_ids)
    vd = ids.numel()

    def w(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    state = {
        "fc.weight": w(hidden, 3 * t_hidden),
        "midlayer.input_layernorm.weight": 1 + w(hidden, scale=0.1),
        "midlayer.hidden_norm.weight": 1 + w(hidden, scale=0.1),
        "midlayer.post_attention_layernorm.weight": 1 + w(hidden, scale=0.1),
        "midlayer.self_attn.q_proj.weight": w(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": w(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": w(inter, hidden),
        "midlayer.mlp.up_proj.weight": w(inter, hidden),
        "midlayer.mlp.down_proj.weight": w(hidden, inter),
        "norm.weight": 1 + w(hidden, scale=0.1),
        "lm_head.weight": w(vd, hidden, scale=0.3),
        "d2t": (ids - torch.arange(vd)).to(torch.int64),
        "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True),
    }
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_hidden_layers": 1,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "float16", "vocab_size": vocab, "draft_vocab_size": vd,
    }
    if hidden != t_hidden:
        config["target_hidden_size"] = t_hidden
        state["embed_tokens.weight"] = w(vocab, hidden, scale=0.5)
    config.update(extra_config or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    return state, config


def reference_forward(state, config, feats, ids, embed, norm_before_residual=False):
    """The EAGLE-3 head re-derived from the raw tensors: [1, N, 3Ht] target features and
    [1, N] tokens at positions 0..N-1, causal; returns (hidden [N, H], logits [N, Vd])."""
    eps, n = config["rms_norm_eps"], ids.shape[1]
    hq, hkv, dh = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]

    def rms(x, name):
        return state[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    g = feats[0] @ state["fc.weight"].T
    e = rms(embed[ids[0]], "midlayer.input_layernorm.weight")
    gn = rms(g, "midlayer.hidden_norm.weight")
    a = torch.cat([e, gn], -1)
    q = (a @ state["midlayer.self_attn.q_proj.weight"].T).view(n, hq, dh).transpose(0, 1)
    k = (a @ state["midlayer.self_attn.k_proj.weight"].T).view(n, hkv, dh).transpose(0, 1)
    v = (a @ state["midlayer.self_attn.v_proj.weight"].T).view(n, hkv, dh).transpose(0, 1)
    theta = config.get("rope_theta", 10000.0)
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()

    def rot(x):
        x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(hq // hkv, 0), v.repeat_interleave(hq // hkv, 0)
    scores = (q @ k.transpose(1, 2)) / math.sqrt(dh)
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, hq * dh) @ state["midlayer.self_attn.o_proj.weight"].T
    h = (gn if norm_before_residual else g) + o
    x = rms(h, "midlayer.post_attention_layernorm.weight")
    mlp = torch.nn.functional.silu(x @ state["midlayer.mlp.gate_proj.weight"].T) * (x @ state["midlayer.mlp.up_proj.weight"].T)
    h = h + mlp @ state["midlayer.mlp.down_proj.weight"].T
    return h, rms(h, "norm.weight") @ state["lm_head.weight"].T


def target_features(model, ids, layers):
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    return torch.cat([hs[i] for i in layers], -1)


# ---------------------------------------------------------------------------- the head's math
@pytest.mark.parametrize("variant", ["official", "norm_before_residual", "narrow", "rope_theta"])
def test_head_equals_the_rederived_official_head(tmp_path, variant):
    model = deep_target("llama")
    hidden = 48 if variant == "narrow" else 64
    extra = {"norm_before_residual": {"norm_before_residual": True},
             "rope_theta": {"rope_theta": 500000.0}}.get(variant, {})
    state, config = official_files(tmp_path / "h", model, hidden=hidden, inter=80,
                                   draft_ids=reduced_vocab(320, 100), extra_config=extra)
    head = EagleDraftHead.from_pretrained(tmp_path / "h", target=model)
    assert isinstance(head, Eagle3DraftHead)
    assert head.feature_layers == (2, 4, 5) and head.target_feature_size == 3 * 64
    assert torch.equal(head.draft_to_target, reduced_vocab(320, 100))
    torch.manual_seed(1)
    ids = torch.randint(0, 320, (1, 11))
    feats = target_features(model, ids, (2, 4, 5))
    embed = state["embed_tokens.weight"] if hidden != 64 else model.get_input_embeddings().weight.detach()
    ref_h, ref_logits = reference_forward(state, config, feats[:, :-1], ids[:, 1:], embed,
                                          norm_before_residual=variant == "norm_before_residual")
    with torch.no_grad():
        out = head(feats[:, :-1], ids[:, 1:])
        logits = head.logits(out)
    torch.testing.assert_close(out[0], ref_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[0], ref_logits, rtol=1e-4, atol=1e-5)


def test_cached_steps_equal_the_teacher_forced_forward():
    from eagle2_kernels.cache import StaticKVCache

    model = deep_target("qwen2")
    head = random_eagle3_head(model, "reduced")
    torch.manual_seed(2)
    n = 9
    ids = torch.randint(0, 500, (1, n + 1))
    feats = target_features(model, ids, head.feature_layers)[:, :n]
    with torch.no_grad():
        full = head(feats, ids[:, 1:])
        cache = StaticKVCache(1, 1, head.num_kv_heads, 32, head.head_dim, torch.float32, "cpu")
        first = head.prefill(feats[:, :5], ids[:, 1:6], cache)
        cache.set_length(5)
        chain = torch.tensor([[[1], [3], [7], [15]]], dtype=torch.int32)  # causal over 4 rows
        rest = head.tree_step(feats[:, 5:], ids[:, 6:], torch.arange(5, 9)[None], cache, 5, chain, 4,
                              from_target=True)
        # One expansion step from the head's own output (no fc), seeing the 9 pairs and itself,
        # matches project / finish with plain attention.
        nxt = head.tree_step(rest[:, -1:], ids[:, :1], torch.tensor([[9]]), cache, 9,
                             torch.tensor([[[31]]], dtype=torch.int32), 5, from_target=False)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        r, q, k, v = head.project(rest[:, -1:], ids[:, :1], torch.tensor([[9]]), from_target=False)
        _, _, k0, v0 = head.project(feats, ids[:, 1:], torch.arange(9)[None], from_target=True)
        kk, vv = torch.cat([k0, k], 2), torch.cat([v0, v], 2)
        kk, vv = kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1)
        att = torch.softmax(q @ kk.transpose(-1, -2) * head.layers[0].self_attn.scaling, -1) @ vv
        want = head.finish(r, att)
    torch.testing.assert_close(nxt, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must have width 192"):
        head.tree_step(rest, ids[:, :4], torch.arange(4)[None], cache, 5, chain, 4, from_target=True)


# ---------------------------------------------------------------------------- the adapter
@pytest.mark.parametrize("arch", list(ARCHS))
def test_adapter_captures_the_feature_layers(arch):
    model = deep_target(arch)
    vocab = model.config.vocab_size
    layers = (2, EAGLE3_LAYERS // 2, EAGLE3_LAYERS - 3)
    adapter = TargetAdapter(model, feature_layers=layers)
    L = 7
    ids = prompt(vocab, L, seed=3)
    cache = adapter.new_cache(1, 32)
    logits, feats = adapter.forward(ids, torch.arange(L)[None], DecodeContext(cache, 0, None, L))
    torch.testing.assert_close(feats, target_features(model, ids, layers), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # A tree after the prefix: root, two children of the root, a grandchild under the first.
    cache.set_length(L)
    mask = torch.tensor([[[1], [3], [5], [11]]], dtype=torch.int32)
    tokens = prompt(vocab, 4, seed=4)
    _, feats_t = adapter.forward(tokens, torch.tensor([[0, 1, 1, 2]]) + L, DecodeContext(cache, L, mask, 4))
    for node, branch in [(1, [0, 1]), (2, [0, 2]), (3, [0, 1, 3])]:
        seq = torch.cat([ids, tokens[:, branch]], 1)
        torch.testing.assert_close(feats_t[0, node], target_features(model, seq, layers)[0, -1], rtol=1e-5, atol=1e-5)
    # Only the named layers are kept: the model is not asked for all its hidden states.
    asked = []
    forward = model.forward

    def spy(*args, **kwargs):
        asked.append(kwargs.get("output_hidden_states"))
        return forward(*args, **kwargs)

    model.forward = spy
    try:
        adapter.forward(ids, torch.arange(L)[None], DecodeContext(cache, 0, None, L))
    finally:
        del model.forward
    assert asked == [False]
    # The hooks live only inside our forward; the embeddings (0) and the post-norm output (L) work too.
    assert all(not blk._forward_pre_hooks for blk in model.model.layers) and not model.model.norm._forward_hooks
    ends = TargetAdapter(model, feature_layers=(0, EAGLE3_LAYERS))
    cache.set_length(0)  # a prefill (tree_mask None) runs over an empty prefix, as the decoder's does
    _, f = ends.forward(ids, torch.arange(L)[None], DecodeContext(cache, 0, None, L))
    torch.testing.assert_close(f, target_features(model, ids, (0, EAGLE3_LAYERS)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"valid indices are 0..8"):
        TargetAdapter(model, feature_layers=(2, 4, 9))


# ---------------------------------------------------------------------------- losslessness
@pytest.mark.parametrize("variant", ["full", "reduced", "narrow"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_lossless_random_head_in_official_layout(tmp_path, arch, variant):
    model = deep_target(arch)
    random_eagle3_head(model, variant).save_pretrained(tmp_path / "head")
    head = EagleDraftHead.from_pretrained(tmp_path / "head", target=model)
    assert isinstance(head, Eagle3DraftHead)
    ids = prompt(model.config.vocab_size, 7, seed=11)
    ref = hf_greedy(model, ids, 24)
    for static in (False, True):
        out = decoder(model, head, 12, 4, 3, static_round=static).generate(ids, 24)
        assert torch.equal(out.sequences, ref), (arch, variant, static)
        check_stats(out, ids.shape[1])


@pytest.mark.parametrize("T, D, K", LONG_PATH_TREES)
def test_greedy_lossless_trained_head_long_paths(T, D, K):
    model, head, prompts = eagle3_trained_setup()
    for static in (False, True):
        dec = decoder(model, head, T, D, K, static_round=static)
        for i in (0, 3):
            ids = prompts[i:i + 1]
            out = dec.generate(ids, 40)
            assert torch.equal(out.sequences, hf_greedy(model, ids, 40)), (T, D, K, static, i)
            # The head was trained on these continuations: paths are long, so the catch-up over
            # several accepted nodes' multi-layer features is exercised.
            assert out.stats.mean_accept_length > 2.5, out.stats.accept_lengths
            assert max(out.stats.accept_lengths) >= min(D + 1, 4)


def test_batch_greedy_lossless():
    model, head, prompts = eagle3_trained_setup()
    ids = torch.cat([prompts[2:5], prompt(320, 6, seed=30)])  # three seen prompts and a fresh one
    ref = [hf_greedy(model, ids[b:b + 1], 24) for b in range(ids.shape[0])]
    for static in (False, True):
        out = decoder(model, head, 16, 3, 4, static_round=static).generate(ids, 24)
        for b in range(ids.shape[0]):
            assert torch.equal(out.sequences[b:b + 1], ref[b]), (static, b)


def test_trained_head_round_trips_and_decodes_after_reload(tmp_path):
    model, head, prompts = eagle3_trained_setup()
    head.save_pretrained(tmp_path / "h")
    back = EagleDraftHead.from_pretrained(tmp_path / "h", target=model)
    assert isinstance(back, Eagle3DraftHead)
    for (k, v), (k2, v2) in zip(head.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert torch.equal(back.draft_to_target, head.draft_to_target)
    ids = prompts[1:2]
    a = decoder(model, head, 16, 3, 4).generate(ids, 30)
    b = decoder(model, back, 16, 3, 4).generate(ids, 30)
    assert torch.equal(a.sequences, b.sequences) and a.stats.accept_lengths == b.stats.accept_lengths


# ---------------------------------------------------------------------------- files
def test_save_writes_the_official_layout(tmp_path):
    model = deep_target("mistral")
    d2t = reduced_vocab(1000, 250)
    head = random_eagle3_head(model, "reduced")
    head.save_pretrained(tmp_path / "h")
    state = load_file(str(tmp_path / "h" / "model.safetensors"))
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert set(state) == OFFICIAL_KEYS
    assert torch.equal(state["d2t"], d2t - torch.arange(250))  # offsets, not absolute ids
    assert state["t2d"].dtype == torch.bool and int(state["t2d"].sum()) == 250 and bool(state["t2d"][d2t].all())
    assert cfg["draft_vocab_size"] == 250 and cfg["vocab_size"] == 1000 and cfg["num_hidden_layers"] == 1
    assert "target_hidden_size" not in cfg and "eagle_config" not in cfg
    # A full-vocabulary head still writes d2t (zeros) and t2d (all true), as the releases do.
    random_eagle3_head(model, "full").save_pretrained(tmp_path / "f")
    full = load_file(str(tmp_path / "f" / "model.safetensors"))
    assert not full["d2t"].any() and full["t2d"].all()
    assert EagleDraftHead.from_pretrained(tmp_path / "f", target=model).draft_to_target is None
    # A narrow head carries its own embedding and says target_hidden_size.
    random_eagle3_head(model, "narrow").save_pretrained(tmp_path / "n")
    assert "embed_tokens.weight" in load_file(str(tmp_path / "n" / "model.safetensors"))
    assert json.loads((tmp_path / "n" / "config.json").read_text())["target_hidden_size"] == 64


def _same_head(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert (a.draft_to_target is None) == (b.draft_to_target is None)
    if a.draft_to_target is not None:
        assert torch.equal(a.draft_to_target, b.draft_to_target)


def test_layout_variants_load_the_same_head(tmp_path):
    model = deep_target("llama")
    state, config = official_files(tmp_path / "ref", model, draft_ids=reduced_vocab(320, 64))
    ref = EagleDraftHead.from_pretrained(tmp_path / "ref", target=model)
    # pytorch_model.bin (the official releases), loaded with weights_only.
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config))
    _same_head(ref, EagleDraftHead.from_pretrained(tmp_path / "bin", target=model))
    # layers.0. instead of midlayer., and a model. prefix (SGLang-style files).
    for name, rename in [("layers0", lambda k: k.replace("midlayer.", "layers.0.")),
                         ("prefixed", lambda k: "model." + k if not k.startswith("lm_head") else k)]:
        (tmp_path / name).mkdir()
        save_file({rename(k): v for k, v in state.items()}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLMEagle3"]}))
        _same_head(ref, EagleDraftHead.from_pretrained(tmp_path / name, target=model))
    # A speculators config: the Llama fields one level down, the ids at the top (vLLM's spelling).
    spec = {"speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"], "draft_vocab_size": 64,
            "transformer_layer_config": {k: v for k, v in config.items() if k != "draft_vocab_size"},
            "eagle_aux_hidden_state_layer_ids": [2, 4, 5], "norm_before_residual": False}
    (tmp_path / "spec").mkdir()
    save_file({k.replace("midlayer.", "layers.0."): v for k, v in state.items()}, str(tmp_path / "spec" / "model.safetensors"))
    (tmp_path / "spec" / "config.json").write_text(json.dumps(spec))
    _same_head(ref, EagleDraftHead.from_pretrained(tmp_path / "spec", target=model))
    # Eagle3DraftHead.from_pretrained reads the same files.
    _same_head(ref, Eagle3DraftHead.from_pretrained(tmp_path / "ref", target=model))


def test_feature_layer_ids_in_both_spellings():
    # SpecForge / SGLang: eagle_config ids are layer OUTPUTS (SGLang adds 1); vLLM: hidden-state indices.
    assert feature_layers_from_config({}) is None
    assert feature_layers_from_config({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 4]}}) == (2, 4, 5)
    assert feature_layers_from_config({"eagle_aux_hidden_state_layer_ids": [2, 4, 5]}) == (2, 4, 5)
    assert feature_layers_from_config({"eagle_aux_hidden_state_layer_ids": [2, 4, 5],
                                       "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 4]}}) == (2, 4, 5)
    with pytest.raises(ValueError, match="two different feature layer sets"):
        feature_layers_from_config({"eagle_aux_hidden_state_layer_ids": [1, 3, 4],
                                    "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 4]}})


def test_explicit_feature_layers_decode_and_round_trip(tmp_path):
    model = deep_target("qwen2")
    official_files(tmp_path / "h", model, extra_config={"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 3, 6]}})
    head = EagleDraftHead.from_pretrained(tmp_path / "h", target=model)
    assert head.feature_layers == (1, 4, 7)
    dec = decoder(model, head, 10, 3, 3)
    assert dec._state.adapter.feature_layers == (1, 4, 7)
    ids = prompt(500, 6, seed=21)
    assert torch.equal(dec.generate(ids, 16).sequences, hf_greedy(model, ids, 16))
    head.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 3, 6]}
    _same_head(head, EagleDraftHead.from_pretrained(tmp_path / "again", target=model))


def _write(folder, state, config):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def test_inconsistent_files_fail_clearly(tmp_path):
    model = deep_target("llama")
    state, config = official_files(tmp_path / "ok", model, draft_ids=reduced_vocab(320, 64))
    load = EagleDraftHead.from_pretrained

    def bad(name, match, exc=ValueError, target=model, **change):
        s = {k: v for k, v in state.items() if k not in change.get("drop", ())}
        s.update(change.get("state", {}))
        _write(tmp_path / name, s, {**config, **change.get("config", {})})
        with pytest.raises(exc, match=match):
            load(tmp_path / name, target=target)

    bad("missing", r"missing keys \['midlayer.mlp.up_proj.weight'\]", drop=["midlayer.mlp.up_proj.weight"])
    bad("unexpected", r"unexpected keys \['midlayer.self_attn.q_proj.bias'\]",
        state={"midlayer.self_attn.q_proj.bias": torch.zeros(64)})
    bad("shape", r"midlayer.mlp.gate_proj.weight has shape \(95, 64\)",
        state={"midlayer.mlp.gate_proj.weight": torch.zeros(95, 64)})
    d2t_out = state["d2t"].clone()
    d2t_out[3] = 400
    bad("d2t-outside", r"d2t maps draft ids to target ids \[\d+, \d+\], outside the vocabulary \[0, 320\)",
        state={"d2t": d2t_out})
    bad("t2d", "t2d does not mark exactly", state={"t2d": torch.ones(320, dtype=torch.bool)})
    bad("no-d2t", "needs a d2t map", drop=["d2t", "t2d"])
    bad("vocab-size", "draft_vocab_size=100 but lm_head.weight has 64 rows", config={"draft_vocab_size": 100})
    bad("ids-outside", r"feature layers \(2, 4, 10\) lie outside the target's hidden states 0..8",
        config={"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 9]}})
    bad("fc", r"fc.weight reads 192 features; three target hidden states of width 32",
        config={"target_hidden_size": 32})
    # A head for another target: its vocabulary, hidden size or depth differ.
    other = deep_target("qwen2")
    with pytest.raises(ValueError, match="head vocab size 320 does not match the target's vocab size 500"):
        load(tmp_path / "ok", target=other)
    from tiny_models import tiny_model

    narrow = tiny_model("llama", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=8)
    with pytest.raises(ValueError, match="target features of hidden size 64.*the target's hidden size is 32"):
        load(tmp_path / "ok", target=narrow)
    _write(tmp_path / "deep-ids", state, {**config, "eagle_aux_hidden_state_layer_ids": [2, 4, 6]})
    shallow = tiny_model("llama", vocab_size=320, num_hidden_layers=5)
    with pytest.raises(ValueError, match=r"feature layers \(2, 4, 6\) lie outside the target's hidden states 0..5"):
        load(tmp_path / "deep-ids", target=shallow)
    # An EAGLE-3 config over EAGLE-1/2 weights, and EAGLE-1/2 files asked for as EAGLE-3.
    from tiny_models import random_head

    random_head("llama").save_pretrained(tmp_path / "e2")
    cfg2 = json.loads((tmp_path / "e2" / "config.json").read_text())
    (tmp_path / "e2" / "config.json").write_text(json.dumps({**cfg2, "architectures": ["LlamaForCausalLMEagle3"]}))
    with pytest.raises(ValueError, match=r"config says EAGLE-3 .* but the weights are an EAGLE-1/2 head"):
        load(tmp_path / "e2")
    # The weights decide when the config names no kind (a draft_vocab_size alone does not).
    (tmp_path / "e2" / "config.json").write_text(json.dumps({**cfg2, "draft_vocab_size": 320}))
    assert type(load(tmp_path / "e2")) is EagleDraftHead
    with pytest.raises(ValueError, match="holds an EAGLE-1/2 head"):
        Eagle3DraftHead.from_pretrained(tmp_path / "e2")
    # An unattached head with default layers cannot tell the adapter what to capture.
    fresh = Eagle3DraftHead.from_pretrained(tmp_path / "ok")
    with pytest.raises(RuntimeError, match="attach it first"):
        fresh.feature_layers


def test_loads_in_the_target_dtype(tmp_path):
    from tiny_models import NO_SPECIAL_TOKENS, tiny_model

    torch.manual_seed(3)
    model = tiny_model("llama", vocab_size=320, num_hidden_layers=8, **NO_SPECIAL_TOKENS).to(torch.bfloat16)
    official_files(tmp_path / "h", model, draft_ids=reduced_vocab(320, 64))  # fp32 files
    head = EagleDraftHead.from_pretrained(tmp_path / "h", target=model)
    assert head.fc.weight.dtype == torch.bfloat16 and head.inv_freq.dtype == torch.float32
    assert head.draft_to_target.dtype == torch.int64
    out = decoder(model, head, 8, 3, 2).generate(prompt(320, 5, seed=2), 12)
    assert out.sequences.shape == (1, 17)
    check_stats(out, 5)
