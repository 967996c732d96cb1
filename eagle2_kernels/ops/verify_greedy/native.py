"""Native CPU ``verify_greedy`` (``eagle2_kernels._C``): the walk in plain loops, the argmax
taken only at the nodes the walk visits.

Same signature and outputs as ``reference.py``; importing this module imports the extension,
so the dispatch imports it only when ``ext_available()`` said yes.
"""

from __future__ import annotations

import torch

from eagle2_kernels._native import extension
from eagle2_kernels.ops.tree import DraftTree

_C = extension()  # ImportError with the reason when the extension is missing


def verify_greedy(
    tree: DraftTree, target_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native ``verify_greedy``: tree of [B, T], target_logits [B, T, V] -> path [B, T] int64
    (-1 padded), accept_len [B] int64, bonus [B] int64."""
    return _C.verify_greedy(tree.tokens, tree.parents, target_logits)
