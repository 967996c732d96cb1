"""The adaptive tree-size policy and the machine cost model.

Unit tests on synthetic cost curves and score sets with a known optimum (the chosen size is
checked against a brute force over every ancestor-closed node set of small trees), the
expansion bound, the plain-step backoff and calibration; then the decoder under cost curves
that force n = 0 (plain steps only), n = max (every round the full tree) and mixtures:
fp32 greedy output equal to transformers' greedy decoding on Llama, Qwen2 and Mistral with
heads that really accept, batches whose sequences mix plain steps and trees, and sampling
that keeps the target's law (chi-square).
"""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from eagle2_kernels.runtime.costmodel import CostModel
from eagle2_kernels.runtime.policy import RoundPolicy, choose_size, expand_bound, predicted_rates

transformers = pytest.importorskip("transformers")

from eagle2_kernels import TreeSpecDecoder  # noqa: E402
from tiny_models import (  # noqa: E402
    assert_accepts,
    check_stats,
    first_prompt_pvalues,
    hf_greedy,
    one_thread,  # noqa: F401  (autouse fixture)
    prompt,
    sampling_setup,
    trained_setup,
)

# Cost curves (seconds of a target forward over n = 1, 2, ... new tokens) that force a choice.
FLAT = CostModel.synthetic([0.04] * 64, draft_s=0.0)  # verifying more is free: n = max
STEEP = CostModel.synthetic([0.04, 1.0], draft_s=0.001)  # any tree costs 25x a plain step: n = 0
# Zen 3 without AVX-512 (bf16 emulated), SmolLM2-135M: 42/53/92/169/270 ms for n = 1/2/4/8/16.
ZEN3 = CostModel.synthetic([0.042, 0.053, 0.092, 0.169, 0.270], draft_s=0.0017, n_grid=[1, 2, 4, 8, 16])
# Mostly linear: a few nodes pay when the draft is confident.
RAMP = CostModel.synthetic([0.040, 0.050, 0.060, 0.070, 0.080, 0.090], draft_s=0.002)
# 30 ms per extra token after 40 ms: trees of a varying few nodes pay for a confident head.
MIXED = CostModel.synthetic([0.04 + 0.03 * i for i in range(8)], draft_s=0.002)


# ------------------------------------------------------------------------------ cost model
def test_cost_model_interpolates_and_extrapolates():
    cm = CostModel.synthetic([0.010, 0.030], draft_s=[0.001, 0.003], n_grid=[2, 4], k_grid=[1, 3])
    assert cm.target(2) == pytest.approx(0.010)
    assert cm.target(3) == pytest.approx(0.020)
    assert cm.target(6) == pytest.approx(0.050)  # linear past the last point
    assert cm.target(1) == pytest.approx(0.010)  # never below the cheapest measured forward
    assert cm.draft(2) == pytest.approx(0.002)
    assert cm.n_max == 4


def test_cost_model_prefix_interpolation_and_json_round_trip():
    cm = CostModel(n_grid=(1, 8), target_short_s=(0.01, 0.02), target_long_s=(0.03, 0.06), short_prefix=100,
                   long_prefix=300, k_grid=(1,), draft_step_s=(0.001,), round_overhead_s=0.0005,
                   info={"cpu": "x"})
    assert cm.target(1, 200) == pytest.approx(0.02)
    assert cm.target(8, 300) == pytest.approx(0.06)
    assert cm.target(8, 50) == pytest.approx(0.02)  # shorter than measured: clamped at the short curve
    back = CostModel.from_json(json.loads(json.dumps(cm.to_json())))
    assert back == cm and back.info == {"cpu": "x"}
    assert "prefix   300" in cm.describe()


@pytest.mark.parametrize("bad, message", [
    (dict(n_grid=(2, 1)), "n_grid"),
    (dict(target_short_s=(0.01,)), "target_short_s"),
    (dict(draft_step_s=(-1.0,)), "draft_step_s"),
    (dict(long_prefix=1), "long_prefix"),
])
def test_cost_model_rejects_bad_values(bad, message):
    fields = dict(n_grid=(1, 2), target_short_s=(0.01, 0.02), target_long_s=(0.01, 0.02), short_prefix=5,
                  long_prefix=10, k_grid=(1,), draft_step_s=(0.001,))
    with pytest.raises(ValueError, match=message):
        CostModel(**{**fields, **bad})


