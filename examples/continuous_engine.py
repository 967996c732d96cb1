"""A continuous-batching EAGLE-2 engine over a paged KV pool, built on the public ops.

Requests arrive and finish at different times. Each ``step()`` of the engine

    admit    waiting requests (FIFO) while there is a free batch row and the pool can hold the
             request's worst case (blocks are reserved at admission, allocated lazily)
    prefill  the admitted prompts, right-padded, in one target forward (causal, empty prefix;
             K/V into the pages); the first token of each comes from its last logits
    round    ONE speculative round for every running request, the just-admitted ones included:
             draft catch-up (ragged, padded) -> root expansion + D expansions (tree_expand)
             -> tree_build -> target verify over the tree (tree_attention_paged)
             -> verify_greedy -> kv_compact_paged (or, with block_size 1 and
             commit="remap", remap_slots: SGLang's slot remapping, no KV moves) -> EOS / budget
    finish   a request that has its tokens leaves at once and its blocks go back to the pool

so new requests prefill while others decode (the prefill is its own target forward within the
step, then the newcomers join the same round as everyone else).

Where the KV lives: both the target's and the draft head's KV are in the paged pool.
    * target: ``target_kv`` [2 * layers, num_blocks, block_size, Hkv, Dh], K of layer l at 2l,
      V at 2l + 1. The engine drives the package's ``TargetAdapter`` unchanged; its attention
      function writes and reads through ``ctx.cache.write`` / ``ctx.cache.attend`` (the interface
      of ``StaticKVCache`` and ``PagedKVCache``), and the engine passes a :class:`PoolView` there:
      writes go to the pages through the round's block table, attention is
      ``ops.tree_attention_paged``, and the commit is ``ops.kv_compact_paged`` on all layers at
      once. (The prefill, over an empty prefix, is the adapter's own causal attention over the
      new tokens; their K/V still go to the pages.) No per-slot dense cache exists.
    * draft head: ``draft_kv`` [2, num_blocks, block_size, Hkv', Dh'], the same block ids and
      block table as the target (its stable length equals the target's committed prefix after
      each catch-up); the head runs as ``head.project`` -> paged write ->
      ``ops.tree_attention_paged`` -> ``head.finish`` (the same maths as ``head.tree_step``,
      which reads a dense cache). Its tree slots need no compaction: each round's catch-up
      rewrites them.

Block 0 of the pool is a scratch page that no request owns: block-table rows are padded with
it, so the rows a padded batch writes past a request's own pages land there and are never read.

Greedy only (``verify_greedy``); EAGLE-1/2 heads. The output of every request equals plain
greedy decoding of the same target (``model.generate(do_sample=False)``) in float32;
tests/entry/test_continuous_engine.py checks it token for token.

Run a self-check (tiny random target and head, staggered arrivals, compares with HF greedy):
    python examples/continuous_engine.py
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch

from eagle2_kernels.models.draft_head import EagleDraftHead
from eagle2_kernels.models.target import DecodeContext, TargetAdapter
from eagle2_kernels.ops import kv_compact_paged, remap_slots, tree_attention_paged, verify_greedy
from eagle2_kernels.ops.tree import pack_bits
from eagle2_kernels.runtime.phases import draft_tree
from eagle2_kernels.runtime.request import cut, eos_ids
from eagle2_kernels.runtime.state import TreeConstants

SCRATCH_BLOCK = 0


# ------------------------------------------------------------------------------------------------
# Masks


def causal_mask(n: int) -> torch.Tensor:
    """[n, ceil(n/32)] int32 packed mask: row i sees rows 0..i."""
    return pack_bits(torch.tril(torch.ones(n, n, dtype=torch.bool)))



# ------------------------------------------------------------------------------------------------
# The paged pool


class BlockPool:
    """Free-list allocator of KV blocks with admission-time reservations.

    Block 0 is the scratch page (never handed out). ``reserve(n)`` promises n blocks to a
    request at admission (so a running request can always grow: no preemption is needed);
    ``alloc`` / ``free`` hand out and take back concrete block ids.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"BlockPool: need num_blocks >= 2 (block 0 is scratch) and block_size >= 1, "
                             f"got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out 1, 2, ... first
        self.reserved = 0

    @property
    def capacity(self) -> int:
        """Blocks a request may ever hold (all but the scratch page)."""
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def can_reserve(self, n: int) -> bool:
        return self.reserved + n <= self.capacity

    def reserve(self, n: int) -> None:
        if not self.can_reserve(n):
            raise RuntimeError(f"BlockPool: cannot reserve {n} blocks ({self.reserved} of {self.capacity} reserved)")
        self.reserved += n

    def release(self, n: int) -> None:
        self.reserved -= n

    def alloc(self) -> int:
        return self._free.pop()

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def write_pages(k_pages, v_pages, block_table, start, k, v) -> None:
    """Store k, v [B, Hkv, N, Dh] at logical positions start[b] + 0..N-1 of each sequence
    (page ``block_table[b, pos // page_size]``, slot ``pos % page_size``); pages
    [num_blocks, page_size, Hkv, Dh] (contiguous), block_table [B, max_blocks], start [B]."""
    B, H, N, Dh = k.shape
    bs = k_pages.shape[1]
    pos = start.to(torch.int64)[:, None] + torch.arange(N, device=k.device)  # [B, N]
    slots = (block_table.to(torch.int64).gather(1, pos // bs) * bs + pos % bs).reshape(-1)
    k_pages.view(-1, H, Dh)[slots] = k.transpose(1, 2).reshape(B * N, H, Dh)
    v_pages.view(-1, H, Dh)[slots] = v.transpose(1, 2).reshape(B * N, H, Dh)


# ------------------------------------------------------------------------------------------------
# The target on pages: what the adapter's attention function writes to and reads from


class PoolView:
    """The paged pool as the target adapter's attention function sees it during one forward.

    ``TargetAdapter``'s attention function calls ``ctx.cache.write(layer, slot, k, v)`` and then
    ``ctx.cache.attend(layer, q, tree_mask, tree_len, scale, backend)`` (the interface shared by
    the package's ``StaticKVCache`` and ``PagedKVCache``); this object answers both on the
    engine's pool for the forward's batch rows: the write goes through the block table, the
    attention is ``ops.tree_attention_paged``. For a prefill (``tree_mask`` None) the adapter
    attends causally over the new tokens itself (the prefix is empty) and only writes here.

    Args: kv [2 * layers, num_blocks, block_size, Hkv, Dh]; block_table [B, max_blocks] int32;
    lengths [B] int32, the committed prefix of each row (visible to every query).
    """

    def __init__(self, kv: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor):
        self.kv, self.block_table, self.lengths = kv, block_table, lengths

    def write(self, layer: int, start, k: torch.Tensor, v: torch.Tensor) -> None:
        if not torch.is_tensor(start):
            start = torch.as_tensor([start] * k.shape[0] if isinstance(start, int) else start, device=k.device)
        write_pages(self.kv[2 * layer], self.kv[2 * layer + 1], self.block_table, start, k, v)

    def attend(self, layer: int, q, tree_mask, tree_len: int, scale, backend=None,
               window=None, softcap=None, sinks=None) -> torch.Tensor:
        # window / softcap / sinks: the layer's local attention, as the adapter passes it.
        extra = {} if backend is None else {"backend": backend}
        return tree_attention_paged(q, self.kv[2 * layer], self.kv[2 * layer + 1], self.block_table, self.lengths,
                                    tree_mask, tree_len, scale=scale, window=window, softcap=softcap, sinks=sinks,
                                    **extra)


# ------------------------------------------------------------------------------------------------
# Requests


@dataclass(eq=False)  # identity: requests are compared as objects, never by their tensors
class Request:
    """One generation request and its decode state (the engine owns the state fields)."""

    rid: int
    prompt: list[int]
    max_new_tokens: int
    eos: frozenset = frozenset()
    output: list[int] = field(default_factory=list)
    done: bool = False
    # pool state
    blocks: list[int] = field(default_factory=list)
    reserved: int = 0
    prefix: int = 0  # target KV slots committed (the root's KV is not cached yet)
    draft_len: int = 0  # draft stable slots (pairs already seen by the head)
    root: int = -1
    pend_feats: torch.Tensor | None = None  # [n, H] target features of the pending pairs
    pend_tokens: torch.Tensor | None = None  # [n] the token after each
    # bookkeeping
    arrived_step: int = -1
    admitted_step: int = -1
    finished_step: int = -1
    accept_lengths: list[int] = field(default_factory=list)


@dataclass
class EngineStats:
    steps: int = 0
    rounds: int = 0
    prefills: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # requests per round
    mixed_steps: int = 0  # steps where a prefill ran while other requests were decoding
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0


# ------------------------------------------------------------------------------------------------
# The engine


class ContinuousEngine:
    """Continuous-batching greedy EAGLE-2 decoding over a paged KV pool.

    Args:
        model: a transformers causal LM (attention through ``AttentionInterface``).
        head: an attached ``EagleDraftHead`` (EAGLE-1/2) for ``model``.
        total_tokens, depth, top_k: the tree (T nodes including the root, D expansion levels,
            K branching factor), fixed every round.
        block_size: slots per KV page.
        num_blocks: pages in the pool (block 0 is scratch); default: enough for ``max_batch``
            requests of ``max_model_len`` tokens.
        max_batch: most requests running at once (batch rows of a round).
        max_model_len: longest prompt + new tokens a request may ask for (sizes the default pool).
        commit: how a round's accepted path becomes the next prefix: ``"compact"`` moves its
            target K/V behind the prefix (``kv_compact_paged``, any block size); ``"remap"``
            (block_size 1 only, SGLang's token pool) moves nothing: ``remap_slots`` gives the
            accepted nodes' slot ids, which become the request's next positions, and the
            rejected nodes' slots go back to the pool.
        backend: optional forced ops backend.

    Example::

        eng = ContinuousEngine(model, head, total_tokens=10, depth=3, top_k=3, max_batch=4)
        a = eng.add_request([5, 7, 11], max_new_tokens=20)
        eng.step()                                   # a prefills and runs its first round
        b = eng.add_request([3, 1], max_new_tokens=8)
        while eng.has_work():
            eng.step()                               # b prefills while a decodes
        eng.requests[a].output, eng.requests[b].output
    """

    def __init__(self, model, head: EagleDraftHead, total_tokens: int = 10, depth: int = 3, top_k: int = 3,
                 block_size: int = 16, num_blocks: int | None = None, max_batch: int = 8,
                 max_model_len: int = 512, commit: str = "compact", backend: str | None = None):
        if not (total_tokens >= 1 and depth >= 1 and top_k >= 1):
            raise ValueError(f"ContinuousEngine: need total_tokens, depth, top_k >= 1, got "
                             f"{total_tokens}, {depth}, {top_k}")
        if total_tokens - 1 > top_k + depth * top_k * top_k:
            raise ValueError(f"ContinuousEngine: total_tokens={total_tokens} exceeds the {top_k + depth * top_k ** 2} "
                             f"candidates + root of depth={depth}, top_k={top_k}")
        if getattr(head, "feature_layers", None) is not None:
            raise ValueError("ContinuousEngine drives EAGLE-1/2 heads (post-norm last-hidden features) only")
        self.model, self.head = model, head
        self.T, self.D, self.K = total_tokens, depth, top_k
        if commit not in ("compact", "remap"):
            raise ValueError(f"ContinuousEngine: commit must be 'compact' or 'remap', got {commit!r}")
        if commit == "remap" and block_size != 1:
            raise ValueError(f"ContinuousEngine: commit='remap' remaps token slots and needs block_size=1, "
                             f"got block_size={block_size}")
        self.commit = commit
        self.backend = backend
        self.adapter = TargetAdapter(model, backend=backend)
        ad = self.adapter
        self.device, self.dtype = ad.device, ad.dtype
        self.max_batch = max_batch
        self.block_size = block_size
        self.max_model_len = max_model_len
        # a round touches logical slots up to prefix + max(T, D*K) (target tree, draft tree)
        self.lookahead = max(total_tokens, depth * top_k)
        if num_blocks is None:
            num_blocks = 1 + max_batch * -(-(max_model_len + self.lookahead) // block_size)
        self.pool = BlockPool(num_blocks, block_size)
        self.target_kv = torch.zeros(2 * ad.num_layers, num_blocks, block_size, ad.num_kv_heads, ad.head_dim,
                                     dtype=self.dtype, device=self.device)
        self.draft_kv = torch.zeros(2, num_blocks, block_size, head.num_kv_heads, head.head_dim,
                                    dtype=self.dtype, device=self.device)
        self._consts: dict[int, TreeConstants] = {}  # the draft expansion's constants, by batch size
        self._causal: dict[int, torch.Tensor] = {}
        self.requests: dict[int, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.stats = EngineStats()
        self._next_id = 0

    # ---------------------------------------------------------------- public API
    def add_request(self, prompt, max_new_tokens: int, eos_token_id=None) -> int:
        """Queue a request; returns its id. ``prompt``: list of ints or a 1-D int tensor."""
        ids = prompt.tolist() if torch.is_tensor(prompt) else list(prompt)
        if torch.is_tensor(prompt) and prompt.dim() != 1:
            raise ValueError(f"add_request: prompt must be 1-D, got shape {tuple(prompt.shape)}")
        if not ids or max_new_tokens < 1:
            raise ValueError(f"add_request: need a non-empty prompt and max_new_tokens >= 1, got "
                             f"{len(ids)} tokens, max_new_tokens={max_new_tokens}")
        if len(ids) + max_new_tokens > self.max_model_len:
            raise ValueError(f"add_request: prompt {len(ids)} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_model_len={self.max_model_len}")
        need = self._blocks_for(len(ids) + max_new_tokens + self.lookahead)
        if need > self.pool.capacity:
            raise ValueError(f"add_request: the request needs {need} blocks, the pool has {self.pool.capacity}")
        eos = eos_ids(eos_token_id, self.adapter.vocab_size)  # None: no stop ids
        req = Request(self._next_id, ids, max_new_tokens, frozenset(eos),
                      arrived_step=self.stats.steps, reserved=need)
        self._next_id += 1
        self.requests[req.rid] = req
        self.waiting.append(req)
        return req.rid

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[tuple[int, list[int], bool]]:
        """Admit + prefill arrivals, then one speculative round for every running request.

        Returns the step's events: (request id, tokens committed this step, finished).
        """
        self.stats.steps += 1
        events: dict[int, list[int]] = {}
        admitted = self._admit()
        with torch.no_grad():
            if admitted:
                if any(r.admitted_step < self.stats.steps for r in self.running if r not in admitted):
                    self.stats.mixed_steps += 1
                for r, toks in self._prefill(admitted):
                    events.setdefault(r.rid, []).extend(toks)
            live = [r for r in self.running if not r.done]
            if live:
                for r, toks in self._round(live):
                    events.setdefault(r.rid, []).extend(toks)
        finished = [r for r in self.running if r.done]
        for r in finished:
            self._retire(r)
        return [(rid, toks, self.requests[rid].done) for rid, toks in events.items()]

    def run(self) -> dict[int, list[int]]:
        """Step until every queued request has finished; returns {id: new tokens}."""
        while self.has_work():
            self.step()
        return {rid: r.output for rid, r in self.requests.items()}

    # ---------------------------------------------------------------- scheduling / pool
    def _blocks_for(self, n_slots: int) -> int:
        return -(-n_slots // self.block_size)

    def _admit(self) -> list[Request]:
        admitted = []
        while self.waiting and len(self.running) < self.max_batch and self.pool.can_reserve(self.waiting[0].reserved):
            r = self.waiting.pop(0)
            self.pool.reserve(r.reserved)
            r.admitted_step = self.stats.steps
            self.running.append(r)
            admitted.append(r)
        return admitted

    def _retire(self, r: Request) -> None:
        self.pool.free(r.blocks)
        self.pool.release(r.reserved)
        r.blocks, r.reserved = [], 0
        r.pend_feats = r.pend_tokens = None
        r.finished_step = self.stats.steps
        self.running.remove(r)

    def _grow(self, r: Request, n_slots: int) -> None:
        """Allocate pages until request r holds logical slots 0..n_slots-1."""
        while len(r.blocks) * self.block_size < n_slots:
            r.blocks.append(self.pool.alloc())

    def _table(self, reqs: list[Request], n_slots: int) -> torch.Tensor:
        """[B, ceil(n_slots / block_size)] int32 block table, rows padded with the scratch page."""
        width = max(self._blocks_for(n_slots), max(len(r.blocks) for r in reqs))
        rows = [r.blocks + [SCRATCH_BLOCK] * (width - len(r.blocks)) for r in reqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def _causal_mask(self, n: int) -> torch.Tensor:
        if n not in self._causal:
            self._causal[n] = causal_mask(n).to(self.device)
        return self._causal[n]

    def _lens(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    # ---------------------------------------------------------------- prefill
    def _prefill(self, reqs: list[Request]):
        """Right-padded batched prefill of the admitted prompts; commits their first token."""
        t0 = time.perf_counter()
        B, n = len(reqs), max(len(r.prompt) for r in reqs)
        for r in reqs:
            self._grow(r, len(r.prompt))
        ids = torch.zeros(B, n, dtype=torch.int64)
        for b, r in enumerate(reqs):
            ids[b, : len(r.prompt)] = torch.tensor(r.prompt)
        ids = ids.to(self.device)
        zero = torch.zeros(B, dtype=torch.int32, device=self.device)
        # tree_mask None: the adapter's causal prefill over an empty prefix (K/V still go to pages)
        ctx = DecodeContext(PoolView(self.target_kv, self._table(reqs, n), zero), zero, None, n, self.backend)
        positions = torch.arange(n, device=self.device).expand(B, n)
        # logits only at each prompt's last position (transformers' per-row logits_to_keep):
        # the lm_head over every padded position would cost more than the rest of the prefill
        last = torch.tensor([[len(r.prompt) - 1] for r in reqs], device=self.device)
        logits, feats = self.adapter.forward(ids, positions, ctx, logits_to_keep=last)
        roots = logits[:, 0].argmax(-1).tolist()
        out = []
        for b, (r, root) in enumerate(zip(reqs, roots)):
            P = len(r.prompt)
            r.prefix, r.draft_len, r.root = P, 0, root
            # the prompt's catch-up pairs (f_t, x_{t+1}), t = 1..P, the last one's token = root
            r.pend_feats = feats[b, :P]
            r.pend_tokens = torch.cat([ids[b, 1:P], torch.tensor([root], device=self.device)])
            out.append((r, self._commit(r, [root])))
        self.stats.prefills += 1
        self.stats.prefill_s += time.perf_counter() - t0
        return out

    # ---------------------------------------------------------------- the draft on pages
    def _draft_forward(self, feats, tokens, positions, table, prefix, offset, mask, tree_len):
        """The head over N rows per sequence: K/V written at logical prefix + offset + 0..N-1 of
        the draft pages, attention over the stable prefix plus ``tree_len`` tree slots (mask)."""
        head = self.head
        h, q, k, v = head.project(feats, tokens, positions)
        write_pages(self.draft_kv[0], self.draft_kv[1], table, prefix + offset, k, v)
        extra = {} if self.backend is None else {"backend": self.backend}
        out = tree_attention_paged(q, self.draft_kv[0], self.draft_kv[1], table, prefix, mask, tree_len,
                                   scale=head.layers[0].self_attn.scaling, **extra)
        return head.finish(h, out)

    # ---------------------------------------------------------------- one round
    def _round(self, reqs: list[Request]):
        T, D, K = self.T, self.D, self.K
        B, dev, head = len(reqs), self.device, self.head
        t0 = time.perf_counter()
        self.stats.rounds += 1
        self.stats.batch_sizes.append(B)
        counts = [r.pend_tokens.shape[0] for r in reqs]
        n = max(counts)
        for r in reqs:
            self._grow(r, r.prefix + self.lookahead)
        table = self._table(reqs, max(max(r.draft_len + n for r in reqs), max(r.prefix for r in reqs) + self.lookahead))

        # ---- catch-up: the pending pairs (ragged, right-padded: padding rows write past the
        # sequence's stable length, where this round's tree slots will overwrite them)
        feats = torch.zeros(B, n, head.target_feature_size, dtype=self.dtype, device=dev)
        toks = torch.zeros(B, n, dtype=torch.int64, device=dev)
        for b, r in enumerate(reqs):
            feats[b, : counts[b]] = r.pend_feats
            toks[b, : counts[b]] = r.pend_tokens
        d_prefix = self._lens([r.draft_len for r in reqs])
        positions = d_prefix[:, None].to(torch.int64) + torch.arange(n, device=dev)
        hs = self._draft_forward(feats, toks, positions, table, d_prefix, 0,
                                 self._causal_mask(n).expand(B, n, -1), n)
        last = torch.tensor([c - 1 for c in counts], device=dev)
        h_parent = hs[torch.arange(B, device=dev), last][:, None]  # [B, 1, H]
        for r in reqs:
            r.draft_len = r.prefix  # the head has now seen every committed pair
        prefix = self._lens([r.prefix for r in reqs])
        root = torch.tensor([r.root for r in reqs], dtype=torch.int64, device=dev)

        # ---- root expansion + D levels + tree_build: the package's draft_tree, each level's
        # head step run on the pages (each frontier row sees the prefix + its ancestors)
        consts = self._consts.get(B)
        if consts is None:
            consts = self._consts[B] = TreeConstants.build(B, K, D, dev, self.backend)
        draft_pos = prefix[:, None].to(torch.int64)

        def step(j, f_feat, f_tok, f_mask):
            return self._draft_forward(f_feat, f_tok, (draft_pos + (j - 1)).expand(B, K), table, prefix,
                                       (j - 1) * K, f_mask, j * K)

        tree, _ = draft_tree(head, consts, h_parent, root, step, T)
        t1 = time.perf_counter()
        self.stats.draft_s += t1 - t0

        # ---- verify: the target over the tree at positions prefix + depth, on the pages
        ctx = DecodeContext(PoolView(self.target_kv, table, prefix), prefix, tree.mask, T, self.backend)
        logits, tfeats = self.adapter.forward(tree.tokens, prefix[:, None].to(torch.int64) + tree.depth.to(torch.int64), ctx)
        path, alen, bonus = verify_greedy(tree, logits)
        t2 = time.perf_counter()
        self.stats.verify_s += t2 - t1

        # ---- commit: move the accepted path's KV behind the prefix (all layers, one call)
        path_tok = tree.tokens.gather(1, path.clamp(min=0))
        alen_l, bonus_l, path_tok_l = alen.tolist(), bonus.tolist(), path_tok.tolist()
        if self.commit == "compact":
            kv_compact_paged(self.target_kv, table, prefix, path, alen)
        else:
            # token pool: the accepted nodes' slots become positions prefix..prefix+a-1 (no KV
            # moves); the other tree slots are freed; slots past the tree (draft-only) are kept
            acc, free, _ = remap_slots(table, prefix, path, alen, tree_len=T, update=False)
            acc_l, free_l = acc.tolist(), free.tolist()
            for b, r in enumerate(reqs):
                p, a = r.prefix, alen_l[b]
                r.blocks = r.blocks[:p] + acc_l[b][:a] + r.blocks[p + T:]
                self.pool.free([x for x in free_l[b] if x >= 0])
        out = []
        for b, r in enumerate(reqs):
            a = alen_l[b]
            new = path_tok_l[b][1:a] + [bonus_l[b]]
            # next catch-up: (feature of path node i, the token after it), i < a
            r.pend_feats = tfeats[b, path[b, :a]]
            r.pend_tokens = torch.tensor(new, dtype=torch.int64, device=dev)
            r.prefix += a
            r.root = bonus_l[b]
            r.accept_lengths.append(a)
            out.append((r, self._commit(r, new)))
        self.stats.other_s += time.perf_counter() - t2
        return out

    def _commit(self, r: Request, tokens: list[int]) -> list[int]:
        """Append tokens to r's output up to its budget / first EOS; mark it done then."""
        kept, done = cut(tokens, r.max_new_tokens - len(r.output), r.eos)
        r.output.extend(kept)
        r.done = r.done or done
        return kept


# ------------------------------------------------------------------------------------------------
# Self-check


def _tiny_setup(seed: int = 0):
    """A tiny random Llama (2 layers, hidden 64, vocab 256; real Llama-3-8B: 32 / 4096 / 128256)
    and an untrained head for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # confident next-token laws
    return model, EagleDraftHead.from_target(model).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--tree", default="10,3,3", help="T,D,K")
    parser.add_argument("--block-size", type=int, default=4)
    args = parser.parse_args(argv)
    T, D, K = (int(x) for x in args.tree.split(","))
    torch.set_num_threads(1)
    model, head = _tiny_setup()
    eng = ContinuousEngine(model, head, total_tokens=T, depth=D, top_k=K, block_size=args.block_size,
                           max_batch=args.max_batch, max_model_len=128)
    g = torch.Generator().manual_seed(1)
    reqs = [(torch.randint(0, 256, (3 + 2 * i,), generator=g).tolist(), 8 + 5 * i) for i in range(args.requests)]
    ids = {}
    t0 = time.perf_counter()
    for i, (p, n) in enumerate(reqs):  # one arrival per step: later requests prefill while others decode
        ids[eng.add_request(p, n)] = (p, n)
        eng.step()
    eng.run()
    elapsed = time.perf_counter() - t0
    ok = True
    for rid, (p, n) in ids.items():
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
        r = eng.requests[rid]
        same = r.output == ref
        ok &= same
        print(f"request {rid}: prompt {len(p):2d}, {len(r.output)} new, steps {r.admitted_step}-{r.finished_step}, "
              f"tokens/round {sum(r.accept_lengths) / max(len(r.accept_lengths), 1):.2f}, equals HF greedy: {same}")
    print(f"{eng.stats.steps} steps, {eng.stats.rounds} rounds, batch sizes {eng.stats.batch_sizes}, "
          f"{elapsed * 1e3:.0f} ms; pool free {eng.pool.free_blocks}/{eng.pool.capacity}")
    if not ok:
        print("MISMATCH: engine output differs from plain greedy decoding", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
