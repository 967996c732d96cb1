"""Logits processing and inverse-CDF sampling shared by plain and speculative sampling.

Contract: ``process_logits`` equals transformers' Temperature -> TopK -> TopP warper chain
followed by a softmax (float32, removed tokens exactly 0); ``sample_from_probs`` is the
inverse CDF in token-id order with the last-nonzero guard.
"""

from __future__ import annotations

import pytest
import torch

from eagle2_kernels.ops.sampling import check_sampling_params, process_logits, sample_from_probs
from tolerances import FP32_ABS, PROBS


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; bins with zero expectation must be empty."""
    counts = counts.double()
    probs = probs.double()
    n = counts.sum()
    zero = probs == 0
    assert counts[zero].sum() == 0, "a token with probability 0 was drawn"
    expected = probs[~zero] * n
    stat = ((counts[~zero] - expected) ** 2 / expected).sum()
    dof = int((~zero).sum()) - 1
    # chi2 survival function = regularized upper incomplete gamma Q(dof/2, stat/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


def hf_process(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """The transformers way: LogitsProcessorList of the three warpers, then softmax."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    flat = logits.reshape(-1, logits.shape[-1]).float()
    scores = warpers(torch.zeros(flat.shape[0], 1, dtype=torch.long), flat)
    return scores.softmax(dim=-1).reshape(logits.shape)


HF_CASES = [
    pytest.param((4, 50), 1.0, 1.0, 0, id="plain-V50"),
    pytest.param((4, 50), 0.7, 1.0, 0, id="temp0.7"),
    pytest.param((3, 5, 64), 1.3, 1.0, 10, id="B3xT5-topk10"),
    pytest.param((6, 100), 1.0, 0.9, 0, id="topp0.9"),
    pytest.param((2, 7, 37), 0.8, 0.95, 20, id="B2xT7-V37-all"),
    pytest.param((5, 1000), 0.6, 0.5, 50, id="V1000-all"),
    pytest.param((5, 33), 2.0, 0.3, 0, id="hot-topp0.3"),
    pytest.param((4, 16), 1.0, 0.8, 100, id="topk-above-V"),
    pytest.param((4, 16), 1.0, 1.0, 1, id="topk1"),
    pytest.param((3, 40), 1.0, 1e-6, 0, id="topp-tiny"),
]


@pytest.mark.parametrize("shape,temperature,top_p,top_k", HF_CASES)
def test_process_logits_matches_transformers(shape, temperature, top_p, top_k):
    g = torch.Generator().manual_seed(hash((shape, temperature, top_p, top_k)) % 2**31)
    logits = torch.randn(shape, generator=g) * 3.0
    ours = process_logits(logits, temperature, top_p, top_k)
    theirs = hf_process(logits, temperature, top_p, top_k)
    assert ours.dtype == torch.float32 and ours.shape == logits.shape
    assert torch.equal(ours == 0, theirs == 0), "different tokens removed"
    torch.testing.assert_close(ours, theirs, **PROBS)
    torch.testing.assert_close(ours.sum(-1), torch.ones(shape[:-1]), **FP32_ABS)


def test_process_logits_masked_vocabulary_matches_transformers():
    # -inf logits (a masked vocabulary) stay at probability 0 through every step
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 30, generator=g)
    logits[:, ::3] = float("-inf")
    for args in [(1.0, 0.9, 0), (0.7, 0.8, 5), (1.5, 1.0, 25)]:
        ours = process_logits(logits, *args)
        assert (ours[:, ::3] == 0).all()
        assert torch.equal(ours == 0, hf_process(logits, *args) == 0)
        torch.testing.assert_close(ours, hf_process(logits, *args), **PROBS)


