"""Per-round tree sizing from the draft's confidence and the machine's measured costs.

EAGLE-2's observation is that the draft is calibrated: a node whose path probability
exp(score) is p is accepted about p of the time. So before the target runs, the expected
tokens of verifying the n best candidates (ancestor-closed, as ``tree_build`` keeps them) are

    E(n) = 1 + c * (p_1 + ... + p_n)        (the 1 is the bonus token; c corrects calibration)

and with the measured cost of a target forward over n + 1 tokens the round's rate is

    R(n) = E(n) / (draft seconds so far + overhead + t(n + 1)).

The policy picks the n that maximises R (n = 0 is a plain step: the root alone), stops
expanding the tree once even an optimistic bound on the next level's gain cannot raise R,
and, when rounds keep choosing n = 0, skips drafting for a growing number of plain steps
(doubling, capped) before it probes again.

Losslessness: every choice here reads only draft scores, measured costs and the outcomes of
*earlier* rounds. The tree of a round is fixed before the target sees it, and both the greedy
rule and the sampler's guarantee (each emitted token is distributed as the target's processed
distribution) hold for any tree fixed in advance, so sizing never changes the output.
"""

from __future__ import annotations

import heapq
import math
import numbers
from dataclasses import dataclass

from eagle2_kernels.runtime.costmodel import CostModel

__all__ = ["Choice", "PROBE_SHARE", "RoundPolicy", "choose_size", "expand_bound", "plain_cap"]


@dataclass(frozen=True)
class Choice:
    """The verified tree size of a round: ``n`` drafted nodes (0 = plain step), expected
    committed tokens over the batch, predicted seconds and their ratio."""

    n: int
    expected: float
    seconds: float

    @property
    def rate(self) -> float:
        return self.expected / self.seconds if self.seconds > 0 else math.inf


def _prefix_mass(top: list[list[float]], n_cap: int) -> list[float]:
    """mass[n] = sum over sequences of their n largest probabilities (n = 0..n_cap)."""
    mass = [0.0] * (n_cap + 1)
    for probs in top:
        acc = 0.0
        for i in range(n_cap):
            if i < len(probs):
                acc += probs[i]
            mass[i + 1] += acc
    return mass


def choose_size(top: list[list[float]], costs: CostModel, draft_s: float, n_cap: int,
                prefix: int | None = None, calibration: float = 1.0) -> Choice:
    """The n in 0..n_cap that maximises expected tokens per second of this round.

    Args:
        top: per active sequence, its candidates' path probabilities in decreasing order
            (at least the n_cap largest).
        costs: the machine's cost model (for this batch size).
        draft_s: draft seconds already spent this round (sunk, but part of its cost).
        n_cap: largest tree the round may verify, root excluded.
        prefix: cached tokens (the cost model interpolates in it).
        calibration: c, the observed ratio of accepted to predicted nodes.
    """
    seqs = len(top)
    n_cap = max(0, min(n_cap, min((len(p) for p in top), default=0)))
    mass = _prefix_mass(top, n_cap)
    t = costs.target_row(prefix, n_cap + 2)
    best = Choice(0, float(seqs), draft_s + t[1])
    for n in range(1, n_cap + 1):
        c = Choice(n, seqs + calibration * mass[n], draft_s + costs.round_overhead_s + t[n + 1])
        if c.rate > best.rate:
            best = c
    return best


def expand_bound(top: list[list[float]], frontier_mass: float, costs: CostModel, draft_s: float,
                 step_s: float, n_cap: int, prefix: int | None = None, calibration: float = 1.0) -> float:
    """An upper bound on the rate after one more expansion level.

    The next level's candidates are children of the frontier, so their total probability is
    at most ``frontier_mass`` (summed over the batch). Optimistically all of it arrives in one
    extra node per sequence, at the cost of one more draft step.
    """
    seqs = len(top)
    n_cap = max(0, min(n_cap, min((len(p) for p in top), default=0)))
    mass = _prefix_mass(top, n_cap)
    t = costs.target_row(prefix, n_cap + 2)
    best = seqs / (draft_s + step_s + t[1])  # a plain step after all
    for n in range(0, n_cap + 1):
        gain = seqs + calibration * (mass[n] + frontier_mass)
        cost = draft_s + step_s + costs.round_overhead_s + t[n + 2]
        best = max(best, gain / cost)
    return best


