"""Training an EAGLE-3 head (``eagle2 train ... --arch eagle3``) on a tiny 8-layer target:
multi-layer features are stored (and also train an EAGLE-1/2 head), the fit lowers the token
loss with a 3-step training-time test, the saved head is in the official layout, beats chance
on held-out data, decodes losslessly, round-trips through save_pretrained and continues with
--init-from; mismatched inputs fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import EagleDraftHead  # noqa: E402
from eagle2_kernels.models.eagle3_head import Eagle3DraftHead  # noqa: E402
from eagle2_kernels.train.features import generate_features, load_chunk  # noqa: E402
from eagle3_models import decoder  # noqa: E402
from tiny_chat import synthetic_conversations, tiny_tokenizer  # noqa: E402
from tiny_models import hf_greedy, one_thread  # noqa: E402,F401


def tiny_target(vocab_size: int):
    # Llama shrunk to 8 layers, hidden 32, tied embeddings (real SmolLM2-135M: 30 layers, hidden
    # 576). The final norm is scaled up so the target's token distributions are confident: an
    # EAGLE-3 head learns only from them (no feature loss), and a random target's are nearly
    # uniform. (Tied, its greedy tokens stay among the data's, so the draft vocabulary has them.)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=8, vocab_size=vocab_size, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    return model


def test_eagle3_train_end_to_end(tmp_path):
    from eagle2_kernels.train.evaluate import evaluate_head
    from eagle2_kernels.train.fit import FitConfig, fit

    tok = tiny_tokenizer()
    target = tiny_target(len(tok))
    convs = synthetic_conversations(40)
    layers = (2, 4, 5)
    generate_features(target, tok, convs[:32], tmp_path / "train", chunk_size=8, progress=False,
                      feature_layers=layers)
    generate_features(target, tok, convs[32:], tmp_path / "heldout", chunk_size=8, progress=False,
                      feature_layers=layers)
    meta = json.loads((tmp_path / "train" / "meta.json").read_text())
    assert meta["feature_layers"] == [2, 4, 5]
    chunk = load_chunk(tmp_path / "train" / "chunk_00000.safetensors")
    assert chunk.features.shape[1] == 4 * 32 and chunk.features.dtype == torch.bfloat16
    # The stored columns: the three hidden states, then the post-norm last one.
    ids = chunk.input_ids[: int(chunk.offsets[1])].long()[None]
    with torch.no_grad():
        out = target(ids, output_hidden_states=True)
    want = torch.cat([out.hidden_states[i] for i in layers] + [out.hidden_states[-1]], -1)[0]
    torch.testing.assert_close(chunk.features[: ids.shape[1]].float(), want.bfloat16().float())

    cfg = FitConfig(arch="eagle3", epochs=1000, max_steps=120, lr=3e-3, warmup_steps=10, batch_tokens=512,
                    ttt_steps=3, draft_vocab=24, eval_every=60, log_every=20)
    summary = fit([tmp_path / "train"], tmp_path / "head", cfg, eval_dirs=[tmp_path / "heldout"],
                  target=target, progress=False)
    assert summary["steps"] == 120
    # The soft cross-entropy cannot fall below the target's own entropy: the accuracy tells more.
    assert summary["last_train_loss"] < 0.8 * summary["first_train_loss"], summary
    assert min(summary["last_train_acc"]) > 0.5, summary  # all 3 steps; chance: 1/24
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "head" / "model.safetensors"))
    assert {"midlayer.hidden_norm.weight", "lm_head.weight", "d2t", "t2d"} <= set(state)
    assert "embed_tokens.weight" not in state and state["fc.weight"].dtype == torch.bfloat16
    assert state["lm_head.weight"].shape == (24, 32) and state["fc.weight"].shape == (32, 96)

    head = EagleDraftHead.from_pretrained(tmp_path / "head", target=target, dtype=torch.float32)
    assert isinstance(head, Eagle3DraftHead) and head.feature_layers == layers
    result = evaluate_head(tmp_path / "head", [tmp_path / "heldout"], steps=3, target=target)
    assert result["positions"] > 0 and result["acc"][0] > 0.3, result  # chance: 1/24
    # It decodes losslessly, and says so after a save / load round trip too.
    text = tok.apply_chat_template(convs[35][:1], add_generation_prompt=True, tokenize=False)
    prompt = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    ref = hf_greedy(target, prompt, 24)
    out = decoder(target, head, 8, 3, 2).generate(prompt, 24)
    assert torch.equal(out.sequences, ref)
    head.save_pretrained(tmp_path / "again")
    back = EagleDraftHead.from_pretrained(tmp_path / "again", target=target)
    assert torch.equal(decoder(target, back, 8, 3, 2).generate(prompt, 24).sequences, ref)

    # Continue from the saved head; the same features train an EAGLE-1/2 head (the last columns).
    more = fit([tmp_path / "train"], tmp_path / "head2",
               FitConfig(arch="eagle3", max_steps=2, batch_tokens=512, eval_every=1, init_from=tmp_path / "head"),
               eval_dirs=[tmp_path / "heldout"], target=target, progress=False)
    assert more["steps"] == 2 and more["draft_vocab"] == 24
    e2 = fit([tmp_path / "train"], tmp_path / "head_e2", FitConfig(max_steps=2, batch_tokens=512, draft_vocab=24),
             target=target, progress=False)
    assert e2["steps"] == 2
    assert type(EagleDraftHead.from_pretrained(tmp_path / "head_e2", target=target)) is EagleDraftHead
    with pytest.raises(ValueError, match="is an EAGLE-3 head, but arch is 'eagle2'"):
        fit([tmp_path / "train"], tmp_path / "x", FitConfig(max_steps=1, init_from=tmp_path / "head"),
            target=target, progress=False)


def test_eagle3_fit_needs_multi_layer_features(tmp_path):
    from eagle2_kernels.train.fit import FitConfig, fit

    tok = tiny_tokenizer()
    target = tiny_target(len(tok))
    convs = synthetic_conversations(8)
    generate_features(target, tok, convs, tmp_path / "plain", chunk_size=8, progress=False)
    with pytest.raises(ValueError, match="features --arch eagle3"):
        fit([tmp_path / "plain"], tmp_path / "h", FitConfig(arch="eagle3", max_steps=1), target=target,
            progress=False)
    generate_features(target, tok, convs, tmp_path / "other", chunk_size=8, progress=False,
                      feature_layers=(1, 3, 6))
    with pytest.raises(ValueError, match="different feature layouts"):
        fit([tmp_path / "plain", tmp_path / "other"], tmp_path / "h", FitConfig(arch="eagle3", max_steps=1),
            target=target, progress=False)
    # Non-default layers give a head that names them (and says so in its config).
    fit([tmp_path / "other"], tmp_path / "h", FitConfig(arch="eagle3", max_steps=1, batch_tokens=512,
                                                        draft_vocab=0), target=target, progress=False)
    head = EagleDraftHead.from_pretrained(tmp_path / "h", target=target)
    assert head.feature_layers == (1, 3, 6) and head.draft_to_target is None
    with pytest.raises(ValueError, match=r"must be hidden-state indices in \[0, 8\]"):
        generate_features(target, tok, convs, tmp_path / "bad", progress=False, feature_layers=(2, 9))
    with pytest.raises(ValueError, match="arch must be"):
        FitConfig(arch="eagle4").check()


def test_train_cli_passes_the_arch():
    from eagle2_kernels.train.cli import build_parser

    p = build_parser()
    assert p.parse_args(["fit", "--features", "f", "--out", "o", "--arch", "eagle3"]).arch == "eagle3"
    assert p.parse_args(["features", "--out", "o", "--arch", "eagle3"]).arch == "eagle3"
    assert p.parse_args(["run", "--out", "o", "--arch", "eagle3"]).arch == "eagle3"
    assert p.parse_args(["fit", "--features", "f", "--out", "o"]).arch == "eagle2"
