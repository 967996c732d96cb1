"""``verify_greedy``: greedy acceptance of a draft tree on device."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._checks import check_tree_and_logits
from eagle2_kernels.ops._dispatch import dispatch
from eagle2_kernels.ops.tree import DraftTree

__all__ = ["verify_greedy"]

_NAME = "verify_greedy"


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
    check_tree_and_logits(_NAME, tree, target_logits)
    return dispatch(_NAME, target_logits, backend, tree, target_logits)
