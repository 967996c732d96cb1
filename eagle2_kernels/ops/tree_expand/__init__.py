"""``tree_expand``: one draft-tree expansion step (log-softmax, per-row top-k, global top-k)."""

from __future__ import annotations

import torch

from eagle2_kernels._backend import device_guard, select_backend
from eagle2_kernels.ops.tree_expand.reference import tree_expand as _reference

__all__ = ["tree_expand"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


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
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a [B, R, V] tensor, got {_shape(logits)}")
    if logits.dtype not in _FLOATS:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    B, R, V = logits.shape
    if B < 1 or R < 1 or V < 1:
        raise ValueError(f"logits shape [B, R, V] = {list(logits.shape)} must have B, R, V >= 1")
    if not isinstance(parent_scores, torch.Tensor) or tuple(parent_scores.shape) != (B, R):
        raise ValueError(
            f"parent_scores must have shape [B, R] = {[B, R]}, got {_shape(parent_scores)}"
        )
    if parent_scores.dtype != torch.float32:
        raise TypeError(f"parent_scores must be float32, got {parent_scores.dtype}")
    if parent_scores.device != logits.device:
        raise ValueError(
            f"parent_scores is on {parent_scores.device} but logits on {logits.device}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= V:
        raise ValueError(f"top_k={top_k} must be in [1, V={V}]")
    if draft_to_target is not None:
        if not isinstance(draft_to_target, torch.Tensor) or tuple(draft_to_target.shape) != (V,):
            raise ValueError(
                f"draft_to_target must have shape [V] = [{V}], got {_shape(draft_to_target)}"
            )
        if draft_to_target.dtype not in _INTS:
            raise TypeError(f"draft_to_target must be int32 or int64, got {draft_to_target.dtype}")
        if draft_to_target.device != logits.device:
            raise ValueError(
                f"draft_to_target is on {draft_to_target.device} but logits on {logits.device}"
            )

    name = select_backend(logits, backend)
    if name == "triton":
        from eagle2_kernels.ops.tree_expand.kernel import tree_expand as impl
    elif name == "ext":
        from eagle2_kernels import _native

        impl = _native.tree_expand
    else:
        impl = _reference
    with device_guard(logits):
        return impl(logits, parent_scores, top_k, draft_to_target)
