"""The side-by-side runner: every method on every turn, in one process, one after the other."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from eagle2_kernels.eval.methods import HF, Generation, Method
from eagle2_kernels.eval.questions import PromptBuilder, Question


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class PlainComparison:
    """One generation against plain decoding of the same prompt.

    Attributes:
        speedup: tokens/s of the generation over tokens/s of plain decoding (the time ratio
            when both produced as many tokens).
        identical: whether the two token sequences are equal.
        common_prefix: how many leading tokens they share.
    """

    speedup: float
    identical: bool
    common_prefix: int


def compare_with_plain(
    new_ids: Sequence[int], seconds: float, plain_ids: Sequence[int], plain_seconds: float
) -> PlainComparison:
    """Speedup in tokens/s and agreement of ``new_ids`` with plain decoding's ``plain_ids``."""
    speedup = (len(new_ids) / seconds) / (len(plain_ids) / plain_seconds)
    return PlainComparison(speedup, list(new_ids) == list(plain_ids), common_prefix(new_ids, plain_ids))


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
                        {f"x{reference}": f"{pooled_speedup(records, spec[0], reference):.2f}"}, refresh=False
                    )
    finally:
        if bar is not None:
            bar.close()
    return records


def pooled_speedup(records: Sequence[TurnRecord], method: str, baseline: str) -> float:
    """``baseline`` seconds / ``method`` seconds, each summed over ``records`` (nan if no time)."""
    spent = sum(r.results[method].seconds for r in records)
    base = sum(r.results[baseline].seconds for r in records)
    return base / spent if spent > 0 else float("nan")

