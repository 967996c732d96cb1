"""TreeSpecDecoder, sampling: the sampled tokens follow the exact law of plain sampling from
the processed target distribution (chi-square tests, significance 1e-3 each, fixed seeds so the
outcome is reproducible), for one sequence and for a batch of two different prompts (each row
its own law, the rows independent); plain sampling passes the same test; a fixed generator
gives a fixed output.

The sample sizes are chosen by power: each test names the broken decoders ("mutants") that it
rejects, with the p-values measured when each mutant was applied to a copy of the code (never
committed). The mutants:

- no-renorm: a rejected child's probability is zeroed but the residual is not renormalised
  (later siblings are accepted with p(x) instead of p(x) / (1 - p(rejected)); the bonus's
  inverse CDF runs over a distribution summing to less than 1);
- no-renorm-accept: as no-renorm for the siblings' acceptance only, the bonus drawn from the
  correctly renormalised residual;
- bonus-unrenormalised: the bonus is drawn from the node's full processed distribution, not
  the residual left after the rejected children;
- accept-unprocessed: acceptance (and its residual) uses softmax(logits), not the
  temperature / top-k / top-p processed distribution; the bonus uses the processed one;
- one-branch: the bonus skips the logits processing when a child was rejected (processing
  applied in one branch only, a historical bug of the reference code);
- one-uniform: one uniform per round decides every node and the bonus;
- reused-uniforms: every round after the first reuses the first round's uniforms;
- shared-row-uniforms (batch): all rows of a batch get the same uniforms.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels.ops.sampling import process_logits  # noqa: E402
from chi_square import chi_square_pvalue  # noqa: E402
from tiny_models import (  # noqa: E402
    SAMPLING,
    SAMPLING_PROMPTS,
    SAMPLING_VOCAB,
    exact_law,
    fixed_decoder,
    law_pvalues,
    marginal,
    one_thread,  # noqa: F401  (autouse fixture)
    sampling_setup,
    token_counts,
)

ALPHA = 1e-3  # significance of each chi-square test
NEW_TOKENS = 3  # x1 from the prefill, x2 and x3 from the first one or two rounds
SEED_ONE, SEED_BATCH, SEED_PLAIN = 11, 13, 12


def processed(logits):
    return process_logits(logits, **SAMPLING)


def draw(fn, prompts, calls, seed, new_tokens=NEW_TOKENS):
    """``calls`` samples of n = ``new_tokens`` tokens after each of ``prompts`` [B, L].
    Returns (samples [calls, B * n] int64, row b's tokens in columns b*n .. b*n+n-1; the
    accept_lengths of the speculative rounds, i.e. those after the prefill's)."""
    g = torch.Generator().manual_seed(seed)
    samples, rounds = [], []
    for _ in range(calls):
        out = fn(prompts, max_new_tokens=new_tokens, generator=g, **SAMPLING)
        samples.append(out.sequences[:, prompts.shape[1]:].reshape(-1))
        rounds.extend(out.stats.accept_lengths[1:])
    return torch.stack(samples), rounds


def decoder():
    model, head = sampling_setup()
    return model, fixed_decoder(model, head, 6, 2, 3)


def test_speculative_sampling_matches_target_distribution():
    """B = 1, tree T6-D2-K3, 600 samples of (x1, x2, x3); tests the joints (x1, x2) and
    (x2, x3). Rejects (smallest p-value of the two, measured with this seed; the correct
    decoder gives 0.80): no-renorm 3e-71, no-renorm-accept 2e-30, bonus-unrenormalised 6e-11,
    accept-unprocessed 9e-24, one-branch 0 (a filtered token came out), one-uniform 3e-199,
    reused-uniforms 8e-17. The weakest two over seeds 1-6: bonus-unrenormalised <= 4e-11,
    reused-uniforms <= 1e-14."""
    model, dec = decoder()
    prompt = SAMPLING_PROMPTS[:1]
    law = exact_law(model, prompt, NEW_TOKENS, processed)
    samples, rounds = draw(dec.generate, prompt, 600, seed=SEED_ONE)
    pvalues = law_pvalues(samples, law, [(0, 1), (1, 2)])
    assert min(pvalues.values()) > ALPHA, pvalues
    # Drafted tokens were really accepted (a round commits at most 2 of the 3 tokens), so the
    # test covers the acceptance / residual logic, not only bonus draws.
    assert sum(a == 2 for a in rounds) / len(rounds) > 0.3, rounds
    # A gross control: the same samples reject the unprocessed law (temperature 1, no filters).
    wrong = exact_law(model, prompt, NEW_TOKENS, lambda lg: torch.softmax(lg.float(), -1))
    assert min(law_pvalues(samples, wrong, [(0, 1)]).values()) < 1e-6


def test_batched_sampling_matches_target_distribution():
    """B = 2 different prompts in one batch, 400 samples of 4 tokens per row (so that most
    samples take two rounds or more): each row follows its own law (joints (x1, x2), (x2, x3),
    (x3, x4) of each row) and the rows are independent (joint of row 0's and row 1's x1, and
    of their x2, against the product of the marginals). Rejects (smallest p-value of the
    eight, measured with this seed; the correct decoder gives 0.0096): no-renorm 3e-53,
    no-renorm-accept 2e-20, bonus-unrenormalised 4e-14, accept-unprocessed 9e-22, one-branch 0,
    one-uniform 6e-155, reused-uniforms 1e-11, shared-row-uniforms 6e-100 (via the cross-row
    joints; the per-row laws alone do not see it). The weakest two over seeds 1-6:
    bonus-unrenormalised <= 6e-8, reused-uniforms <= 2e-7 (with 300 samples it rose to 7e-4 on
    one seed: hence 400)."""
    model, dec = decoder()
    prompts, n = SAMPLING_PROMPTS, 4
    laws = [exact_law(model, prompts[b : b + 1], n, processed) for b in range(2)]
    samples, rounds = draw(dec.generate, prompts, 400, seed=SEED_BATCH, new_tokens=n)
    pvalues = {}
    for b in range(2):
        row = law_pvalues(samples[:, b * n : (b + 1) * n], laws[b], [(0, 1), (1, 2), (2, 3)])
        pvalues.update({f"row{b}:{k}": v for k, v in row.items()})
    for d in (0, 1):
        both = token_counts(samples, (d, n + d), SAMPLING_VOCAB)
        product = torch.outer(marginal(laws[0], (d,)), marginal(laws[1], (d,)))
        pvalues[f"x{d + 1} of both rows"] = chi_square_pvalue(both, product)
    assert min(pvalues.values()) > ALPHA, pvalues
    assert max(rounds) >= 5  # both rows accepted drafted tokens in the same round


def test_plain_sampling_matches_target_distribution():
    model, dec = decoder()
    prompt = SAMPLING_PROMPTS[:1]
    law = exact_law(model, prompt, NEW_TOKENS, processed)
    samples, rounds = draw(dec.generate_plain, prompt, 300, seed=SEED_PLAIN)
    assert set(rounds) == {1}
    pvalues = law_pvalues(samples, law, [(0, 1), (1, 2)])
    assert min(pvalues.values()) > ALPHA, pvalues


def test_fixed_generator_is_deterministic():
    model, dec = decoder()
    prompt = SAMPLING_PROMPTS[:1]
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