class RoundPolicy:
    """The state the adaptive decoder carries between rounds: the cost model, the observed
    calibration of the draft, and the plain-step backoff.

    Args:
        costs: the machine's :class:`CostModel` for this batch size.
        max_nodes: T - 1, the most drafted nodes a round may verify (the config's bound).
        max_depth: D, the most expansion levels after the root expansion.
        top_k: K, frontier rows per expansion level.
        max_plain: longest run of plain steps between two probes; None (default) = the
            smallest power of two >= 16 at which a probe that drafts in vain costs at most
            ``PROBE_SHARE`` of the plain steps before it (:func:`plain_cap`). Where the draft is
            dear next to a plain step (bf16 emulated on CPUs without AVX-512-BF16), the runs
            grow longer, so that decoding where drafting does not pay stays at plain speed.

    Used by the decoder as: ``plain_due`` before a round (skip the draft when > 0),
    ``keep_expanding`` after each level, ``choose`` after the last, ``record`` after verify.
    """

    def __init__(self, costs: CostModel, max_nodes: int, max_depth: int, top_k: int, max_plain: int | None = None,
                 calibration_prior: float = 4.0, decay: float = 0.9):
        # Any bounds a DecodeConfig accepts are valid here, however small or odd (T - 1 = 1 node,
        # K above T, D + 2 above T): sizes are clipped to the candidates a round really has.
        if not isinstance(costs, CostModel):
            raise TypeError(f"RoundPolicy: costs must be a CostModel, got {type(costs).__name__}")
        if max_plain is None:
            max_plain = plain_cap(costs, top_k)
        for name, value in (("max_nodes", max_nodes), ("max_depth", max_depth), ("top_k", top_k),
                            ("max_plain", max_plain)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"RoundPolicy: {name} must be an int >= 1, got {value!r}")
        self.costs = costs
        self.max_nodes, self.max_depth, self.top_k = int(max_nodes), int(max_depth), int(top_k)
        self.max_plain = int(max_plain)
        self._prior, self._decay = float(calibration_prior), float(decay)
        self._acc = 0.0  # decayed sum of accepted drafted nodes
        self._pred = 0.0  # decayed sum of their predicted count (sum of p of verified nodes)
        self._misses = 0  # consecutive rounds that chose n = 0 (or drafted at a loss)
        self._tokens = self._seconds = self._weight = 0.0  # decayed over drafted rounds: predicted
        # tokens, predicted seconds, and their count
        self._unmodelled = {"round": [0.0, 0.0], "plain": [0.0, 0.0]}  # decayed (wall - model) s, count
        self.last_choice: Choice | None = None
        self.plain_due = 0  # plain steps still to take before the next probe
        self.sizes: list[int] = []  # chosen n per drafted round (for reports)
        self.depths: list[int] = []  # expansion levels run per drafted round
        self.plain_steps = 0  # plain steps taken by the backoff
        self.lookup_rounds = 0  # rounds of the backoff that verified lookup continuations alone
        self._profile = [0.0] * self.max_nodes  # sum over rounds/sequences of the i-th best p
        self._profile_n = 0
        self.predicted_s = 0.0  # the cost model's seconds for every round and plain step taken

    @property
    def calibration(self) -> float:
        """c: observed accepted / predicted drafted nodes (decayed), shrunk toward 1."""
        return (self._acc + self._prior) / (self._pred + self._prior)

    def step_seconds(self, rows: int) -> float:
        return self.costs.draft(rows)

    def keep_expanding(self, top: list[list[float]], frontier_mass: float, draft_s: float, levels_done: int,
                       prefix: int | None) -> bool:
        """True when one more expansion level may pay for itself (see :func:`expand_bound`)."""
        if levels_done >= self.max_depth:
            return False
        c = self.calibration
        now = choose_size(top, self.costs, draft_s, self.max_nodes, prefix, c).rate
        bound = expand_bound(top, frontier_mass, self.costs, draft_s, self.step_seconds(self.top_k),
                             self.max_nodes, prefix, c)
        return bound > now

    def choose(self, top: list[list[float]], draft_s: float, prefix: int | None, levels_done: int) -> Choice:
        choice = choose_size(top, self.costs, draft_s, self.max_nodes, prefix, self.calibration)
        for probs in top:
            for i, p in enumerate(probs[: self.max_nodes]):
                self._profile[i] += p
            self._profile_n += 1
        self.sizes.append(choice.n)
        self.depths.append(levels_done)
        self.predicted_s += choice.seconds
        # The choice above treats this round's draft as spent. Whether drafting pays at all is
        # the drafted rounds' predicted rate (tokens over seconds, draft included, decayed over
        # recent rounds: one unsure round is not a trend) against plain steps with no draft.
        if choice.n > 0:
            self._tokens = self._decay * self._tokens + choice.expected
            self._seconds = self._decay * self._seconds + choice.seconds
            self._weight = self._decay * self._weight + 1.0
        self.last_choice = choice
        # Both sides carry the host time the cost model does not see (measured online, below).
        plain_rate = len(top) / (self.costs.target(1, prefix) + self.unmodelled("plain")) if top else 0.0
        losing = choice.n > 0 and self._tokens < plain_rate * (self._seconds + self._weight * self.unmodelled("round"))
        if choice.n == 0 or losing:
            # Drafting did not pay: back off (1, 2, 4, ... plain steps) before probing again.
            # (A chosen tree is still verified: its draft is spent and it beats a plain step now.)
            self._misses += 1
            self.plain_due = min(2 ** (self._misses - 1), self.max_plain)
        else:
            self._misses = 0
        return choice

    def observe(self, kind: str, wall_s: float, model_s: float) -> None:
        """A drafted round (``kind="round"``) or a plain step (``"plain"``) took ``wall_s``
        seconds where the cost model said ``model_s``: the host time around the forwards
        (Python, the policy itself, cache misses) that the model's isolated timings miss. It
        only informs whether drafting pays at all (the backoff), never a tree's size. Which
        rounds draft may then vary from run to run with the machine's load, the output does not:
        every tree is still fixed before the target sees it (lossless)."""
        acc = self._unmodelled[kind]
        acc[0] = self._decay * acc[0] + (wall_s - model_s)
        acc[1] = self._decay * acc[1] + 1.0

    def unmodelled(self, kind: str) -> float:
        """Mean seconds a ``kind`` of round has taken beyond the cost model lately (>= 0)."""
        total, count = self._unmodelled[kind]
        return max(0.0, total / count) if count else 0.0

    def record(self, predicted: float, accepted: int) -> None:
        """After a verified round: ``predicted`` = sum of p over verified nodes, ``accepted`` =
        drafted nodes actually accepted (over the batch)."""
        self._acc = self._decay * self._acc + accepted
        self._pred = self._decay * self._pred + predicted

    @property
    def profile(self) -> list[float]:
        """Mean path probability of the i-th best candidate (i = 1..T-1) over the rounds so far:
        the draft's typical confidence, from which :func:`predicted_rates` follows."""
        n = max(self._profile_n, 1)
        return [p / n for p in self._profile]

    def summary(self) -> dict:
        """What the policy chose: verified sizes, depths, plain steps, calibration."""
        sizes = self.sizes
        return {
            "rounds_drafted": len(sizes),
            "mean_nodes": sum(sizes) / len(sizes) if sizes else 0.0,
            "mean_depth": sum(self.depths) / len(self.depths) if self.depths else 0.0,
            "no_draft_rounds": sum(1 for n in sizes if n == 0),
            "plain_steps": self.plain_steps,
            "lookup_rounds": self.lookup_rounds,
            "calibration": round(self.calibration, 3),
        }

    def take_plain_step(self, prefix: int | None = None) -> None:
        self.predicted_s += self.costs.target(1, prefix)
        self.plain_due -= 1
        self.plain_steps += 1

    def take_lookup_round(self, choice: Choice) -> None:
        """A round of the backoff that verified the context's continuations alone (no head
        forward): it counts as one of the steps due, at its predicted cost."""
        self.predicted_s += choice.seconds
        self.plain_due -= 1
        self.lookup_rounds += 1