def test_cost_model_schema_is_checked():
    d = FLAT.to_json()
    d["schema"] = -1
    with pytest.raises(ValueError, match="schema"):
        CostModel.from_json(d)


# ------------------------------------------------------------------------------ choose_size
def _random_tree(rng: random.Random, nodes: int):
    """Parents (parent < child, -1 = root) and path probabilities of a random draft tree."""
    parents, probs = [], []
    for i in range(nodes):
        p = rng.randrange(-1, i)
        parents.append(p)
        base = 1.0 if p < 0 else probs[p]
        probs.append(base * rng.random() ** 2)
    return parents, probs


def _brute_force_best(parents, probs, costs: CostModel, draft_s: float, n_cap: int):
    """The best rate over every ancestor-closed node set of size <= n_cap (independent of the
    policy's top-n shortcut)."""
    best = 1.0 / (draft_s + costs.target(1))
    for size in range(1, n_cap + 1):
        for subset in itertools.combinations(range(len(probs)), size):
            chosen = set(subset)
            if any(parents[i] >= 0 and parents[i] not in chosen for i in subset):
                continue
            rate = (1 + sum(probs[i] for i in subset)) / (draft_s + costs.round_overhead_s + costs.target(size + 1))
            best = max(best, rate)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_choose_size_is_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    parents, probs = _random_tree(rng, 8)
    # A random convex-ish curve: flat part, then a random slope.
    knee, slope = rng.randrange(1, 6), rng.uniform(0.0, 0.02)
    costs = CostModel.synthetic([0.04 + max(0, n - knee) * slope for n in range(1, 12)],
                                round_overhead_s=rng.uniform(0, 0.002))
    draft_s = rng.uniform(0, 0.01)
    choice = choose_size([sorted(probs, reverse=True)], costs, draft_s, n_cap=8)
    assert choice.rate == pytest.approx(_brute_force_best(parents, probs, costs, draft_s, 8))
    assert 0 <= choice.n <= 8


def test_choose_size_extremes_and_batches():
    probs = [[0.9, 0.8, 0.5, 0.1, 0.01]]
    assert choose_size(probs, FLAT, 0.0, n_cap=5).n == 5
    assert choose_size(probs, STEEP, 0.0, n_cap=5).n == 0
    # n_cap bounds the tree; a batch sums its sequences' expected tokens for one shared n.
    assert choose_size(probs, FLAT, 0.0, n_cap=3).n == 3
    one = choose_size(probs, RAMP, 0.002, n_cap=5)
    # A second sequence with no confident candidate adds one token whatever n: the shared
    # cost then weighs more, so the batch verifies no more nodes than the single sequence.
    two = choose_size(probs + [[0.0] * 5], RAMP, 0.002, n_cap=5)
    assert two.expected == pytest.approx(1 + 1 + sum(probs[0][: two.n]))
    assert two.n <= one.n
    # Hand-computed on RAMP: n=1 gives 1.9 / (0.002 + 0.05) = 36.5/s, n=2 2.7/0.062 = 43.5/s,
    # n=3 3.2/0.072 = 44.4/s, n=4 3.3/0.082 = 40.2/s; plain 1/0.042 = 23.8/s.
    assert one.n == 3 and one.rate == pytest.approx(3.2 / 0.072)


def test_zen3_curve_needs_a_confident_draft():
    """On the Zen 3 curve (bf16 emulated), a node must be likely to pay for its slot."""
    assert choose_size([[0.15, 0.1]], ZEN3, 0.0017, n_cap=8).n == 0
    assert choose_size([[0.95, 0.9, 0.85]], ZEN3, 0.0017, n_cap=8).n >= 1


