"""``eagle2 tune``'s analysis: what the adaptive policy does, and is predicted to gain, on one
real answer under a cost model (this machine's, or a target curve measured elsewhere).

:func:`costs_from_curve` puts a given target curve next to this machine's draft costs;
:func:`evaluate_policy` decodes one answer with the adaptive policy sized by a cost model and
returns a :class:`PolicyEvaluation`: the cost model's time for the answer against plain
decoding, and the predicted tokens/s of verifying n drafted nodes for the draft confidence of
that answer (``runtime.policy.predicted_rates``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from eagle2_kernels.runtime.costmodel import CostModel
from eagle2_kernels.runtime.policy import RoundPolicy, predicted_rates


def costs_from_curve(
    n_grid: Sequence[int], target_s: Sequence[float], measured: CostModel, source: str = ""
) -> CostModel:
    """A cost model with the target forward curve ``target_s`` [seconds over ``n_grid`` new
    tokens] at every prefix length, and the draft and round-overhead costs of ``measured``."""
    return CostModel(
        n_grid=tuple(n_grid), target_short_s=tuple(target_s), target_long_s=tuple(target_s),
        short_prefix=0, long_prefix=0, k_grid=measured.k_grid, draft_step_s=measured.draft_step_s,
        round_overhead_s=measured.round_overhead_s, info={"source": source},
    )


@dataclass
class PolicyEvaluation:
    """One answer decoded by the adaptive policy under ``costs``, and what the costs predict.

    Attributes:
        decoder: the decoder that ran (the given decoder's model, head and config, sized by
            ``costs``); its ``last_policy`` is ``policy``.
        costs: the cost model the policy was sized by.
        stats: the call's ``DecodeStats`` (tree sizes, acceptance lengths, new tokens).
        policy: the call's ``RoundPolicy`` (sizes chosen, draft profile, calibration).
        predicted_s: the cost model's seconds for the answer (first token of the prefill, then
            every round and plain step taken).
        plain_s: the cost model's seconds for as many tokens decoded plainly.
        depth: the mean expansion depth of the call's trees, rounded.
        rates: (n, expected tokens, predicted tokens/s) of verifying the n best drafted nodes,
            n = 0 (plain decoding) .. the profile's length.
    """

    decoder: object
    costs: CostModel
    stats: object
    policy: RoundPolicy
    predicted_s: float
    plain_s: float
    depth: int
    rates: list[tuple[int, float, float]]

    @property
    def predicted_speedup(self) -> float:
        """Plain decoding's predicted time over the policy's, for this answer."""
        return self.plain_s / self.predicted_s

    @property
    def best_n(self) -> int:
        """The drafted-node count with the highest predicted tokens/s (0: plain decoding)."""
        return max(self.rates, key=lambda r: r[2])[0]

    @property
    def verdict(self) -> str:
        """The tree size the curve implies for an average round, in words."""
        if self.best_n == 0:
            return "plain decoding: no tree pays on this curve"
        return f"verify about {self.best_n} drafted nodes (T = {self.best_n + 1}) on an average round"

    def to_json(self, measured: CostModel, machine: dict) -> dict:
        """The ``tune.json`` record: machine, both cost models, the policy and the predictions."""
        return {"machine": machine, "costs": self.costs.to_json(), "measured": measured.to_json(),
                "policy": self.policy.summary(), "tree_sizes": self.stats.tree_sizes,
                "profile": self.policy.profile, "predicted_rates": self.rates,
                "predicted_speedup": self.predicted_speedup,
                "mean_accept_length": self.stats.mean_accept_length}


def evaluate_policy(
    decoder, costs: CostModel, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None
) -> PolicyEvaluation:
    """Decode ``input_ids`` [1, L] greedily with ``decoder``'s adaptive config sized by
    ``costs`` (a new decoder over the same model and head), and predict from the answer.

    Raises:
        ValueError: when the decoder's config is not adaptive (a fixed tree has no policy).
    """
    from eagle2_kernels.runtime.decoder import TreeSpecDecoder

    if not decoder.config.adaptive:
        raise ValueError("evaluate_policy needs an adaptive config (adaptive=True); a fixed tree has no policy")
    run = TreeSpecDecoder(decoder.target, decoder.draft, tokenizer=decoder.tokenizer, config=decoder.config,
                          cost_model=costs)
    out = run.generate(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    policy, stats, prefix = run.last_policy, out.stats, input_ids.shape[1]
    first = costs.target(1, prefix)  # the prefill's first token, timed like a plain step
    depth = round(policy.summary()["mean_depth"])
    rates = predicted_rates(policy.profile, costs, depth, prefix=prefix, calibration=policy.calibration)
    return PolicyEvaluation(decoder=run, costs=costs, stats=stats, policy=policy,
                            predicted_s=first + policy.predicted_s, plain_s=stats.new_tokens * first,
                            depth=depth, rates=rates)
