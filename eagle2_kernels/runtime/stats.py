"""What a decoding call returns: the sequences and honest per-round statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    """

    rounds: int = 0
    new_tokens: int = 0
    accept_lengths: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0

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
