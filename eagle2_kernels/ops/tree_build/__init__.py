"""``tree_build``: rerank draft candidates into a parents-first ``DraftTree`` with packed mask."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._checks import (FLOAT_DTYPES, INT_DTYPES, check_device, check_int,
                                        check_rank, check_shape)
from eagle2_kernels.ops._dispatch import dispatch
from eagle2_kernels.ops.tree import DraftTree

__all__ = ["tree_build"]

_NAME = "tree_build"


def tree_build(
    cand_tokens: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    root_tokens: torch.Tensor,
    total_tokens: int,
    backend: str | None = None,
    error_flag: torch.Tensor | None = None,
) -> DraftTree:
    """Keep the ``total_tokens - 1`` best draft candidates and lay them out as a tree.

    Candidates come in generation order (a candidate's parent has a smaller candidate index;
    parent -1 is the root). The T-1 highest scores are kept (equal scores: the lower
    candidate index wins) and numbered in candidate order: node 0 is the root, the m-th kept
    candidate (m = 0, 1, ...) becomes node m + 1, so every parent precedes its children.

    Errors: when a kept candidate's parent was not kept (impossible with log-probability
    path scores, where a child never outscores its parent), or a parent index is not in
    [-1, own index), the op writes a per-sequence error code to ``error_flag`` when given
    and raises ValueError, except on the Triton backend (the CUDA default) when a flag is
    passed: there the codes stay on the device (no host read, no sync, graph-capturable)
    and the caller checks the flag later, e.g. one round late. Without a flag the Triton
    launcher reads the codes on the host and raises, except while a CUDA graph is being
    captured (no host reads allowed). The CPU backends (reference, native) compute on the
    host and always raise.

    Args:
        cand_tokens: [B, C] int32/int64 candidate token ids.
        cand_scores: [B, C] float32 (float16/bfloat16 accepted) candidate scores.
        cand_parents: [B, C] int32/int64 parent candidate index, -1 for a child of the root.
        root_tokens: [B] int32/int64 root token (the last committed token) per sequence.
        total_tokens: T, nodes in the tree including the root; 2 <= T <= C + 1.
        backend: "reference", "triton" or "ext"; default by device (see ``_backend``).
        error_flag: optional [B] int32 output, overwritten with a per-sequence error code:
            0 = ok, else the OR of 1 (a kept candidate's parent was dropped) and 2 (some
            candidate's parent index is invalid).

    Returns:
        DraftTree: tokens [B, T] int64 (root token at node 0), parents [B, T] int32 (-1 for
        the root, 0 for a candidate whose parent is -1), depth [B, T] int32 (root 0), mask
        [B, T, W] int32 with W = ceil(T / 32): bit j % 32 of word j // 32 in row i is set iff
        node j is i or an ancestor of i (bit 31 makes a word negative).

    Example:
        >>> tree = tree_build(torch.tensor([[5, 6, 7]]), torch.tensor([[-0.1, -2.0, -0.5]]),
        ...                   torch.tensor([[-1, -1, 0]]), torch.tensor([9]), total_tokens=3)
        >>> tree.tokens.tolist(), tree.parents.tolist(), tree.mask.tolist()
        ([[9, 5, 7]], [[-1, 0, 1]], [[[1], [3], [7]]])
    """
    check_rank(_NAME, "cand_scores", cand_scores, "[B, C]", FLOAT_DTYPES)
    B, C = cand_scores.shape
    if B < 1 or C < 1:
        raise ValueError(f"{_NAME}: cand_scores shape [B, C] = {[B, C]} must have B, C >= 1")
    for name, x in (("cand_tokens", cand_tokens), ("cand_parents", cand_parents)):
        check_shape(_NAME, name, x, (B, C), "[B, C]", INT_DTYPES)
    check_shape(_NAME, "root_tokens", root_tokens, (B,), "[B]", INT_DTYPES)
    check_int(_NAME, "total_tokens", total_tokens, 2, C + 1, f"C + 1 = {C + 1}",
              f" (the root plus at most all {C} candidates)")
    if error_flag is not None:
        check_shape(_NAME, "error_flag", error_flag, (B,), "[B]", (torch.int32,))
    others = (("cand_tokens", cand_tokens), ("cand_parents", cand_parents),
              ("root_tokens", root_tokens), ("error_flag", error_flag))
    for name, x in others:
        if x is not None:
            check_device(_NAME, name, x, cand_scores.device, "cand_scores")
    return dispatch(_NAME, cand_scores, backend, cand_tokens, cand_scores, cand_parents,
                    root_tokens, total_tokens, error_flag)
