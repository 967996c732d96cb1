"""TreeSpecDecoder, greedy: token-for-token equal to transformers' greedy generate (fp32,
tiny random Llama / Qwen2 / Mistral), with a random head (short acceptances) and, for each of
the three architectures, a head trained on the target's own features (long acceptances:
compaction and deep paths, asserted), EOS and max_new_tokens inside a round, batches (B = 3),
stats, streaming, bad input, every ops backend, and the user's model untouched. Tests of a
given tree shape build the decoder with ``fixed`` (no adaptive tree sizing)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from eagle2_kernels import DecodeConfig, EagleDraftHead, TreeSpecDecoder  # noqa: E402
from tiny_models import (  # noqa: E402
    ARCHS,
    assert_accepts,
    fixed,
    fixed_decoder,
    hf_greedy,
    NO_SPECIAL_TOKENS,
    one_thread,  # noqa: F401  (autouse fixture)
    prompt,
    random_head,
    tiny_model,
    tiny_target,
    trained_setup,
)


# Greedy losslessness, EOS / budget inside a round and batches, for both drivers: test_drivers.py.


@pytest.mark.parametrize("arch", list(ARCHS))
def test_stream_matches_generate_and_plain(arch):
    model, head, prompts = trained_setup(arch)
    dec = fixed_decoder(model, head, 12, 4, 3)
    ids = prompts[1:2]
    out = dec.generate(ids, max_new_tokens=33)
    assert_accepts(out.stats, tau=2.5, longest=4)  # the stream's chunks are multi-token
    chunks = list(dec.stream(ids, max_new_tokens=33))
    assert [len(c) for c in chunks] == out.stats.accept_lengths
    assert sum(chunks, []) == out.sequences[0, ids.shape[1]:].tolist()
    assert dec.last_stats.accept_lengths == out.stats.accept_lengths
    plain = dec.generate_plain(ids, max_new_tokens=33)
    assert torch.equal(plain.sequences, out.sequences)
    assert plain.stats.rounds == 33 and plain.stats.mean_accept_length == 1.0
    # A stream overtaken by another call on the same decoder refuses to continue (no garbage).
    first = dec.stream(ids, max_new_tokens=33)
    next(first)
    dec.generate(ids, 5)
    with pytest.raises(RuntimeError, match="overtaken"):
        next(first)
    assert torch.equal(dec.generate(ids, 33).sequences, out.sequences)
    # A tokenizer-style mapping is accepted (padded ones: tests/runtime/test_ragged.py).
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(dec.generate(enc, 33).sequences, out.sequences)
    with pytest.raises(ValueError, match="at least one token"):
        dec.generate({"input_ids": ids, "attention_mask": torch.zeros_like(ids)}, 3)
    # max_new_tokens = 0 returns the prompt.
    assert torch.equal(dec.generate(ids, 0).sequences, ids)


def test_user_model_unchanged_while_decoder_exists():
    model = tiny_target("qwen2")
    ids = prompt(model.config.vocab_size, 6, 5)
    before_impl = model.config._attn_implementation
    with torch.no_grad():
        before_logits = model(ids).logits
    before_gen = hf_greedy(model, ids, 12)
    with TreeSpecDecoder(model, random_head("qwen2"), total_tokens=8, depth=3, top_k=3) as dec:
        assert model.config._attn_implementation == before_impl
        dec.generate(ids, 10)
        assert model.config._attn_implementation == before_impl
        # In the middle of a stream (between two rounds) the user's model is itself.
        stream = dec.stream(ids, max_new_tokens=20)
        next(stream)
        next(stream)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, before_logits)
        assert torch.equal(hf_greedy(model, ids, 12), before_gen)
        rest = list(stream)
        assert len(rest) >= 1
    assert model.config._attn_implementation == before_impl
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before_logits)
    assert torch.equal(hf_greedy(model, ids, 12), before_gen)


def test_bad_input_errors_and_reuse():
    model = tiny_target("llama")
    head = random_head("llama")
    vocab = model.config.vocab_size
    dec = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3, max_length=64)
    ids = prompt(vocab, 5, 3)
    ref = hf_greedy(model, ids, 10)
    bad_calls = [
        (dict(input_ids=ids.float()), TypeError, "integer"),
        (dict(input_ids=ids[:, :0]), ValueError, "non-empty"),
        (dict(input_ids=ids.numpy()), TypeError, "torch.Tensor"),
        (dict(input_ids=ids + vocab), ValueError, r"\[0, 320\)"),
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(temperature=1.0, top_p=0.0), ValueError, "top_p"),
        (dict(temperature=1.0, top_p=1.5), ValueError, "top_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=60), ValueError, "max_length=64"),
        (dict(eos_token_id="x"), ValueError, "eos_token_id"),
        (dict(eos_token_id=[vocab]), ValueError, "eos_token_id"),
        (dict(input_ids=ids.to("meta")), ValueError, "device|on meta"),
    ]
    for kwargs, exc, match in bad_calls:
        call = dict(input_ids=ids, max_new_tokens=10)
        call.update(kwargs)
        with pytest.raises(exc, match=match):
            dec.generate(**call)
        with pytest.raises(exc, match=match):
            dec.stream(**call)
        # Still usable, same output.
        assert torch.equal(dec.generate(ids, 10).sequences, ref)
    # Beyond the model's positions (no max_length): 512 positions.
    free = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        free.generate(ids, max_new_tokens=505)
    assert torch.equal(free.generate(ids, 10).sequences, ref)
    # Decode configuration errors.
    for kwargs, match in [
        (dict(total_tokens=1), "total_tokens must be >= 2"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(depth=0), "depth must be >= 1"),
        (dict(total_tokens=20, depth=1, top_k=3), "supply only K \\+ D\\*K\\*K = 12"),
        (dict(total_tokens=2.5), "int"),
    ]:
        with pytest.raises(ValueError, match=match):
            TreeSpecDecoder(model, head, **{**dict(total_tokens=6, depth=2, top_k=3), **kwargs})
    with pytest.raises(ValueError, match="hidden size"):
        TreeSpecDecoder(model, EagleDraftHead.from_target(LlamaForCausalLM(LlamaConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
            vocab_size=vocab))), total_tokens=4, depth=1, top_k=3)
    with pytest.raises(ValueError, match="draft head is on meta but the target on cpu"):
        TreeSpecDecoder(model, EagleDraftHead.from_target(model).to("meta"), total_tokens=4, depth=1, top_k=3)
    with pytest.raises(ValueError, match="float16"):
        TreeSpecDecoder(model, EagleDraftHead.from_target(model, dtype=torch.float16), total_tokens=4, depth=1, top_k=3)
    cfg = DecodeConfig(total_tokens=8, depth=2, top_k=2)
    assert cfg.num_candidates == 10
    assert TreeSpecDecoder(model, head, config=cfg).config is cfg
    with pytest.raises(Exception):
        cfg.depth = 3  # frozen


def test_sliding_window_within_and_past_the_window():
    """Tree attention applies the target's sliding window (each layer's, as transformers hands
    it over): within the window and far past it the output equals transformers' greedy
    generate (tests/runtime/test_any_model.py covers the other local-attention models); a
    window switched off (use_sliding_window=False) is no limit."""
    torch.manual_seed(3)
    model = tiny_model("mistral", vocab_size=200, sliding_window=32, **NO_SPECIAL_TOKENS)
    dec = fixed_decoder(model, EagleDraftHead.from_target(model), 6, 2, 3)
    ids = prompt(200, 5, 1)
    for n in (12, 100):
        assert torch.equal(dec.generate(ids, n).sequences, hf_greedy(model, ids, n))
    off = tiny_model("qwen2", vocab_size=200, sliding_window=8, use_sliding_window=False, **NO_SPECIAL_TOKENS)
    dec = fixed_decoder(off, EagleDraftHead.from_target(off), 6, 2, 3)
    assert torch.equal(dec.generate(ids, 30).sequences, hf_greedy(off, ids, 30))


def test_from_pretrained_with_objects_and_paths(tmp_path):
    model = tiny_target("mistral")
    head = random_head("mistral")
    head.save_pretrained(tmp_path / "head")
    dec = TreeSpecDecoder.from_pretrained(model, str(tmp_path / "head"), total_tokens=10, depth=3, top_k=4)
    assert dec.target is model and dec.tokenizer is None and dec.config.total_tokens == 10
    ids = prompt(model.config.vocab_size, 4, 8)
    assert torch.equal(dec.generate(ids, 12).sequences, hf_greedy(model, ids, 12))
    # No head for a target given by object: lookup trees alone (runtime/lookup.py), same output.
    alone = TreeSpecDecoder.from_pretrained(model, total_tokens=10, depth=3, top_k=4)
    assert alone.draft is None and torch.equal(alone.generate(ids, 12).sequences, hf_greedy(model, ids, 12))
    dec.close()
    with pytest.raises(RuntimeError, match="closed"):
        dec.generate(ids, 3)


def _backends():
    from conftest import requires_triton

    from eagle2_kernels._backend import ext_available

    ext = pytest.mark.skipif(not ext_available(), reason="native extension not built")
    return [
        pytest.param("reference", id="reference"),
        pytest.param("ext", id="ext", marks=ext),
        pytest.param("triton", id="triton", marks=requires_triton),
    ]


@pytest.mark.parametrize("backend", _backends())
def test_every_ops_backend_decodes_the_same(backend):
    """The runtime does not care which backend runs the ops (Triton: under the interpreter on CPU)."""
    model, head, prompts = trained_setup()
    ids = prompts[:1]
    dec = fixed_decoder(model, head, 6, 2, 3, backend=backend)
    out = dec.generate(ids, 12)
    assert torch.equal(out.sequences, hf_greedy(model, ids, 12))
    assert max(out.stats.accept_lengths) >= 3
    ref = fixed_decoder(model, head, 6, 2, 3, backend="reference")
    kw = dict(temperature=1.0, top_k=20)
    sampled = dec.generate(ids, 8, generator=torch.Generator().manual_seed(3), **kw).sequences
    assert torch.equal(sampled, ref.generate(ids, 8, generator=torch.Generator().manual_seed(3), **kw).sequences)


def test_batch_sampling_is_reproducible():
    """A fixed generator gives a fixed batched sample, and another seed another one. A row of a
    batch is NOT the same sample as that prompt decoded alone with the same seed (each round
    draws its uniforms for the whole batch, [B, T]); the batched distribution is tested in
    test_decoder_sampling.py."""
    model, head, prompts = trained_setup()
    dec = fixed_decoder(model, head, 8, 3, 3)
    ids = prompts[:2]
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=30)
    a = dec.generate(ids, generator=torch.Generator().manual_seed(4), **kw)
    b = dec.generate(ids, generator=torch.Generator().manual_seed(4), **kw).sequences
    c = dec.generate(ids, generator=torch.Generator().manual_seed(5), **kw).sequences
    assert torch.equal(a.sequences, b) and a.sequences.shape == (2, 26)
    assert not torch.equal(b, c)
    assert max(a.stats.accept_lengths) >= 3  # drafted tokens were accepted while sampling


def test_released_bin_with_embedding_decodes_like_safetensors(tmp_path):
    """The released layout (pytorch_model.bin, fp32, with embed_tokens) and our safetensors save
    (no embed_tokens: the target's is shared) give the same decoding, round for round."""
    import json

    model, head, prompts = trained_setup()
    head.save_pretrained(tmp_path / "st")
    state = {k: v.float().clone() for k, v in head.state_dict().items()}
    state["embed_tokens.weight"] = model.get_input_embeddings().weight.detach().float().clone()
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    cfg = json.loads((tmp_path / "st" / "config.json").read_text())
    (tmp_path / "bin" / "config.json").write_text(json.dumps(cfg))
    outs = []
    for folder in ("bin", "st"):
        dec = TreeSpecDecoder.from_pretrained(model, str(tmp_path / folder), **fixed(total_tokens=10, depth=3, top_k=3))
        assert (dec.draft.embed_tokens is not None) == (folder == "bin")
        outs.append(dec.generate(prompts[2:3], 30))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert outs[0].stats.accept_lengths == outs[1].stats.accept_lengths
    assert outs[0].stats.mean_accept_length > 2


def test_from_pretrained_default_path(tmp_path, monkeypatch):
    """With no arguments the embedded default is used: load_default() and default_head_path()
    (replaced here by a tiny model and head so that nothing large is loaded)."""
    from eagle2_kernels.models import default as default_model

    model = tiny_target("llama")
    random_head("llama").save_pretrained(tmp_path / "head")
    calls = {}

    def fake_load_default(dtype=torch.bfloat16, device="cpu"):
        calls["args"] = (dtype, device)
        return model, "a tokenizer"

    monkeypatch.setattr(default_model, "load_default", fake_load_default)
    monkeypatch.setattr(default_model, "default_head_path", lambda: tmp_path / "head")
    dec = TreeSpecDecoder.from_pretrained(dtype=torch.float32, total_tokens=6, depth=2, top_k=3)
    assert calls["args"] == (torch.float32, "cpu")
    assert dec.target is model and dec.tokenizer == "a tokenizer" and dec.config.total_tokens == 6
    ids = prompt(model.config.vocab_size, 5, 4)
    assert torch.equal(dec.generate(ids, 8).sequences, hf_greedy(model, ids, 8))
