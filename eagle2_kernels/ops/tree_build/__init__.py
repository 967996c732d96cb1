"""``tree_build``: rerank draft candidates into a parents-first ``DraftTree`` with packed mask."""

from __future__ import annotations

import torch

from eagle2_kernels._backend import device_guard, select_backend
from eagle2_kernels.ops.tree import DraftTree
from eagle2_kernels.ops.tree_build.reference import tree_build as _reference

__all__ = ["tree_build"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


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
    for name, x, dtypes in (
        ("cand_tokens", cand_tokens, _INTS),
        ("cand_scores", cand_scores, _FLOATS),
        ("cand_parents", cand_parents, _INTS),
    ):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a [B, C] tensor, got {_shape(x)}")
        if x.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {list(dtypes)}, got {x.dtype}")
    B, C = cand_scores.shape
    if B < 1 or C < 1:
        raise ValueError(f"cand_scores shape [B, C] = {[B, C]} must have B, C >= 1")
    for name, x in (("cand_tokens", cand_tokens), ("cand_parents", cand_parents)):
        if tuple(x.shape) != (B, C):
            raise ValueError(f"{name} must have the shape of cand_scores {[B, C]}, got {_shape(x)}")
    if not isinstance(root_tokens, torch.Tensor) or tuple(root_tokens.shape) != (B,):
        raise ValueError(f"root_tokens must have shape [B] = [{B}], got {_shape(root_tokens)}")
    if root_tokens.dtype not in _INTS:
        raise TypeError(f"root_tokens must be int32 or int64, got {root_tokens.dtype}")
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, int):
        raise TypeError(f"total_tokens must be an int, got {type(total_tokens).__name__}")
    if not 2 <= total_tokens <= C + 1:
        raise ValueError(
            f"total_tokens={total_tokens} must be in [2, C + 1 = {C + 1}] (the root plus at "
            f"most all {C} candidates)"
        )
    if error_flag is not None:
        if not isinstance(error_flag, torch.Tensor) or tuple(error_flag.shape) != (B,):
            raise ValueError(f"error_flag must have shape [B] = [{B}], got {_shape(error_flag)}")
        if error_flag.dtype != torch.int32:
            raise TypeError(f"error_flag must be int32, got {error_flag.dtype}")
    others = [cand_tokens, cand_parents, root_tokens, error_flag]
    for x in (x for x in others if x is not None):
        if x.device != cand_scores.device:
            raise ValueError(
                f"all tree_build tensors must be on one device: cand_scores is on "
                f"{cand_scores.device}, another input on {x.device}"
            )

    name = select_backend(cand_scores, backend)
    if name == "triton":
        from eagle2_kernels.ops.tree_build.kernel import tree_build as impl
    elif name == "ext":
        from eagle2_kernels import _native

        impl = _native.tree_build
    else:
        impl = _reference
    with device_guard(cand_scores):
        return impl(cand_tokens, cand_scores, cand_parents, root_tokens, total_tokens, error_flag)
