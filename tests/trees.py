"""Hand-made draft trees for the verify tests: parent and token lists in, a DraftTree out."""

from __future__ import annotations

import torch

from eagle2_kernels.ops import DraftTree
from eagle2_kernels.ops.tree import pack_bits


def make_tree(parents, tokens, device="cpu", token_dtype=torch.int64, parent_dtype=torch.int32):
    """A DraftTree from [B][T] (or [T]) parent and token lists; depth and mask derived by
    walking each node up to the root (an independent, loop-based construction)."""
    parents = torch.as_tensor(parents)
    parents = parents.reshape(-1, parents.shape[-1])
    tokens = torch.as_tensor(tokens).reshape(parents.shape)
    B, T = parents.shape
    depth = torch.zeros(B, T, dtype=torch.int32)
    ancestors = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            j = i
            while j >= 0:
                ancestors[b, i, j] = True
                j = int(parents[b, j])
                depth[b, i] += j >= 0
    mask = pack_bits(ancestors)
    return DraftTree(
        tokens.to(token_dtype).to(device), parents.to(parent_dtype).to(device), depth.to(device), mask.to(device)
    )
