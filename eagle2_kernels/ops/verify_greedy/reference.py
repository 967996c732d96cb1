"""Pure-torch specification of ``verify_greedy`` (also the CPU path)."""

from __future__ import annotations

import torch

from eagle2_kernels.ops.tree import DraftTree


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor):
    """Greedy acceptance of a draft tree; see ``eagle2_kernels.ops.verify_greedy``.

    Node i > 0 is accepted iff its parent is accepted and ``tokens[i]`` equals the argmax of
    the target logits at the parent (ties to the lower token id). Walking the nodes in index
    order from the root, the first child of the current node whose token matches becomes the
    current node (siblings carry distinct tokens, so at most one can match).
    """
    tokens = tree.tokens.long()
    parents = tree.parents.long()
    batch, num_nodes = tokens.shape
    device = tokens.device
    # torch.argmax returns the first maximal index: ties go to the lower token id
    best = target_logits.argmax(dim=-1)  # [B, T] int64

    rows = torch.arange(batch, device=device)
    cur = torch.zeros(batch, dtype=torch.long, device=device)  # deepest accepted node
    accept_len = torch.ones(batch, dtype=torch.long, device=device)
    path = torch.full((batch, num_nodes), -1, dtype=torch.long, device=device)
    path[:, 0] = 0
    for i in range(1, num_nodes):
        # children of the current node come after it, so one pass in index order suffices
        take = (parents[:, i] == cur) & (tokens[:, i] == best[rows, cur])
        path[rows, accept_len] = torch.where(take, i, path[rows, accept_len])
        accept_len = accept_len + take.long()
        cur = torch.where(take, i, cur)
    bonus = best[rows, cur]
    return path, accept_len, bonus