def test_expand_bound_is_an_upper_bound():
    """Whatever children a frontier of mass M gets (mass <= M), the best rate after one more
    level never exceeds the bound."""
    rng = random.Random(3)
    for _ in range(200):
        top = sorted((rng.random() ** 2 for _ in range(6)), reverse=True)
        frontier = top[:3]
        mass = sum(frontier)
        kids = []
        for f in frontier:
            shares = [rng.random() for _ in range(3)]
            total = sum(shares) * rng.uniform(1.0, 3.0)
            kids += [f * s / total for s in shares]
        step = rng.uniform(0, 0.005)
        after = choose_size([sorted(top + kids, reverse=True)], RAMP, 0.004 + step, n_cap=10)
        bound = expand_bound([top], mass, RAMP, 0.004, step, n_cap=10)
        assert after.rate <= bound * (1 + 1e-12)


# ------------------------------------------------------------------------------ RoundPolicy
def backoff_dues(pol: RoundPolicy, top: list[list[float]], draft_s: float, rounds: int) -> list[int]:
    """The plain steps due after each of ``rounds`` drafted rounds that choose n = 0 (each run
    of plain steps taken before the next round)."""
    dues = []
    for _ in range(rounds):
        assert pol.choose(top, draft_s, None, 1).n == 0
        dues.append(pol.plain_due)
        while pol.plain_due:
            pol.take_plain_step()
    return dues


def test_backoff_doubles_and_resets():
    pol = RoundPolicy(STEEP, max_nodes=7, max_depth=3, top_k=2, max_plain=4)
    dues = backoff_dues(pol, [[0.5, 0.4]], 0.001, 5)
    assert dues == [1, 2, 4, 4, 4]  # doubling, capped at max_plain
    assert pol.plain_steps == 15
    pol.costs = FLAT
    assert pol.choose([[0.5, 0.4]], 0.0, None, 1).n == 2
    assert pol.plain_due == 0
    pol.costs = STEEP
    pol.choose([[0.5]], 0.001, None, 1)
    assert pol.plain_due == 1  # a paying round reset the backoff


def test_backoff_when_drafted_rounds_lose_to_plain_steps():
    """A tree that beats a plain step once its draft is spent still backs off when drafting
    loses to plain steps with no draft: by the model's own costs, or once the host time the
    rounds take beyond the model (observed) tips the balance."""
    top = [[0.9, 0.8]]
    pol = RoundPolicy(RAMP, max_nodes=7, max_depth=3, top_k=2)
    assert pol.choose(top, 0.002, None, 1).n > 0 and pol.plain_due == 0  # pays, by the model
    # Wall time: plain steps on the model, drafted rounds 60 ms slower than predicted.
    for _ in range(20):
        pol.observe("plain", RAMP.target(1), RAMP.target(1))
        pol.observe("round", pol.last_choice.seconds + 0.060, pol.last_choice.seconds)
    assert pol.unmodelled("round") == pytest.approx(0.060) and pol.unmodelled("plain") == 0.0
    choice = pol.choose(top, 0.002, None, 1)
    assert choice.n > 0 and pol.plain_due == 1  # still verified (its draft is spent), then back off
    # A draft dear by the model alone: sunk, the tree beats a plain step; overall it loses.
    pol = RoundPolicy(RAMP, max_nodes=7, max_depth=3, top_k=2)
    choice = pol.choose(top, 0.060, None, 1)
    assert choice.n > 0 and choice.rate < 1 / RAMP.target(1) and pol.plain_due == 1
    # Plain steps slower than the model make the same drafted rounds pay again.
    pol = RoundPolicy(RAMP, max_nodes=7, max_depth=3, top_k=2)
    for _ in range(20):
        pol.observe("plain", RAMP.target(1) + 0.040, RAMP.target(1))
    assert pol.choose(top, 0.060, None, 1).n > 0 and pol.plain_due == 0


def test_calibration_follows_observed_acceptance():
    pol = RoundPolicy(RAMP, max_nodes=7, max_depth=3, top_k=2)
    assert pol.calibration == pytest.approx(1.0)
    before = choose_size([[0.6, 0.5, 0.4]], RAMP, 0.002, 7, calibration=pol.calibration).n
    for _ in range(20):
        pol.record(predicted=1.5, accepted=0)  # an over-confident draft
    assert pol.calibration < 0.3
    after = pol.choose([[0.6, 0.5, 0.4]], 0.002, None, 1).n
    assert after < before
    for _ in range(40):
        pol.record(predicted=1.0, accepted=1)
    assert pol.calibration == pytest.approx(1.0, abs=0.05)


