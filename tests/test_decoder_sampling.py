"""TreeSpecDecoder, sampling: the first tokens' distribution equals the exact processed target
distribution (chi-square test, significance 1e-3, fixed seeds so the outcome is reproducible),
plain sampling passes the same test, the test has power (a wrong distribution is rejected), and
a fixed generator gives a fixed output."""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import EagleDraftHead, TreeSpecDecoder  # noqa: E402
from eagle2_kernels.ops.sampling import process_logits  # noqa: E402
from tiny_models import (  # noqa: E402
    NO_SPECIAL_TOKENS,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_model,
)

ALPHA = 1e-3  # significance of each chi-square test
VOCAB = 8
SAMPLING = dict(temperature=0.8, top_p=0.9, top_k=6)


@functools.lru_cache(maxsize=None)
def setup():
    # A Llama shrunk to 1 layer, hidden 32, vocab 8 (real Llama-3-8B: 32 layers, 4096, 128256).
    torch.manual_seed(2024)
    model = tiny_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       vocab_size=VOCAB, max_position_embeddings=128, **NO_SPECIAL_TOKENS)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # spread, not uniform: ~30 of 64 (x1, x2) pairs possible
    head = EagleDraftHead.from_target(model)
    dec = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    return model, dec, prompt


def exact_first_tokens(model, prompt, process):
    """Exact joint P(x1, x2) [V, V] and marginal P(x3) [V] of the first three sampled tokens."""
    V = VOCAB
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


def draw(fn, n, seed):
    model, dec, prompt = setup()
    g = torch.Generator().manual_seed(seed)
    samples, rounds = [], []
    for _ in range(n):
        out = fn(prompt, max_new_tokens=3, generator=g, **SAMPLING)
        samples.append(out.sequences[0, prompt.shape[1]:].tolist())
        rounds.extend(out.stats.accept_lengths[1:])  # speculative rounds (after the prefill's)
    return torch.tensor(samples), rounds


def counts_of(samples):
    joint = torch.zeros(VOCAB, VOCAB)
    joint.index_put_((samples[:, 0], samples[:, 1]), torch.ones(len(samples)), accumulate=True)
    marg3 = torch.bincount(samples[:, 2], minlength=VOCAB)
    return joint, marg3


def test_speculative_sampling_matches_target_distribution():
    model, dec, prompt = setup()
    joint, marg3 = exact_first_tokens(model, prompt, lambda lg: process_logits(lg, **SAMPLING))
    samples, rounds = draw(dec.generate, 600, seed=11)
    c_joint, c3 = counts_of(samples)
    p_joint = chi_square_pvalue(c_joint, joint)
    p_3 = chi_square_pvalue(c3, marg3)
    assert p_joint > ALPHA, p_joint
    assert p_3 > ALPHA, p_3
    # Drafted tokens were really accepted (not only bonus tokens), so the test covers the
    # acceptance / residual logic of verify_sample.
    assert sum(a >= 2 for a in rounds) / len(rounds) > 0.1
    # Power: the same samples reject the unprocessed distribution (temperature 1, no filters).
    wrong_joint, wrong3 = exact_first_tokens(model, prompt, lambda lg: torch.softmax(lg.float(), -1))
    assert chi_square_pvalue(c_joint, wrong_joint) < 1e-6


def test_plain_sampling_matches_target_distribution():
    model, dec, prompt = setup()
    joint, marg3 = exact_first_tokens(model, prompt, lambda lg: process_logits(lg, **SAMPLING))
    samples, _ = draw(dec.generate_plain, 300, seed=12)
    c_joint, c3 = counts_of(samples)
    assert chi_square_pvalue(c_joint, joint) > ALPHA
    assert chi_square_pvalue(c3, marg3) > ALPHA


def test_fixed_generator_is_deterministic():
    model, dec, prompt = setup()
    runs = [
        dec.generate(prompt, 24, generator=torch.Generator().manual_seed(s), temperature=1.0).sequences
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # The stream gives the same tokens for the same generator state.
    chunks = list(dec.stream(prompt, 24, temperature=1.0, generator=torch.Generator().manual_seed(5)))
    assert sum(chunks, []) == runs[0][0, prompt.shape[1]:].tolist()
    # Greedy ignores the generator.
    g1 = dec.generate(prompt, 10, generator=torch.Generator().manual_seed(1)).sequences
    g2 = dec.generate(prompt, 10, generator=torch.Generator().manual_seed(2)).sequences
    assert torch.equal(g1, g2)
