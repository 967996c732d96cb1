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
        req_to_token[b, prefix_len[b] + j] = accepted_slots[b, j] for j < accept_len[b]
        (every slot id read before any is written).
    """
    B, T = path.shape
    dev = req_to_token.device
    accept = accept_len.to(torch.int64)
    prefix = prefix_len.to(torch.int64)
    bad = (accept < 0) | (accept > min(T, tree_len))
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{_NAME}: accept_len[{b}]={int(accept[b])} is not in [0, min(T={T}, "
            f"tree_len={tree_len})]"
        )
    bad = (prefix < 0) | (prefix + tree_len > req_to_token.shape[1])
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{_NAME}: sequence {b}: prefix_len={int(prefix[b])} + tree_len={tree_len} passes "
            f"the {req_to_token.shape[1]} positions of req_to_token"
        )
    j = torch.arange(T, device=dev)
    valid = j[None, :] < accept[:, None]  # [B, T]: the accepted path entries
    nodes = path.to(torch.int64)
    bad = (valid & ((nodes < 0) | (nodes >= tree_len))).any(1)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{_NAME}: sequence {b}: path[:{int(accept[b])}]={nodes[b, : int(accept[b])].tolist()}"
            f" has entries outside the tree's nodes [0, {tree_len})"
        )
    # The slot ids of the tree's positions, read (copied) before anything is written.
    tree = req_to_token.gather(1, prefix[:, None] + torch.arange(tree_len, device=dev))
    keep = torch.zeros(B, tree_len + 1, dtype=torch.bool, device=dev)
    keep.scatter_(1, torch.where(valid, nodes, tree_len), True)  # column tree_len: padding
    keep = keep[:, :tree_len]
    bad = keep.sum(1) != accept
    if bool(bad.any()):
        raise ValueError(f"{_NAME}: sequence {int(torch.nonzero(bad)[0])}: the path repeats a node")
    accepted = torch.where(valid, tree.gather(1, torch.where(valid, nodes, 0)), -1)
    # Rejected nodes first, in node order (stable sort on the keep flag).
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)
    num_free = tree_len - accept
    n = torch.arange(tree_len, device=dev)
    free = torch.where(n[None, :] < num_free[:, None], tree.gather(1, order), -1)
    if update:
        seq = torch.arange(B, device=dev)[:, None].expand(B, T)[valid]
        req_to_token[seq, (prefix[:, None] + j)[valid]] = accepted[valid]
    return accepted.to(req_to_token.dtype), free.to(req_to_token.dtype), num_free
