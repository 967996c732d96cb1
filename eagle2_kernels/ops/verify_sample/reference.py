"""Pure-torch specification of ``verify_sample`` (also the CPU path)."""

from __future__ import annotations

import torch

from eagle2_kernels.ops.sampling import process_logits, sample_from_probs
from eagle2_kernels.ops.tree import DraftTree


def verify_sample(
    tree: DraftTree,
    target_logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
):
    """Lossless multi-draft rejection sampling; see ``eagle2_kernels.ops.verify_sample``.

    Per sequence, with p the processed target distribution at the current node (a float64
    copy of the float32 ``process_logits`` output):

    - the nodes are visited in index order; a node whose parent is the current node is a
      child being tried: it is accepted iff ``uniforms[b, i] < p[tokens[i]]`` (a token outside
      [0, V) has probability 0), and the walk continues from it with p = the processed
      distribution there (its children all come later in index order);
    - a rejected child with nonzero probability has it set to 0 and p renormalised
      (``p / p.sum()``);
    - at the end, the current node's children are exhausted (or it is a leaf) and the bonus
      is ``sample_from_probs(p, uniforms[b, 0])``.

    The loop runs over nodes with the batch vectorised, so it needs no host reads.
    """
    probs = process_logits(target_logits, temperature, top_p, top_k)  # [B, T, V] float32
    tokens = tree.tokens.long()
    parents = tree.parents.long()
    u = uniforms.double()
    batch, num_nodes = tokens.shape
    vocab = probs.shape[-1]
    device = probs.device
    rows = torch.arange(batch, device=device)

    cur = torch.zeros(batch, dtype=torch.long, device=device)  # deepest accepted node
    p = probs[:, 0].double()  # [B, V] residual distribution at cur
    accept_len = torch.ones(batch, dtype=torch.long, device=device)
    path = torch.full((batch, num_nodes), -1, dtype=torch.long, device=device)
    path[:, 0] = 0
    for i in range(1, num_nodes):
        x = tokens[:, i]
        in_vocab = (x >= 0) & (x < vocab)
        x_safe = torch.where(in_vocab, x, 0)
        p_x = torch.where(in_vocab, p[rows, x_safe], 0.0)
        tried = parents[:, i] == cur
        accept = tried & (u[:, i] < p_x)
        reject = tried & ~accept & (p_x > 0)
        # rejected: zero the token and renormalise the residual
        zeroed = p.clone()
        zeroed[rows, x_safe] = torch.where(reject, 0.0, p_x)
        zeroed = torch.where(reject[:, None], zeroed / zeroed.sum(-1, keepdim=True), p)
        # accepted: one level deeper, with the processed distribution of node i
        p = torch.where(accept[:, None], probs[:, i].double(), zeroed)
        path[rows, accept_len] = torch.where(accept, i, path[rows, accept_len])
        accept_len = accept_len + accept.long()
        cur = torch.where(accept, i, cur)
    bonus = sample_from_probs(p, u[:, 0])
    return path, accept_len, bonus
