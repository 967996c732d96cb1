"""Native CPU ``verify_sample`` (``eagle2_kernels._C``): the target logits are processed with
the shared ``process_logits`` (temperature / top-k / top-p in torch, so plain sampling and
verification share one distribution bit for bit) only at the nodes the walk visits; the walk
and the inverse-CDF bonus draw run natively.

Same signature and outputs as ``reference.py``; importing this module imports the extension,
so the dispatch imports it only when ``ext_available()`` said yes.
"""

from __future__ import annotations

import torch

from eagle2_kernels._native import extension
from eagle2_kernels.ops.sampling import process_logits
from eagle2_kernels.ops.tree import DraftTree

_C = extension()  # ImportError with the reason when the extension is missing


def verify_sample(
    tree: DraftTree,
    target_logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native ``verify_sample``: tree of [B, T], target_logits [B, T, V], uniforms [B, T] f32
    -> path [B, T] int64 (-1 padded), accept_len [B] int64, bonus [B] int64.

    The processed distribution of a node (``process_logits`` of its row, which is what the
    reference computes for all rows at once) is computed when the walk reaches the node.
    """
    tokens, parents = tree.tokens, tree.parents
    B, T = tokens.shape
    path_rows = [[-1] * T for _ in range(B)]
    bonus_list, len_list = [], []
    for b in range(B):
        tok_b, par_b, u_b, logits_b = tokens[b], parents[b], uniforms[b], target_logits[b]
        row_path = path_rows[b]
        row_path[0] = 0
        cur, length = 0, 1
        # At most one step per tree level: accept a child (go deeper) or draw the bonus.
        while True:
            probs = process_logits(logits_b[cur], temperature, top_p, top_k)
            child, token = _C.verify_sample_step(tok_b, par_b, probs, u_b, cur)
            if child < 0:
                break
            row_path[length] = child
            length += 1
            cur = child
        bonus_list.append(token)
        len_list.append(length)
    path = torch.tensor(path_rows, dtype=torch.int64)
    accept_len = torch.tensor(len_list, dtype=torch.int64)
    bonus = torch.tensor(bonus_list, dtype=torch.int64)
    return path, accept_len, bonus