def test_keep_expanding_stops_when_the_frontier_is_improbable():
    pol = RoundPolicy(RAMP, max_nodes=15, max_depth=4, top_k=2)
    assert pol.keep_expanding([[0.9, 0.05]], frontier_mass=0.9, draft_s=0.002, levels_done=0, prefix=None)
    assert not pol.keep_expanding([[0.02, 0.01]], frontier_mass=0.03, draft_s=0.002, levels_done=0, prefix=None)
    assert not pol.keep_expanding([[0.9, 0.9]], frontier_mass=1.8, draft_s=0.002, levels_done=4, prefix=None)


def test_predicted_rates_match_choose_size():
    profile = [0.8, 0.5, 0.3, 0.1]
    rates = predicted_rates(profile, RAMP, depth_levels=0, catchup_rows=1)
    best = max(rates, key=lambda r: r[2])
    assert best[0] == choose_size([profile], RAMP, RAMP.draft(1), 4).n
    assert rates[0] == (0, 1.0, pytest.approx(1 / 0.04))


# ------------------------------------------------------------------------------ the decoder
ARCH_IDS = ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", ARCH_IDS)
@pytest.mark.parametrize("costs, expect", [(FLAT, "max"), (STEEP, "plain"), (MIXED, "mixed")],
                         ids=["n-max", "n-0", "mixed"])