# The most a probe that drafts in vain may cost, as a share of the plain steps before it.
PROBE_SHARE = 0.02


def plain_cap(costs: CostModel, top_k: int, share: float = PROBE_SHARE, floor: int = 16, ceiling: int = 256) -> int:
    """The longest run of plain steps between two probes: the smallest power of two >= ``floor``
    (at most ``ceiling``) at which one probe's fixed part (the root expansion and one level of
    ``top_k`` rows, from the cost model) costs at most ``share`` of the run's plain steps. The
    catch-up over the run's tokens is left out: it grows with the run, whatever its length."""
    cap = floor
    probe = costs.draft(1) + costs.draft(top_k) + costs.round_overhead_s
    while cap < ceiling:
        if probe <= share * cap * costs.target(1):
            break
        cap *= 2
    return cap


def top_probs(scores: list[list[float]], n: int) -> list[list[float]]:
    """Per sequence, the ``n`` largest exp(score) in decreasing order."""
    return [[math.exp(s) for s in heapq.nlargest(n, row)] for row in scores]


def predicted_rates(profile: list[float], costs: CostModel, depth_levels: int, catchup_rows: int = 2,
                    prefix: int | None = None, calibration: float = 1.0) -> list[tuple[int, float, float]]:
    """(n, expected tokens, predicted tokens/s) of verifying the n best candidates of a draft
    whose i-th best candidate has probability ``profile[i-1]``, n = 0 (plain) .. len(profile).
    Drafting costs the catch-up plus ``depth_levels`` expansion steps (none for n = 0)."""
    draft_s = costs.draft(catchup_rows) + depth_levels * costs.draft(max(costs.k_grid))
    out = [(0, 1.0, 1.0 / costs.target(1, prefix))]
    acc = 0.0
    for n, p in enumerate(profile, start=1):
        acc += p
        e = 1.0 + calibration * acc
        out.append((n, e, e / (draft_s + costs.round_overhead_s + costs.target(n + 1, prefix))))
    return out
