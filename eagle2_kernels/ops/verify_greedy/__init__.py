"""``verify_greedy``: greedy acceptance of a draft tree on device (DESIGN.md section 1.6)."""

from __future__ import annotations

import torch

from eagle2_kernels._backend import device_guard, select_backend
from eagle2_kernels.ops.tree import DraftTree

__all__ = ["verify_greedy"]

_INT_DTYPES = (torch.int32, torch.int64)


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor, backend: str | None = None):
    """Accept the longest tree path that greedy decoding of the target would produce.

    Node i > 0 is accepted iff its parent is accepted and ``tokens[b, i] ==
    argmax(target_logits[b, parents[b, i]])`` (ties to the lower token id). Siblings carry
    distinct tokens (as ``tree_build`` produces them), so the accepted nodes form one path
    from the root; should two siblings both match, the lower node index is taken.

    Args:
        tree: the ``DraftTree`` of ``tree_build``: ``tokens`` [B, T] int32/int64,
            ``parents`` [B, T] int32/int64 (-1 at the root, ``parents[b, i] < i``); ``depth``
            and ``mask`` are not used.
        target_logits: [B, T, V] float (fp32, fp16 or bf16); row i holds the target's
            logits at node i (the next-token distribution after node i's token). Values may
            be -inf; the argmax of a row containing NaN is unspecified.
        backend: ``"reference"``, ``"triton"`` or ``"ext"``; default by device (see
            ``eagle2_kernels._backend``).

    Returns:
        path: [B, T] int64, node indices of the accepted path from the root
            (``path[:, 0] == 0``), in increasing depth, padded with -1.
        accept_len: [B] int64, number of nodes on the path including the root (1..T).
        bonus: [B] int64, ``argmax(target_logits[b, path[b, accept_len[b] - 1]])``: the
            token the target emits after the accepted path.

    Example:
        >>> tree = DraftTree(tokens=torch.tensor([[5, 1, 2]]), parents=torch.tensor([[-1, 0, 1]],
        ...     dtype=torch.int32), depth=torch.tensor([[0, 1, 2]], dtype=torch.int32),
        ...     mask=torch.tensor([[[1], [3], [7]]], dtype=torch.int32))
        >>> logits = torch.eye(4)[[1, 3, 0]].unsqueeze(0)  # argmax 1 at node 0, 3 at node 1
        >>> verify_greedy(tree, logits)
        (tensor([[ 0,  1, -1]]), tensor([2]), tensor([3]))
    """
    check_tree_and_logits(tree, target_logits)
    name = select_backend(target_logits, backend)
    if name == "reference":
        from eagle2_kernels.ops.verify_greedy.reference import verify_greedy as impl
    elif name == "triton":
        from eagle2_kernels.ops.verify_greedy.kernel import verify_greedy as impl
    else:
        from eagle2_kernels import _native

        impl = _native.verify_greedy
    with device_guard(target_logits):
        return impl(tree, target_logits)


def check_tree_and_logits(tree, target_logits) -> None:
    """Shape/dtype/device checks shared by ``verify_greedy`` and ``verify_sample``."""
    if not isinstance(tree, DraftTree):
        raise TypeError(f"tree must be an eagle2_kernels.ops.DraftTree, got {type(tree).__name__}")
    tokens, parents = tree.tokens, tree.parents
    for name, t in (("tree.tokens", tokens), ("tree.parents", parents)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {tuple(t.shape)}")
        if t.dtype not in _INT_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if tuple(parents.shape) != tuple(tokens.shape):
        raise ValueError(
            f"tree.parents shape {tuple(parents.shape)} differs from tree.tokens shape "
            f"{tuple(tokens.shape)}"
        )
    batch, num_nodes = tokens.shape
    if batch < 1 or num_nodes < 1:
        raise ValueError(f"the tree needs B >= 1 and T >= 1 (the root), got [B, T] = [{batch}, {num_nodes}]")
    if not torch.is_tensor(target_logits):
        raise TypeError(f"target_logits must be a tensor, got {type(target_logits).__name__}")
    if not target_logits.is_floating_point():
        raise ValueError(f"target_logits must be float (fp32/fp16/bf16), got {target_logits.dtype}")
    if target_logits.dim() != 3 or tuple(target_logits.shape[:2]) != (batch, num_nodes):
        raise ValueError(
            f"target_logits must be [B, T, V] = [{batch}, {num_nodes}, V], got shape "
            f"{tuple(target_logits.shape)}"
        )
    if target_logits.shape[2] < 1:
        raise ValueError("target_logits has an empty vocabulary dim (V = 0)")
    for name, t in (("tree.tokens", tokens), ("tree.parents", parents)):
        if t.device != target_logits.device:
            raise ValueError(f"{name} is on {t.device} but target_logits on {target_logits.device}")
