"""Pure-torch specification of ``tree_build`` (also the CPU path without the extension)."""

from __future__ import annotations

import torch

from eagle2_kernels.ops.tree import DraftTree, pack_bits
from eagle2_kernels.ops.tree_expand.reference import topk_lowest_index

# Per-sequence error codes written to ``error_flag`` (bits, OR-ed together).
ERR_PARENT_DROPPED = 1  # a kept candidate's parent is not among the kept candidates
ERR_PARENT_INVALID = 2  # some candidate's parent is not in [-1, own index)


def raise_for_error_codes(codes: torch.Tensor, cand_parents: torch.Tensor) -> None:
    """Raise ValueError describing the first nonzero per-sequence error code (host read)."""
    bad = torch.nonzero(codes).flatten().tolist()
    if not bad:
        return
    b = bad[0]
    code = int(codes[b])
    if code & ERR_PARENT_INVALID:
        parents = cand_parents[b].long().cpu()
        own = torch.arange(parents.numel())
        c = int(torch.nonzero((parents < -1) | (parents >= own))[0])
        raise ValueError(
            f"tree_build: cand_parents[{b}, {c}] = {int(parents[c])} is invalid: a candidate's "
            f"parent must be -1 (the root) or a smaller candidate index in [0, {c})"
        )
    raise ValueError(
        f"tree_build: in sequence {b} a kept candidate's parent was not kept (the kept set must "
        "be closed under ancestors: a child's score must not exceed its parent's, as with "
        "log-probability path scores)"
    )


def tree_build(
    cand_tokens: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    root_tokens: torch.Tensor,
    total_tokens: int,
    error_flag: torch.Tensor | None = None,
) -> DraftTree:
    """Rerank draft candidates into a tree of ``total_tokens`` nodes (root included).

    Shapes: cand_* [B, C], root_tokens [B] -> DraftTree with T = total_tokens nodes.
    """
    B, C = cand_scores.shape
    T = total_tokens
    device = cand_scores.device
    parents = cand_parents.to(torch.int64)
    own = torch.arange(C, device=device)
    invalid = (parents < -1) | (parents >= own)  # [B, C]

    # Keep the T-1 best scores (ties to the lower candidate index), in candidate order.
    _, best = topk_lowest_index(cand_scores.float(), T - 1)
    kept = best.sort(dim=-1).values  # [B, T-1]
    node_of = torch.full((B, C), -1, dtype=torch.int64, device=device)
    node_of.scatter_(1, kept, torch.arange(1, T, device=device).expand(B, T - 1))

    # Parent node of each kept candidate: the root (0) for parent -1, else its node index.
    # An invalid parent index is reported by its own code and then treated as the root.
    par = torch.where(invalid.gather(1, kept), -1, parents.gather(1, kept))
    par_node = torch.where(par < 0, 0, node_of.gather(1, par.clamp(min=0)))
    dropped = par_node < 0
    codes = (ERR_PARENT_INVALID * invalid.any(1) | ERR_PARENT_DROPPED * dropped.any(1)).to(
        torch.int32
    )
    if error_flag is not None:
        error_flag.copy_(codes)
    raise_for_error_codes(codes, cand_parents)

    root = root_tokens.to(torch.int64)[:, None]
    tokens = torch.cat([root, cand_tokens.gather(1, kept).to(torch.int64)], 1)
    node_parents = torch.cat(
        [torch.full((B, 1), -1, dtype=torch.int64, device=device), par_node], 1
    )

    # Ancestor-or-self relation: start from self + parent edges, close it by squaring.
    rows = torch.arange(T, device=device)
    anc = torch.zeros(B, T, T, dtype=torch.float32, device=device)
    anc[:, rows, rows] = 1.0
    anc[:, 1:, :] = anc[:, 1:, :].scatter(-1, node_parents[:, 1:, None], 1.0)
    reach = 1  # paths of up to `reach` parent steps are covered
    while reach < T - 1:
        anc = (anc @ anc > 0).float()
        reach *= 2
    is_anc = anc > 0

    return DraftTree(
        tokens=tokens,
        parents=node_parents.to(torch.int32),
        depth=(is_anc.sum(-1) - 1).to(torch.int32),
        mask=pack_bits(is_anc),
    )
