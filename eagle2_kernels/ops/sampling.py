"""Logits processing and inverse-CDF sampling shared by plain and speculative sampling.

Plain sampling in the runtime and the lossless acceptance of ``verify_sample`` both go
through :func:`process_logits`, so that the two draw from exactly the same distribution.
The processing follows the usual Hugging Face warper chain (temperature, then top-k, then
top-p with ``min_tokens_to_keep=1``), computed in float32.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["check_sampling_params", "process_logits", "sample_from_probs"]


def check_sampling_params(temperature, top_p=1.0, top_k=0) -> tuple[float, float, int]:
    """Validate the sampling parameters and return them as ``(float, float, int)``.

    Raises:
        TypeError: ``temperature`` or ``top_p`` is not a real number, or ``top_k`` not an
            integer (bools are neither).
        ValueError: ``temperature`` is not a finite number > 0, ``top_p`` is not in (0, 1],
            or ``top_k`` is < 0.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number > 0, got {temperature!r}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r} "
            "(for temperature 0 use greedy decoding: verify_greedy / argmax)"
        )
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise TypeError(f"top_p must be a real number in (0, 1], got {top_p!r}")
    top_p = float(top_p)
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an integer >= 0 (0 disables top-k), got {top_k!r}")
    top_k = int(top_k)
    if top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables top-k), got {top_k!r}")
    return temperature, top_p, top_k


def process_logits(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0
) -> torch.Tensor:
    """Turn logits into the sampling distribution: temperature, then top-k, then top-p.

    The same chain as ``LogitsProcessorList([TemperatureLogitsWarper(temperature),
    TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)])`` followed by a softmax, with every
    step in float32:

    - temperature: ``logits / temperature``;
    - top-k (``top_k > 0``; ``top_k >= V`` keeps everything): tokens whose logit is below the
      k-th largest are removed (ties with the k-th largest are kept);
    - top-p (``top_p < 1``): sort ascending (stable, so among equal logits the lower token id
      comes first), remove the tokens whose ascending cumulative probability is
      ``<= 1 - top_p``; the most probable token is always kept.

    Removed tokens get probability exactly 0.

    Args:
        logits: [..., V] float (fp32, fp16 or bf16), any leading dims.
        temperature: float > 0.
        top_p: float in (0, 1]; 1 disables top-p.
        top_k: int >= 0; 0 disables top-k.

    Returns:
        probs: [..., V] float32, each row sums to 1 (up to rounding).

    Example:
        >>> process_logits(torch.tensor([2.0, 1.0, 0.0]), 1.0, top_k=2)
        tensor([0.7311, 0.2689, 0.0000])
    """
    temperature, top_p, top_k = check_sampling_params(temperature, top_p, top_k)
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor [..., V], got {_describe(logits)}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dim, got shape {tuple(logits.shape)}")
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False, stable=True)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1.0 - top_p)
        remove_sorted[..., -1] = False  # min_tokens_to_keep = 1: the most probable token stays
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(dim=-1)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row by inverse CDF, in token-id order.

    The token is the smallest id whose cumulative probability (summed in float64 in token-id
    order) exceeds ``u``. When rounding leaves no cumulative value above ``u`` (the row sums
    to slightly less than 1), the last token with nonzero probability is taken. ``probs`` is
    used as given (not renormalised).

    Args:
        probs: [..., V] float32 or float64, nonnegative, rows summing to 1.
        uniforms: [...] float, values in [0, 1), the leading shape of ``probs``.

    Returns:
        tokens: [...] int64.

    Example:
        >>> sample_from_probs(torch.tensor([0.25, 0.0, 0.75]), torch.tensor(0.3))
        tensor(2)
    """
    if not torch.is_tensor(probs) or not probs.is_floating_point():
        raise TypeError(f"probs must be a floating-point tensor [..., V], got {_describe(probs)}")
    if not torch.is_tensor(uniforms) or not uniforms.is_floating_point():
        raise TypeError(f"uniforms must be a floating-point tensor, got {_describe(uniforms)}")
    if probs.dim() < 1 or tuple(uniforms.shape) != tuple(probs.shape[:-1]):
        raise ValueError(
            f"uniforms must have the leading shape of probs {tuple(probs.shape[:-1])}, "
            f"got {tuple(uniforms.shape)}"
        )
    if uniforms.device != probs.device:
        raise ValueError(f"uniforms is on {uniforms.device} but probs on {probs.device}")
    vocab = probs.shape[-1]
    cdf = probs.double().cumsum(dim=-1)
    above = cdf > uniforms.double().unsqueeze(-1)
    # argmax of a 0/1 row is its first 1; a row without any 1 falls back below
    first = above.to(torch.uint8).argmax(dim=-1)
    ids = torch.arange(vocab, device=probs.device)
    last_nonzero = torch.where(probs > 0, ids, 0).amax(dim=-1)
    return torch.where(above.any(dim=-1), first, last_nonzero)


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"
