"""TreeSpecDecoder: lossless EAGLE-2 speculative decoding of a transformers causal LM.

This module holds construction, loading, the public calls and the choice of driver. One round
is a sequence of phase functions over explicit state (``runtime/phases.py`` over a
``runtime/state.DecodeState``), each doing its per-node work in a fixed number of ops:

    catch-up     draft head over the pairs committed last round        (head's own KV cache)
    draft        root expansion + D steps: head.tree_step + ops.tree_expand, then
                 ops.tree_build: the T-1 best candidates -> DraftTree
    verify       one target forward over the T tree tokens (ops.tree_attention inside
                 transformers' attention interface), then ops.verify_greedy / verify_sample
    accept       ops.kv_compact (or kv_compact_paged) moves the accepted path's KV; one host
                 read of (accept length, bonus, path tokens) for EOS / max_new_tokens / streaming

The drivers that run them: ``runtime/drivers.py`` (the dynamic round, the plain loop, the
static round's host side), ``runtime/graphs.py`` (the static round's device phases) and
``runtime/lookup.py`` (lookup trees with no head).
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import torch

from eagle2_kernels.models.compiled_head import compile_head
from eagle2_kernels.models.draft_head import check_pair
from eagle2_kernels.models.head_base import DraftHeadBase
from eagle2_kernels.models.head_loader import load_draft_head
from eagle2_kernels.models.target import TargetAdapter
from eagle2_kernels.runtime import phases
from eagle2_kernels.runtime.config import DecodeConfig, default_tree
from eagle2_kernels.runtime.drivers import Run, StaticCalls, lookup_rounds, plain_rounds, static_rounds, tree_rounds
from eagle2_kernels.runtime.locking import lock_for
from eagle2_kernels.runtime.request import (InputTypeError, Request, SamplingParams, check_budget, check_generator,
                                            eos_ids, pad_id, read_prompts)
from eagle2_kernels.runtime.state import DecodeState
from eagle2_kernels.runtime.stats import DecodeStats, GenerateOutput

__all__ = ["TreeSpecDecoder", "GenerateOutput", "DecodeStats", "InputTypeError"]


def _compile_note(message: str) -> None:
    """Tell the user why a call pauses: a graph compiling (once per machine, then loaded from
    the cache folder) or loading."""
    import sys

    print(f"eagle2_kernels: {message}", file=sys.stderr, flush=True)


def _config_of(target, config: DecodeConfig | None, fields: dict) -> DecodeConfig:
    """The decoder's config: ``config`` when given, else one from the constructor's keywords,
    unset tree bounds taken from the one table of defaults by the target's device."""
    if config is not None:
        if not isinstance(config, DecodeConfig):
            raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
        return config
    try:
        device = next(target.parameters()).device
    except (AttributeError, StopIteration):
        device = "cpu"  # not a torch model: the adapter says what is wrong
    for name, default in zip(("total_tokens", "depth", "top_k"), default_tree(device)):
        if fields[name] is None:
            fields[name] = default
    return DecodeConfig(**fields)