def test_greedy_is_exact_under_any_cost_curve(arch, costs, expect):
    model, head, prompts = trained_setup(arch)
    dec = TreeSpecDecoder(model, head, total_tokens=12, depth=4, top_k=3, cost_model=costs)
    ids = prompts[:1]
    ref = hf_greedy(model, ids, 40)
    out = dec.generate(ids, 40, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    check_stats(out, ids.shape[1])
    sizes = out.stats.tree_sizes
    assert len(sizes) == out.stats.rounds - 1  # every round after the prefill
    if expect == "max":
        assert set(sizes) == {12}  # the full tree (the frontier is never empty)
        assert_accepts(out.stats, tau=2.0)
    elif expect == "plain":
        assert set(sizes) == {1}
        assert dec.last_policy.plain_steps > len(sizes) // 2  # the backoff skipped the draft
        assert max(out.stats.accept_lengths) == 1
    else:
        assert len(set(sizes)) > 1 and max(sizes) < 12  # sized per round, below the bound
        assert max(out.stats.accept_lengths) >= 3  # drafted trees of a few nodes were accepted
        # Here a tree of n nodes costs 40 + 30 n ms: the head's trees barely pay even when
        # accepted, and the backoff keeps decoding near plain speed by the policy's own model
        # (probes included), whichever way each round goes.
        assert dec.last_policy.predicted_s <= 1.1 * costs.target(1) * out.stats.new_tokens


def test_batch_mixing_plain_steps_and_trees_is_exact():
    """B = 3 with EOS and budgets: pending catch-up rows of different counts per sequence
    (tree rounds, then backoff plain steps) are joined so that each sequence's rows come first."""
    model, head, prompts = trained_setup("llama")
    vocab = model.config.vocab_size
    # One prompt the head knows (long accepted paths) and two fresh ones (it rarely accepts),
    # on a curve where trees pay only when the draft is confident: the batch mixes trees and
    # plain steps, and per-sequence pending counts differ.
    ids = torch.cat([prompts[:1], prompt(vocab, 6, 1), prompt(vocab, 6, 2)], 0)
    costs = CostModel.synthetic([0.04, 0.058, 0.07, 0.08, 0.09, 0.1], draft_s=0.004)
    dec = TreeSpecDecoder(model, head, total_tokens=10, depth=4, top_k=3, cost_model=costs)
    ref = hf_greedy(model, ids, 36)
    out = dec.generate(ids, 36, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert 1 in out.stats.tree_sizes and max(out.stats.tree_sizes) > 1
    assert max(out.stats.accept_lengths) >= 5  # summed over the batch: row 0 accepted a path
    # Each row on its own gives its own plain greedy answer too (EOS cut inside a round).
    eos = int(ref[1, ids.shape[1] + 20])
    for b in range(3):
        got = dec.generate(ids[b : b + 1], 36, eos_token_id=[eos]).sequences[0].tolist()
        want = hf_greedy(model, ids[b : b + 1], 36, eos=[eos])[0].tolist()
        assert got == want[: len(got)] and (got[-1] == eos or len(got) == len(want))


def test_stream_under_backoff_yields_the_same_tokens():
    model, head, prompts = trained_setup("qwen2")
    dec = TreeSpecDecoder(model, head, total_tokens=8, depth=3, top_k=3, cost_model=ZEN3)
    ids = prompts[2:3]
    chunks = list(dec.stream(ids, 30, eos_token_id=[]))
    assert sum(chunks, []) == hf_greedy(model, ids, 30)[0, ids.shape[1]:].tolist()


def test_reliability_is_recorded():
    model, head, prompts = trained_setup("llama")
    dec = TreeSpecDecoder(model, head, total_tokens=12, depth=4, top_k=3, cost_model=FLAT)
    out = dec.generate(prompts[:1], 30, eos_token_id=[])
    rel = out.stats.reliability
    assert sum(rel.nodes) == 11 * (out.stats.rounds - 1)
    # accepted drafted nodes = committed tokens minus the bonus per tree round (the last round
    # may be cut by the budget, after acceptance: at most depth + 1 more nodes)
    low = sum(a - 1 for a in out.stats.accept_lengths[1:])
    assert low <= sum(rel.accepted) <= low + 5
    assert all(0 <= a <= n for a, n in zip(rel.accepted, rel.nodes))
    assert "reliability" in out.stats.as_dict()


def test_fixed_shape_is_untouched_by_the_policy():
    model, head, prompts = trained_setup("llama")
    dec = TreeSpecDecoder(model, head, total_tokens=9, depth=3, top_k=3, adaptive=False, cost_model=STEEP)
    out = dec.generate(prompts[:1], 20, eos_token_id=[])
    assert set(out.stats.tree_sizes) == {9}
    assert dec.last_policy is None


@pytest.mark.parametrize("costs", [FLAT, STEEP, MIXED], ids=["n-max", "n-0", "mixed"])
def test_sampling_keeps_the_target_law_under_any_curve(costs):
    """600 samples of (x1, x2, x3) with the policy sizing each round (joints (x1, x2) and
    (x2, x3) against the exact law of plain sampling, significance 1e-3)."""
    model, head = sampling_setup()
    dec = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3, cost_model=costs)
    pvalues = first_prompt_pvalues(dec, samples=600, seed=21)
    assert min(pvalues.values()) > 1e-3, pvalues


def test_measured_cost_model_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE2_KERNELS_CACHE", str(tmp_path))
    model, head, _ = trained_setup("llama")
    dec = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3)
    calls = []
    cm = dec.cost_model(1, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1]
    assert cm.n_grid[0] == 1 and cm.n_grid[-1] == 6 and all(t > 0 for t in cm.target_short_s)
    assert list(cm.target_short_s) == sorted(cm.target_short_s)  # monotone in n
    assert cm.info["threads"] == torch.get_num_threads() and "cpu" in cm.info
    files = list((tmp_path / "costs").glob("*.json"))
    assert len(files) == 1
    # A new decoder over the same model reads the file instead of measuring again.
    again = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3).cost_model(1)
    assert again == cm
    fresh = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3).cost_model(1, remeasure=True)
    assert fresh.info["measured_at"] >= cm.info["measured_at"] and fresh.n_grid == cm.n_grid
    # A different thread count is a different machine configuration: its own file.
    torch.set_num_threads(2)
    try:
        TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3).cost_model(1)
    finally:
        torch.set_num_threads(1)
    assert len(list((tmp_path / "costs").glob("*.json"))) == 2


