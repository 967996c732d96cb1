"""The static-shape decoding round: the GPU path, with optional CUDA graphs.

A round is split into two phase functions over preallocated buffers (``StaticRound``):

    draft_phase    catch-up over the last round's pairs, padded to P = min(T, D + 2) rows with
                   a device-side count; root expansion; D expansions; tree_build (errors go to
                   a device flag, not an exception)
    verify_phase   target forward over the T tree nodes; verify_greedy / verify_sample;
                   kv_compact; the committed tokens cut at EOS and the token budget ON THE
                   DEVICE; next root, next catch-up inputs, device-side length updates

Neither phase reads a device value on the host, takes a branch on one, or changes a shape
with the data: every shape depends only on (B, T, D, K), lengths live in the caches' device
``lengths`` tensors, and stopped sequences are frozen by a device-side ``active`` mask. So on a
CUDA target each phase is captured once as a CUDA graph (per batch size and sampling
parameters) and replayed every round; the host only copies a small packed record of the round
(committed count, tokens, active flag, tree error code) into pinned memory and reads it one
round later, after an event, for streaming, EOS and ``max_new_tokens``.

On CPU the same functions run eagerly (``DecodeConfig(static_round=True)``), which is how the
path is tested without a GPU. The ops' CPU backends (reference / native) may read values on
the host inside an op; the Triton kernels used on CUDA do not.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from eagle2_kernels import ops
from eagle2_kernels._backend import device_guard
from eagle2_kernels.models.target import DecodeContext
from eagle2_kernels.runtime.phases import dense_step, draft_tree

__all__ = ["StaticRound", "PlainStep", "graphs_supported"]


def graphs_supported(device: torch.device) -> tuple[bool, str]:
    """Whether CUDA graphs can be used on ``device``: (ok, reason when not)."""
    if device.type != "cuda":
        return False, f"CUDA graphs need a CUDA device, the target is on {device}"
    if not torch.cuda.is_available():
        return False, "torch.cuda is not available"
    return True, ""


class _Captured:
    """A CUDA graph around a zero-argument function, or the function itself (eager)."""

    def __init__(self, fn, graph=None):
        self.fn, self.graph = fn, graph

    def __call__(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


class StaticRound:
    """Static buffers and the two phase functions of one EAGLE-2 round for batch size B.

    Built by the decoder over its caches (target ``tcache`` [2*layers, B, Hkv, Lmax, Dh] and
    draft ``dcache``, both with device ``lengths`` [B] int32). Buffers (all on the device):

        root          [B] int64      the next root (last committed token)
        pend_feats    [B, P, H]      target features of the pairs the draft must catch up on
        pend_tokens   [B, P] int64   the token after each of those features
        pend_n        [B] int64      valid catch-up rows per sequence (0 for stopped ones)
        active        [B] bool       sequence still generating
        budget        [B] int64      tokens it may still emit
        eos           [E] int64      stop ids (-1 = none)
        uniforms      [B, T] float32 the sampling draws of the round (filled before verify)
        record        [B, 3 + P] int64  per round: committed count, active, tree error, tokens

    Args:
        state: the decoder's :class:`~eagle2_kernels.runtime.state.DecodeState` (adapter, head,
            config, caches and constants; ``ensure``-d for ``batch``).
        batch: B.
        total_tokens: T (default: the config's).

    The sampling parameters baked into the verify phase are set with :meth:`set_sampling`
    (default greedy); each setting gets its own verify graph.
    """

    def __init__(self, state, batch: int, total_tokens: int | None = None):
        cfg = state.config
        self.state = state
        self.batch = batch
        # T of this round: the config's, or a smaller size bucket the adaptive policy chose
        # for this call (each bucket is its own StaticRound, with its own captured graphs).
        self.T, self.D, self.K = total_tokens or cfg.total_tokens, cfg.depth, cfg.top_k
        self.P = min(self.T, self.D + 2)  # longest accepted path = catch-up rows
        self.backend = cfg.backend
        self.tcache, self.dcache = state.tcache, state.dcache
        ad, head = state.adapter, state.head
        dev, dtype = ad.device, ad.dtype
        self.device = dev
        B, P, T = batch, self.P, self.T
        H = head.target_feature_size
        self.root = torch.zeros(B, dtype=torch.int64, device=dev)
        self.pend_feats = torch.zeros(B, P, H, dtype=dtype, device=dev)
        self.pend_tokens = torch.zeros(B, P, dtype=torch.int64, device=dev)
        self.pend_n = torch.zeros(B, dtype=torch.int64, device=dev)
        self.active = torch.zeros(B, dtype=torch.bool, device=dev)
        self.budget = torch.zeros(B, dtype=torch.int64, device=dev)
        self.eos = torch.full((1,), -1, dtype=torch.int64, device=dev)
        self.uniforms = torch.zeros(B, T, dtype=torch.float32, device=dev)
        self.err = torch.zeros(B, dtype=torch.int32, device=dev)
        self.record = torch.zeros(B, 3 + P, dtype=torch.int64, device=dev)
        self.rows = torch.arange(P, dtype=torch.int64, device=dev)  # catch-up / path row index
        # Catch-up visibility: row i sees pending rows 0..i (padding rows come after the valid
        # ones, so a valid row never sees one).
        self.chain = state.consts.chain[:P].unsqueeze(0).expand(B, P, -1).contiguous()
        # The expansion's constants, with the tree_build error flag of this round's buffers.
        self.consts = dataclasses.replace(state.consts, error_flag=self.err)
        # The draft's confidence profile, accumulated on the device (no host read in a round):
        # sum over rounds and active sequences of the i-th best candidate's path probability,
        # i < the config's T - 1. The decoder reads it after the call to size the next one.
        self.profile_sum = torch.zeros(cfg.total_tokens - 1, dtype=torch.float32, device=dev)
        self.profile_rounds = torch.zeros((), dtype=torch.float32, device=dev)
        self.sampling = (0.0, 1.0, 0)
        self.tree = None
        self._draft = _Captured(self.draft_phase)
        self._verify: dict[tuple, _Captured] = {}
        self._pool = None
        self.graphs = False
        self.graph_error: str | None = None

    # ------------------------------------------------------------------ state
    def start(self, root: torch.Tensor, feat: torch.Tensor, budgets: torch.Tensor, eos: frozenset,
              active: torch.Tensor) -> None:
        """Set the state after the prefill: root [B] int64, last prompt feature feat [B, H],
        the tokens each sequence may still emit (budgets [B] int64), the stop ids, and which
        sequences go on (active [B] bool)."""
        self.root.copy_(root)
        self.pend_feats[:, 0].copy_(feat)
        self.pend_tokens.zero_()
        self.pend_tokens[:, 0].copy_(root)
        self.pend_n.fill_(1)
        self.active.copy_(active)
        self.budget.copy_(budgets)
        ids = sorted(eos) or [-1]
        if self.eos.numel() != len(ids):
            # The verify graphs read this tensor: a new size means new graphs.
            self.eos = torch.empty(len(ids), dtype=torch.int64, device=self.device)
            self._verify.clear()
        self.eos.copy_(torch.tensor(ids, dtype=torch.int64))
        self.err.zero_()

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.root, self.pend_feats, self.pend_tokens, self.pend_n, self.active, self.budget,
                self.err, self.record, self.tcache.lengths, self.dcache.lengths]

    # ------------------------------------------------------------------ the two phases
    def draft_phase(self) -> None:
        """Catch-up (padded), root expansion, D expansions, tree_build -> ``self.tree``.

        Reads root / pend_* and the draft cache; advances ``dcache.lengths`` by ``pend_n``.
        No host reads, no data-dependent Python control flow.
        """
        head, dc = self.state.head, self.dcache
        B, P, K = self.batch, self.P, self.K
        H, backend = head.hidden_size, self.backend
        with torch.no_grad():
            positions = dc.lengths[:, None].to(torch.int64) + self.rows
            hs = head.tree_step(self.pend_feats, self.pend_tokens, positions, dc, dc.lengths, self.chain, P, backend,
                                from_target=True)
            last = (self.pend_n - 1).clamp(min=0)
            h_parent = hs.gather(1, last.view(B, 1, 1).expand(B, 1, H))
            dc.lengths.add_(self.pend_n.to(torch.int32))
            step = dense_step(head, dc, lambda j: dc.lengths + (j - 1) * K, backend)
            self.tree, cand_scores = draft_tree(head, self.consts, h_parent, self.root, step, self.T)
            top = torch.topk(cand_scores.float(), self.profile_sum.shape[0], dim=1).values.exp()
            live = self.active.to(torch.float32)
            self.profile_sum.add_((top * live[:, None]).sum(0))
            self.profile_rounds.add_(live.sum())

    def verify_phase(self) -> None:
        """Target forward over ``self.tree``, acceptance, compaction, device-side commit.

        Writes ``record`` (count, active, error, tokens), the next root and catch-up inputs,
        and advances ``tcache.lengths`` and ``budget``; freezes sequences that stop.
        """
        tree, tc, ad = self.tree, self.tcache, self.state.adapter
        B, P, T = self.batch, self.P, self.T
        backend = self.backend
        temperature, top_p, top_k = self.sampling
        with torch.no_grad():
            positions = tree.depth.to(torch.int64) + tc.lengths[:, None]
            ctx = DecodeContext(tc, tc.lengths, tree.mask, T, backend)
            logits, feats = ad.forward(tree.tokens, positions, ctx)
            if temperature == 0.0:
                path, alen, bonus = ops.verify_greedy(tree, logits, backend=backend)
            else:
                path, alen, bonus = ops.verify_sample(
                    tree, logits, self.uniforms, temperature, top_p, top_k, backend=backend
                )
            tc.compact(path, alen, backend=backend)
            sel = path[:, :P].clamp(min=0)
            path_tokens = tree.tokens.gather(1, sel)  # [B, P]
            # Tokens this round proposes: the path after the root, then the bonus (row alen-1).
            toks = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], dim=1)
            toks.scatter_(1, (alen - 1).view(B, 1), bonus.view(B, 1))
            # Cut at the first EOS (kept) and at the budget, on the device.
            idx = self.rows.view(1, P)
            is_eos = (toks[:, :, None] == self.eos.view(1, 1, -1)).any(-1) & (idx < alen[:, None])
            first_eos = torch.where(is_eos.any(1), is_eos.to(torch.int64).argmax(1), P)
            was_active = self.active
            n = torch.minimum(torch.minimum(alen, first_eos + 1), self.budget)
            n = torch.where(was_active, n, torch.zeros_like(n))
            done = (first_eos < n) | (n >= self.budget)
            still = was_active & ~done
            self.budget.sub_(n)
            # Only sequences that go on advance (a stopped one keeps its cache lengths).
            adv = torch.where(still, alen, torch.zeros_like(alen))
            tc.lengths.add_(adv.to(torch.int32))
            self.pend_feats.copy_(feats.gather(1, sel[:, :, None].expand(B, P, feats.shape[-1])))
            self.pend_tokens.copy_(toks)
            self.pend_n.copy_(adv)
            self.root.copy_(bonus.view(B))
            self.active.copy_(still)
            self.record[:, 0].copy_(n)
            self.record[:, 1].copy_(still.to(torch.int64))
            self.record[:, 2].copy_(self.err.to(torch.int64))
            self.record[:, 3:].copy_(toks)

    # ------------------------------------------------------------------ driving
    def set_sampling(self, temperature: float, top_p: float, top_k: int) -> None:
        self.sampling = (float(temperature), float(top_p), int(top_k))

    def _verify_fn(self) -> _Captured:
        key = self.sampling
        fn = self._verify.get(key)
        if fn is None:
            fn = self._verify[key] = _Captured(self.verify_phase)
            if self.graphs:
                self._capture_verify(fn)
        return fn

    def run_draft(self) -> None:
        self._draft()

    def run_verify(self) -> None:
        self._verify_fn()()

    # ------------------------------------------------------------------ CUDA graphs
    def enable_graphs(self) -> bool:
        """Capture the draft phase (and, lazily, each verify phase) as CUDA graphs.

        Runs each phase twice eagerly on a side stream first (Triton compiles there), with the
        round state saved and restored around, so the decode state is unchanged. On failure
        the phases stay eager and ``graph_error`` says why (a warning is issued once).
        """
        ok, why = graphs_supported(self.device)
        if not ok:
            self.graph_error = why
            return False
        from eagle2_kernels._backend import forced_backend

        backend = self.backend or forced_backend()
        if backend in ("reference", "ext"):
            # Their CPU-style implementations read values on the host: not capturable.
            self._fail(RuntimeError(f"the {backend!r} ops backend reads device values on the host; "
                                    f"use the Triton backend (the CUDA default) for graphs"))
            return False
        try:
            with device_guard(self.device):
                self._pool = torch.cuda.graph_pool_handle()
            graph = self._capture(self.draft_phase, warm=lambda: (self.draft_phase(), self.verify_phase()))
            self._draft = _Captured(self.draft_phase, graph)
            self.graphs = True
        except Exception as exc:  # capture is best effort: the eager static path is exact too
            self._fail(exc)
            return False
        return True

    def _capture_verify(self, fn: _Captured) -> None:
        try:
            fn.graph = self._capture(self.verify_phase, warm=self.verify_phase)
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self.graphs = False
        self._draft = _Captured(self.draft_phase)
        self._verify.clear()
        self.graph_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"TreeSpecDecoder: CUDA graph capture failed, running the static round eagerly "
            f"(same output, more launch overhead). Reason: {self.graph_error}",
            RuntimeWarning,
            stacklevel=3,
        )

    def _capture(self, fn, warm):
        # On the target's device, whatever device is current (a target on cuda:1).
        with device_guard(self.device):
            return self._capture_here(fn, warm)

    def _capture_here(self, fn, warm):
        saved = [t.clone() for t in self.state_tensors()]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    warm()
                    for t, s in zip(self.state_tensors(), saved):
                        t.copy_(s)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # An explicit capture stream: torch.cuda.graph's default one is made once, on
            # whatever device was current at its first use.
            with torch.cuda.graph(graph, pool=self._pool, stream=torch.cuda.Stream(self.device)):
                fn()
            return graph
        finally:
            for t, s in zip(self.state_tensors(), saved):
                t.copy_(s)
            torch.cuda.synchronize(self.device)


class PlainStep:
    """Plain greedy decoding over the decoder's static target cache: one token per forward,
    no host reads per step (so it is CUDA-graph capturable). The baseline of the round-cost
    benchmark (``bench/bench_round.py``), and only that.

    Why a second plain step beside ``TreeSpecDecoder.generate_plain``: the benchmark reports
    round / plain-step cost with the round replayed as a CUDA graph, and a fair baseline has
    to be captured the same way. ``generate_plain`` reads every token on the host and runs its
    forwards eagerly, so on a GPU it would time kernel-launch overhead instead of the step,
    and flatter the round. This class is the same forward (same cache, same attention
    context) with the token and length kept on the device, so it captures.

    Buffers: ``token`` [B] int64 (the last token; the next one replaces it), and the target
    cache's device ``lengths``. ``step()`` runs one forward at position ``lengths`` and
    advances ``lengths`` by one.
    """

    def __init__(self, state, batch: int):
        self.state = state
        self.batch = batch
        self.tcache = state.tcache
        self.device = state.device
        self.token = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.one_mask = state.consts.one_mask
        self._graph = None

    def step(self) -> None:
        tc, ad = self.tcache, self.state.adapter
        B = self.batch
        with torch.no_grad():
            ctx = DecodeContext(tc, tc.lengths, self.one_mask, 1, self.state.config.backend)
            logits, _ = ad.forward(self.token.view(B, 1), tc.lengths.to(torch.int64).view(B, 1), ctx)
            self.token.copy_(logits[:, -1].argmax(-1))
            tc.lengths.add_(1)

    def capture(self) -> None:
        """Capture ``step`` as a CUDA graph (state saved and restored around the warm-up), on
        the target's device whatever device is current."""
        with device_guard(self.device):
            self._capture_here()

    def _capture_here(self) -> None:
        tc = self.tcache
        saved = (self.token.clone(), tc.lengths.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):  # not the shared default one
            self.step()
        self.token.copy_(saved[0])
        tc.lengths.copy_(saved[1])
        self._graph = graph

    def __call__(self) -> None:
        if self._graph is None:
            self.step()
        else:
            self._graph.replay()
