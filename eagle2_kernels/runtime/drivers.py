"""The decoding loops: short drivers over the round's phases (``runtime/phases.py``).

    plain_rounds    one target forward per token (``generate_plain``)
    tree_rounds     the dynamic round: catch-up, draft_tree, verify, accept, commit
    static_rounds   the static-shape round (``runtime/graphs.py``): device-side lengths, no
                    host reads inside a round; the host reads each round's record

Each is a generator yielding, per round, one list of committed token ids per sequence.
Sequences of a batch advance in lockstep; one that has stopped (EOS or budget) keeps riding
along with frozen cache lengths and its tokens are discarded. The per-call mutable bookkeeping
(budgets, which sequences are active, stats, the lookup context) lives in :class:`Run`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from eagle2_kernels.runtime.phases import (Sizer, accept, catch_up, catchup_pairs, dense_step, draft_tree,
                                           plain_step, verify)
from eagle2_kernels.runtime.lookup import NO_CATCHUP, size_alone, verify_alone
from eagle2_kernels.runtime.request import Request, cut
from eagle2_kernels.runtime.stats import DecodeStats

__all__ = ["Run", "StaticCalls", "plain_rounds", "tree_rounds", "static_rounds", "plain_round", "check_epoch"]


@dataclass
class Run:
    """One call's host bookkeeping: its request, stats and epoch (see ``DecodeState.epoch``),
    each sequence's remaining budget and whether it still generates, and the context lookup
    (``runtime/lookup.py``) that sees every committed chunk."""

    req: Request
    stats: DecodeStats
    epoch: int
    active: list[bool] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    lookup: object | None = None

    def __post_init__(self):
        self.active = self.active or [True] * self.req.batch
        self.budgets = self.budgets or [self.req.max_new_tokens] * self.req.batch

    def commit(self, proposals: list[list[int]]) -> list[list[int]]:
        """Cut each active sequence's proposed tokens (EOS, budget); record the round."""
        chunks, total = [], 0
        for b, tokens in enumerate(proposals):
            if not self.active[b]:
                chunks.append([])
                continue
            chunk, done = cut(tokens, self.budgets[b], self.req.eos)
            self.budgets[b] -= len(chunk)
            self.active[b] = not done
            total += len(chunk)
            chunks.append(chunk)
        self.stats.record(total)
        if self.lookup is not None:
            self.lookup.extend(chunks)  # the context the next lookup searches
        return chunks


def check_epoch(state, run: Run) -> None:
    if run.epoch != state.epoch:
        raise RuntimeError(
            "this stream was overtaken: another generate/stream call on the same decoder ran "
            "while it was suspended and reused its caches; consume one stream at a time"
        )


def plain_round(state, run: Run, token: torch.Tensor, pending=None):
    """One plain step. Inside the speculative loop (``pending`` given) its pair (feature of
    the token, next token) joins the draft's catch-up and it counts as a round of one node.
    Yields the round's chunks; returns the next token."""
    t0 = time.perf_counter()
    req, stats = run.req, run.stats
    token, feats, counts = plain_step(state, token, run.active, req.sampling, req.generator)
    if pending is not None:
        pending.add(feats, token.view(-1, 1), counts)
        stats.tree_sizes.append(1)
    t1 = time.perf_counter()
    stats.verify_s += t1 - t0
    chunks = run.commit([[t] for t in token.tolist()])
    stats.other_s += time.perf_counter() - t1
    yield chunks
    return token


def plain_rounds(state, run: Run, token: torch.Tensor):
    """Plain decoding after the prefill: one target forward per token, same cache path."""
    while any(run.active):
        check_epoch(state, run)
        token = yield from plain_round(state, run, token)


