"""What a decoder's tree policy did and why, as lines of text (``eagle2 generate``, ``demo``,
``tune`` and the ``bench`` report print them).

The policy kinds: a fixed tree (``adaptive=False``); the static round (one captured tree per
call, sized from earlier calls); lookup trees alone (no head); and the adaptive policy, whose
lines name the tree sizes it verified and the measured costs that made it choose them.
"""

from __future__ import annotations

from typing import Sequence

from eagle2_kernels.eval.tally import histogram


def policy_lines(
    decoder, stats=None, *, tree_sizes: Sequence[int] | None = None, scope: str = "this call"
) -> list[str]:
    """Describe what ``decoder``'s policy chose in its last call, and the costs behind it.

    Args:
        decoder: a ``TreeSpecDecoder`` after a call (its config, head, last policy).
        stats: that call's ``DecodeStats`` (for the tree sizes and the lookup counts), or None.
        tree_sizes: the verified tree sizes to describe instead of ``stats.tree_sizes`` (e.g.
            pooled over a whole benchmark, see ``tally.pooled_tree_sizes``).
        scope: what the sizes cover, in words ("this call", "all turns").

    Returns:
        One to three lines: ``policy: ...``, for the adaptive policy ``why: ...``, and with
        context lookup ``lookup: ...``.
    """
    cfg = decoder.config
    if tree_sizes is None:
        tree_sizes = stats.tree_sizes if stats is not None else []
    if not cfg.adaptive:
        return [f"policy: fixed tree T={cfg.total_tokens} D={cfg.depth} K={cfg.top_k} (--fixed)"]
    if decoder.uses_static_round:
        return [f"policy: static round, one captured tree per call, sized from earlier calls' draft "
                f"confidence within T<={cfg.total_tokens} D={cfg.depth} K={cfg.top_k}; tree sizes used: "
                f"{sorted(set(tree_sizes))}"]
    lookup = ([f"lookup: accepted drafted tokens from the head {stats.head_tokens}, from context lookup "
               f"{stats.lookup_tokens}, from both {stats.both_tokens}"]
              if stats is not None and hasattr(stats, "lookup_nodes") and cfg.lookup else [])
    if decoder.draft is None:
        return [f"policy: lookup trees alone (no head) within T<={cfg.total_tokens}; each round verifies the "
                f"continuations found in the context that maximise predicted tokens per second"] + lookup
    pol = decoder.last_policy
    if pol is None or not pol.sizes:
        return ["policy: adaptive (no round drafted)"] + lookup
    cm, s = pol.costs, pol.summary()
    shown = ", ".join(f"{n}: {c}" for n, c in histogram(tree_sizes).items())
    n_mean = max(2, round(s["mean_nodes"]) + 1)
    t1, t_mean = cm.target(1), cm.target(n_mean)
    return [
        f"policy: adaptive within T<={cfg.total_tokens} D<={cfg.depth} K={cfg.top_k}; verified tree sizes "
        f"over {scope} (nodes incl. root: rounds) {shown}; last call: mean depth {s['mean_depth']:.1f}, "
        f"{s['plain_steps']} plain steps and {s.get('lookup_rounds', 0)} lookup-only rounds by backoff, draft calibration {s['calibration']:.2f}",
        f"why: measured target forward {1e3 * t1:.1f} ms for 1 token, {1e3 * t_mean:.1f} ms for "
        f"{n_mean}; draft step {1e3 * cm.draft(cfg.top_k):.2f} ms; each round "
        f"verifies the n best candidates maximising (1 + sum of their probabilities) / cost",
    ] + lookup
