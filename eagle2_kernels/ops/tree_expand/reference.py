"""Pure-torch specification of ``tree_expand`` (also the CPU path without the extension)."""

from __future__ import annotations

import torch


def topk_lowest_index(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` along the last dim, descending, equal values ordered by the lower index.

    ``torch.topk`` returns the right values but leaves the order of ties (and which tied
    elements make the cut) unspecified, so the tie rule is applied explicitly: every element
    strictly above the k-th value is taken, then the lowest-indexed elements equal to it.
    NaN is not supported.

    Returns (values, indices), both ``[..., k]``; indices int64.
    """
    kth = torch.topk(x, k, dim=-1).values[..., -1:]
    chosen = x >= kth
    if (chosen.sum(-1) > k).any():  # ties straddle the cut: keep the lowest-indexed ones
        above = x > kth
        need = k - above.sum(-1, keepdim=True)
        at_kth = x == kth
        chosen = above | (at_kth & (torch.cumsum(at_kth, dim=-1) <= need))
    # now exactly k chosen per row
    index = chosen.nonzero()[:, -1].view(*x.shape[:-1], k)  # ascending within each row
    values = x.gather(-1, index)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), index.gather(-1, order)


def tree_expand(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    top_k: int,
    draft_to_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expand R frontier rows into their top-k children and choose the next frontier.

    Shapes: logits [B, R, V], parent_scores [B, R] -> child_tokens [B, R, K] int64,
    child_scores [B, R, K] float32, next_index [B, K] int64, next_scores [B, K] float32.
    """
    B, R, V = logits.shape
    x = logits.float()
    # Log-softmax is a per-row shift, so ranking by the float32 logit is ranking by
    # log-probability; equal logits are the ties, broken toward the lower (draft) id.
    _, child_ids = topk_lowest_index(x, top_k)
    logp = torch.log_softmax(x, dim=-1).gather(-1, child_ids)
    child_scores = parent_scores.float()[..., None] + logp
    if draft_to_target is not None:
        child_tokens = draft_to_target.to(torch.int64)[child_ids]
    else:
        child_tokens = child_ids
    # Next frontier: the K best of all R*K children, flat index r*K + j, ties to the lower.
    next_scores, next_index = topk_lowest_index(child_scores.reshape(B, R * top_k), top_k)
    return child_tokens, child_scores, next_index, next_scores
