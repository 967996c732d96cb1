"""The draft tree shared by every op (see the package docstring for shape letters)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """A batch of draft trees of T nodes each, in parents-first order (node 0 = root).

    Attributes:
        tokens: [B, T] int64 token ids; ``tokens[:, 0]`` is the root (the last committed token).
        parents: [B, T] int32 parent node index, ``-1`` for the root; ``parents[b, i] < i``.
        depth: [B, T] int32 depth, 0 for the root.
        mask: [B, T, W] int32, W = ceil(T / 32); bit j (word j // 32, bit j % 32) of row i is
            set iff node j is i or an ancestor of i.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def to(self, device) -> "DraftTree":
        return DraftTree(*(t.to(device) for t in (self.tokens, self.parents, self.depth, self.mask)))


def mask_words(num_nodes: int) -> int:
    """Number of int32 words per mask row: ceil(T / 32)."""
    return (num_nodes + 31) // 32