def backoff_round(state, run: Run, root: torch.Tensor, pending, policy):
    """One round while the policy backs off from drafting with the head: the lookup's
    continuations verified alone when the cost model says they pay (sized from lookup scores
    and measured costs only, so the tree is fixed before the target sees it: lossless), else a
    plain step. Yields the round's chunks; returns the next root."""
    lookup = run.lookup
    if lookup is not None:
        t0 = time.perf_counter()
        rnd = lookup.begin_round(run.active)
        choice = None
        if not rnd.empty:
            rnd.merge(None, None, None, root.shape[0], "cpu")
            choice = size_alone(rnd, policy.costs, state.config.total_tokens - 1, max(state.tcache.host_lengths),
                                run.active)
        run.stats.draft_s += time.perf_counter() - t0
        if choice is not None and choice.n > 0:
            root = yield from verify_alone(state, run, rnd, choice.n, root, pending)
            policy.take_lookup_round(choice)
            return root
    stats = run.stats
    before = stats.verify_s + stats.other_s  # the step's own time, not its consumer's
    root = yield from plain_round(state, run, root, pending)
    policy.take_plain_step()
    policy.observe("plain", stats.verify_s + stats.other_s - before,
                   policy.costs.target(1, max(state.tcache.host_lengths)))
    return root


def tree_rounds(state, run: Run, root: torch.Tensor, pending, policy=None):
    """The dynamic round with a draft head: catch-up, draft tree (sized by ``policy`` when
    adaptive, merged with the context's continuations when lookup is on), verify, accept,
    commit. A round the policy finds not worth drafting is a plain step."""
    req, stats, lookup = run.req, run.stats, run.lookup
    first = True
    while any(run.active):
        check_epoch(state, run)
        if policy is not None and policy.plain_due > 0:
            # Backoff: drafting with the head has not paid lately. A round of the context's
            # continuations alone where they pay (no head forward), else a plain step; the
            # pairs either commits wait for the next catch-up, which takes them all in one
            # draft forward.
            root = yield from backoff_round(state, run, root, pending, policy)
            continue
        t0 = time.perf_counter()
        lround = lookup.begin_round(run.active) if lookup is not None else None
        h_parent, n, stable = catch_up(state, pending, run.active, first)
        first = False
        K = state.config.top_k
        step = dense_step(state.head, state.dcache, lambda j: [s + (j - 1) * K for s in stable], state.config.backend)
        size = state.config.total_tokens
        if policy is not None:
            size = Sizer(policy, n, max(state.tcache.host_lengths), run.active)
        tree, _ = draft_tree(state.head, state.consts, h_parent, root, step, size, lround)
        state.sync()
        t1 = time.perf_counter()
        stats.draft_s += t1 - t0
        if tree is None:  # the policy chose n = 0: verifying any draft would not pay
            root = yield from plain_round(state, run, root, pending)
            continue
        v = verify(state, tree, req.sampling, req.generator)
        state.sync()
        t2 = time.perf_counter()
        stats.verify_s += t2 - t1
        acc = accept(state, v, run.active)
        T = tree.tokens.shape[1]
        if policy is not None:
            size.record(stats, acc.paths)
        if lround is not None:
            lookup.record(lround, acc.paths, T, stats)  # counts accepted nodes by source
        else:
            stats.head_tokens += sum(len(p) for p in acc.paths if p)
        chunks = run.commit(acc.proposals)
        stats.tree_sizes.append(T)
        if any(run.active):
            pending.add(*catchup_pairs(v, acc))
            root = v.bonus.view(-1)
        t3 = time.perf_counter()
        stats.other_s += t3 - t2
        if policy is not None and policy.last_choice is not None:
            policy.observe("round", t3 - t0, policy.last_choice.seconds)
        yield chunks


def lookup_rounds(state, run, root: torch.Tensor, costs=None):
    """Decoding rounds with lookup trees alone (a target with no draft head).

    Each round: search the context, score the continuations, pick the tree size (``costs``
    given, adaptive: the n best candidates that maximise predicted tokens per second under the
    cost model, n = 0 being a plain step; else up to T - 1 candidates), verify, commit. Yields
    each round's committed chunks, as the other drivers (``runtime/drivers.py``) do.
    """
    n_max = state.config.total_tokens - 1
    while any(run.active):
        check_epoch(state, run)
        t0 = time.perf_counter()
        rnd = run.lookup.begin_round(run.active)
        n = 0
        if not rnd.empty:
            rnd.merge(None, None, None, root.shape[0], "cpu")
            if costs is None:
                n = min(n_max, max(len(t) for t in rnd.tokens))
            else:
                # The size reads only lookup scores and measured costs (no target output of
                # this round), so the tree is fixed before verification: lossless.
                n = size_alone(rnd, costs, n_max, max(state.tcache.host_lengths), run.active).n
        run.stats.draft_s += time.perf_counter() - t0
        if n == 0:
            root = yield from plain_round(state, run, root, NO_CATCHUP)  # a round of one node
        else:
            root = yield from verify_alone(state, run, rnd, n, root)


