"""The phases of one EAGLE-2 round, as functions over explicit state.

    prefill      one target forward over the prompts -> first token, prompt features
    catch_up     the draft head over the pairs committed since it last ran (head's own KV)
    draft_tree   root expansion + expansion levels (ops.tree_expand) + ops.tree_build
    verify       one target forward over the tree, then ops.verify_greedy / verify_sample
    accept       ops.kv_compact of the accepted path, one host read of the round's outcome
    plain_step   the target over one token per sequence (a tree of one node)

Every function takes a :class:`~eagle2_kernels.runtime.state.DecodeState` (or, for
:func:`draft_tree`, just the head, the constants and a step callback, so that the static
round and the paged engine expand with the same code) and returns plain values. The drivers
(``runtime/drivers.py``, ``runtime/graphs.py``, ``runtime/lookup.py``) sequence them and keep
the host bookkeeping: EOS / budget cuts, stats, the catch-up queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from eagle2_kernels import ops
from eagle2_kernels.models.target import DecodeContext

__all__ = ["Pending", "Sizer", "Verified", "Accepted", "prefill", "catch_up", "dense_step", "draft_tree",
           "verify", "accept", "catchup_pairs", "plain_step"]

# step(j, feats [B, K, F], tokens [B, K], mask [B, K, words]) -> draft hidden states [B, K, H]
StepFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------- prefill
@torch.no_grad()
def prefill(state, req) -> tuple[torch.Tensor, torch.Tensor]:
    """One target forward over the prompts: (first token [B], features [B, L, F]).

    Prompts of different lengths are right-padded: causal attention keeps each valid position
    blind to the padding after it, and the cache lengths then drop the padding's KV.
    """
    tc, dc, ad = state.tcache, state.dcache, state.adapter
    input_ids, lengths = req.input_ids, req.lengths
    batch, length = input_ids.shape
    tc.set_length(0)
    if dc is not None:
        dc.set_length(0)
    ctx = DecodeContext(tc, 0, None, length, state.config.backend)
    last = torch.tensor(lengths, device=input_ids.device) - 1
    keep = 1 if not req.ragged else torch.unique(last)
    logits, feats = ad.forward(input_ids, state.positions[:length].expand(batch, length), ctx, logits_to_keep=keep)
    tc.set_lengths(lengths)
    if req.ragged:  # row b's last prompt position among the kept ones
        logits = logits[torch.arange(batch, device=logits.device), torch.searchsorted(keep, last)][:, None]
    return state.pick(logits[:, -1], req.sampling, req.generator), feats


def prompt_pairs(req, root: torch.Tensor, feats: torch.Tensor) -> "Pending":
    """The draft's first catch-up: pairs (f_t, x_{t+1}), t = 1..L (row b: its own L), the
    last one's token being the first committed token ``root``."""
    input_ids, lengths = req.input_ids, req.lengths
    batch = input_ids.shape[0]
    last = torch.tensor(lengths, device=input_ids.device) - 1
    pending = Pending(batch)
    nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    nxt.scatter_(1, last.view(batch, 1), root.view(batch, 1))
    pending.add(feats, nxt, lengths)
    return pending


