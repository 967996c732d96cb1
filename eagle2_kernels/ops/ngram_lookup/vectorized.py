"""``ngram_lookup`` as a few vectorised torch ops over all end positions at once (any device).

The match length of every end position p comes from one [B, L, max_ngram] comparison: the
window of the max_ngram tokens ending at p (newest first) against the context's last
max_ngram tokens (newest first); the run of leading equalities is m(p). One argmax per slot
over a key that orders (m, p) then picks the match, with no loop over the context.
"""

from __future__ import annotations

import torch

_NO_TOKEN = -1  # padding of the windows before the context's start (token ids are >= 0)
_NO_SUFFIX = -2  # suffix entries before the context's start: equal to nothing


def ngram_lookup(context, lengths, max_ngram, min_ngram, num_tokens, num_matches):
    """See ``eagle2_kernels.ops.ngram_lookup``: tokens [B, M, N], counts [B, M], match_len [B, M]."""
    B, L = context.shape
    dev = context.device
    ctx = context.to(torch.int64)
    n_len = lengths.to(device=dev, dtype=torch.int64)
    G = max_ngram
    # win[b, p, j] = c[p - j] (the G tokens ending at p, newest first), -1 before the start.
    padded = torch.cat([torch.full((B, G - 1), _NO_TOKEN, dtype=torch.int64, device=dev), ctx], 1)
    win = padded.unfold(1, G, 1).flip(-1)  # [B, L, G]
    # suffix[b, j] = c[L_b - 1 - j], the last G tokens newest first (-2 before the start).
    back = n_len[:, None] - 1 - torch.arange(G, device=dev)  # [B, G]
    suffix = torch.where(back >= 0, ctx.gather(1, back.clamp(min=0)), _NO_SUFFIX)
    # m(p): length of the run of equalities from j = 0 (cumprod zeroes everything after a miss).
    m = (win == suffix[:, None, :]).to(torch.int32).cumprod(-1).sum(-1).to(torch.int64)  # [B, L]
    pos = torch.arange(L, device=dev)
    ok = (pos[None, :] <= n_len[:, None] - 2) & (m >= min_ngram)  # a continuation token exists
    key = torch.where(ok, m * L + pos[None, :], -1)  # orders by m, then by recency; -1 = none
    nxt = torch.cat([ctx[:, 1:], ctx[:, :1]], 1)  # nxt[b, p] = c[p + 1] (valid where ok)

    picks, found = [], []
    for _ in range(num_matches):  # M is small (a few slots), not the context length
        k, p = key.max(dim=1)
        hit = k >= 0
        picks.append(p)
        found.append(hit)
        # Later slots must start with another token: drop every match sharing this next token.
        first = nxt.gather(1, p[:, None])
        key = torch.where(hit[:, None] & (nxt == first), -1, key)
    p = torch.stack(picks, 1)  # [B, M]
    hit = torch.stack(found, 1)
    counts = torch.where(hit, torch.clamp(n_len[:, None] - 1 - p, max=num_tokens), 0)
    match_len = torch.where(hit, m.gather(1, p), 0)
    steps = torch.arange(num_tokens, device=dev)
    idx = (p[:, :, None] + 1 + steps).clamp(max=L - 1)  # [B, M, N]
    tokens = ctx.gather(1, idx.view(B, -1)).view(B, num_matches, num_tokens)
    tokens = torch.where(steps < counts[:, :, None], tokens, -1)
    return tokens, counts, match_len
