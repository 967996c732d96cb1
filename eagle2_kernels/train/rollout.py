"""Multi-step draft forward over whole sequences ("training-time test").

At decode time the draft runs on the target's features only for the accepted prefix; deeper
tree nodes are fed the draft's OWN predicted features. :func:`rollout` reproduces that over a
whole sequence at once, for every start position in parallel:

* step 1 is the teacher-forced pass: the pair at index i is (f_i, x_{i+1}) at position i and
  predicts f_{i+1};
* step j >= 2 at index i is the pair (h^{(j-1)}_i, x_{i+j}) at position i + j - 1, where
  h^{(j-1)}_i is step j-1's output at the same index. Its query sees exactly what the
  corresponding tree node sees at decode time: the step-1 keys of indices <= i (the stable
  prefix, built from target features) and the keys of steps 2..j at its own index (its
  ancestors in the tree), the attention pattern of EAGLE-3's training-time test.

Step j's output at index i predicts f_{i+j}, i.e. the token x_{i+j+1}. Indices whose inputs would
run past the sequence produce garbage that the callers mask out (``valid_length``).

This runs the head's halves around its own attention (``project`` and ``finish`` of
:class:`~eagle2_kernels.models.draft_head.EagleDraftHead`): ``forward`` is plain causal
attention over one sequence, which is step 1 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def valid_length(n: int, step: int) -> int:
    """Number of indices with a complete step-``step`` input in a sequence of ``n`` tokens
    (features f_0..f_{n-1}, tokens x_0..x_{n-1}): those i with i + step <= n - 1."""
    return max(0, n - step)


def _expand_kv(head, t: torch.Tensor) -> torch.Tensor:
    if head.num_kv_heads == head.num_heads:
        return t
    return t.repeat_interleave(head.num_heads // head.num_kv_heads, dim=1)


def rollout(head, features: torch.Tensor, input_ids: torch.Tensor, steps: int,
            noise: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Run the draft ``steps`` times over padded sequences.

    Args:
        head: an attached ``EagleDraftHead`` (EAGLE-1/2 or EAGLE-3: step 1 reads target
            features, later steps the head's own outputs, ``project(..., from_target=)``).
        features: [B, N, F] target features f_0..f_{N-1} (right-padded; F =
            ``head.target_feature_size``).
        input_ids: [B, N] int64 tokens x_0..x_{N-1} (right-padded; pad with any valid id).
        steps: number of draft steps (1 = teacher forcing only).
        noise: optional [B, N-1, F] added to the step-1 input features (training augmentation).

    Returns:
        ``steps`` tensors; element j-1 is [B, N-1, H], step j's predicted features: index i
        predicts f_{i+j}. Only indices i < N - j are meaningful (see :func:`valid_length`).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b, n, _ = features.shape
    m = n - 1  # indices 0..N-2 have a step-1 pair
    if m < 1:
        raise ValueError(f"sequences need at least 2 tokens, got N={n}")
    f_in = features[:, :m]
    if noise is not None:
        f_in = f_in + noise
    pos = torch.arange(m, device=features.device)
    if steps == 1:
        return [head(f_in, input_ids[:, 1:n], pos)]

    dev = features.device
    h, q, k1, v1 = head.project(f_in, input_ids[:, 1:n], pos.unsqueeze(0).expand(b, m), from_target=True)
    scale = head.layers[0].self_attn.scaling
    k1e, v1e = _expand_kv(head, k1), _expand_kv(head, v1)
    out = head.finish(h, F.scaled_dot_product_attention(q, k1e, v1e, is_causal=True,
                                                         scale=scale))
    outputs = [out]
    causal = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
    diag_keys, diag_vals = [], []
    for j in range(2, steps + 1):
        # Tokens x_{i+j}; indices past the end reuse the last token (masked out by callers).
        tok_idx = (torch.arange(m, device=dev) + j).clamp(max=n - 1)
        ids_j = input_ids[:, tok_idx]
        pos_j = (pos + (j - 1)).unsqueeze(0).expand(b, m)
        h, q, k, v = head.project(outputs[-1], ids_j, pos_j)
        ke, ve = _expand_kv(head, k), _expand_kv(head, v)
        diag_keys.append(ke)
        diag_vals.append(ve)
        # Scores against the stable prefix (step-1 keys, causal) and against this index's own
        # tree ancestors (steps 2..j, one key each): [B, Hq, M, M + j - 1].
        s_prefix = torch.matmul(q, k1e.transpose(-1, -2)) * scale
        s_prefix = s_prefix.masked_fill(~causal, float("-inf"))
        s_diag = torch.stack([(q * kd).sum(-1) for kd in diag_keys], dim=-1) * scale
        probs = torch.softmax(torch.cat([s_prefix.float(), s_diag.float()], dim=-1), dim=-1)
        probs = probs.to(q.dtype)
        attn = torch.matmul(probs[..., :m], v1e)
        for d, vd in enumerate(diag_vals):
            attn = attn + probs[..., m + d:m + d + 1] * vd
        outputs.append(head.finish(h, attn))
    return outputs
