"""``verify_sample``: lossless rejection sampling of a draft tree on device."""

from __future__ import annotations

import torch

from eagle2_kernels.ops._checks import check_device, check_shape, check_tree_and_logits
from eagle2_kernels.ops._dispatch import dispatch
from eagle2_kernels.ops.sampling import check_sampling_params
from eagle2_kernels.ops.tree import DraftTree

__all__ = ["verify_sample"]

_NAME = "verify_sample"


def verify_sample(
    tree: DraftTree,
    target_logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    backend: str | None = None,
):
    """Accept a path of a draft tree so that the emitted tokens follow the target's sampling law.

    Multi-draft rejection sampling with point-mass drafts, deterministic given ``uniforms``.
    Per sequence, starting at the root with p = ``process_logits(target_logits[b, node],
    temperature, top_p, top_k)`` (temperature, then top-k, then top-p, exactly as plain
    sampling does it):

    1. the children of the current node are tried in increasing node index; child i is
       accepted iff ``uniforms[b, i] < p[tokens[b, i]]`` (tokens outside [0, V) have
       probability 0); the walk then continues from i, with p the processed distribution
       at i;
    2. a rejected child's probability is set to 0 and p is renormalised;
    3. when the current node's children are exhausted (or it is a leaf), ``bonus`` is drawn
       from the current residual p by inverse CDF with ``uniforms[b, 0]``: the smallest token
       id whose cumulative probability (in token-id order) exceeds ``uniforms[b, 0]``; if
       rounding leaves none, the last token with nonzero probability.

    Every emitted token (accepted children, then the bonus) is distributed exactly as plain
    sampling from the target would give it. Siblings must carry distinct tokens (as
    ``tree_build`` makes them; a repeated sibling token has residual probability 0).

    Args:
        tree: the ``DraftTree`` of ``tree_build``: ``tokens`` [B, T] int32/int64, ``parents``
            [B, T] int32/int64 (-1 at the root, ``parents[b, i] < i``); ``depth`` and
            ``mask`` are not used.
        target_logits: [B, T, V] float (fp32, fp16 or bf16); row i holds the target's logits
            at node i.
        uniforms: [B, T] float32, values in [0, 1) (not checked: no host reads); entry i > 0
            decides node i, entry 0 draws the bonus.
        temperature: float > 0 (for greedy use ``verify_greedy``).
        top_p: float in (0, 1]; 1 disables top-p.
        top_k: int >= 0; 0 disables top-k.
        backend: ``"reference"``, ``"triton"`` or ``"ext"``; default by device.

    Returns:
        path: [B, T] int64, node indices of the accepted path from the root
            (``path[:, 0] == 0``), padded with -1.
        accept_len: [B] int64, nodes on the path including the root (1..T).
        bonus: [B] int64, the token drawn after the path.

    Example:
        >>> tree = DraftTree(tokens=torch.tensor([[7, 2]]), parents=torch.tensor([[-1, 0]],
        ...     dtype=torch.int32), depth=torch.tensor([[0, 1]], dtype=torch.int32),
        ...     mask=torch.tensor([[[1], [3]]], dtype=torch.int32))
        >>> logits = torch.zeros(1, 2, 4)  # uniform over 4 tokens at both nodes
        >>> verify_sample(tree, logits, torch.tensor([[0.9, 0.2]]), temperature=1.0)
        (tensor([[0, 1]]), tensor([2]), tensor([3]))
    """
    B, T = check_tree_and_logits(_NAME, tree, target_logits)
    temperature, top_p, top_k = check_sampling_params(temperature, top_p, top_k)
    check_shape(_NAME, "uniforms", uniforms, (B, T), "[B, T]", (torch.float32,))
    check_device(_NAME, "uniforms", uniforms, target_logits.device, "target_logits")
    return dispatch(_NAME, target_logits, backend, tree, target_logits, uniforms, temperature,
                    top_p, top_k)
