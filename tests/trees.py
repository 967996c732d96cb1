"""Hand-made draft trees for the verify tests: parent and token lists in, a DraftTree out."""

from __future__ import annotations

import torch

from eagle2_kernels.ops import DraftTree
from eagle2_kernels.ops.tree import mask_words


def make_tree(parents, tokens, device="cpu", token_dtype=torch.int64, parent_dtype=torch.int32):
    """A DraftTree from [B][T] (or [T]) parent and token lists; depth and mask derived by
    walking each node up to the root (an independent, loop-based construction)."""
    parents = torch.as_tensor(parents)
    parents = parents.reshape(-1, parents.shape[-1])
    tokens = torch.as_tensor(tokens).reshape(parents.shape)
    B, T = parents.shape
    depth = torch.zeros(B, T, dtype=torch.int32)
    mask = torch.zeros(B, T, mask_words(T), dtype=torch.int64)
    for b in range(B):
        for i in range(T):
            j = i
            while j >= 0:
                mask[b, i, j // 32] |= 1 << (j % 32)
                j = int(parents[b, j])
                depth[b, i] += j >= 0
    mask = torch.where(mask >= 2**31, mask - 2**32, mask).to(torch.int32)
    return DraftTree(
        tokens.to(token_dtype).to(device), parents.to(parent_dtype).to(device), depth.to(device), mask.to(device)
    )
