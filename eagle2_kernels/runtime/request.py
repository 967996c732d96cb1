"""One validated decoding call: prompts, budget, sampling, stop ids, padding.

Everything a caller hands to ``generate`` / ``stream`` (or the CLI, the evaluation, the
engine) is checked here once, with one rule for errors: a value of the wrong *type* raises
:class:`InputTypeError` (a ``TypeError``, and also a ``ValueError`` so that ``except
ValueError`` catches every bad input), a value out of range raises ``ValueError``. The ops
(``ops.sampling.check_sampling_params``) follow the same rule.

Also here: the one EOS normaliser (:func:`eos_ids`) and the one host cut of a round's tokens
at EOS and budget (:func:`cut`), shared by every loop.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["InputTypeError", "SamplingParams", "Request", "eos_ids", "cut", "read_prompts"]


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type (say, float input ids). Also a ValueError, so that
    ``except ValueError`` catches every bad-input error of the decoder."""


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are picked: temperature 0 = greedy (argmax); > 0 samples after top-k and
    top-p filtering (``ops.sampling.process_logits``: the HF warper order)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        t, p, k = self.temperature, self.top_p, self.top_k
        if not _real(t):
            raise InputTypeError(f"temperature must be a real number >= 0 (0 = greedy), got {t!r}")
        if not (math.isfinite(float(t)) and float(t) >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not _real(p):
            raise InputTypeError(f"top_p must be a real number in (0, 1], got {p!r}")
        if not 0.0 < float(p) <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        if not isinstance(k, numbers.Integral) or isinstance(k, bool):
            raise InputTypeError(f"top_k (the sampling filter) must be an int >= 0 (0 = off), got {k!r}")
        if k < 0:
            raise ValueError(f"top_k (the sampling filter) must be an int >= 0 (0 = off), got {k!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "top_k", int(k))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_tuple(self) -> tuple[float, float, int]:
        return self.temperature, self.top_p, self.top_k


def eos_ids(eos_token_id, vocab: int, model=None) -> tuple[int, ...]:
    """The stop ids of a call, in the order given: an int, a list of ints, or None (then the
    model's ``generation_config.eos_token_id``, as transformers' generate does; none = ``()``).
    ``[]`` disables stopping."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            return ()
    items = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else eos_token_id
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}") from None
    for e in items:
        if isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < vocab:
            raise ValueError(f"eos_token_id entries must be ints in [0, {vocab}), got {eos_token_id!r}")
    return tuple(int(e) for e in items)


def pad_id(model, eos: tuple[int, ...]) -> int:
    """Pads sequences that stop early, as transformers does: the pad id, else the first EOS."""
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    return int(pad) if isinstance(pad, numbers.Integral) else (eos[0] if eos else 0)


def cut(tokens: list[int], budget: int, eos) -> tuple[list[int], bool]:
    """A round's proposed tokens truncated at the first EOS (kept) and at the token budget;
    and whether the sequence is done."""
    done = False
    if eos:
        for i, t in enumerate(tokens):
            if t in eos:
                tokens, done = tokens[: i + 1], True
                break
    if len(tokens) >= budget:
        tokens, done = tokens[:budget], True
    return tokens, done


@dataclass(frozen=True)
class Request:
    """One validated generate / stream call: prompts right-padded to the longest ([B, Lmax]
    int64 on the target's device) with their lengths, the budget, sampling and stop ids, and
    ``need``, the cache slots the call may use."""

    input_ids: torch.Tensor
    lengths: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    eos: frozenset
    need: int
    generator: torch.Generator | None
    pad_id: int  # pads sequences that stop early (and the prompts of a ragged batch)

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def ragged(self) -> bool:
        return min(self.lengths) != self.input_ids.shape[1]


def check_budget(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    return int(max_new_tokens)


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


# ---------------------------------------------------------------------------------- prompts
def _as_ids(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InputTypeError(f"{name} must be an integer tensor (int64 token ids), got dtype {t.dtype}")
    return t if t.dtype in (torch.int32, torch.int64) else t.long()  # embeddings take int32/int64


def _rows_of_list(prompts, attention_mask) -> list[torch.Tensor]:
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a padded [B, L] tensor, not with a list of prompts")
    if not prompts:
        raise ValueError("input_ids is an empty list; give at least one prompt")
    if all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in prompts):
        raise ValueError(
            f"input_ids is a flat list of {len(prompts)} ints; a list holds prompts: write "
            f"[[...]] for one prompt, or pass torch.tensor([...])"
        )
    rows = []
    for i, row in enumerate(prompts):
        if isinstance(row, (str, bytes)):
            raise InputTypeError(f"prompt {i} of the list is text ({row[:20]!r}); tokenize it first, "
                                 f"e.g. tokenizer(texts, return_tensors='pt', padding=True)")
        if not torch.is_tensor(row) and hasattr(row, "__len__") and len(row) == 0:
            raise ValueError(f"prompt {i} of the list is empty; every prompt needs at least one token")
        try:
            t = row if torch.is_tensor(row) else torch.as_tensor(row)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputTypeError(f"prompt {i} of the list must be a 1-D tensor or a list of int token "
                                 f"ids, got {type(row).__name__} ({exc})") from None
        if t.dim() != 1:
            raise ValueError(f"prompt {i} of the list must be 1-D, got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"prompt {i} of the list is empty; every prompt needs at least one token")
        rows.append(_as_ids(t, f"prompt {i}"))
    return rows


def _check_tensor_type(input_ids) -> None:
    if isinstance(input_ids, (str, bytes)):
        raise InputTypeError(
            f"input_ids is text ({input_ids[:20]!r}); tokenize it first, e.g. "
            f"tokenizer(text, return_tensors='pt') (or dec.tokenizer when the decoder has one)"
        )
    if isinstance(input_ids, Mapping):
        raise ValueError(f"input_ids is a mapping without an 'input_ids' key (keys: {sorted(map(str, input_ids))}); "
                         f"pass a tokenizer's output or a tensor of token ids")
    if not torch.is_tensor(input_ids):
        raise InputTypeError(
            f"input_ids must be a torch.Tensor of token ids [B, L] (or a list of 1-D prompts), got "
            f"{type(input_ids).__name__}"
        )


def _check_vocab(ids: torch.Tensor, name: str, vocab: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} must lie in [0, {vocab}), got values in [{lo}, {hi}]")


def _rows_of_tensor(input_ids, attention_mask, device, vocab):
    """A [B, L] / [L] tensor (+ optional 0/1 mask): (ids, lengths) when nothing is padded,
    else the list of each row's unpadded tokens."""
    _check_tensor_type(input_ids)
    ids = _as_ids(input_ids, "input_ids")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, L], got {tuple(ids.shape)}")
    mask = None if attention_mask is None else torch.as_tensor(attention_mask)
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    if mask is None or bool(mask.all()):
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must hold a non-empty prompt, got shape {tuple(ids.shape)}")
        if ids.device != device:
            raise ValueError(f"input_ids is on {ids.device} but the target model on {device}; move it there")
        _check_vocab(ids, "input_ids", vocab)
        return ids, [ids.shape[1]] * ids.shape[0]
    rows = []
    for b in range(ids.shape[0]):
        keep = torch.nonzero(mask[b].to("cpu") != 0).flatten()
        if keep.numel() and keep[-1] - keep[0] + 1 != keep.numel():
            raise ValueError(f"attention_mask row {b} has zeros between ones; only left or right padding is supported")
        rows.append(ids[b, keep.to(ids.device)])
    return rows


def read_prompts(input_ids, attention_mask, device, vocab: int) -> tuple[torch.Tensor, list[int]]:
    """Prompts -> (right-padded ids [B, Lmax] on ``device``, lengths [B]).

    Accepts a [B, L] or [L] integer tensor (with an optional ``attention_mask`` of 0/1, left
    or right padding), a tokenizer's BatchEncoding / dict with ``input_ids`` (and
    ``attention_mask``), or a list of 1-D tensors / lists of ids of different lengths.
    """
    if isinstance(input_ids, Mapping) and "input_ids" in input_ids:
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids["input_ids"]
    if isinstance(input_ids, (list, tuple)):
        rows = _rows_of_list(input_ids, attention_mask)
    else:
        rows = _rows_of_tensor(input_ids, attention_mask, device, vocab)
        if isinstance(rows, tuple):
            return rows
    lengths = [int(r.numel()) for r in rows]
    if min(lengths) < 1:
        raise ValueError(f"every prompt must hold at least one token, got lengths {lengths}")
    for i, r in enumerate(rows):
        if r.device != device:
            raise ValueError(f"prompt {i} is on {r.device} but the target model on {device}; move it there")
        _check_vocab(r, f"prompt {i}", vocab)
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.int64, device=device)
    for b, r in enumerate(rows):
        ids[b, : lengths[b]] = r
    return ids, lengths