# ---------------------------------------------------------------------------------- static round
class StaticCalls:
    """The static round across the calls of one decoder: a ``StaticRound`` per (batch, T) with
    its buffers and captured graphs, the one the last call used (``last``), the draft's
    confidence profile per batch size (read after each call, sizes the next one) and
    ``read_lag``, which overrides how many rounds the host reads behind the device (tests run
    the lagged CUDA order on CPU)."""

    # Tree sizes the static round captures graphs for (each its own StaticRound).
    BUCKETS = (2, 4, 8, 16, 32, 60)

    def __init__(self):
        self.rounds: dict[tuple[int, int], object] = {}
        self.last = None
        self.profile: dict[int, list[float]] = {}
        self.read_lag: int | None = None

    def round_for(self, state, batch: int, total_tokens: int):
        from eagle2_kernels.runtime.graphs import StaticRound

        sr = self.rounds.get((batch, total_tokens))
        if sr is None or sr.tcache is not state.tcache or sr.dcache is not state.dcache:
            sr = self.rounds[(batch, total_tokens)] = StaticRound(state, batch, total_tokens)
        self.last = sr
        return sr

    def tree_size(self, config, batch: int, costs) -> int:
        """T of a static call. Fixed shapes: the config's. Adaptive: the size bucket that the
        cost model (``costs(batch)``) and the draft's confidence profile of earlier static calls
        predict to be fastest; the config's T until one exists. The choice reads nothing of this
        call's target outputs, so acceptance stays lossless."""
        profile = self.profile.get(batch)
        if not config.adaptive or profile is None:
            return config.total_tokens
        from eagle2_kernels.runtime.policy import predicted_rates

        sizes = sorted({t for t in self.BUCKETS if t < config.total_tokens} | {config.total_tokens})
        rates = predicted_rates(profile, costs(batch), config.depth, catchup_rows=min(config.depth + 2, 8))
        return max(sizes, key=lambda t: rates[min(t - 1, len(rates) - 1)][2])

    def clear(self) -> None:
        self.rounds, self.last = {}, None


