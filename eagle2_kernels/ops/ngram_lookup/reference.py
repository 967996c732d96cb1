"""Specification of ``ngram_lookup`` as plain loops (one sequence, one end position at a time)."""

from __future__ import annotations

import torch


def ngram_lookup(context, lengths, max_ngram, min_ngram, num_tokens, num_matches):
    """See ``eagle2_kernels.ops.ngram_lookup``: tokens [B, M, N], counts [B, M], match_len [B, M]."""
    B = context.shape[0]
    M, N = num_matches, num_tokens
    tokens = torch.full((B, M, N), -1, dtype=torch.int64)
    counts = torch.zeros(B, M, dtype=torch.int64)
    match_len = torch.zeros(B, M, dtype=torch.int64)
    for b in range(B):
        L = int(lengths[b])
        c = context[b, :L].tolist()
        found = []  # (m, p) of every match
        for p in range(L - 1):
            m = 0
            while m < max_ngram and p - m >= 0 and c[p - m] == c[L - 1 - m]:
                m += 1
            if m >= min_ngram:
                found.append((m, p))
        found.sort(reverse=True)  # longest first, then most recent
        used = set()
        slot = 0
        for m, p in found:
            if slot == M:
                break
            if c[p + 1] in used:
                continue
            used.add(c[p + 1])
            cont = c[p + 1 : p + 1 + N]
            tokens[b, slot, : len(cont)] = torch.tensor(cont)
            counts[b, slot] = len(cont)
            match_len[b, slot] = m
            slot += 1
    dev = context.device
    return tokens.to(dev), counts.to(dev), match_len.to(dev)
