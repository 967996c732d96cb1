"""Draft candidates from the context: n-gram / suffix lookup merged into the EAGLE-2 tree.

Where text repeats (code, edits, quotes, summaries, multi-turn chat) the tokens that followed
an earlier occurrence of the last few tokens are a free draft: ``ops.ngram_lookup`` finds the
longest suffix matches of each sequence in its own context (prompt + output so far) and
returns their continuations. This module turns them into tree candidates:

* :class:`ContextStore`: the per-request token store (one row per sequence of the batch), fed
  with every committed chunk.
* :class:`LookupCalibration`: how often a lookup node was accepted given that its parent was,
  per (match length m, depth d), learned online during the request (decayed counts shrunk
  toward a prior). A lookup node at depth d of a match of length m gets the path probability
  a(m, 1) * ... * a(m, d), so its score is a log path probability like the head's.
* :class:`LookupRound`: one round's continuations, merged into the head's candidates before
  ``tree_build`` and the policy's sizing: a continuation token that the head also proposed
  under the same parent raises that candidate's score to the larger of the two; the rest of the
  continuation is appended as new candidates (parents before children). Scores never rise
  from parent to child, so the kept set stays closed under ancestors and parents-first.
* :func:`size_alone` / :func:`verify_alone`: a round of lookup candidates alone, which
  ``runtime/drivers.py`` runs for a target with no draft head (``lookup_rounds``) and in the backoff.

Losslessness: every candidate, score and tree size here comes from the context (committed
tokens) and from the outcomes of earlier rounds, never from this round's target outputs. The
tree is fixed before the target sees it, and greedy acceptance and the sampler's guarantee hold
for any tree fixed in advance, so lookup changes how many tokens a round commits, never which.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from eagle2_kernels import ops

__all__ = ["LookupConfig", "ContextStore", "LookupCalibration", "LookupRound", "LookupDrafter", "lookup_rounds"]

# A candidate score that no real one reaches (padding of ragged candidate rows): log p of
# path probabilities stays far above it, and exp() of it is 0.
PAD_SCORE = -1.0e9

# Provenance of a verified node (stats: committed tokens by source).
HEAD, LOOKUP, BOTH = 0, 1, 2


@dataclass(frozen=True)
class LookupConfig:
    """How the context is searched and how lookup nodes are scored.

    Attributes:
        max_ngram: longest suffix compared (matches of 1..max_ngram tokens).
        min_ngram: shortest suffix that counts as a match.
        num_tokens: continuation tokens proposed per match (the deepest lookup node).
        num_matches: matches per sequence and round (each a chain with its own first token).
        prior_first: prior acceptance of the first continuation token, by match length 1..max
            (the last entry also serves longer matches).
        prior_next: prior acceptance of a later token given that its parent was accepted.
        prior_strength: pseudo-observations behind the prior.
        decay: weight of older rounds' observations, per round (the text's regime changes).
    """

    max_ngram: int = 4
    min_ngram: int = 1
    num_tokens: int = 8
    num_matches: int = 2
    prior_first: tuple[float, ...] = (0.2, 0.35, 0.5, 0.6)
    prior_next: float = 0.7
    prior_strength: float = 2.0
    decay: float = 0.97


class ContextStore:
    """Per-request context of each sequence: its prompt, then every committed token.

    Kept on the CPU whatever the target's device (the committed tokens are host ints anyway,
    and the search then needs no device round-trip).

    Args:
        prompts: [B, Lmax] int64 right-padded prompts.
        lengths: prompt lengths (B ints).
        capacity: tokens a row may hold (prompt + new tokens); grows if exceeded.
    """

    def __init__(self, prompts: torch.Tensor, lengths: list[int], capacity: int):
        batch, width = prompts.shape
        self.tokens = torch.zeros(batch, max(capacity, width), dtype=torch.int64)
        self.tokens[:, :width] = prompts.to("cpu", torch.int64)
        self.lengths = list(lengths)

    def extend(self, chunks: list[list[int]]) -> None:
        """Append each sequence's committed tokens (``chunks[b]``, possibly empty)."""
        need = max(n + len(c) for n, c in zip(self.lengths, chunks))
        if need > self.tokens.shape[1]:
            grown = torch.zeros(self.tokens.shape[0], 2 * need, dtype=torch.int64)
            grown[:, : self.tokens.shape[1]] = self.tokens
            self.tokens = grown
        for b, chunk in enumerate(chunks):
            if chunk:
                n = self.lengths[b]
                self.tokens[b, n : n + len(chunk)] = torch.tensor(chunk, dtype=torch.int64)
                self.lengths[b] = n + len(chunk)

    def search(self, cfg: LookupConfig):
        """(tokens [B][M][<=N], match lengths [B][M]) as host lists; empty slots dropped."""
        width = max(self.lengths)
        toks, counts, m = ops.ngram_lookup(self.tokens[:, :width], torch.tensor(self.lengths), cfg.max_ngram,
                                           cfg.min_ngram, cfg.num_tokens, cfg.num_matches)
        conts, lens = [], []
        for row_t, row_c, row_m in zip(toks.tolist(), counts.tolist(), m.tolist()):
            conts.append([t[:c] for t, c in zip(row_t, row_c) if c > 0])
            lens.append([x for x, c in zip(row_m, row_c) if c > 0])
        return conts, lens