class _StaticLoop:
    """Host side of the static rounds of one call: launches each round's two phases, and reads
    each round's packed record ``lag`` rounds late (1 on CUDA: round r+1 is launched before
    round r's record is read, so the device never waits for Python; 0 on CPU, where the phases
    run synchronously anyway)."""

    def __init__(self, state, run: Run, calls: StaticCalls, feats, root, costs):
        t0 = time.perf_counter()
        req, dev = run.req, state.device
        batch, length = req.input_ids.shape
        with torch.no_grad():
            # The draft catches up on the prompt's pairs but the last, (f_L, root): that one is
            # the first round's (padded) catch-up, so every round has the same shape. Rows of
            # shorter prompts hold padding after their own L - 1 pairs (then cut by the length).
            if length > 1:
                state.head.prefill(feats[:, : length - 1], req.input_ids[:, 1:], state.dcache)
            state.dcache.set_lengths([n - 1 for n in req.lengths])
            feat_last = feats[torch.arange(batch, device=dev), torch.tensor(req.lengths, device=dev) - 1]
        sr = self.sr = calls.round_for(state, batch, calls.tree_size(state.config, batch, costs))
        sr.profile_sum.zero_()
        sr.profile_rounds.zero_()
        sr.set_sampling(*req.sampling.as_tuple())
        sr.start(root, feat_last, torch.tensor(run.budgets), req.eos, torch.tensor(run.active, device=dev))
        self.cuda = cuda = dev.type == "cuda"
        if cuda and state.config.cuda_graphs is not False and not sr.graphs and sr.graph_error is None:
            sr.enable_graphs()
        self.state, self.run, self.calls = state, run, calls
        self.lag = calls.read_lag if calls.read_lag is not None else (1 if cuda else 0)
        self.host = torch.empty((2, batch, sr.record.shape[1]), dtype=torch.int64, pin_memory=cuda)
        self.pinned_u = torch.empty((2, batch, sr.T), dtype=torch.float32, pin_memory=cuda)
        self.u_done: list = [None, None]
        self.queue: list[tuple[int, object]] = []
        self.events: list[tuple] = []
        # Events record on the target's stream: a bare record() would use the *current*
        # device's stream, and for a target on cuda:1 the host could read a stale record.
        self.stream = torch.cuda.current_stream(dev) if cuda else None
        run.stats.other_s += time.perf_counter() - t0

    def _draws(self, r: int) -> None:
        sr, req = self.sr, self.run.req
        gen = req.generator
        shape = (req.batch, sr.T)
        if self.cuda and gen is not None and gen.device.type == "cpu":
            # A CPU generator: draw into pinned memory and copy asynchronously (a pageable
            # copy would wait for the device and end the overlap).
            u = self.pinned_u[r % 2]
            if self.u_done[r % 2] is not None:
                self.u_done[r % 2].synchronize()  # its copy two rounds ago has finished
            torch.rand(shape, generator=gen, out=u)
            sr.uniforms.copy_(u, non_blocking=True)
            self.u_done[r % 2] = torch.cuda.Event()
            self.u_done[r % 2].record(self.stream)
        else:
            sr.uniforms.copy_(self.state.uniforms(shape, gen))

    def launch(self, r: int) -> None:
        sr, stats = self.sr, self.run.stats
        t0 = time.perf_counter()
        if not self.run.req.sampling.greedy:
            self._draws(r)
        if self.cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record(self.stream)
            sr.run_draft()
            marks[1].record(self.stream)
            sr.run_verify()
            marks[2].record(self.stream)
            self.events.append(marks)
            self.host[r % 2].copy_(sr.record, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
            self.queue.append((r % 2, done))
            stats.other_s += time.perf_counter() - t0
        else:
            sr.run_draft()
            t1 = time.perf_counter()
            sr.run_verify()
            t2 = time.perf_counter()
            stats.draft_s += t1 - t0
            stats.verify_s += t2 - t1
            self.host[r % 2].copy_(sr.record)
            self.queue.append((r % 2, None))

    def read(self) -> list[list[int]]:
        """The oldest launched round's committed chunks (its record read on the host)."""
        t0 = time.perf_counter()
        run = self.run
        slot, done = self.queue.pop(0)
        if done is not None:
            done.synchronize()
        chunks = []
        for b, row in enumerate(self.host[slot].tolist()):
            n, still, err = row[0], row[1], row[2]
            if err:
                raise ValueError(
                    f"tree_build reported error code {err} for sequence {b} (a kept draft candidate's "
                    f"parent was dropped or invalid); the draft scores are not log-probabilities of paths"
                )
            chunks.append(row[3 : 3 + n] if run.active[b] else [])
            run.budgets[b] -= n
            run.active[b] = bool(still) and run.active[b]
        run.stats.record(sum(len(c) for c in chunks))
        run.stats.tree_sizes.append(self.sr.T)
        run.stats.other_s += time.perf_counter() - t0
        return chunks

    def finish(self) -> None:
        sr, stats = self.sr, self.run.stats
        if self.cuda and self.events:
            torch.cuda.synchronize(self.state.device)
            stats.draft_s += sum(a.elapsed_time(b) for a, b, _ in self.events) / 1e3
            stats.verify_s += sum(b.elapsed_time(c) for _, b, c in self.events) / 1e3
        # The draft's confidence this call (one read, after the rounds): sizes the next call.
        rounds = float(sr.profile_rounds)
        if rounds > 0:
            self.calls.profile[self.run.req.batch] = (sr.profile_sum / rounds).tolist()


def static_rounds(state, run: Run, calls: StaticCalls, feats: torch.Tensor, root: torch.Tensor, costs):
    """Rounds over static buffers (runtime/graphs.py): no host reads inside a round; the
    host reads each round's packed record one round late on CUDA (pinned copy + event)."""
    if not any(run.active):
        return
    loop = _StaticLoop(state, run, calls, feats, root, costs)
    r = 0
    try:
        while True:
            check_epoch(state, run)
            loop.launch(r)
            r += 1
            if len(loop.queue) <= loop.lag:
                continue
            yield loop.read()
            if not any(run.active):
                break
    finally:
        loop.finish()
