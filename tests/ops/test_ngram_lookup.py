"""ngram_lookup: the vectorised search equals the loop specification (random contexts with a
small vocabulary, so matches of every length occur; ragged lengths; int32 and int64), the
worked cases of the contract (longest first, then most recent; distinct first tokens per
slot; continuations cut at the end; no match; a one-token context), and the input checks."""

from __future__ import annotations

import pytest
import torch

from eagle2_kernels.ops.ngram_lookup import ngram_lookup

CASES = [
    pytest.param(1, 17, 4, 1, 8, 1, 3, id="B1-L17-G4-m1-N8-M1-V3"),
    pytest.param(3, 40, 3, 2, 5, 2, 4, id="B3-L40-G3-m2-N5-M2-V4-ragged"),
    pytest.param(2, 64, 6, 1, 1, 3, 5, id="B2-L64-G6-m1-N1-M3-V5"),
    pytest.param(4, 129, 4, 3, 12, 4, 2, id="B4-L129-G4-m3-N12-M4-V2"),
    pytest.param(2, 33, 1, 1, 3, 2, 30, id="B2-L33-G1-m1-N3-M2-V30-sparse"),
]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("B,L,G,m_min,N,M,V", CASES)
def test_vectorized_equals_specification(B, L, G, m_min, N, M, V, dtype):
    g = torch.Generator().manual_seed(B * 1000 + L)
    for trial in range(4):
        ctx = torch.randint(0, V, (B, L), generator=g).to(dtype)
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        lengths[0] = L  # one full row
        if trial == 3:
            lengths[-1] = 1
        lengths = lengths.to(dtype)
        want = ngram_lookup(ctx, lengths, G, m_min, N, M, backend="reference")
        got = ngram_lookup(ctx, lengths, G, m_min, N, M)
        for name, w, x in zip(("tokens", "counts", "match_len"), want, got):
            assert x.dtype == torch.int64 and x.shape == w.shape, name
            assert torch.equal(w, x), (name, trial, ctx.tolist(), lengths.tolist(), w.tolist(), x.tolist())


def lookup(ctx, **kw):
    ctx = torch.tensor([ctx])
    tok, cnt, m = ngram_lookup(ctx, torch.tensor([ctx.shape[1]]), **kw)
    return tok[0].tolist(), cnt[0].tolist(), m[0].tolist()


def test_longest_match_wins_over_recent_shorter():
    # ...7 8 9 [1] at p=3 matches "8 9" (m=2); "9" at p=7 matches m=1 only but is more recent.
    ctx = [7, 8, 9, 1, 2, 5, 9, 3, 4, 8, 9]
    assert lookup(ctx, max_ngram=4, num_tokens=2) == ([[1, 2]], [2], [2])


def test_equal_lengths_prefer_the_most_recent():
    ctx = [4, 1, 4, 2, 4, 3, 4]
    assert lookup(ctx, max_ngram=2, num_tokens=1, num_matches=1) == ([[3]], [1], [1])


def test_slots_propose_distinct_first_tokens():
    # "4" is followed by 1, 2, 1, 3: slot order 3 (most recent), 1 (p=4; p=0 shares it), 2.
    ctx = [4, 1, 4, 2, 4, 1, 4, 3, 4]
    tok, cnt, m = lookup(ctx, max_ngram=1, num_tokens=2, num_matches=4)
    assert tok == [[3, 4], [1, 4], [2, 4], [-1, -1]] and cnt == [2, 2, 2, 0] and m == [1, 1, 1, 0]


def test_continuation_is_cut_at_the_end_of_the_context():
    # The match ending right before the last token continues with that token only.
    ctx = [5, 5]
    assert lookup(ctx, max_ngram=3, num_tokens=4) == ([[5, -1, -1, -1]], [1], [1])


def test_no_match_and_min_ngram():
    assert lookup([1, 2, 3, 4], num_tokens=2) == ([[-1, -1]], [0], [0])
    # "3" occurs before, but "2 3" does not: below min_ngram=2 there is no match.
    assert lookup([3, 9, 2, 3], min_ngram=2, num_tokens=2) == ([[-1, -1]], [0], [0])
    assert lookup([7], num_tokens=1) == ([[-1]], [0], [0])  # a one-token context


def test_entries_past_the_length_are_ignored():
    ctx = torch.tensor([[1, 2, 1, 2, 1, 9, 9, 9]])
    got = ngram_lookup(ctx, torch.tensor([5]), max_ngram=3, num_tokens=4)
    assert [t.tolist() for t in got] == [[[[2, 1, -1, -1]]], [[2]], [[3]]]


@pytest.mark.parametrize("bad, err", [
    (dict(context=torch.zeros(2, 3)), TypeError),
    (dict(context=torch.zeros(3, dtype=torch.int64)), ValueError),
    (dict(lengths=torch.tensor([0, 3])), ValueError),
    (dict(lengths=torch.tensor([2, 4])), ValueError),
    (dict(lengths=torch.tensor([2])), ValueError),
    (dict(lengths=torch.tensor([2.0, 3.0])), TypeError),
    (dict(max_ngram=0), ValueError),
    (dict(min_ngram=5, max_ngram=4), ValueError),
    (dict(num_tokens=0), ValueError),
    (dict(num_matches=0), ValueError),
    (dict(num_tokens=2.0), TypeError),
], ids=["float-context", "1d-context", "zero-length", "length-past-L", "lengths-shape",
        "float-lengths", "max_ngram-0", "min-above-max", "num_tokens-0", "num_matches-0", "float-num_tokens"])
def test_input_checks(bad, err):
    kw = dict(context=torch.zeros(2, 3, dtype=torch.int64), lengths=torch.tensor([2, 3]))
    kw.update(bad)
    with pytest.raises(err, match="ngram_lookup"):
        ngram_lookup(**kw)