class LookupCalibration:
    """a(m, d): how often a lookup node of a length-m match at depth d was accepted when its
    parent was, from decayed counts shrunk toward the prior (:class:`LookupConfig`)."""

    def __init__(self, cfg: LookupConfig):
        self.cfg = cfg
        M, N = cfg.max_ngram, cfg.num_tokens
        first = list(cfg.prior_first) + [cfg.prior_first[-1]] * max(0, M - len(cfg.prior_first))
        self.prior = [[first[m] if d == 0 else cfg.prior_next for d in range(N)] for m in range(M)]
        self.accepted = [[0.0] * N for _ in range(M)]
        self.tried = [[0.0] * N for _ in range(M)]

    def rate(self, m: int, d: int) -> float:
        """a(m, d) for match length m >= 1 and depth d >= 1 (clipped to [1e-4, 0.999])."""
        i, j = min(m, self.cfg.max_ngram) - 1, d - 1
        s = self.cfg.prior_strength
        a = (self.accepted[i][j] + s * self.prior[i][j]) / (self.tried[i][j] + s)
        return min(max(a, 1e-4), 0.999)

    def path_scores(self, m: int, depth: int) -> list[float]:
        """log(a(m, 1) ... a(m, d)) for d = 1..depth: decreasing, like log path probabilities."""
        out, acc = [], 0.0
        for d in range(1, depth + 1):
            acc += math.log(self.rate(m, d))
            out.append(acc)
        return out

    def observe(self, m: int, d: int, accepted: bool) -> None:
        i, j = min(m, self.cfg.max_ngram) - 1, d - 1
        self.tried[i][j] += 1.0
        self.accepted[i][j] += float(accepted)

    def decay(self) -> None:
        w = self.cfg.decay
        for rows in (self.accepted, self.tried):
            for row in rows:
                for j in range(len(row)):
                    row[j] *= w


