"""Context lookup in the tree (runtime/lookup.py): the pieces (context store, calibration, the
merge into the head's candidates: ancestor-closed and parents-first for every tree size), fp32
greedy output equal to transformers' greedy decoding with a head (random and trained) and with
no head at all (lookup trees alone), adaptive and fixed, batched and ragged, with EOS and with
calibrations that trust the lookup too much or too little; sampling follows the exact law of
plain sampling (chi-square) with lookup nodes accepted in the tree; stats split the accepted
drafted tokens by source."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import TreeSpecDecoder, ops  # noqa: E402
from eagle2_kernels.ops.sampling import process_logits  # noqa: E402
from eagle2_kernels.runtime import lookup as lookup_mod  # noqa: E402
from eagle2_kernels.runtime.costmodel import CostModel  # noqa: E402
from eagle2_kernels.runtime.lookup import (BOTH, HEAD, LOOKUP, PAD_SCORE, ContextStore,  # noqa: E402
                                           LookupCalibration, LookupConfig, LookupRound)
from tiny_models import (  # noqa: E402
    SAMPLING,
    exact_law,
    hf_greedy,
    law_pvalues,
    one_thread,  # noqa: F401  (autouse fixture)
    random_head,
    sampling_setup,
    tiny_target,
    trained_setup,
)

# A CPU-like cost curve: verifying a few more tokens costs little, a draft step some.
COSTS = CostModel.synthetic([0.040, 0.041, 0.042, 0.043, 0.045, 0.047, 0.050, 0.052, 0.055, 0.058,
                             0.061, 0.064, 0.067, 0.070, 0.073, 0.076], draft_s=0.002)



def head_never_pays(monkeypatch) -> None:
    """Every drafted round sizes its tree as if all its candidates had probability 0, so it
    chooses n = 0 and the policy backs off; its backoff rounds then verify the lookup's
    continuations alone where those pay (they are sized apart, by ``lookup.size_alone``)."""
    from eagle2_kernels.runtime.policy import RoundPolicy

    choose = RoundPolicy.choose
    monkeypatch.setattr(RoundPolicy, "choose", lambda self, top, draft_s, prefix, levels_done: choose(
        self, [[0.0] * len(t) for t in top], draft_s, prefix, levels_done))


def repetitive_prompt(vocab: int, seed: int, period: int = 7, length: int = 30) -> torch.Tensor:
    """[1, length]: a random phrase of ``period`` tokens repeated (lookup finds matches at once)."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, vocab, (period,), generator=g)
    return phrase.repeat(length // period + 1)[:length].view(1, length)


def sources(stats) -> int:
    return stats.head_tokens + stats.lookup_tokens + stats.both_tokens


def drafted(stats) -> int:
    """Drafted tokens committed after the prefill (each tree round commits one bonus token)."""
    return sum(a - 1 for a in stats.accept_lengths[1:])


# ---------------------------------------------------------------------- the pieces
def test_context_store_extends_rows_and_searches_each_sequence():
    prompts = torch.tensor([[1, 2, 3, 1, 2], [7, 8, 0, 0, 0]])
    store = ContextStore(prompts, [5, 2], capacity=6)
    store.extend([[3, 9], []])
    store.extend([[4, 1, 2], [7]])  # grows past the capacity
    assert store.lengths == [10, 3]
    assert store.tokens[0, :10].tolist() == [1, 2, 3, 1, 2, 3, 9, 4, 1, 2]
    conts, lens = store.search(LookupConfig(num_tokens=3, num_matches=2))
    # Row 0 ends "1 2": "1 2 3" matched twice (m = 2); the recent one continues "3 9 4" ...
    assert conts[0] == [[3, 9, 4]] and lens[0] == [2]
    # ... row 1 ends with 7, seen at the start, followed by 8.
    assert conts[1] == [[8, 7]] and lens[1] == [1]


def test_calibration_learns_toward_the_observed_rate_and_scores_decrease():
    cfg = LookupConfig(max_ngram=3, num_tokens=4, prior_first=(0.3,), prior_next=0.6, prior_strength=2.0)
    cal = LookupCalibration(cfg)
    assert cal.rate(1, 1) == pytest.approx(0.3) and cal.rate(3, 2) == pytest.approx(0.6)
    for _ in range(200):
        cal.observe(2, 1, True)
        cal.observe(2, 2, False)
    assert cal.rate(2, 1) > 0.98 and cal.rate(2, 2) < 0.02
    assert cal.rate(1, 1) == pytest.approx(0.3)  # other cells untouched
    assert cal.rate(9, 1) == cal.rate(3, 1)  # longer matches share the last row
    scores = cal.path_scores(1, 4)
    assert all(b < a < 0 for a, b in zip(scores, scores[1:]))
    before = cal.tried[1][0]
    cal.decay()
    assert cal.tried[1][0] == pytest.approx(before * cfg.decay)


def head_candidates():
    """Sequence 0: root children 5 (log p -0.1) and 6 (-1.0); 5's children 7 (-0.3), 8 (-2.0);
    7's child 9 (-0.6). Sequence 1: the same shape with other tokens."""
    tokens = torch.tensor([[5, 6, 7, 8, 9], [15, 16, 17, 18, 19]])
    scores = torch.tensor([[-0.1, -1.0, -0.3, -2.0, -0.6], [-0.2, -0.5, -0.9, -1.1, -1.5]])
    parents = torch.tensor([[-1, -1, 0, 0, 2], [-1, -1, 0, 0, 2]])
    return tokens, scores, parents


def test_merge_boosts_shared_nodes_appends_the_rest_and_stays_closed():
    tokens, scores, parents = head_candidates()
    lg = [math.log(p) for p in (0.95, 0.9, 0.8, 0.7)]
    # Sequence 0: continuation 5 7 4 3 shares "5 7" with the head, then leaves it; a second
    # match starting with 6 shares one node. Sequence 1: nothing shared, shorter.
    chains = [[([5, 7, 4, 3], 3, lg), ([6, 2], 1, [math.log(0.05), math.log(0.01)])],
              [([30, 31], 2, lg[:2])]]
    rnd = LookupRound(chains, [True, True])
    mt, ms, mp = rnd.merge(tokens, scores, parents, 2, "cpu")
    assert mt.shape == ms.shape == mp.shape == (2, 8)  # 5 + 3 appended in row 0, + 2 (padded) in row 1
    assert mt[0].tolist() == [5, 6, 7, 8, 9, 4, 3, 2]
    assert mp[0].tolist() == [-1, -1, 0, 0, 2, 2, 5, 1]
    assert rnd.source[0] == [BOTH, BOTH, BOTH, HEAD, HEAD, LOOKUP, LOOKUP, LOOKUP]
    # Shared nodes take the larger score: 5 and 7 the lookup's, 6 keeps the head's -1.0.
    assert ms[0, :3].tolist() == pytest.approx([lg[0], -1.0, lg[1]])
    assert rnd.lookup_info[0][5] == (3, 3) and rnd.lookup_info[0][1] == (1, 1)
    assert mt[1].tolist() == [15, 16, 17, 18, 19, 30, 31, 0]
    assert mp[1].tolist() == [-1, -1, 0, 0, 2, -1, 5, -1] and ms[1, -1].item() == PAD_SCORE
    assert rnd.scores[1] == pytest.approx(ms[1, :7].tolist())  # host copy without the padding
    # Parents first and scores never rising from parent to child, so every tree size builds.
    for b in range(2):
        for c in range(8):
            p = int(mp[b, c])
            assert p < c and (p < 0 or ms[b, c] <= ms[b, p])
    for T in range(2, 9):
        tree = ops.tree_build(mt, ms, mp, torch.tensor([1, 2]), T, backend="reference")
        assert tree.tokens.shape == (2, T)


def test_merge_without_a_head_builds_the_chains_alone():
    rnd = LookupRound([[([4, 5, 6], 2, [-0.1, -0.2, -0.4])], []], [True, True])
    mt, ms, mp = rnd.merge(None, None, None, 2, "cpu")
    assert mt[0].tolist() == [4, 5, 6] and mp[0].tolist() == [-1, 0, 1]
    assert ms[1].tolist() == [PAD_SCORE] * 3 and rnd.real_candidates() == 0
    assert not rnd.empty and LookupRound([[], []], [True, True]).empty
    assert LookupRound([[([4], 1, [-0.1])], []], [False, True]).empty  # a stopped row's chains


# ---------------------------------------------------------------------- greedy: exact
def check_exact(dec, model, ids, n, eos=None):
    out = dec.generate(ids, max_new_tokens=n, eos_token_id=eos)
    assert torch.equal(out.sequences, hf_greedy(model, ids, n, eos=eos))
    s = out.stats
    assert s.new_tokens == out.sequences.shape[1] - ids.shape[1] == sum(s.accept_lengths)
    assert sources(s) >= drafted(s)  # counted before the last round's cut
    return s


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_exact_random_head_with_lookup(arch, adaptive):
    model = tiny_target(arch)
    V = model.config.vocab_size
    dec = TreeSpecDecoder(model, random_head(arch), total_tokens=10, depth=3, top_k=4, adaptive=adaptive,
                          cost_model=COSTS)
    found = 0
    for seed in range(3):
        s = check_exact(dec, model, repetitive_prompt(V, seed), 40)
        found += s.lookup_tokens + s.both_tokens
    assert found > 0  # the lookup's nodes were accepted: the merge path really ran


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_greedy_exact_trained_head_with_lookup(adaptive):
    model, head, prompts = trained_setup("llama")
    dec = TreeSpecDecoder(model, head, total_tokens=16, depth=4, top_k=4, adaptive=adaptive, cost_model=COSTS)
    head_tokens = lookup_tokens = 0
    for i in range(3):
        s = check_exact(dec, model, prompts[i : i + 1], 48)
        head_tokens += s.head_tokens + s.both_tokens
        lookup_tokens += s.lookup_tokens + s.both_tokens
    assert head_tokens > 0 and lookup_tokens > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_exact_lookup_rounds_during_the_backoff(arch, monkeypatch):
    """A head that never pays: the backoff's rounds verify lookup continuations alone (no head
    forward), their pairs join the head's catch-up for its next probe; output identical to plain
    greedy decoding, alone and in a ragged batch."""
    head_never_pays(monkeypatch)
    model = tiny_target(arch)
    V = model.config.vocab_size
    dec = TreeSpecDecoder(model, random_head(arch), total_tokens=10, depth=3, top_k=4, cost_model=COSTS)
    rounds = lookup = 0
    for seed in range(3):
        s = check_exact(dec, model, repetitive_prompt(V, seed), 40)
        rounds += dec.last_policy.lookup_rounds
        lookup += s.lookup_tokens
        assert s.head_tokens == s.both_tokens == 0 and all(n == 0 for n in dec.last_policy.sizes)
    assert rounds > 0 and lookup > 0
    rows = [repetitive_prompt(V, s, period=5 + s, length=20 + 3 * s)[0] for s in range(3)]
    out = dec.generate(rows, max_new_tokens=30)
    assert dec.last_policy.lookup_rounds > 0
    for b, row in enumerate(rows):
        want = hf_greedy(model, row.view(1, -1), 30)[0, row.numel():]
        assert out.sequences[b, -30:].tolist() == want.tolist(), b  # rows are left-padded


@pytest.mark.parametrize("T", [2, 6, 16], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_exact_without_a_head(arch, adaptive, T):
    model = tiny_target(arch)
    V = model.config.vocab_size
    dec = TreeSpecDecoder(model, total_tokens=T, depth=2, top_k=4, adaptive=adaptive, cost_model=COSTS)
    assert dec.draft is None and not dec.uses_static_round
    total = 0
    for seed in range(3):
        s = check_exact(dec, model, repetitive_prompt(V, seed), 36)
        assert s.head_tokens == s.both_tokens == 0
        total += s.lookup_tokens
    assert total > 0
    # A prompt of one token (nothing to look up at first) and one with no repeats.
    check_exact(dec, model, torch.tensor([[3]]), 12)
    check_exact(dec, model, torch.arange(20).view(1, 20), 12)


@pytest.mark.parametrize("head", [True, False], ids=["head", "no-head"])
def test_greedy_exact_batch_ragged_and_eos(head):
    model = tiny_target("llama")
    V = model.config.vocab_size
    dec = TreeSpecDecoder(model, random_head("llama") if head else None, total_tokens=10, depth=3, top_k=4,
                          cost_model=COSTS)
    rows = [repetitive_prompt(V, s, period=5 + s, length=20 + 3 * s)[0] for s in range(3)]
    out = dec.generate(rows, max_new_tokens=30)
    for b, row in enumerate(rows):
        want = hf_greedy(model, row.view(1, -1), 30)[0, row.numel():]
        assert out.sequences[b, -30:].tolist() == want.tolist(), b
    # EOS inside a round: the token that plain decoding emits 9th stops generation there.
    ids = repetitive_prompt(V, 4)
    eos = int(hf_greedy(model, ids, 9)[0, -1])
    check_exact(dec, model, ids, 24, eos=eos)


@pytest.mark.parametrize("prior", [0.999, 0.01], ids=["trusts-lookup", "distrusts-lookup"])
def test_greedy_exact_whatever_the_calibration(monkeypatch, prior):
    """The calibration only moves which nodes are verified; the output stays plain greedy's."""
    cfg = LookupConfig(prior_first=(prior,), prior_next=prior, prior_strength=1e6)
    monkeypatch.setattr(lookup_mod, "LookupConfig", lambda: cfg)
    model, head, prompts = trained_setup("llama")
    for h in (head, None):
        dec = TreeSpecDecoder(model, h, total_tokens=12, depth=3, top_k=4, cost_model=COSTS)
        for i in range(2):
            check_exact(dec, model, prompts[i : i + 1], 40)


def test_lookup_off_and_no_head_errors():
    model = tiny_target("llama")
    V = model.config.vocab_size
    dec = TreeSpecDecoder(model, random_head("llama"), total_tokens=10, depth=3, top_k=4, lookup=False,
                          cost_model=COSTS)
    s = check_exact(dec, model, repetitive_prompt(V, 0), 30)
    assert s.lookup_tokens == s.both_tokens == s.lookup_nodes == 0
    with pytest.raises(ValueError, match="lookup=False needs a draft head"):
        TreeSpecDecoder(model, lookup=False)
    with pytest.raises(TypeError, match=r"EagleDraftHead, Eagle3DraftHead\) or None"):
        TreeSpecDecoder(model, "head")


# ---------------------------------------------------------------------- sampling: the exact law
ALPHA = 1e-3
SAMPLING_PROMPT = torch.tensor([[3, 1, 4, 1, 5, 3, 1, 4]])  # repeats: lookup proposes from x1 on


@pytest.mark.parametrize("head,backoff", [(True, False), (False, False), (True, True)],
                         ids=["head+lookup", "lookup-only", "lookup-in-backoff"])
def test_sampling_with_lookup_matches_the_target_law(head, backoff, monkeypatch):
    """600 samples of (x1, x2, x3, x4) after a repetitive prompt from a vocabulary-8 target,
    tree T6-D2-K3 (fixed) with lookup candidates merged in: the joints (x1, x2), (x2, x3) and
    (x3, x4) against the exact law of plain sampling. A control: the same samples reject the
    unprocessed law. Lookup nodes must have been accepted (the test covers them)."""
    model, h = sampling_setup()
    if backoff:
        head_never_pays(monkeypatch)
    dec = TreeSpecDecoder(model, h if head else None, total_tokens=6, depth=2, top_k=3, adaptive=backoff,
                          cost_model=COSTS if backoff else None)
    n = 4
    law = exact_law(model, SAMPLING_PROMPT, n, lambda lg: process_logits(lg, **SAMPLING))
    g = torch.Generator().manual_seed(21)
    samples, accepted_lookup = [], 0
    for _ in range(600):
        out = dec.generate(SAMPLING_PROMPT, n, generator=g, **SAMPLING)
        samples.append(out.sequences[0, SAMPLING_PROMPT.shape[1]:])
        accepted_lookup += out.stats.lookup_tokens + out.stats.both_tokens
        if backoff:  # the lookup's nodes came from the backoff's rounds, the head drafted none
            assert all(n == 0 for n in dec.last_policy.sizes) and out.stats.head_tokens == 0
    samples = torch.stack(samples)
    pvalues = law_pvalues(samples, law, [(0, 1), (1, 2), (2, 3)])
    assert min(pvalues.values()) > ALPHA, pvalues
    assert accepted_lookup > 40, accepted_lookup  # measured: 79 (head+lookup)
    wrong = exact_law(model, SAMPLING_PROMPT, n, lambda lg: torch.softmax(lg.float(), -1))
    assert min(law_pvalues(samples, wrong, [(0, 1)]).values()) < 1e-6