# ---------------------------------------------------------------------------------- catch-up
class Pending:
    """Catch-up pairs the draft has not seen yet, in chunks (a tree round's accepted path, the
    plain steps after it). ``take`` joins them so each sequence's valid rows come first."""

    def __init__(self, batch: int):
        self.batch = batch
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []

    def add(self, feats: torch.Tensor, tokens: torch.Tensor, counts: list[int]) -> None:
        """feats [B, r, F], tokens [B, r]; sequence b has ``counts[b]`` valid leading rows."""
        self.chunks.append((feats, tokens, list(counts)))

    def take(self, active: list[bool]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(feats [B, n, F], tokens [B, n], valid rows per sequence; 0 for stopped ones)."""
        chunks, self.chunks = self.chunks, []
        totals = [sum(c[2][b] for c in chunks) if active[b] else 0 for b in range(self.batch)]
        if len(chunks) == 1:
            return chunks[0][0], chunks[0][1], totals
        feats = torch.cat([c[0] for c in chunks], dim=1)
        tokens = torch.cat([c[1] for c in chunks], dim=1)
        widths = [c[1].shape[1] for c in chunks]
        if all(c[2][b] == w for c, w in zip(chunks, widths) for b in range(self.batch)):
            return feats, tokens, totals
        # Ragged: gather each sequence's valid rows to the front (padding repeats its last one).
        n = max(max(totals), 1)
        index = torch.zeros(self.batch, n, dtype=torch.int64)
        for b in range(self.batch):
            rows, offset = [], 0
            for c, w in zip(chunks, widths):
                if active[b]:  # a stopped sequence's rows are dropped (its total is 0)
                    rows.extend(range(offset, offset + c[2][b]))
                offset += w
            rows = rows or [0]
            index[b] = torch.tensor(rows + [rows[-1]] * (n - len(rows)))
        index = index.to(tokens.device)
        feats = feats.gather(1, index[:, :, None].expand(self.batch, n, feats.shape[-1]))
        return feats, tokens.gather(1, index), totals


@torch.no_grad()
def catch_up(state, pending: Pending, active: list[bool], first: bool) -> tuple[torch.Tensor, int, list[int]]:
    """The draft head over the pending pairs: (draft feature of each sequence's last committed
    token [B, 1, H], rows run, the draft cache's new host lengths). Rows past a sequence's own
    count are padding: later slots, never visible; stopped sequences keep their lengths."""
    head, dc, consts = state.head, state.dcache, state.consts
    stable = dc.host_lengths
    feats, tokens, counts = pending.take(active)
    batch, n = tokens.shape
    if first:
        hs = head.prefill(feats, tokens, dc)
    else:
        mask = consts.chain_mask(n).unsqueeze(0).expand(batch, n, -1)
        positions = dc.lengths[:, None].to(torch.int64) + state.positions[:n]
        hs = head.tree_step(feats, tokens, positions, dc, stable, mask, n, consts.backend, from_target=True)
    last = torch.tensor([max(c - 1, 0) for c in counts], device=hs.device)
    h_parent = hs.gather(1, last.view(batch, 1, 1).expand(batch, 1, hs.shape[-1]))
    stable = [s + c for s, c in zip(stable, counts)]
    dc.set_lengths(stable)
    return h_parent, n, stable


# ---------------------------------------------------------------------------------- draft
def dense_step(head, dcache, level_slots, backend) -> StepFn:
    """The expansion step over a dense draft cache: level j writes its K rows at
    ``level_slots(j)`` (a host list in the dynamic round, a device tensor in the static one)
    and sees the cache plus its own ancestors (``mask``)."""
    rows = dcache.lengths[:, None].to(torch.int64)  # draft position of the root, per sequence

    def step(j, feats, tokens, mask):
        positions = (rows + (j - 1)).expand(tokens.shape)
        return head.tree_step(feats, tokens, positions, dcache, level_slots(j), mask, j * tokens.shape[1], backend)

    return step


@torch.no_grad()
def draft_tree(head, consts, h_parent, root, step: StepFn, size, lookup=None):
    """Root expansion, the expansion levels and ``tree_build``: the draft tree of a round.

    ``h_parent`` [B, 1, H] is the draft feature of each sequence's last committed token and
    ``root`` [B] that token. ``size`` is T (nodes, root included: up to ``consts.depth``
    levels, shapes fixed by the constants alone, which the static round captures) or a
    :class:`Sizer` (the adaptive round: it sees each level's scores on the host, decides
    whether to expand further and how many nodes to keep, and may choose none). ``lookup`` (a
    ``runtime.lookup.LookupRound``) merges the context's continuations into the candidates
    before the sizing and the build.

    Returns (DraftTree or None for "verify no draft: a plain step", candidate scores [B, C]).
    """
    K, D, backend = consts.top_k, consts.depth, consts.backend
    sizer = size if isinstance(size, Sizer) else None
    d2t = head.draft_to_target
    batch, hidden = h_parent.shape[0], h_parent.shape[-1]
    ct, cs, ni, ns = ops.tree_expand(head.logits(h_parent), consts.zero_scores, K, d2t, backend=backend)
    cand_tokens, cand_scores, cand_parents = [ct.view(batch, K)], [cs.view(batch, K)], [consts.root_parent]
    f_tokens, f_index, f_scores = ct.view(batch, K).gather(1, ni), ni, ns
    f_feats, f_mask = h_parent.expand(batch, K, hidden), consts.own_bits[0]
    if sizer is not None and lookup is not None:
        sizer.seed(lookup.seed_scores)  # the expansion decisions see the lookup's nodes too
    j = 1
    while j <= D and (sizer is None or sizer.keep_going(cand_scores[-1], f_scores, j - 1)):
        hs = step(j, f_feats, f_tokens, f_mask)
        ct, cs, ni, ns = ops.tree_expand(head.logits(hs), f_scores, K, d2t, backend=backend)
        cand_tokens.append(ct.view(batch, K * K))
        cand_scores.append(cs.view(batch, K * K))
        cand_parents.append(f_index.repeat_interleave(K, dim=1))
        if j < D:
            rows = ni // K  # frontier row that is each new frontier node's parent
            f_tokens = ct.view(batch, K * K).gather(1, ni)
            f_index, f_scores = ni + K + (j - 1) * K * K, ns
            f_feats = hs.gather(1, rows[:, :, None].expand(batch, K, hidden))
            f_mask = f_mask.gather(1, rows[:, :, None].expand(batch, K, f_mask.shape[-1])) | consts.own_bits[j]
        j += 1
    tokens, scores, parents = torch.cat(cand_tokens, 1), torch.cat(cand_scores, 1), torch.cat(cand_parents, 1)
    if lookup is not None:
        # The context's continuations join the candidates here, before the size and the
        # tree are chosen. Like the head's, they come from draft-side information only
        # (committed tokens, earlier rounds' outcomes): the tree is fixed before the target
        # sees it, so greedy and sampled acceptance stay lossless.
        tokens, scores, parents = lookup.merge(tokens, scores, parents, batch, scores.device)
    T = size
    if sizer is not None:
        T = sizer.size(cand_scores[-1], j - 1, merged=None if lookup is None else lookup.scores)
        if T is None:
            return None, scores
    tree = ops.tree_build(tokens, scores, parents, root, T, backend=backend, error_flag=consts.error_flag)
    return tree, scores


class Sizer:
    """Host side of one adaptive round: collects each level's candidate scores, asks the
    :class:`~eagle2_kernels.runtime.policy.RoundPolicy` whether to expand further and how
    many nodes to verify, and after verification reports predicted vs accepted nodes. The
    draft seconds it charges come from the cost model (so the choice is reproducible), not
    from a clock."""

    def __init__(self, policy, catchup_rows: int, prefix: int, active: list[bool]):
        self.policy = policy
        self.base_s = policy.costs.draft(catchup_rows)  # catch-up forward + root expansion
        self.prefix = prefix
        self.active = [b for b, a in enumerate(active) if a]
        self.scores: list[list[float]] = [[] for _ in active]  # candidate order, as tree_build
        self.levels_absorbed = 0
        self.n = 0

    def _absorb(self, level_scores: torch.Tensor) -> None:
        rows = level_scores.tolist()
        for b in self.active:
            self.scores[b].extend(rows[b])
        self.levels_absorbed += 1

    def seed(self, rows: list[list[float]]) -> None:
        """Extra candidate scores per sequence known before the expansion (context lookup)."""
        for b in self.active:
            self.scores[b].extend(rows[b])

    def _draft_s(self, levels: int) -> float:
        return self.base_s + levels * self.policy.step_seconds(self.policy.top_k)

    def _top(self) -> list[list[float]]:
        from eagle2_kernels.runtime.policy import top_probs

        return top_probs([self.scores[b] for b in self.active], self.policy.max_nodes)

    def keep_going(self, level_scores, frontier_scores, levels_done: int) -> bool:
        self._absorb(level_scores)
        f = frontier_scores.tolist()
        mass = sum(math.exp(x) for b in self.active for x in f[b])
        return self.policy.keep_expanding(self._top(), mass, self._draft_s(levels_done), levels_done, self.prefix)

    def size(self, level_scores, levels_done: int, merged: list[list[float]] | None = None) -> int | None:
        """T for tree_build (n + 1), or None for a plain step. ``merged``: the final candidate
        scores per sequence (in candidate order) when lookup changed the head's set."""
        if merged is not None:
            self.scores = [list(row) for row in merged]
            self.levels_absorbed = levels_done + 1
        if self.levels_absorbed < levels_done + 1:
            self._absorb(level_scores)
        choice = self.policy.choose(self._top(), self._draft_s(levels_done), self.prefix, levels_done)
        self.n = choice.n
        return None if choice.n == 0 else choice.n + 1

    def record(self, stats, paths: list[list[int] | None]) -> None:
        """``paths[b]``: accepted drafted node indices of sequence b (root excluded)."""
        predicted, accepted = 0.0, 0
        for b in self.active:
            if paths[b] is None:
                continue
            row = self.scores[b]
            # tree_build keeps the n best (ties: lower index) and numbers them in candidate order.
            kept = sorted(sorted(range(len(row)), key=lambda i: (-row[i], i))[: self.n])
            on_path = set(paths[b])
            for node, c in enumerate(kept, start=1):
                p = math.exp(row[c])
                predicted += p
                stats.reliability.add(p, node in on_path)
            accepted += len(paths[b])
        self.policy.record(predicted, accepted)


# ---------------------------------------------------------------------------------- verify
@dataclass
class Verified:
    """A verified tree: target features [B, T, F], the accepted path [B, P] (node indices,
    -1 padded), accept lengths [B] (root included), bonus tokens [B], and the target cache's
    host lengths before the round."""

    tree: object
    feats: torch.Tensor
    path: torch.Tensor
    alen: torch.Tensor
    bonus: torch.Tensor
    prefix: list[int]


@torch.no_grad()
def verify(state, tree, sampling, generator) -> Verified:
    """One target forward over ``tree`` (its KV written past each prefix) and acceptance."""
    tc, ad, backend = state.tcache, state.adapter, state.config.backend
    batch, T = tree.tokens.shape
    prefix = tc.host_lengths
    ctx = DecodeContext(tc, prefix[0] if batch == 1 else prefix, tree.mask, T, backend)
    positions = tree.depth.to(torch.int64) + tc.lengths[:, None]
    logits, feats = ad.forward(tree.tokens, positions, ctx)
    if sampling.greedy:
        path, alen, bonus = ops.verify_greedy(tree, logits, backend=backend)
    else:
        uniforms = state.uniforms((batch, T), generator)
        path, alen, bonus = ops.verify_sample(tree, logits, uniforms, *sampling.as_tuple(), backend=backend)
    return Verified(tree, feats, path, alen, bonus, prefix)


@dataclass
class Accepted:
    """The host's view of a verified round: per sequence the proposed tokens (accepted path
    after the root, then the bonus), the accepted drafted node indices (None for a stopped
    sequence) and the accept lengths; and the path's tokens [B, P] on the device."""

    proposals: list[list[int]]
    paths: list[list[int] | None]
    counts: list[int]
    path_tokens: torch.Tensor


def accept(state, v: Verified, active: list[bool]) -> Accepted:
    """Compact the accepted path's KV to the front of the tree slots, read the round's outcome
    in one host transfer, and advance the target cache's lengths (a stopped sequence keeps its
    length: its tokens are discarded)."""
    tc, batch = state.tcache, v.path.shape[0]
    tc.compact(v.path, v.alen, backend=state.config.backend)
    path_tokens = v.tree.tokens.gather(1, v.path.clamp(min=0))
    P = v.path.shape[1]
    packed = torch.cat([v.alen.view(batch, 1), v.bonus.view(batch, 1), path_tokens, v.path], dim=1).tolist()
    counts = [row[0] for row in packed]
    tc.set_lengths([p + (c if active[b] else 0) for b, (p, c) in enumerate(zip(v.prefix, counts))])
    proposals = [row[3 : 2 + row[0]] + [row[1]] for row in packed]
    paths = [row[2 + P + 1 : 2 + P + row[0]] if active[b] else None for b, row in enumerate(packed)]
    return Accepted(proposals, paths, counts, path_tokens)


def catchup_pairs(v: Verified, acc: Accepted) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The next catch-up's pairs: (feature of path node i, the token after it), i < accept
    length; the token after the deepest node is the bonus."""
    batch = v.path.shape[0]
    a_max = max(acc.counts)
    sel = v.path[:, :a_max].clamp(min=0)
    toks = torch.cat([acc.path_tokens[:, 1:], acc.path_tokens[:, :1]], dim=1)
    toks.scatter_(1, (v.alen - 1).view(batch, 1), v.bonus.view(batch, 1))
    feats = v.feats.gather(1, sel[:, :, None].expand(batch, a_max, v.feats.shape[-1]))
    return feats, toks[:, :a_max], acc.counts


@torch.no_grad()
def plain_step(state, token: torch.Tensor, active: list[bool], sampling, generator):
    """The target over one token per sequence: (next token [B], features [B, 1, F], rows
    committed per sequence: 1, or 0 for a stopped one, whose step is recomputed and discarded)."""
    tc, ad = state.tcache, state.adapter
    batch = token.shape[0]
    prefix = tc.host_lengths
    ctx = DecodeContext(tc, prefix[0] if batch == 1 else prefix, state.consts.one_mask, 1, state.config.backend)
    logits, feats = ad.forward(token.view(batch, 1), tc.lengths.to(torch.int64).view(batch, 1), ctx)
    counts = [1 if a else 0 for a in active]
    tc.set_lengths([p + c for p, c in zip(prefix, counts)])
    return state.pick(logits[:, -1], sampling, generator), feats, counts
