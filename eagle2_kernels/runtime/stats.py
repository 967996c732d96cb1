"""What a decoding call returns: the sequences and honest per-round statistics."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch


RELIABILITY_EDGES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0 + 1e-9)


@dataclass
class Reliability:
    """Predicted vs actual acceptance of verified draft nodes, per bin of path probability
    exp(score): ``nodes[i]``, ``predicted[i]`` (sum of p) and ``accepted[i]`` for the bin
    [edges[i], edges[i+1]). A calibrated draft has accepted ~ predicted in every bin."""

    edges: tuple[float, ...] = RELIABILITY_EDGES
    nodes: list[int] = field(default_factory=lambda: [0] * (len(RELIABILITY_EDGES) - 1))
    predicted: list[float] = field(default_factory=lambda: [0.0] * (len(RELIABILITY_EDGES) - 1))
    accepted: list[int] = field(default_factory=lambda: [0] * (len(RELIABILITY_EDGES) - 1))

    def add(self, p: float, was_accepted: bool) -> None:
        i = max(0, min(len(self.nodes) - 1, bisect.bisect_right(self.edges, p) - 1))
        self.nodes[i] += 1
        self.predicted[i] += p
        self.accepted[i] += int(was_accepted)

    def merge(self, other: "Reliability") -> None:
        for i in range(len(self.nodes)):
            self.nodes[i] += other.nodes[i]
            self.predicted[i] += other.predicted[i]
            self.accepted[i] += other.accepted[i]

    def as_dict(self) -> dict:
        return {"edges": [round(e, 6) for e in self.edges], "nodes": list(self.nodes),
                "predicted": [round(p, 4) for p in self.predicted], "accepted": list(self.accepted)}


@dataclass
class DecodeStats:
    """Statistics of one ``generate`` / ``generate_plain`` call (or a finished ``stream``).

    Attributes:
        rounds: target forwards that committed tokens. The prefill forward (which commits the
            first new token, with no draft) counts as one round; each draft-verify round after
            it is one more. Plain decoding has one round per token.
        new_tokens: tokens generated (``sequences.shape[1] - prompt length`` for B = 1; for
            B > 1 the real tokens of all sequences, padding excluded).
        accept_lengths: tokens committed per round, bonus token included (the prefill round
            commits 1 per sequence), summed over the batch; the last round is cut at EOS /
            ``max_new_tokens``. Their sum is ``new_tokens``.
        draft_s: seconds in the draft phase (catch-up, expansions, tree build).
        verify_s: seconds in target forwards (prefill and verification) and acceptance; in
            the static round (runtime/graphs.py) also KV compaction and the device-side commit.
        other_s: the rest of the call (KV compaction in the dynamic round, bookkeeping,
            output assembly).
        tree_sizes: tree nodes verified per round after the prefill, root included (1 = a
            plain step chosen by the adaptive policy); empty for plain decoding.
        reliability: predicted vs actual acceptance of verified nodes by probability bin
            (adaptive dynamic round only).
        head_tokens, lookup_tokens, both_tokens: accepted drafted tokens (bonus tokens excluded;
            the last round counted before its cut at EOS / ``max_new_tokens``) whose tree node
            the draft head proposed alone, the context lookup alone (``runtime/lookup.py``), or
            both. Counted in the dynamic round (with ``lookup=False`` every one is the head's);
            all zero in the static round, whose device-side commit does not report paths.
        lookup_nodes: verified tree nodes that the lookup proposed (alone or with the head).
    """

    rounds: int = 0
    new_tokens: int = 0
    accept_lengths: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    tree_sizes: list[int] = field(default_factory=list)
    reliability: Reliability = field(default_factory=Reliability)
    head_tokens: int = 0
    lookup_tokens: int = 0
    both_tokens: int = 0
    lookup_nodes: int = 0

    @property
    def mean_accept_length(self) -> float:
        """tau: mean tokens committed per round (0.0 before any round)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def total_s(self) -> float:
        return self.draft_s + self.verify_s + self.other_s

    def record(self, committed: int) -> None:
        self.rounds += 1
        self.new_tokens += committed
        self.accept_lengths.append(committed)

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "new_tokens": self.new_tokens,
            "accept_lengths": list(self.accept_lengths),
            "mean_accept_length": self.mean_accept_length,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "other_s": self.other_s,
            "tree_sizes": list(self.tree_sizes),
            "reliability": self.reliability.as_dict(),
            "head_tokens": self.head_tokens,
            "lookup_tokens": self.lookup_tokens,
            "both_tokens": self.both_tokens,
            "lookup_nodes": self.lookup_nodes,
        }

    def __repr__(self) -> str:
        return (
            f"DecodeStats(rounds={self.rounds}, new_tokens={self.new_tokens}, "
            f"mean_accept_length={self.mean_accept_length:.3f}, draft_s={self.draft_s:.4f}, "
            f"verify_s={self.verify_s:.4f}, other_s={self.other_s:.4f})"
        )


@dataclass
class GenerateOutput:
    """``sequences`` [B, L + n] int64 (prompt then new tokens, like transformers' generate)
    and ``stats`` (:class:`DecodeStats`)."""

    sequences: torch.Tensor
    stats: DecodeStats
