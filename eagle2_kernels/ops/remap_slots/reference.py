"""Pure-torch ``remap_slots``: the specification (also the CPU path)."""

from __future__ import annotations

import torch

_NAME = "remap_slots"


def remap_slots(
    req_to_token: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
    tree_len: int,
    update: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accepted and freed pool slots of each sequence's tree (see ``ops.remap_slots``).

    Returns:
        accepted_slots [B, T] (dtype of ``req_to_token``, -1 padded), free_slots
        [B, tree_len] (-1 padded, increasing node order), num_free [B] int64. With ``update``,
        req_to_token[b, prefix_len[b] + j] = accepted_slots[b, j] for j < accept_len[b].
    """
    B, T = path.shape
    max_context = req_to_token.shape[1]
    accepted_slots = torch.full((B, T), -1, dtype=req_to_token.dtype, device=req_to_token.device)
    free_slots = torch.full((B, tree_len), -1, dtype=req_to_token.dtype,
                            device=req_to_token.device)
    num_free = torch.zeros(B, dtype=torch.int64, device=req_to_token.device)
    for b in range(B):
        accepted = int(accept_len[b])
        prefix = int(prefix_len[b])
        if not 0 <= accepted <= min(T, tree_len):
            raise ValueError(
                f"{_NAME}: accept_len[{b}]={accepted} is not in [0, min(T={T}, "
                f"tree_len={tree_len})]"
            )
        if prefix < 0 or prefix + tree_len > max_context:
            raise ValueError(
                f"{_NAME}: sequence {b}: prefix_len={prefix} + tree_len={tree_len} passes the "
                f"{max_context} positions of req_to_token"
            )
        nodes = path[b, :accepted].to(torch.int64)
        if accepted and (int(nodes.min()) < 0 or int(nodes.max()) >= tree_len):
            raise ValueError(
                f"{_NAME}: sequence {b}: path[:{accepted}]={nodes.tolist()} has entries outside "
                f"the tree's nodes [0, {tree_len})"
            )
        if nodes.unique().numel() != accepted:
            raise ValueError(f"{_NAME}: sequence {b}: path[:{accepted}] repeats a node")
        tree = req_to_token[b, prefix: prefix + tree_len].clone()  # read before any write
        keep = torch.zeros(tree_len, dtype=torch.bool, device=req_to_token.device)
        keep[nodes] = True
        accepted_slots[b, :accepted] = tree[nodes]
        freed = tree[~keep]
        free_slots[b, : freed.numel()] = freed
        num_free[b] = freed.numel()
        if update:
            req_to_token[b, prefix: prefix + accepted] = tree[nodes]
    return accepted_slots, free_slots, num_free
