"""The ways of decoding compared side by side, as *methods*: callables
``(input_ids [1, L] int64, max_new_tokens) -> Generation``.

:func:`hf_generate_method` (transformers ``generate(do_sample=False)``), :func:`plain_loop_method`
(the decoder's own plain loop) and :func:`speculative_method` (the decoder's EAGLE-2 rounds); any
callable with the same signature works with the runner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

# Method names used by the CLI; any names work with the runner.
HF = "hf"  # transformers generate(do_sample=False)
LOOP = "loop"  # the decoder's own plain loop (one target forward per token)
SPEC = "spec"  # EAGLE-2 speculative decoding


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


def eos_token_ids(model, tokenizer) -> list[int] | None:
    """The stop tokens of a model: its tokenizer's ``eos_token_id`` and its generation
    config's (an int or a list), merged and sorted; None when neither names one."""
    from eagle2_kernels.runtime.request import eos_ids

    ids = []
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is not None:  # the decoder checks the ids against its vocabulary
            ids += eos_ids(source, vocab=2**62)
    return sorted(set(ids)) or None


def _eos_list(eos_token_id) -> list[int] | None:
    from eagle2_kernels.runtime.request import eos_ids

    return None if eos_token_id is None else list(eos_ids(eos_token_id, vocab=2**62))


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

