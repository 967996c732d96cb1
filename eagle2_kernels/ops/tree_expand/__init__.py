"""``tree_expand``: one draft-tree expansion step (log-softmax, per-row top-k, global top-k)."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._checks import (FLOAT_DTYPES, INT_DTYPES, check_device, check_int,
                                        check_rank, check_shape)
from eagle2_kernels.ops._dispatch import dispatch

__all__ = ["tree_expand"]

_NAME = "tree_expand"


def tree_expand(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    top_k: int,
    draft_to_target: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expand R frontier nodes into their top-k children and pick the next frontier.

    For every row (b, r): log-softmax of ``logits[b, r]`` in float32, its ``top_k`` best
    tokens in descending order (equal logits: the lower draft id first), each child scored
    ``parent_scores[b, r] + logp``. Then, per sequence, the ``top_k`` best of all R*K
    children become the next frontier.

    Args:
        logits: [B, R, V] float32, float16 or bfloat16: draft logits of the R frontier nodes
            (R = 1 for the root expansion). NaN is not supported; -inf is allowed.
        parent_scores: [B, R] float32: scores (log path probabilities) of the frontier
            nodes; zeros for the root expansion.
        top_k: K, children per row and size of the next frontier; 1 <= K <= V.
        draft_to_target: optional [V] int32/int64 map from draft id to target token id
            (reduced draft vocabulary); ties are still broken on the draft id.
        backend: "reference", "triton" or "ext"; default by device (see ``_backend``).

    Returns:
        child_tokens: [B, R, K] int64 token ids (mapped through ``draft_to_target``).
        child_scores: [B, R, K] float32, descending along K.
        next_index: [B, K] int64 flat indices ``r * K + j`` into ``child_scores[b]``
            of the K best children, descending by score, ties to the lower flat index.
        next_scores: [B, K] float32, ``child_scores[b].flatten()[next_index[b]]``.

    Example:
        >>> logits = torch.tensor([[[0.0, 2.0, 1.0, 2.0]]])
        >>> toks, scores, idx, nxt = tree_expand(logits, torch.zeros(1, 1), 2)
        >>> toks.tolist(), idx.tolist()
        ([[[1, 3]]], [[0, 1]])
    """
    check_rank(_NAME, "logits", logits, "[B, R, V]", FLOAT_DTYPES)
    B, R, V = logits.shape
    if B < 1 or R < 1 or V < 1:
        raise ValueError(f"{_NAME}: logits shape [B, R, V] = {list(logits.shape)} must have B, R, V >= 1")
    check_shape(_NAME, "parent_scores", parent_scores, (B, R), "[B, R]", (torch.float32,))
    check_device(_NAME, "parent_scores", parent_scores, logits.device, "logits")
    check_int(_NAME, "top_k", top_k, 1, V, f"V={V}")
    if draft_to_target is not None:
        check_shape(_NAME, "draft_to_target", draft_to_target, (V,), "[V]", INT_DTYPES)
        check_device(_NAME, "draft_to_target", draft_to_target, logits.device, "logits")
    return dispatch(_NAME, logits, backend, logits, parent_scores, top_k, draft_to_target)
