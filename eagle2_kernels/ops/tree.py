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


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool [..., N] tensor into int32 words [..., ceil(N / 32)], on its device.

    Bit j goes to word j // 32 at bit j % 32 (bit 31 is the sign bit, so such words are
    negative): the layout of ``DraftTree.mask`` and of every ``tree_mask`` argument.

    Example:
        >>> pack_bits(torch.tril(torch.ones(3, 3, dtype=torch.bool))).tolist()  # a chain
        [[1], [3], [7]]
    """
    n = bits.shape[-1]
    words = mask_words(n)
    padded = torch.zeros(*bits.shape[:-1], words * 32, dtype=torch.int64, device=bits.device)
    padded[..., :n] = bits.to(torch.int64)
    weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64, device=bits.device)
    value = (padded.view(*bits.shape[:-1], words, 32) * weights).sum(-1)
    return torch.where(value >= 1 << 31, value - (1 << 32), value).to(torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: int32 words [..., W] -> bool [..., n] (n <= 32 W).

    Example:
        >>> unpack_bits(torch.tensor([[1], [3], [5]], dtype=torch.int32), 3).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    """
    j = torch.arange(n, device=words.device)
    return ((words[..., j // 32].to(torch.int64) >> (j % 32)) & 1).bool()