def test_bad_cost_model_argument():
    model, head, _ = trained_setup("llama")
    with pytest.raises(TypeError, match="cost_model"):
        TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3, cost_model={"t": 1})
    with pytest.raises(ValueError, match="adaptive"):
        TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3, adaptive="yes")


def test_expected_tokens_use_path_probabilities():
    """tau predicted from the draft's own scores on FLAT (every round the full tree) is close
    to the measured tau for the trained head: the calibration the policy relies on."""
    model, head, prompts = trained_setup("llama")
    dec = TreeSpecDecoder(model, head, total_tokens=12, depth=4, top_k=3, cost_model=FLAT)
    out = dec.generate(prompts[:2], 40, eos_token_id=[])
    rel = out.stats.reliability
    predicted, accepted = sum(rel.predicted), sum(rel.accepted)
    assert accepted > 0 and predicted > 0
    assert 0.3 < accepted / predicted < 3.0, (accepted, predicted)
    assert math.isfinite(dec.last_policy.calibration)


@pytest.mark.parametrize("costs, second", [(FLAT, 12), (MIXED, None), (STEEP, 2)], ids=["n-max", "mixed", "n-0"])
def test_static_round_sizes_each_call_from_the_previous_ones(costs, second):
    """The static (graph-captured) round keeps one fixed shape per call: the config's T on the
    first call, then the size bucket that the cost model and the draft confidence measured on
    the device during earlier calls predict fastest. Every call stays exact; the one-round-late
    host read (the CUDA loop) gives the same tokens."""
    model, head, prompts = trained_setup("llama")
    dec = TreeSpecDecoder(model, head, total_tokens=12, depth=4, top_k=3, static_round=True, cost_model=costs)
    ids = prompts[:2]
    ref = hf_greedy(model, ids, 30)
    sizes = []
    for call in range(3):
        dec._statics.read_lag = call % 2  # the lagged (CUDA) read order on the middle call
        out = dec.generate(ids, 30, eos_token_id=[])
        assert torch.equal(out.sequences, ref)
        assert len(set(out.stats.tree_sizes)) == 1  # one shape per call: the captured graph's
        sizes.append(out.stats.tree_sizes[0])
    profile = dec._statics.profile[2]
    assert len(profile) == 11 and profile == sorted(profile, reverse=True) and 0.5 < profile[0] <= 1.0
    assert sizes[0] == 12
    if second is not None:
        assert sizes[1:] == [second, second]
    else:
        assert 2 < sizes[1] < 12 and sizes[2] == sizes[1]
    fixed_dec = TreeSpecDecoder(model, head, total_tokens=12, depth=4, top_k=3, static_round=True,
                                adaptive=False, cost_model=STEEP)
    for _ in range(2):
        assert set(fixed_dec.generate(ids, 10, eos_token_id=[]).stats.tree_sizes) == {12}


def test_plain_runs_grow_where_the_draft_is_dear():
    """The backoff's cap keeps a vain probe's fixed cost within PROBE_SHARE of the plain steps
    before it: 16 where a draft step is cheap next to a forward, longer where it is dear."""
    from eagle2_kernels.runtime.policy import PROBE_SHARE, plain_cap

    cheap = CostModel.synthetic([0.020, 0.021], draft_s=[0.001, 0.003], k_grid=[1, 8])
    dear = CostModel.synthetic([0.0326, 0.051], draft_s=[0.002, 0.0094], k_grid=[1, 8])  # bf16 emulated
    assert plain_cap(cheap, 8) == 16
    cap = plain_cap(dear, 8)
    assert cap == 32 and (0.002 + 0.0094) <= PROBE_SHARE * cap * 0.0326 < 2 * (0.002 + 0.0094)
    assert plain_cap(CostModel.synthetic([0.01], draft_s=1.0), 1) == 256  # bounded
    pol = RoundPolicy(dear, max_nodes=7, max_depth=3, top_k=8)
    assert pol.max_plain == 32
    assert backoff_dues(pol, [[0.1, 0.05]], 0.0114, 8) == [1, 2, 4, 8, 16, 32, 32, 32]
