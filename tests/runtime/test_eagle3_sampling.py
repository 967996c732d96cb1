"""EAGLE-3 heads, sampling: with an EAGLE-3 head (reduced draft vocabulary) the first tokens'
distribution equals the exact processed target distribution (chi-square, significance 1e-3,
fixed seeds), drafted tokens are really accepted, and the test has power."""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels.models.eagle3_head import Eagle3DraftHead  # noqa: E402
from eagle2_kernels.ops.sampling import process_logits  # noqa: E402
from chi_square import chi_square_pvalue, exact_first_tokens  # noqa: E402
from eagle3_models import decoder  # noqa: E402
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
    # A Llama shrunk to 8 layers (EAGLE-3 reads 2, 4, 5), hidden 32, vocab 8 (real Llama-3-8B:
    # 32 layers, 4096, 128256); a head drafting over 5 of the 8 tokens.
    torch.manual_seed(2025)
    model = tiny_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                       vocab_size=VOCAB, max_position_embeddings=128, **NO_SPECIAL_TOKENS)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # spread, not uniform
    head = Eagle3DraftHead.from_target(model, draft_to_target=torch.tensor([6, 1, 3, 0, 5]))
    dec = decoder(model, head, 6, 2, 3)
    return model, dec, torch.tensor([[3, 1, 4, 1, 5]])


def test_speculative_sampling_with_an_eagle3_head_matches_the_target():
    model, dec, prompt = setup()
    joint, marg3 = exact_first_tokens(model, prompt, lambda lg: process_logits(lg, **SAMPLING), VOCAB)
    g = torch.Generator().manual_seed(13)
    samples, rounds = [], []
    for _ in range(600):
        out = dec.generate(prompt, max_new_tokens=3, generator=g, **SAMPLING)
        samples.append(out.sequences[0, prompt.shape[1]:].tolist())
        rounds.extend(out.stats.accept_lengths[1:])  # speculative rounds (after the prefill's)
    samples = torch.tensor(samples)
    c_joint = torch.zeros(VOCAB, VOCAB).index_put_((samples[:, 0], samples[:, 1]), torch.ones(len(samples)),
                                                   accumulate=True)
    c3 = torch.bincount(samples[:, 2], minlength=VOCAB)
    assert chi_square_pvalue(c_joint, joint) > ALPHA
    assert chi_square_pvalue(c3, marg3) > ALPHA
    # Drafted tokens were accepted (not only bonus tokens): the acceptance / residual logic ran.
    assert sum(a >= 2 for a in rounds) / len(rounds) > 0.1
    # Power: the same samples reject the unprocessed distribution.
    wrong, _ = exact_first_tokens(model, prompt, lambda lg: torch.softmax(lg.float(), -1), VOCAB)
    assert chi_square_pvalue(c_joint, wrong) < 1e-6
