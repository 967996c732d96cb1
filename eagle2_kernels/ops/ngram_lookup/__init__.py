"""``ngram_lookup``: continuations of the longest suffix matches of each sequence in its own
context (prompt-lookup / suffix-match drafting, no model needed)."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._checks import INT_DTYPES, check_device, check_int, check_rank, check_shape

__all__ = ["ngram_lookup"]

_NAME = "ngram_lookup"


def ngram_lookup(
    context: torch.Tensor,
    lengths: torch.Tensor,
    max_ngram: int = 4,
    min_ngram: int = 1,
    num_tokens: int = 8,
    num_matches: int = 1,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find where the last tokens of each sequence occurred before, and what followed.

    For sequence b with context c = ``context[b, :lengths[b]]`` (L = ``lengths[b]``), every
    earlier end position p in [0, L-2] gets the match length m(p): the largest m <=
    ``max_ngram`` with c[p-m+1 .. p] == c[L-m .. L-1] (the m tokens ending at p equal the last
    m tokens). Positions with m(p) >= ``min_ngram`` are matches, ranked by longer m first,
    then by more recent p. Slot 0 takes the best match; slot i the best match whose next token
    c[p+1] differs from those of slots 0..i-1, so the slots propose distinct first tokens
    (distinct siblings in a draft tree). Each slot returns up to ``num_tokens`` tokens of its
    continuation c[p+1 ..] (cut at the end of the context).

    One implementation of the search runs on every device: a vectorised torch comparison of
    all end positions at once (``vectorized.py``, the default; no Python loop over the
    context). ``backend="reference"`` runs ``reference.py``, the same semantics written as
    plain loops (the specification; slow).

    Args:
        context: [B, L] int32/int64 token ids; entries past a sequence's length are ignored.
        lengths: [B] int32/int64 tensor on the context's device, each in [1, L] (read on the
            host once to check).
        max_ngram: longest suffix compared (>= 1).
        min_ngram: shortest suffix that counts as a match, in [1, max_ngram].
        num_tokens: N, continuation tokens returned per match (>= 1).
        num_matches: M, matches returned per sequence (>= 1).
        backend: None (vectorised) or "reference" (loops); other backend names run the
            vectorised search too (it is plain torch on any device).

    Returns:
        (tokens, counts, match_len): tokens [B, M, N] int64, slot i's continuation in its first
        ``counts[b, i]`` entries and -1 after them; counts [B, M] int64 in [0, N] (0 = no
        match for that slot; filled slots come first); match_len [B, M] int64, m of each slot
        (0 where empty).

    Example:
        >>> ctx = torch.tensor([[5, 6, 7, 8, 5, 6]])
        >>> tok, cnt, m = ngram_lookup(ctx, torch.tensor([6]), max_ngram=3, num_tokens=3)
        >>> tok.tolist(), cnt.tolist(), m.tolist()
        ([[[7, 8, 5]]], [[3]], [[2]])
    """
    check_rank(_NAME, "context", context, "[B, L]", INT_DTYPES)
    B, L = context.shape
    if B < 1 or L < 1:
        raise ValueError(f"{_NAME}: context shape [B, L] = {[B, L]} must have B, L >= 1")
    check_shape(_NAME, "lengths", lengths, (B,), "[B]", INT_DTYPES)
    check_device(_NAME, "lengths", lengths, context.device, "context")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > L:
        raise ValueError(f"{_NAME}: lengths must lie in [1, L={L}], got values in [{lo}, {hi}]")
    check_int(_NAME, "max_ngram", max_ngram, 1, 1 << 16)
    check_int(_NAME, "min_ngram", min_ngram, 1, max_ngram, f"max_ngram={max_ngram}")
    check_int(_NAME, "num_tokens", num_tokens, 1, 1 << 16)
    check_int(_NAME, "num_matches", num_matches, 1, 1 << 16)
    if backend == "reference":
        from eagle2_kernels.ops.ngram_lookup import reference as impl
    else:
        from eagle2_kernels.ops.ngram_lookup import vectorized as impl
    return impl.ngram_lookup(context, lengths, max_ngram, min_ngram, num_tokens, num_matches)