def test_process_logits_hand_cases():
    # top-p 0.7 over [0.5, 0.3, 0.2]: ascending cumsum [0.2, 0.5, 1.0]; 0.2 <= 0.3 is removed
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    torch.testing.assert_close(process_logits(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0.0]))
    # top-k keeps ties with the k-th largest: both 3s survive top_k=1
    logits = torch.tensor([3.0, 3.0, 1.0, 0.0])
    torch.testing.assert_close(process_logits(logits, 1.0, top_k=1), torch.tensor([0.5, 0.5, 0.0, 0.0]))
    # top-p ties: the stable ascending sort puts the lower id first, so it is removed first
    probs = process_logits(torch.zeros(4), 1.0, top_p=0.5)
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.0, 0.5, 0.5]))
    # the most probable token always stays, however small top_p is
    probs = process_logits(torch.tensor([0.0, 5.0, 1.0]), 1.0, top_p=1e-9)
    assert probs.tolist() == [0.0, 1.0, 0.0]
    # temperature divides before the softmax
    probs = process_logits(torch.tensor([0.0, 1.0]), 0.5)
    torch.testing.assert_close(probs, torch.tensor([0.0, 2.0]).softmax(-1))
    # order: top-k first, then top-p on the top-k survivors' renormalised probabilities
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # after top_k=3: [4/9, 3/9, 2/9]; ascending cumsum [2/9, 5/9, 1]; top_p=0.7 removes 2/9
    torch.testing.assert_close(process_logits(logits, 1.0, top_p=0.7, top_k=3), torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_process_logits_low_precision_input(dtype):
    logits = (torch.randn(3, 40) * 2).to(dtype)
    ours = process_logits(logits, 0.9, 0.9, 12)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, process_logits(logits.float(), 0.9, 0.9, 12))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        pytest.param(dict(temperature=0.0), ValueError, "temperature", id="temp0"),
        pytest.param(dict(temperature=-1.0), ValueError, "temperature", id="temp-neg"),
        pytest.param(dict(temperature=float("nan")), ValueError, "temperature", id="temp-nan"),
        pytest.param(dict(temperature=float("inf")), ValueError, "temperature", id="temp-inf"),
        pytest.param(dict(temperature=True), TypeError, "temperature", id="temp-bool"),
        pytest.param(dict(temperature=1.0, top_p=0.0), ValueError, "top_p", id="topp0"),
        pytest.param(dict(temperature=1.0, top_p=1.5), ValueError, "top_p", id="topp1.5"),
        pytest.param(dict(temperature=1.0, top_k=-1), ValueError, "top_k", id="topk-neg"),
        pytest.param(dict(temperature=1.0, top_k=2.5), TypeError, "top_k", id="topk-float"),
    ],
)
def test_sampling_params_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        process_logits(torch.zeros(2, 4), **kwargs)


def test_sampling_params_normalised():
    assert check_sampling_params(1, 1, 0) == (1.0, 1.0, 0)
    with pytest.raises(TypeError, match="logits"):
        process_logits(torch.zeros(2, 4, dtype=torch.long), 1.0)


def test_sample_from_probs_inverse_cdf():
    probs = torch.tensor([0.25, 0.0, 0.75])
    draw = lambda u: int(sample_from_probs(probs, torch.tensor(u)))  # noqa: E731
    assert draw(0.0) == 0
    assert draw(0.2499) == 0
    assert draw(0.25) == 2  # cumulative 0.25 does not exceed 0.25; the zero token is skipped
    assert draw(0.9999) == 2
    # zero-probability ids are never drawn, also at u = 0 before the first nonzero id
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5])
    assert int(sample_from_probs(probs, torch.tensor(0.0))) == 1
    assert int(sample_from_probs(probs, torch.tensor(0.5))) == 3
    # the float guard: a row summing to less than u takes the last nonzero token
    probs = torch.tensor([0.5, 0.25, 0.0, 0.0])
    assert int(sample_from_probs(probs, torch.tensor(0.9))) == 1
    # leading dims and dtype
    out = sample_from_probs(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[0.5, 0.5]]))
    assert out.dtype == torch.int64 and out.tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="leading shape"):
        sample_from_probs(torch.ones(2, 3) / 3, torch.rand(3))


def test_sample_from_probs_distribution():
    g = torch.Generator().manual_seed(1)
    probs = process_logits(torch.randn(12, generator=g), 0.8, 0.95, 9)
    n = 40_000
    draws = sample_from_probs(probs.expand(n, -1), torch.rand(n, generator=g))
    counts = torch.bincount(draws, minlength=12)
    assert chi2_pvalue(counts, probs) > 1e-3
    # the same test rejects a wrong law (the unprocessed distribution)
    assert chi2_pvalue(counts, torch.randn(12, generator=g).softmax(-1)) < 1e-3
