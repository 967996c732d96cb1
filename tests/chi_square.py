"""Chi-square goodness of fit for the sampling tests (shared: no test module imports another)."""

from __future__ import annotations

import torch


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit. Cells of probability 0 must be empty (else p = 0);
    cells with expected count < 5 are pooled (and the pool joins the smallest other cell if it
    is still below 5)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    if bool((counts[probs == 0] > 0).any()):
        return 0.0
    keep = probs > 0
    counts, expected = counts[keep], probs[keep] * counts.sum()
    small = expected < 5
    obs, exp = counts[~small], expected[~small]
    if small.any():
        pool_o, pool_e = counts[small].sum(), expected[small].sum()
        if pool_e >= 5 or exp.numel() == 0:
            obs, exp = torch.cat([obs, pool_o[None]]), torch.cat([exp, pool_e[None]])
        else:
            i = int(exp.argmin())
            obs, exp = obs.clone(), exp.clone()
            obs[i] += pool_o
            exp[i] += pool_e
    df = obs.numel() - 1
    assert df >= 1, "degenerate distribution: nothing to test"
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def exact_first_tokens(model, prompt, process, vocab: int):
    """Exact joint P(x1, x2) [V, V] and marginal P(x3) [V] of the first three tokens sampled
    from ``model`` after ``prompt`` [1, L], each step's logits mapped to probabilities by
    ``process``."""
    V = vocab
    with torch.no_grad():
        p1 = process(model(prompt).logits[0, -1])
        seq2 = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = process(model(seq2).logits[:, -1])  # [V(x1), V(x2)]
        joint = p1[:, None].double() * p2.double()
        x1 = torch.arange(V).repeat_interleave(V)
        x2 = torch.arange(V).repeat(V)
        seq3 = torch.cat([prompt.expand(V * V, -1), x1[:, None], x2[:, None]], 1)
        p3 = process(model(seq3).logits[:, -1]).double()  # [V*V, V]
    marg3 = (joint.reshape(-1, 1) * p3).sum(0)
    return joint, marg3