class LookupRound:
    """One round's lookup candidates per sequence, and after :meth:`merge` the merged
    candidate lists (host) that ``tree_build`` and the sizing see.

    Per sequence b: ``chains[b]`` = [(tokens, match length, scores)] with the scores of
    :meth:`LookupCalibration.path_scores`; ``seed_scores[b]`` = all those scores (the policy's
    view of the lookup before the head's levels are merged)."""

    def __init__(self, chains: list[list[tuple[list[int], int, list[float]]]], active: list[bool]):
        self.chains = chains
        self.active = active
        self.seed_scores = [[s for _, _, sc in ch for s in sc] for ch in chains]
        # Filled by merge(): per sequence, candidate order.
        self.tokens: list[list[int]] = []
        self.parents: list[list[int]] = []
        self.scores: list[list[float]] = []
        self.source: list[list[int]] = []
        self.lookup_info: list[dict[int, tuple[int, int]]] = []  # candidate -> (m, depth)

    @property
    def empty(self) -> bool:
        return not any(self.chains[b] for b in range(len(self.chains)) if self.active[b])

    def merge(self, cand_tokens: torch.Tensor | None, cand_scores: torch.Tensor | None,
              cand_parents: torch.Tensor | None, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head's candidates [B, C] (None: no head) with the continuations merged in.

        A continuation walks down from the root: where the head proposed the same token under
        the same parent, that candidate takes the larger score (and counts as both sources);
        from the first token the head did not propose, the rest is appended as new candidates,
        each the child of the one before. Returns tokens, scores, parents [B, C'] (ragged rows
        padded with PAD_SCORE children of the root) on ``device``.
        """
        if cand_tokens is not None:
            toks_h, scores_h, pars_h = cand_tokens.tolist(), cand_scores.tolist(), cand_parents.tolist()
        else:
            toks_h = scores_h = pars_h = [[] for _ in range(batch)]
        self.tokens, self.parents, self.scores, self.source, self.lookup_info = [], [], [], [], []
        for b in range(batch):
            tok, par, sc = list(toks_h[b]), list(pars_h[b]), list(scores_h[b])
            src = [HEAD] * len(tok)
            info: dict[int, tuple[int, int]] = {}
            chains = self.chains[b] if self.active[b] else []
            if chains and tok:
                child = {(p, t): c for c, (p, t) in enumerate(zip(par, tok))}
            else:
                child = {}
            for cont, m, lk in chains:
                cur, fresh = -1, False
                for d, (t, s) in enumerate(zip(cont, lk), start=1):
                    c = None if fresh else child.get((cur, t))
                    if c is None:
                        fresh = True  # the head never expands a node the lookup added
                        c = len(tok)
                        tok.append(t)
                        par.append(cur)
                        sc.append(s)
                        src.append(LOOKUP)
                        info[c] = (m, d)
                        child[(cur, t)] = c
                    else:
                        if s > sc[c]:
                            sc[c] = s
                        if src[c] == HEAD:
                            src[c] = BOTH
                        if c not in info or info[c][0] < m:
                            info[c] = (m, d)
                    cur = c
            self.tokens.append(tok)
            self.parents.append(par)
            self.scores.append(sc)
            self.source.append(src)
            self.lookup_info.append(info)
        width = max(1, max(len(t) for t in self.tokens))
        pad = [width - len(t) for t in self.tokens]
        tokens = torch.tensor([t + [0] * k for t, k in zip(self.tokens, pad)], dtype=torch.int64)
        parents = torch.tensor([p + [-1] * k for p, k in zip(self.parents, pad)], dtype=torch.int64)
        scores = torch.tensor([s + [PAD_SCORE] * k for s, k in zip(self.scores, pad)], dtype=torch.float32)
        # The host copies as tree_build ranks them (float32), so that records match its choice.
        self.scores = [row[: len(t)] for row, t in zip(scores.tolist(), self.tokens)]
        return tokens.to(device), scores.to(device), parents.to(device)

    def real_candidates(self) -> int:
        """Fewest candidates of an active sequence (0 when none): the largest tree with no padding."""
        counts = [len(self.tokens[b]) for b in range(len(self.tokens)) if self.active[b]]
        return min(counts) if counts else 0


class LookupDrafter:
    """The lookup state of one generate / stream call: context, calibration, and what was
    committed by which source.

    Args:
        prompts, lengths: the request's right-padded prompts [B, Lmax] and their lengths.
        capacity: expected context length (prompt + new tokens).
        cfg: a :class:`LookupConfig`.
    """

    def __init__(self, prompts: torch.Tensor, lengths: list[int], capacity: int, cfg: LookupConfig | None = None):
        self.cfg = cfg or LookupConfig()
        self.store = ContextStore(prompts, lengths, capacity)
        self.calibration = LookupCalibration(self.cfg)
        self.seconds = 0.0  # time spent searching and merging (part of the draft phase)

    def extend(self, chunks: list[list[int]]) -> None:
        self.store.extend(chunks)

    def begin_round(self, active: list[bool]) -> LookupRound:
        """Search every sequence's context and score the continuations (draft-side only)."""
        t0 = time.perf_counter()
        conts, lens = self.store.search(self.cfg)
        chains = [[(c, m, self.calibration.path_scores(m, len(c))) for c, m in zip(cs, ms)] if active[b] else []
                  for b, (cs, ms) in enumerate(zip(conts, lens))]
        rnd = LookupRound(chains, list(active))
        self.seconds += time.perf_counter() - t0
        return rnd

    def record(self, rnd: LookupRound, paths: list[list[int] | None], total_tokens: int, stats) -> None:
        """After verification of the tree ``tree_build`` made of ``rnd``'s merged candidates
        with ``total_tokens`` nodes: ``paths[b]`` = accepted node indices (root excluded; None
        for a sequence that was not decoding). Updates the calibration (each verified lookup
        node whose parent was accepted is one observation at its depth) and the stats."""
        cal = self.calibration
        cal.decay()
        for b, path in enumerate(paths):
            if path is None or not rnd.active[b]:
                continue
            row = rnd.scores[b]
            # tree_build keeps the T-1 best (ties: lower index) and numbers them in candidate order.
            kept = sorted(sorted(range(len(row)), key=lambda i: (-row[i], i))[: total_tokens - 1])
            node_of = {c: n for n, c in enumerate(kept, start=1)}
            on_path = set(path)
            parents, source, info = rnd.parents[b], rnd.source[b], rnd.lookup_info[b]
            for c, node in node_of.items():
                hit = node in on_path
                src = source[c]
                if hit:
                    if src == HEAD:
                        stats.head_tokens += 1
                    elif src == LOOKUP:
                        stats.lookup_tokens += 1
                    else:
                        stats.both_tokens += 1
                if src != HEAD:
                    stats.lookup_nodes += 1
                    p = parents[c]
                    if p == -1 or node_of.get(p) in on_path:
                        m, d = info[c]
                        cal.observe(m, d, hit)


class _NoCatchup:
    """Stands in for the catch-up queue of a decoder with no head."""

    def add(self, *args) -> None:
        pass


NO_CATCHUP = _NoCatchup()


def size_alone(rnd: LookupRound, costs, n_max: int, prefix: int, active: list[bool]):
    """The :class:`~eagle2_kernels.runtime.policy.Choice` of verifying the lookup's candidates
    alone (no draft forward: nothing is charged for drafting), after ``rnd.merge`` with no head."""
    from eagle2_kernels.runtime.policy import choose_size

    n_cap = min(n_max, max(len(t) for t in rnd.tokens))
    top = [sorted((math.exp(s) for s in rnd.scores[b]), reverse=True) for b in range(len(rnd.tokens)) if active[b]]
    top = [p + [0.0] * (n_cap - len(p)) for p in top]
    return choose_size(top, costs, 0.0, n_cap, prefix)


def verify_alone(state, run, rnd: LookupRound, n: int, root: torch.Tensor, pending=NO_CATCHUP):
    """One round that verifies the n best of ``rnd``'s candidates (no head drafted them) and
    commits; the accepted pairs join ``pending``, the head's catch-up queue, where there is a
    head. Yields the round's chunks; returns the next root [B]."""
    from eagle2_kernels.runtime.phases import accept, catchup_pairs, verify

    stats, req = run.stats, run.req
    batch = root.shape[0]
    t1 = time.perf_counter()
    tokens, scores, parents = rnd.merge(None, None, None, batch, state.device)
    T = n + 1
    tree = ops.tree_build(tokens, scores, parents, root, T, backend=state.config.backend)
    v = verify(state, tree, req.sampling, req.generator)
    state.sync()
    t2 = time.perf_counter()
    stats.verify_s += t2 - t1
    acc = accept(state, v, run.active)
    run.lookup.record(rnd, acc.paths, T, stats)
    chunks = run.commit(acc.proposals)
    stats.tree_sizes.append(T)
    if any(run.active):
        pending.add(*catchup_pairs(v, acc))
    stats.other_s += time.perf_counter() - t2
    yield chunks
    return v.bonus.view(batch)
