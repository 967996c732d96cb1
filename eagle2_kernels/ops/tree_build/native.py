"""Native CPU ``tree_build`` (``eagle2_kernels._C``): plain loops per sequence, parallel
over the batch.

Same signature, ``DraftTree`` and error messages as ``reference.py``; importing this module
imports the extension, so the dispatch imports it only when ``ext_available()`` said yes.
"""

from __future__ import annotations

import torch

from eagle2_kernels._native import extension
from eagle2_kernels.ops.tree import DraftTree
from eagle2_kernels.ops.tree_build.reference import raise_for_error_codes

_C = extension()  # ImportError with the reason when the extension is missing


def tree_build(
    cand_tokens: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    root_tokens: torch.Tensor,
    total_tokens: int,
    error_flag: torch.Tensor | None = None,
) -> DraftTree:
    """Native ``tree_build``: cand_* [B, C], root_tokens [B] -> DraftTree of T = total_tokens
    nodes. Raises ValueError (the reference's message) when a kept candidate's parent was
    dropped or a parent index is invalid; ``error_flag`` [B] int32 receives the codes."""
    tokens, parents, depth, mask, codes = _C.tree_build(
        cand_tokens, cand_scores, cand_parents, root_tokens, int(total_tokens)
    )
    if error_flag is not None:
        error_flag.copy_(codes)
    if bool(codes.any()):
        raise_for_error_codes(codes, cand_parents)
    return DraftTree(tokens=tokens, parents=parents, depth=depth, mask=mask)
