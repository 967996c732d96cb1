"""Held-out draft accuracy of a head: 1..N-step top-1 agreement with the target's greedy token.

For every assistant position of the held-out conversations, step k feeds the draft its own
predicted features k-1 times (the tokens are the conversation's, as in tree expansion along
the true path; see :mod:`eagle2_kernels.train.rollout`) and compares the draft's top-1 token
(mapped to target ids) with the TARGET's greedy token at that position, the argmax of the
target's full-vocabulary logits. So a target token outside the reduced draft vocabulary counts
as a miss. Reported:

* ``acc[k-1]``: fraction of positions where step k's top-1 equals the target's greedy token;
* ``chain[k-1]``: fraction where steps 1..k are all right (a k-token chain fully accepted);
  ``1 + sum(chain)`` is the expected tokens per round of a K=1 chain of depth N;
* ``target_greedy_outside_draft_vocab``: how often the target's greedy token is not in the
  draft vocabulary (an upper bound on what the reduced vocabulary costs).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from eagle2_kernels.train.features import load_sequences
from eagle2_kernels.train.fit import collate, make_batches
from eagle2_kernels.train.rollout import rollout


@torch.no_grad()
def draft_accuracy(head, target, sequences, steps: int = 5, batch_tokens: int = 8192) -> dict:
    """k-step accuracies of ``head`` on ``sequences`` (``(ids, mask, features)`` triples).

    Args:
        head: attached ``EagleDraftHead``.
        target: the target causal LM (its lm_head gives the greedy tokens).
        sequences: held-out sequences from :func:`~eagle2_kernels.train.features.load_sequences`.
        steps: number of draft steps N.
    Returns:
        dict with ``acc`` [N], ``chain`` [N], ``positions``, ``expected_chain_tokens`` and
        ``target_greedy_outside_draft_vocab``.
    """
    head.eval()
    dtype = next(head.parameters()).dtype
    lm_head = target.get_output_embeddings()
    d2t = head.draft_to_target
    vocab = lm_head.weight.shape[0]
    inside = torch.ones(vocab, dtype=torch.bool)
    if d2t is not None:
        inside = torch.zeros(vocab, dtype=torch.bool)
        inside[d2t.cpu()] = True
    correct = torch.zeros(steps)
    chain = torch.zeros(steps)
    positions = 0.0
    outside = 0.0
    for idx in make_batches(sequences, batch_tokens, random.Random(0)):
        feats, ids, pmask = collate(sequences, idx, dtype=dtype)
        b, n, _ = feats.shape
        m = n - 1
        # Target greedy token at feature position p (the prediction of x_{p+1}).
        greedy = lm_head(feats.to(lm_head.weight.dtype)).argmax(-1)  # [B, N]
        outs = rollout(head, feats, ids, steps)
        # ok[j][b, i]: step j+1 at index i predicts position i+j+1 correctly.
        alive = None
        for j, pred in enumerate(outs):
            top = head.logits(pred).argmax(-1)  # [B, M] draft ids
            if d2t is not None:
                top = d2t[top]
            tgt_pos = torch.arange(m) + j + 1
            valid = tgt_pos < n
            tgt = greedy[:, tgt_pos.clamp(max=n - 1)]
            w = pmask[:, tgt_pos.clamp(max=n - 1)] * valid
            # Count only start indices whose first predicted token is an assistant token, so
            # every step is measured over the same starts.
            if j == 0:
                start_w = w
                positions += float(w.sum())
                outside += float((~inside[tgt] * w).sum())
            # Later steps only need a real token there (a chain may run past the reply's end).
            ok = (top == tgt) & valid & (start_w > 0)
            alive = ok if alive is None else alive & ok
            correct[j] += float(ok.sum())
            chain[j] += float(alive.sum())
    acc = (correct / max(positions, 1.0)).tolist()
    ch = (chain / max(positions, 1.0)).tolist()
    return {
        "steps": steps,
        "positions": int(positions),
        "acc": [round(a, 4) for a in acc],
        "chain": [round(c, 4) for c in ch],
        "expected_chain_tokens": round(1.0 + sum(ch), 4),
        "target_greedy_outside_draft_vocab": round(outside / max(positions, 1.0), 4),
    }


def evaluate_head(head_dir, feature_dirs, steps: int = 5, max_tokens: int | None = None,
                  target=None) -> dict:
    """Load the head at ``head_dir`` onto ``target`` (default: the embedded default model in
    fp32) and measure :func:`draft_accuracy` on the held-out ``feature_dirs``."""
    from eagle2_kernels.models.draft_head import EagleDraftHead

    if isinstance(feature_dirs, (str, Path)):
        feature_dirs = [feature_dirs]
    if target is None:
        from eagle2_kernels.models.default import load_default

        target, _ = load_default(dtype=torch.float32)
    head = EagleDraftHead.from_pretrained(head_dir, target=target, dtype=torch.float32)
    seqs = load_sequences(feature_dirs, max_tokens=max_tokens)
    if not seqs:
        raise ValueError(f"no features in {[str(d) for d in feature_dirs]}")
    t0 = time.perf_counter()
    result = draft_accuracy(head, target, seqs, steps=steps)
    result.update(
        heldout_sequences=len(seqs),
        heldout_tokens=sum(len(s[0]) for s in seqs),
        draft_vocab=head.draft_vocab_size,
        seconds=round(time.perf_counter() - t0, 1),
    )
    return result
