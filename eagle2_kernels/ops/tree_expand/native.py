"""Native CPU ``tree_expand`` (``eagle2_kernels._C``): one pass over V per row, the online
max / sum-exp and the top-k together, parallel over rows (at::parallel_for).

Same signature, outputs and semantics as ``reference.py``; importing this module imports the
extension, so the dispatch imports it only when ``ext_available()`` said yes.
"""

from __future__ import annotations

import torch

from eagle2_kernels._native import extension

_C = extension()  # ImportError with the reason when the extension is missing


def tree_expand(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    top_k: int,
    draft_to_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native ``tree_expand``: logits [B, R, V] f32/f16/bf16, parent_scores [B, R] ->
    child_tokens [B, R, K] int64, child_scores [B, R, K] f32, next_index [B, K] int64,
    next_scores [B, K] f32 (see ``eagle2_kernels.ops.tree_expand``)."""
    return _C.tree_expand(logits, parent_scores, int(top_k), draft_to_target)