class TreeSpecDecoder:
    """EAGLE-2 decoding of ``target`` with draft head ``draft``: output identical to plain
    decoding (greedy: token for token; sampling: in distribution), in fewer target forwards.

    Args:
        target: a transformers causal LM whose attention goes through transformers'
            attention interface (Llama, Qwen2/3, Mistral, SmolLM, ...). It stays a normal
            model: our attention is switched in only around the decoder's own forwards.
        draft: a draft head (:class:`~eagle2_kernels.models.head_base.DraftHeadBase`: an
            EAGLE-1/2 ``EagleDraftHead`` or an ``Eagle3DraftHead``) for this target (attached to
            it if it is not yet), or
            None: no head, the trees come from context lookup alone (``runtime/lookup.py``);
            any supported target then decodes faster where its text repeats, same output.
        total_tokens: T, tree nodes per round including the root (>= 2); with ``adaptive`` the
            most a round verifies. None = ``runtime.config.default_tree(device)``: (60, 5, 10)
            on CUDA, (32, 5, 8) on CPU, for depth and top_k as well.
        depth: D, expansion steps after the root expansion (>= 1; with ``adaptive`` at most).
        top_k: K, the tree's branching factor (>= 1). Not the sampling filter: that is
            ``generate(top_k=...)``.
        max_length: KV cache capacity in tokens (prompt + max_new_tokens + T must fit); None
            sizes the caches per call.
        backend: force the ops' backend ("reference", "triton", "ext"); None = by device.
        tokenizer: optional tokenizer kept as ``dec.tokenizer``.
        config: a :class:`DecodeConfig`; when given it replaces total_tokens, depth, top_k,
            max_length, backend, static_round and cuda_graphs.
        static_round: None (default) = the static-shape round (device-side lengths, no host
            reads inside a round; ``runtime/graphs.py``) on CUDA targets and the dynamic round
            on CPU; True / False force one (the static round runs eagerly on CPU).
        cuda_graphs: "auto" (default) = capture the static round's draft and verify phases as
            CUDA graphs on CUDA targets, falling back to eager with a warning if capture fails;
            True = the same, but an error for a non-CUDA target; False = never capture.
        adaptive: True (default) = size every round from the draft's scores and this machine's
            measured costs (``runtime/policy.py``); total_tokens, depth and top_k are then upper
            bounds and a round may decode plainly. False = exactly the fixed shape.
        kv_block_size: None (default) = the target's KV in one dense preallocated tensor; an
            int = in pages of that many tokens reached through a block table (vLLM's layout;
            ``cache.PagedKVCache``), run with ``ops.tree_attention_paged`` and
            ``ops.kv_compact_paged``.
        cost_model: a :class:`~eagle2_kernels.runtime.costmodel.CostModel` for the policy; None
            (default) measures this machine on first use and caches it on disk (see
            :meth:`cost_model`; ``eagle2 tune`` prints it).

    Attributes:
        target, draft, tokenizer, config (:class:`DecodeConfig`).

    Threads: calls take turns, never mix. ``generate``, ``generate_plain`` and ``cost_model``
    hold the target model's lock for the whole call, and a ``stream`` holds it from its first
    ``next()`` until it is exhausted, closed (``close()``, leaving a ``for`` loop by ``break``
    and dropping it) or garbage collected; other threads' calls on this decoder, or on another
    decoder of the same model, wait meanwhile (``runtime/locking.py``). So close a stream you
    stop reading; one kept suspended blocks every other thread's call. Within one thread a new
    call proceeds, and a stream it interrupted raises "overtaken" if resumed. Read the stats of
    a call from its result (``out.stats``): ``last_stats`` is whichever call ran last.

    Example::

        dec = TreeSpecDecoder(model, head, total_tokens=16, depth=4, top_k=8)
        out = dec.generate(input_ids, max_new_tokens=64)      # greedy
        out.sequences, out.stats.mean_accept_length
    """

    def __init__(
        self,
        target,
        draft: DraftHeadBase | None = None,
        total_tokens: int | None = None,
        depth: int | None = None,
        top_k: int | None = None,
        max_length: int | None = None,
        backend: str | None = None,
        tokenizer=None,
        config: DecodeConfig | None = None,
        static_round: bool | None = None,
        cuda_graphs: bool | str = "auto",
        adaptive: bool = True,
        cost_model=None,
        kv_block_size: int | None = None,
        lookup: bool = True,
        compile: bool | str = "auto",
    ):
        fields = dict(total_tokens=total_tokens, depth=depth, top_k=top_k, max_length=max_length, backend=backend,
                      static_round=static_round, cuda_graphs=cuda_graphs, adaptive=adaptive,
                      kv_block_size=kv_block_size, lookup=lookup, compile=compile)
        self.config = config = _config_of(target, config, fields)
        if draft is not None and not isinstance(draft, DraftHeadBase):
            raise TypeError(f"draft must be a draft head (EagleDraftHead, Eagle3DraftHead) or None (lookup trees "
                            f"only), got {type(draft).__name__}")
        if draft is None and not config.lookup:
            raise ValueError("lookup=False needs a draft head: without one the trees come from context lookup alone")
        check_pair(target, draft, "TreeSpecDecoder")  # a target/head pair that cannot decode exactly
        # The model's lock (runtime/locking.py): building an adapter switches the model's
        # attention and back, which must not interleave with another thread's forward.
        self._lock = lock_for(target)
        with self._lock.held():
            adapter = TargetAdapter(target, backend=config.backend)  # validates the target first
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        if draft is not None:
            adapter = self._attach_head(target, draft, adapter)
        if config.compile:
            # Compiled decode forwards (models/compiled.py): lazily, per forward size.
            with self._lock.held():
                adapter.enable_compile(config.compile, config.compile_buckets, _compile_note)
        if config.cuda_graphs is True and adapter.device.type != "cuda":
            raise ValueError(
                f"cuda_graphs=True needs a CUDA target, the model is on {adapter.device}; "
                f"use cuda_graphs='auto' or False (static_round=True runs the static round eagerly)"
            )
        from eagle2_kernels.runtime.costmodel import CostModel

        if cost_model is not None and not isinstance(cost_model, CostModel):
            raise TypeError(f"cost_model must be a CostModel or None, got {type(cost_model).__name__}")
        self._cost_model = cost_model
        self._cost_models: dict[int, CostModel] = {}
        # The head the rounds drive: its cached tree step as one AOT graph where compiling is on
        # (models/compiled_head.py), else the head itself; ``self.draft`` stays the user's head.
        head = compile_head(draft, config.compile, _compile_note) if config.compile else draft
        self._state = DecodeState(adapter, head, config)  # adapter, head, caches, constants
        self._statics = StaticCalls()  # the static round's buffers / graphs / profile, per shape
        self.last_policy = None  # the RoundPolicy of the last adaptive call (sizes chosen, ...)
        self.last_stats: DecodeStats | None = None
        self._closed = False
        if config.max_length is not None:
            self._state.ensure(1, config.max_length)

    def _attach_head(self, target, draft: DraftHeadBase, adapter: TargetAdapter) -> TargetAdapter:
        """Check the head against the target (device, dtype, top_k) and attach it; returns the
        adapter, rebuilt when the head reads features of several layers (EAGLE-3)."""
        lm = target.get_output_embeddings().weight
        head_w = draft.fc.weight
        if head_w.device != lm.device:
            raise ValueError(
                f"the draft head is on {head_w.device} but the target on {lm.device}; move both to one device"
            )
        if head_w.dtype != lm.dtype:
            raise ValueError(
                f"the draft head is {head_w.dtype} but the target {lm.dtype}; load the head with "
                f"EagleDraftHead.from_pretrained(path, target=model) or call head.to(dtype)"
            )
        # (Re-)attach: checks hidden size / vocab against this target and shares its weights.
        # Then the adapter captures the features this head reads (EAGLE-3: layers that depend
        # on the target's depth, known once attached).
        draft.attach_target(target)
        if draft.feature_layers is not None:
            with self._lock.held():
                adapter = TargetAdapter(target, backend=self.config.backend, feature_layers=draft.feature_layers)
        if self.config.top_k > draft.draft_vocab_size:
            raise ValueError(
                f"top_k={self.config.top_k} exceeds the draft vocabulary ({draft.draft_vocab_size} tokens)"
            )
        return adapter

    @classmethod
    def from_pretrained(cls, target=None, draft=None, dtype: torch.dtype | None = None, device=None, **config):
        """Build a decoder from names, paths or objects.

        Args:
            target: a transformers causal LM, or a local name/path loaded with
                ``AutoModelForCausalLM.from_pretrained`` (its tokenizer becomes
                ``dec.tokenizer``); None = the embedded default (SmolLM2-135M-Instruct).
            draft: a draft head object, a directory in the released EAGLE-1/2 or EAGLE-3
                layout, or a Hugging Face hub repository id (read from the local cache when
                ``HF_HUB_OFFLINE`` is set); None with target None = the default head shipped
                with the package; None with any other target, or False, = no head: lookup
                trees alone (``runtime/lookup.py``).
            dtype, device: used when loading a target by name or the default (default: the
                file's dtype, or bf16 for the default model; CPU).
            **config: the constructor's keyword arguments (total_tokens, depth, top_k,
                max_length, backend, static_round, cuda_graphs, or config=DecodeConfig(...)).
                Unset tree bounds come from ``runtime.config.default_tree`` for every target.
        """
        tokenizer = None
        if target is None:
            from eagle2_kernels.models import default as default_model

            kwargs = {} if dtype is None else {"dtype": dtype}
            target, tokenizer = default_model.load_default(device=device or "cpu", **kwargs)
            if draft is None:
                draft = default_model.default_head_path()
        elif isinstance(target, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            name = os.fspath(target)
            kwargs = {} if dtype is None else {"dtype": dtype}
            target = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
            if device is not None:
                target.to(device)
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except (OSError, ValueError):
                tokenizer = None
        if draft is None or draft is False:
            draft = None  # no head: the decoder drafts from the context alone
        elif isinstance(draft, (str, os.PathLike)):
            draft = load_draft_head(draft, target=target)
        return cls(target, draft, tokenizer=tokenizer, **config)

    def close(self) -> None:
        """Release the caches. The target was never left patched (our attention is only
        switched in around our own forwards), so nothing else needs undoing. Waits for a call
        running in another thread (a stream there holds the lock until it is finished or closed)."""
        with self._lock.held():
            self._state.release()
            self._statics.clear()
            self._closed = True

    def __enter__(self) -> "TreeSpecDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"TreeSpecDecoder(target={type(self.target).__name__}, total_tokens={c.total_tokens}, "
            f"depth={c.depth}, top_k={c.top_k}, adaptive={c.adaptive}, max_length={c.max_length})"
        )

    # ------------------------------------------------------------------ the request
    def _request(self, input_ids, max_new_tokens, sampling: SamplingParams, eos_token_id, generator, tree: bool,
                 attention_mask=None) -> Request:
        """One validated call; ``need`` counts the cache slots it may use."""
        if self._closed:
            raise RuntimeError("this TreeSpecDecoder was closed; create a new one")
        ad = self._state.adapter
        input_ids, lengths = read_prompts(input_ids, attention_mask, ad.device, ad.vocab_size)
        max_new_tokens = check_budget(max_new_tokens)
        eos = eos_ids(eos_token_id, ad.vocab_size, self.target)
        check_generator(generator)
        extra = self.config.total_tokens if tree else 1
        need = max(lengths) + max_new_tokens + extra
        for limit, what in ((ad.max_positions, "the model's max_position_embeddings"),
                            (self.config.max_length, "the decoder's max_length")):
            if limit is not None and need > limit:
                raise ValueError(
                    f"prompt ({max(lengths)}) + max_new_tokens ({max_new_tokens}) + {extra} verify slots = {need} "
                    f"exceeds {what}={limit}"
                )
        return Request(input_ids, lengths, max_new_tokens, sampling, frozenset(eos), need, generator,
                       pad_id(self.target, eos))

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> GenerateOutput:
        """Speculative decoding: same output as plain decoding of the target.

        Args:
            input_ids: prompts on the target's device: a [B, L] (or [L]) int64 tensor; a list
                of 1-D tensors (or lists of ids) of different lengths; or a tokenizer's
                BatchEncoding / dict with ``input_ids`` and ``attention_mask`` (left or right
                padded). The B sequences decode together, each at its own length (no padding
                inside the KV cache), and each stops on its own.
            max_new_tokens: at most this many tokens are generated.
            temperature: 0 = greedy (token-for-token equal to plain greedy decoding); > 0 samples.
            top_p: nucleus filter in (0, 1] (sampling only).
            top_k: sampling filter, int >= 0 (0 = off); not the tree's branching factor.
            eos_token_id: int or list of ints; generation stops right after the first one,
                exactly where plain decoding stops. None (the default) takes the model's
                ``generation_config.eos_token_id``, as transformers' generate does; ``[]``
                disables stopping.
            generator: torch.Generator for the sampling draws (same generator state = same
                output).
            attention_mask: optional [B, L] 0/1 mask of a padded ``input_ids`` tensor.

        Returns:
            GenerateOutput: ``sequences`` [B, Lmax + n] int64 laid out as transformers' batched
            generate returns it for decoder-only models: each prompt left-padded to the longest
            (Lmax), then its new tokens, so column Lmax starts every row's answer; a sequence
            that stops early is padded at the end (the model's pad id, else the first EOS id).
            ``stats`` (DecodeStats; for B > 1 ``accept_lengths`` counts the tokens committed by
            the whole batch per round).

        Thread-safe: holds the model's lock for the whole call, so concurrent calls from other
        threads (on this decoder or another one of the same model) run one after another, each
        with the output it would have alone.
        """
        with self._lock.held():  # one call at a time per model (see the Threads note above)
            req = self._request(input_ids, max_new_tokens, SamplingParams(temperature, top_p, top_k), eos_token_id,
                                generator, True, attention_mask)
            return self._collect(True, req)

    def generate_plain(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> GenerateOutput:
        """Plain one-token-per-forward decoding over the same static cache and attention path
        (the baseline; same arguments and output as :meth:`generate`)."""
        with self._lock.held():
            req = self._request(input_ids, max_new_tokens, SamplingParams(temperature, top_p, top_k), eos_token_id,
                                generator, False, attention_mask)
            return self._collect(False, req)

    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        plain: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> Iterator[list[int]]:
        """Like :meth:`generate`, but yields the new token ids of each round as it commits them:
        a list of ints for B = 1, a list of B such lists for B > 1 (empty for a sequence that
        has stopped). The arguments are checked when ``stream`` is called; ``self.last_stats``
        holds the stats once the stream is exhausted. ``plain=True`` streams plain decoding.

        Threads: the stream holds the model's lock from its first ``next()`` until it is
        exhausted, closed or garbage collected, so other threads' calls wait for it meanwhile;
        call ``.close()`` on a stream you stop reading early (or use it in a ``with
        contextlib.closing(...)``), since a suspended stream that stays referenced blocks them.
        """
        req = self._request(input_ids, max_new_tokens, SamplingParams(temperature, top_p, top_k), eos_token_id,
                            generator, not plain, attention_mask)
        return self._locked_rounds(not plain, req)

    def _locked_rounds(self, tree: bool, req: Request):
        """``stream``'s generator: holds the model's lock from the first ``next()`` (a stream
        never started holds nothing) to its ``finally``, which runs when it is exhausted,
        closed, or garbage collected, in whichever thread that happens."""
        with self._lock.held():
            rounds = self._run(tree, req)
            try:
                for chunks in rounds:
                    yield chunks[0] if req.batch == 1 else chunks
            finally:
                rounds.close()

    def _collect(self, tree: bool, req: Request) -> GenerateOutput:
        ids = req.input_ids
        new: list[list[int]] = [[] for _ in range(req.batch)]
        for chunks in self._run(tree, req):
            for seq, chunk in zip(new, chunks):
                seq.extend(chunk)
        t0 = time.perf_counter()
        width = max(len(seq) for seq in new)
        # Sequences that stopped early are padded, as transformers' generate pads them.
        rows = [seq + [req.pad_id] * (width - len(seq)) for seq in new]
        out = torch.tensor(rows, dtype=ids.dtype, device=ids.device).view(req.batch, width)
        if req.ragged:
            # Prompts of different lengths: left-padded to the longest, as transformers lays out
            # a batched decoder-only generate (so column Lmax starts every answer).
            lmax = ids.shape[1]
            prompts = torch.full_like(ids, req.pad_id)
            for b, n in enumerate(req.lengths):
                prompts[b, lmax - n :] = ids[b, :n]
            ids = prompts
        stats = self.last_stats
        stats.other_s += time.perf_counter() - t0
        return GenerateOutput(sequences=torch.cat([ids, out], dim=1), stats=stats)

    # ------------------------------------------------------------------ the driver
    def _run(self, tree: bool, req: Request):
        """Prefill, then the driver: plain steps, the static round, lookup trees alone (no
        head) or the dynamic round. Yields, per round, one list of committed token ids per
        sequence."""
        st = self._state
        st.epoch += 1  # a suspended stream of an earlier call now fails on resumption
        run = Run(req, DecodeStats(), st.epoch)
        self.last_stats = run.stats
        if req.max_new_tokens == 0:
            return
        cfg, t0 = self.config, time.perf_counter()
        st.ensure(req.batch, req.need)
        root, feats = phases.prefill(st, req)
        t1 = time.perf_counter()
        run.stats.verify_s += t1 - t0
        static = tree and self.uses_static_round
        if tree and not static and (cfg.lookup or self.draft is None):
            from eagle2_kernels.runtime.lookup import LookupDrafter

            run.lookup = LookupDrafter(req.input_ids, req.lengths, req.need)  # sees every chunk from here on
        chunks = run.commit([[t] for t in root.tolist()])
        pending = phases.prompt_pairs(req, root, feats) if tree and self.draft is not None and not static else None
        run.stats.other_s += time.perf_counter() - t1
        yield chunks
        if not tree:
            yield from plain_rounds(st, run, root)
        elif static:
            yield from static_rounds(st, run, self._statics, feats, root, self.cost_model)
        elif self.draft is None:
            yield from lookup_rounds(st, run, root, self.cost_model(req.batch) if cfg.adaptive else None)
        else:
            policy = self.last_policy = self._policy(req.batch) if cfg.adaptive else None
            yield from tree_rounds(st, run, root, pending, policy)

    @property
    def uses_static_round(self) -> bool:
        """True when ``generate`` runs the static-shape round (config ``static_round``; by
        default on CUDA targets only)."""
        forced = self.config.static_round
        if self.draft is None:
            return False  # lookup trees alone run in the dynamic round
        return self._state.device.type == "cuda" if forced is None else forced

    @property
    def compile_status(self) -> str:
        """How the target's decode forwards run: "compiled (...)" or "eager (<reason>)"."""
        return self._state.adapter.compile_status

    @property
    def head_compile_status(self) -> str:
        """How the draft head's tree steps run: "compiled: ..." per graph (loaded from the disk
        cache or built by this process; "not loaded yet" before the first step), "eager (<reason>)",
        or "no head"."""
        head = self._state.head
        if head is None:
            return "no head"
        if head is self.draft:
            why = "compile off" if not self.config.compile else "compiling unavailable or switched off by the environment"
            return f"eager ({why})"
        return f"compiled: {head.status}"

    def precompile(self, batch: int = 1) -> None:
        """Load the compiled graphs now rather than on first use: the target's forward and the
        draft head's tree step, each built once per machine (about a minute on 2 cores for the
        default model, about 20 s for its head) and loaded from the cache folder afterwards
        (a second or two). A no-op when they run eagerly (see :attr:`compile_status`)."""
        with self._lock.held():
            self._state.adapter.precompile(batch)
            if self._state.head is not self.draft:  # a CompiledHead: every graph it uses
                self._state.head.ensure()

    @property
    def graph_status(self) -> str:
        """How the last static call ran its round: "graphs", "eager (<reason>)", or "dynamic"."""
        sr = self._statics.last
        if sr is None:
            return "dynamic"
        return "graphs" if sr.graphs else f"eager ({sr.graph_error or 'cuda_graphs off'})"

    # ------------------------------------------------------------------ the cost model
    def cost_model(self, batch: int = 1, remeasure: bool = False, progress=None):
        """The :class:`~eagle2_kernels.runtime.costmodel.CostModel` the adaptive policy uses for
        ``batch`` sequences: the one given to the constructor, else measured on this machine on
        first use and cached on disk (``remeasure=True`` times it again)."""
        from eagle2_kernels.runtime import costmodel

        if self._cost_model is not None and not remeasure:
            return self._cost_model
        with self._lock.held():  # measuring runs the target (and may run while another thread decodes)
            cm = self._cost_models.get(batch)
            if cm is None or remeasure:
                st = self._state
                cm = self._cost_models[batch] = costmodel.load(st.adapter, st.head, self.config, batch=batch,
                                                               remeasure=remeasure, progress=progress)
            return cm

    def _policy(self, batch: int):
        from eagle2_kernels.runtime.policy import RoundPolicy

        cfg = self.config
        return RoundPolicy(self.cost_model(batch), cfg.total_tokens - 1, cfg.depth, cfg.top_k)
