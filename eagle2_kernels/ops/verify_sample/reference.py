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

    Per sequence, with p the processed target distribution at the current node (float64
    copy of the float32 ``process_logits`` output):

    - the children of the current node are tried in increasing node index; child i is
      accepted iff ``uniforms[b, i] < p[tokens[i]]`` (a token outside [0, V) has probability
      0); then the walk continues from i with p = the processed distribution at i;
    - a rejected child's probability is set to 0 and p is renormalised (``p / p.sum()``);
    - at a node whose children are all rejected (or a leaf) the bonus token is drawn from the
      current p by ``sample_from_probs(p, uniforms[b, 0])``.
    """
    probs = process_logits(target_logits, temperature, top_p, top_k)  # [B, T, V] float32
    tokens = tree.tokens.long().cpu()
    parents = tree.parents.long().cpu()
    u = uniforms.detach().cpu()
    batch, num_nodes = tokens.shape
    vocab = probs.shape[-1]
    path = torch.full((batch, num_nodes), -1, dtype=torch.long)
    accept_len = torch.ones(batch, dtype=torch.long)
    bonus = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        path[b, 0] = 0
        cur = 0
        p = probs[b, 0].double().cpu()
        for i in range(1, num_nodes):
            if int(parents[b, i]) != cur:
                continue
            x = int(tokens[b, i])
            px = float(p[x]) if 0 <= x < vocab else 0.0
            if float(u[b, i]) < px:  # accepted: go one level deeper
                path[b, int(accept_len[b])] = i
                accept_len[b] += 1
                cur = i
                p = probs[b, i].double().cpu()
            elif px > 0.0:  # rejected: remove x from the residual distribution
                p[x] = 0.0
                p = p / p.sum()
        bonus[b] = sample_from_probs(p, u[b, 0].double())
    device = tree.tokens.device
    return path.to(device), accept_len.to(device), bonus.to(device)
