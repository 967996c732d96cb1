"""`eagle2 train --target` on a non-Llama target: a tiny random Gemma-3 (sliding-window and global
layers, QK-norm, embeddings scaled by sqrt(H) inside its embedding module; real Gemma-3 270M:
H=640, 18 layers, window 512, V=262144; here H=32, 2 layers, window 8, a 44-token word-level
vocabulary). Features -> fit -> held-out accuracy -> the saved head decodes in fp32 to exactly
the model's own greedy output past the window; a head that carries its own copy of the
embedding table embeds tokens as the target does (scaled) and keeps it frozen in training."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import EagleDraftHead, TreeSpecDecoder  # noqa: E402
from tiny_chat import synthetic_conversations, tiny_tokenizer  # noqa: E402
from tiny_models import hf_greedy, one_thread  # noqa: E402,F401  (autouse: one thread)

WINDOW, NEW = 8, 40


def gemma3_target(vocab_size: int):
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, num_hidden_layers=2, max_position_embeddings=256,
        sliding_window=WINDOW, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"],
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).float().eval()


def fixed_decoder(model, head):
    # No context lookup: the drafts come from the head alone.
    return TreeSpecDecoder(model, head, total_tokens=8, depth=3, top_k=4, adaptive=False, lookup=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The whole pipeline through the command line (`eagle2 train features / fit` with
    --target): returns (tokenizer, target as loaded from disk, conversations, work dir, fit
    summary)."""
    from eagle2_kernels.train import main
    from eagle2_kernels.train.features import feature_chunks, load_chunk

    tmp = tmp_path_factory.mktemp("gemma3")
    tok = tiny_tokenizer()
    gemma3_target(len(tok)).save_pretrained(tmp / "target")
    tok.save_pretrained(tmp / "target")
    convs = synthetic_conversations(104, seed=5)
    (tmp / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    common = ["--target", str(tmp / "target"), "--source", str(tmp / "chats.jsonl"), "--dtype", "fp32"]
    assert main(["features", "--out", str(tmp / "train"), "--start", "0", "--count", "96", "--chunk-size", "32",
                 *common]) == 0
    assert main(["features", "--out", str(tmp / "heldout"), "--start", "96", *common]) == 0
    assert main(["fit", "--target", str(tmp / "target"), "--features", str(tmp / "train"), "--out",
                 str(tmp / "head"), "--epochs", "1000", "--max-steps", "200", "--lr", "3e-3", "--warmup", "10",
                 "--batch-tokens", "1024", "--ttt-steps", "2", "--draft-vocab", "24", "--eval-every", "0"]) == 0
    summary = json.loads((tmp / "head" / "train_log.json").read_text())["summary"]
    target = transformers.AutoModelForCausalLM.from_pretrained(tmp / "target", dtype=torch.float32).eval()
    assert type(target).__name__ == "Gemma3ForCausalLM"
    # The stored features are the lm_head input of the windowed model (chats pass the window).
    ids, _, feats = next(load_chunk(feature_chunks(tmp / "train")[0]).sequences())
    assert len(ids) > 3 * WINDOW
    with torch.no_grad():
        ref = target(ids[None], output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(feats, ref.to(torch.bfloat16), atol=0, rtol=0)
    return tok, target, convs, tmp, summary


def test_gemma3_head_trains_and_decodes_exactly(trained):
    from eagle2_kernels.train import main

    tok, target, convs, tmp, summary = trained
    assert summary["steps"] == 200
    assert summary["last_train_loss"] < 0.75 * summary["first_train_loss"], summary
    assert main(["eval", "--target", str(tmp / "target"), "--head", str(tmp / "head"), "--features",
                 str(tmp / "heldout"), "--steps", "2", "--json", str(tmp / "eval.json")]) == 0
    result = json.loads((tmp / "eval.json").read_text())
    assert result["acc"][0] > 0.3, result  # chance over the 24-token draft vocabulary: ~0.04

    head = EagleDraftHead.from_pretrained(tmp / "head", target=target, dtype=torch.float32)
    # A held-out chat up to its last reply: longer than the window by far.
    ids = tok.apply_chat_template(convs[-1][:3], add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    assert ids.shape[1] > 3 * WINDOW
    want = hf_greedy(target, ids, NEW)
    out = fixed_decoder(target, head).generate(ids, NEW)
    assert torch.equal(out.sequences, want), (out.sequences[0, ids.shape[1]:], want[0, ids.shape[1]:])
    # The trained head's drafts are accepted more often than an untrained one's (1.25 vs 1.05
    # tokens per round here: the model's own greedy text lies off the synthetic chats).
    torch.manual_seed(1)
    plain = fixed_decoder(target, EagleDraftHead.from_target(target)).generate(ids, NEW)
    assert torch.equal(plain.sequences, want)
    assert out.stats.mean_accept_length > plain.stats.mean_accept_length + 0.1, (
        out.stats.accept_lengths, plain.stats.accept_lengths)


def test_gemma3_head_embeds_tokens_as_the_target_does(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from eagle2_kernels.train.fit import FitConfig, fit

    tok, target, convs, tmp, _ = trained
    ids = torch.randint(0, len(tok), (2, 11))
    with torch.no_grad():
        # hidden_states[0]: the input of the first decoder layer, sqrt(H)-scaled embeddings.
        first = target(ids, output_hidden_states=True).hidden_states[0]
    raw = target.get_input_embeddings().weight
    assert not torch.allclose(first, raw[ids])  # the scaling is real here (sqrt(32))
    shared = EagleDraftHead.from_pretrained(tmp / "head", target=target, dtype=torch.float32)
    assert shared.embed_tokens is None
    torch.testing.assert_close(shared.embed(ids), first, atol=0, rtol=0)

    # The same head with its own copy of the table (the raw weights, as released heads carry
    # it): it must embed as the target does, not skip the scaling.
    own_dir = tmp_path / "own"
    own_dir.mkdir()
    (own_dir / "config.json").write_text((tmp / "head" / "config.json").read_text())
    state = load_file(str(tmp / "head" / "model.safetensors"))
    save_file({**state, "embed_tokens.weight": raw.detach().clone()}, str(own_dir / "model.safetensors"))
    own = EagleDraftHead.from_pretrained(own_dir, target=target, dtype=torch.float32)
    assert own.embed_tokens is not None
    torch.testing.assert_close(own.embed(ids), first, atol=0, rtol=0)
    x = torch.tensor([[5, 9, 17, 2]])
    feats = torch.randn(1, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(own(feats, x), shared(feats, x), atol=0, rtol=0)

    # Fine-tuning from it keeps the table frozen and saves it with the head.
    fit([tmp / "train"], tmp_path / "tuned", FitConfig(max_steps=2, batch_tokens=1024, eval_every=0,
                                                       init_from=own_dir), target=target, progress=False)
    tuned = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    assert torch.equal(tuned["embed_tokens.weight"], raw.detach().to(torch.bfloat16))
    assert not torch.equal(tuned["fc.weight"], state["fc.weight"])
