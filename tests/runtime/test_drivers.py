"""Both drivers of a speculative round, one set of tests: the dynamic round
(``runtime/drivers.tree_rounds``, the CPU default) and the static round (``runtime/graphs.py``
phases driven by ``drivers.static_rounds``, run eagerly on CPU). Greedy output is token for
token transformers' greedy generate (fp32, tiny random Llama / Qwen2 / Mistral, random heads
with short acceptances and heads trained on the target's own features with long, asserted
ones), EOS and max_new_tokens inside a round, batches with rows stopping at different rounds,
and the stream yielding the same rounds. Each test runs once per driver."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import (  # noqa: E402
    ARCHS,
    LONG_PATH_TREES,
    assert_accepts,
    check_stats,
    fixed_decoder,
    hf_greedy,
    one_thread,  # noqa: F401  (autouse fixture)
    prompt,
    random_head,
    tiny_target,
    trained_setup,
)

DRIVERS = ["dynamic", "static"]

TREES = [
    pytest.param(2, 1, 1, id="T2-D1-K1"),
    pytest.param(5, 3, 4, id="T5-D3-K4"),
    pytest.param(16, 1, 10, id="T16-D1-K10"),
    pytest.param(16, 5, 4, id="T16-D5-K4"),
    pytest.param(60, 5, 10, id="T60-D5-K10"),
]


def decoder(driver, model, head, T, D, K, **kw):
    """A fixed-shape decoder running ``driver``'s rounds (the dynamic one with its default
    context lookup on)."""
    dec = fixed_decoder(model, head, T, D, K, static_round=(driver == "static"), **kw)
    assert dec.uses_static_round == (driver == "static")
    return dec


def head_only(model, head, T, D, K):
    """The dynamic round drafting with the head alone, as the static round does."""
    return fixed_decoder(model, head, T, D, K, static_round=False, lookup=False)


def _inner_cut(accept_lengths, lo):
    """A token count that ends strictly inside a round of >= 3 tokens (after index lo)."""
    total = 0
    for a in accept_lengths:
        if a >= 3 and total + 1 > lo:
            return total + 1  # one token into this round
        total += a
    raise AssertionError(f"no long round to cut in {accept_lengths}")


def _eos_inside_a_round(new, accept_lengths):
    """Index of a token whose first occurrence is inside (not last in) a round of >= 3 tokens."""
    total = 0
    for a in accept_lengths:
        if a >= 3:
            j = next((j for j in range(total, total + a - 1) if j > 0 and new.index(new[j]) == j), None)
            if j is not None:
                return j
        total += a
    raise AssertionError(f"no token first seen inside a long round: {accept_lengths}")


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("T,D,K", TREES)
def test_greedy_lossless_random_head(driver, arch, T, D, K):
    model = tiny_target(arch)
    dec = decoder(driver, model, random_head(arch), T, D, K)
    for seed, (length, n) in enumerate([(7, 24), (1, 9)]):
        ids = prompt(model.config.vocab_size, length, seed)
        out = dec.generate(ids, max_new_tokens=n)
        assert torch.equal(out.sequences, hf_greedy(model, ids, n)), (driver, arch, T, D, K, seed)
        check_stats(out, length)
    # CPU: the static round runs its phases eagerly (no graphs are tried off CUDA).
    assert dec.graph_status == ("dynamic" if driver == "dynamic" else "eager (cuda_graphs off)")


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("T,D,K", LONG_PATH_TREES)
def test_greedy_lossless_trained_head_long_paths(driver, arch, T, D, K):
    model, head, prompts = trained_setup(arch)
    dec = decoder(driver, model, head, T, D, K)
    alone = head_only(model, head, T, D, K)
    taus = []
    for i in range(3):
        ids = prompts[i : i + 1]
        out = dec.generate(ids, max_new_tokens=40)
        assert torch.equal(out.sequences, hf_greedy(model, ids, 40))
        check_stats(out, ids.shape[1])
        taus.append(out.stats.mean_accept_length)
        assert max(out.stats.accept_lengths) >= 4  # paths of several nodes accepted and compacted
        if driver == "static":  # the same trees as the dynamic round's with the head alone
            assert out.stats.accept_lengths == alone.generate(ids, max_new_tokens=40).stats.accept_lengths
    assert sum(taus) / len(taus) > 2.5, taus
    ids = prompt(model.config.vocab_size, 5, 123)  # a fresh prompt, not trained on
    assert torch.equal(dec.generate(ids, 30).sequences, hf_greedy(model, ids, 30))


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_eos_and_max_new_tokens_inside_a_round(driver, arch):
    model, head, prompts = trained_setup(arch)
    dec = decoder(driver, model, head, 16, 5, 4)
    ids, L = prompts[:1], prompts.shape[1]
    full = dec.generate(ids, max_new_tokens=40)
    assert_accepts(full.stats, tau=2.5, longest=4)
    new, lengths = full.sequences[0, L:].tolist(), full.stats.accept_lengths
    # max_new_tokens ending inside a round.
    cut = _inner_cut(lengths, 2)
    out = dec.generate(ids, max_new_tokens=cut)
    assert out.sequences[0, L:].tolist() == new[:cut]
    check_stats(out, L)
    # EOS inside a round, alone and in a list (the earliest one wins, as in plain decoding).
    pick = _eos_inside_a_round(new, lengths)
    eos = new[pick]
    ref = hf_greedy(model, ids, 40, eos=eos)
    for stop in (eos, [new[pick + 1], eos]):
        out = dec.generate(ids, max_new_tokens=40, eos_token_id=stop)
        assert torch.equal(out.sequences, hf_greedy(model, ids, 40, eos=stop))
        assert out.sequences[0, -1].item() == eos and out.sequences.shape[1] == L + pick + 1
        check_stats(out, L)
    # eos_token_id=None takes the model's generation config, like transformers' generate.
    model.generation_config.eos_token_id = eos
    try:
        assert torch.equal(dec.generate(ids, max_new_tokens=40).sequences, ref)
        assert torch.equal(dec.generate(ids, max_new_tokens=40, eos_token_id=[]).sequences, full.sequences)
    finally:
        model.generation_config.eos_token_id = None
    # The stream yields the same rounds; plain decoding over our cache stops at the same place.
    chunks = list(dec.stream(ids, max_new_tokens=40))
    assert [len(c) for c in chunks] == lengths and sum(chunks, []) == new
    plain = dec.generate_plain(ids, max_new_tokens=40, eos_token_id=eos)
    assert torch.equal(plain.sequences, ref)
    assert plain.stats.accept_lengths == [1] * plain.stats.new_tokens
    # The first token already stops (EOS or budget 1): no round runs.
    assert torch.equal(dec.generate(ids, 1).sequences, full.sequences[:, : L + 1])
    out = dec.generate(ids, 40, eos_token_id=new[0])
    assert out.sequences.shape[1] == L + 1 and out.stats.rounds == 1


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("T,D,K", [pytest.param(6, 2, 3, id="T6-D2-K3"), pytest.param(16, 4, 4, id="T16-D4-K4")])
def test_batch_greedy_equals_transformers(driver, arch, T, D, K):
    """B = 3 sequences in lockstep, with different acceptance lengths per round and EOS stops."""
    model, head, prompts = trained_setup(arch)
    dec = decoder(driver, model, head, T, D, K)
    ids = torch.cat([prompts[:2], prompt(model.config.vocab_size, 6, 77)], 0)  # 2 trained, 1 fresh
    out = dec.generate(ids, max_new_tokens=30)
    assert torch.equal(out.sequences, hf_greedy(model, ids, 30))
    assert out.stats.new_tokens == sum(out.stats.accept_lengths) == 3 * 30
    # Rows 0 and 1 accept long paths in the same rounds (accept_lengths sum over the rows).
    assert max(out.stats.accept_lengths) >= 8, out.stats.accept_lengths
    rows = [dec.generate(ids[b : b + 1], 30) for b in range(3)]
    for r in rows[:2]:
        assert_accepts(r.stats, tau=2.5)
    assert torch.equal(out.sequences, torch.cat([r.sequences for r in rows], 0))
    # An EOS that stops row 0 early inside a round; the others go on, row 0 is padded with it.
    new0 = out.sequences[0, 6:].tolist()
    eos = next(t for j, t in enumerate(new0[3:], 3) if new0.index(t) == j)
    out_eos = dec.generate(ids, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(out_eos.sequences, hf_greedy(model, ids, 30, eos=eos))
    real = sum(len(r[6:].tolist()[: r[6:].tolist().index(eos) + 1]) if eos in r[6:].tolist() else 30
               for r in out_eos.sequences)
    assert out_eos.stats.new_tokens == sum(out_eos.stats.accept_lengths) == real
    chunks = list(dec.stream(ids, max_new_tokens=30, eos_token_id=eos))
    assert all(len(c) == 3 for c in chunks)
    for b in range(3):
        got = sum((c[b] for c in chunks), [])
        assert got == out_eos.sequences[b, 6 : 6 + len(got)].tolist()
    plain = dec.generate_plain(ids, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(plain.sequences, out_eos.sequences)
    if driver == "static":
        alone = head_only(model, head, T, D, K)
        assert out_eos.stats.accept_lengths == alone.generate(ids, 30, eos_token_id=eos).stats.accept_lengths


def test_head_only_rounds_count_the_heads_tokens():
    """With lookup off every accepted drafted token is the head's: the stats say so, and nothing
    is attributed to the lookup. A round commits its accepted drafted nodes and one target
    token, so the drafted tokens are new - 1 (the prefill's) - rounds, plus what the budget cut
    from the last round (counted before its cut: at most D + 1 nodes deep)."""
    model, head, prompts = trained_setup()
    dec = head_only(model, head, 16, 5, 4)
    s = dec.generate(prompts[:1], max_new_tokens=41).stats
    assert s.lookup_tokens == s.both_tokens == 0
    rounds = len(s.accept_lengths) - 1
    assert 0 <= s.head_tokens - (s.new_tokens - 1 - rounds) <= 6
    assert s.head_tokens > 2 * rounds  # a trained head: long accepted paths


def test_pending_drops_the_rows_of_a_stopped_sequence():
    """Catch-up pairs of a sequence that stopped (its total 0) are left out of the ragged
    gather: sequence 1 stopped with 3 rows pending while sequence 0 has 2."""
    from eagle2_kernels.runtime.phases import Pending

    p = Pending(2)
    feats = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    p.add(feats[:, :2], torch.tensor([[1, 2], [5, 6]]), [1, 2])
    p.add(feats[:, 2:], torch.tensor([[3], [7]]), [1, 1])
    f, t, totals = p.take([True, False])
    assert totals == [2, 0] and t.shape == (2, 2)
    assert t[0].tolist() == [1, 3] and torch.equal(f[0], feats[0, [0, 2]])
