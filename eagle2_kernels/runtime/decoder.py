"""TreeSpecDecoder: lossless EAGLE-2 speculative decoding of a transformers causal LM.

One round, with the ops doing the per-node work on device:

    catch-up     draft head over the pairs committed last round        (head's own KV cache)
    expand       root expansion + D steps: head.tree_step + ops.tree_expand
    build        ops.tree_build: the T-1 best candidates -> DraftTree
    verify       one target forward over the T tree tokens (ops.tree_attention inside
                 transformers' attention interface), then ops.verify_greedy / verify_sample
    commit       ops.kv_compact (or kv_compact_paged) moves the accepted path's KV; one host read of
                 (accept length, bonus, path tokens) for EOS / max_new_tokens / streaming

The Python work per round is a fixed number of tensor calls (no loop over nodes).
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator

import torch

from eagle2_kernels import ops
from eagle2_kernels.cache import StaticKVCache
from eagle2_kernels.models.draft_head import EagleDraftHead, check_pair
from eagle2_kernels.models.target import DecodeContext, TargetAdapter
from eagle2_kernels.ops.sampling import process_logits, sample_from_probs
from eagle2_kernels.ops.tree import pack_bits
from eagle2_kernels.runtime.config import DecodeConfig, default_tree
from eagle2_kernels.runtime.locking import lock_for
from eagle2_kernels.runtime.stats import DecodeStats, GenerateOutput

__all__ = ["TreeSpecDecoder", "GenerateOutput", "DecodeStats", "InputTypeError"]

_CACHE_ROUND = 128  # caches sized per call grow in steps of this many slots


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type (say, float input ids). Also a ValueError, so that
    ``except ValueError`` catches every bad-input error of the decoder."""


def _check_sampling(temperature, top_p, top_k) -> tuple[float, float, int]:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a real number >= 0 (0 = greedy), got {temperature!r}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k (the sampling filter) must be an int >= 0 (0 = off), got {top_k!r}")
    return temperature, float(top_p), int(top_k)


def _compile_note(message: str) -> None:
    """Tell the user why the first call of a new size pauses (a compile, once per process)."""
    import sys

    print(f"eagle2_kernels: {message}", file=sys.stderr, flush=True)


class TreeSpecDecoder:
    """EAGLE-2 decoding of ``target`` with draft head ``draft``: output identical to plain
    decoding (greedy: token for token; sampling: in distribution), in fewer target forwards.

    Args:
        target: a transformers causal LM whose attention goes through transformers'
            attention interface (Llama, Qwen2/3, Mistral, SmolLM, ...). It stays a normal
            model: our attention is switched in only around the decoder's own forwards.
        draft: an :class:`EagleDraftHead` for this target (attached to it if it is not yet), or
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
        draft: EagleDraftHead | None = None,
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
        if config is None:
            # Unset tree fields come from the one table of defaults, by the target's device.
            try:
                device = next(target.parameters()).device
            except (AttributeError, StopIteration):
                device = "cpu"  # not a torch model: the adapter below says what is wrong
            bounds = default_tree(device)
            total_tokens = bounds[0] if total_tokens is None else total_tokens
            depth = bounds[1] if depth is None else depth
            top_k = bounds[2] if top_k is None else top_k
            config = DecodeConfig(
                total_tokens=total_tokens, depth=depth, top_k=top_k, max_length=max_length, backend=backend,
                static_round=static_round, cuda_graphs=cuda_graphs, adaptive=adaptive,
                kv_block_size=kv_block_size, lookup=lookup, compile=compile,
            )
        elif not isinstance(config, DecodeConfig):
            raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
        self.config = config
        backend, max_length = config.backend, config.max_length
        if draft is not None and not isinstance(draft, EagleDraftHead):
            raise TypeError(f"draft must be an EagleDraftHead or None (lookup trees only), got {type(draft).__name__}")
        if draft is None and not config.lookup:
            raise ValueError("lookup=False needs a draft head: without one the trees come from context lookup alone")
        check_pair(target, draft, "TreeSpecDecoder")  # a target/head pair that cannot decode exactly
        # The model's lock (runtime/locking.py): building an adapter switches the model's
        # attention and back, which must not interleave with another thread's forward.
        self._lock = lock_for(target)
        with self._lock.held():
            self._adapter = TargetAdapter(target, backend=backend)  # validates the target first
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self._lookup_run = None  # the LookupDrafter of the running call (runtime/lookup.py)
        if draft is not None:
            self._attach_head(target, draft, backend)
        if config.compile:
            # Compiled decode forwards (models/compiled.py): lazily, per forward size.
            with self._lock.held():
                self._adapter.enable_compile(config.compile, config.compile_buckets, _compile_note)
        if config.cuda_graphs is True and self._adapter.device.type != "cuda":
            raise ValueError(
                f"cuda_graphs=True needs a CUDA target, the model is on {self._adapter.device}; "
                f"use cuda_graphs='auto' or False (static_round=True runs the static round eagerly)"
            )
        from eagle2_kernels.runtime.costmodel import CostModel

        if cost_model is not None and not isinstance(cost_model, CostModel):
            raise TypeError(f"cost_model must be a CostModel or None, got {type(cost_model).__name__}")
        self._cost_model = cost_model
        self._cost_models: dict[int, CostModel] = {}
        self._chain_masks: dict[int, torch.Tensor] = {}
        self.last_policy = None  # the RoundPolicy of the last adaptive call (sizes chosen, ...)
        self._static = None  # StaticRound of the last static call (buffers, captured graphs)
        self._statics: dict[tuple[int, int], object] = {}  # (batch, T) -> StaticRound
        self._static_profile: dict[int, list[float]] = {}  # batch -> draft confidence profile
        self._read_lag: int | None = None  # see _static_loop
        self._closed = False
        self._epoch = 0  # bumped by every call: a suspended stream notices it was overtaken
        self._tcache: StaticKVCache | None = None
        self._dcache: StaticKVCache | None = None
        if max_length is not None:
            self._ensure_buffers(1, max_length)

    def _attach_head(self, target, draft: EagleDraftHead, backend) -> None:
        """Check the head against the target (device, dtype, top_k) and attach it."""
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
                self._adapter = TargetAdapter(target, backend=backend, feature_layers=draft.feature_layers)
        if self.config.top_k > draft.draft_vocab_size:
            raise ValueError(
                f"top_k={self.config.top_k} exceeds the draft vocabulary ({draft.draft_vocab_size} tokens)"
            )

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(cls, target=None, draft=None, dtype: torch.dtype | None = None, device=None, **config):
        """Build a decoder from names, paths or objects.

        Args:
            target: a transformers causal LM, or a local name/path loaded with
                ``AutoModelForCausalLM.from_pretrained`` (its tokenizer becomes
                ``dec.tokenizer``); None = the embedded default (SmolLM2-135M-Instruct).
            draft: an :class:`EagleDraftHead`, a directory in the released EAGLE-1/2 or EAGLE-3
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
            draft = EagleDraftHead.from_pretrained(draft, target=target)
        return cls(target, draft, tokenizer=tokenizer, **config)

    def close(self) -> None:
        """Release the caches. The target was never left patched (our attention is only
        switched in around our own forwards), so nothing else needs undoing. Waits for a call
        running in another thread (a stream there holds the lock until it is finished or closed)."""
        with self._lock.held():
            self._release_buffers()

    def _release_buffers(self) -> None:
        self._tcache = self._dcache = None
        self._static = None
        self._statics = {}
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

    # ------------------------------------------------------------------ buffers
    def _ensure_buffers(self, batch: int, need: int) -> None:
        """Allocate (or reuse) the static caches and the per-round constant tensors."""
        cfg = self.config
        if cfg.max_length is not None:
            capacity = cfg.max_length
        else:
            if self._adapter.compiled is not None:  # room for a padded bucket past the tree
                need += max(0, self._adapter.compiled.buckets[-1] - cfg.total_tokens)
            capacity = -(-need // _CACHE_ROUND) * _CACHE_ROUND
            if self._tcache is not None and self._tcache.capacity >= capacity:
                capacity = self._tcache.capacity
        ad, head = self._adapter, self.draft
        dev, dtype = ad.device, ad.dtype
        block = cfg.kv_block_size
        if self._tcache is None or not self._tcache.matches(batch, capacity, dtype, dev, block):
            self._tcache = ad.new_cache(batch, capacity, block)
            d_cap = capacity + cfg.depth * cfg.top_k + cfg.depth + 2
            self._dcache = None if head is None else StaticKVCache(1, batch, head.num_kv_heads, d_cap,
                                                                   head.head_dim, dtype, dev)
            self._positions = torch.arange(d_cap, device=dev, dtype=torch.int64)
        if getattr(self, "_consts_for", None) != (batch, dev):
            self._make_constants(batch, dev)

    def _make_constants(self, batch: int, dev) -> None:
        K, D = self.config.top_k, self.config.depth
        # Expansion step j (1-based) writes its K rows at tree slots (j-1)*K + r: own bits.
        words = (D * K + 31) // 32
        own = pack_bits(torch.eye(D * K, dtype=torch.bool).view(D, K, D * K))  # row (j, r): bit j*K + r
        self._own_bits = own.to(dev).unsqueeze(1).expand(D, batch, K, words).contiguous()
        # Catch-up over n <= D + 2 committed pairs: causal chain masks.
        n_max = D + 2
        self._chain = pack_bits(torch.tril(torch.ones(n_max, n_max, dtype=torch.bool))).to(dev)
        self._zero_scores = torch.zeros(batch, 1, dtype=torch.float32, device=dev)
        self._root_parent = torch.full((batch, K), -1, dtype=torch.int64, device=dev)
        self._one_mask = torch.ones(batch, 1, 1, dtype=torch.int32, device=dev)
        self._consts_for = (batch, dev)

    # ------------------------------------------------------------------ input checks
    def _prompts(self, input_ids, attention_mask) -> tuple[torch.Tensor, list[int]]:
        """Prompts -> (right-padded ids [B, Lmax] on the target's device, lengths [B]).

        Accepts a [B, L] or [L] integer tensor (with an optional ``attention_mask`` of 0/1, left
        or right padding), a tokenizer's BatchEncoding / dict with ``input_ids`` (and
        ``attention_mask``), or a list of 1-D tensors / lists of ids of different lengths.
        """
        if isinstance(input_ids, Mapping) and "input_ids" in input_ids:
            if attention_mask is None:
                attention_mask = input_ids.get("attention_mask")
            input_ids = input_ids["input_ids"]
        dev = self._adapter.device
        if isinstance(input_ids, (list, tuple)):
            if attention_mask is not None:
                raise ValueError("attention_mask goes with a padded [B, L] tensor, not with a list of prompts")
            if not input_ids:
                raise ValueError("input_ids is an empty list; give at least one prompt")
            if all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in input_ids):
                raise ValueError(
                    f"input_ids is a flat list of {len(input_ids)} ints; a list holds prompts: write "
                    f"[[...]] for one prompt, or pass torch.tensor([...])"
                )
            rows = []
            for i, row in enumerate(input_ids):
                if isinstance(row, (str, bytes)):
                    raise InputTypeError(f"prompt {i} of the list is text ({row[:20]!r}); tokenize it first, "
                                         f"e.g. tokenizer(texts, return_tensors='pt', padding=True)")
                if not torch.is_tensor(row) and hasattr(row, "__len__") and len(row) == 0:
                    raise ValueError(f"prompt {i} of the list is empty; every prompt needs at least one token")
                try:
                    t = row if torch.is_tensor(row) else torch.as_tensor(row)
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise InputTypeError(f"prompt {i} of the list must be a 1-D tensor or a list of int token "
                                         f"ids, got {type(row).__name__} ({exc})") from None
                if t.dim() != 1:
                    raise ValueError(f"prompt {i} of the list must be 1-D, got shape {tuple(t.shape)}")
                if t.numel() == 0:
                    raise ValueError(f"prompt {i} of the list is empty; every prompt needs at least one token")
                rows.append(self._as_ids(t, f"prompt {i}"))
        else:
            if isinstance(input_ids, (str, bytes)):
                raise InputTypeError(
                    f"input_ids is text ({input_ids[:20]!r}); tokenize it first, e.g. "
                    f"tokenizer(text, return_tensors='pt') (or dec.tokenizer when the decoder has one)"
                )
            if isinstance(input_ids, Mapping):
                raise ValueError(f"input_ids is a mapping without an 'input_ids' key (keys: {sorted(map(str, input_ids))}); "
                                 f"pass a tokenizer's output or a tensor of token ids")
            if not torch.is_tensor(input_ids):
                raise InputTypeError(
                    f"input_ids must be a torch.Tensor of token ids [B, L] (or a list of 1-D prompts), got "
                    f"{type(input_ids).__name__}"
                )
            ids = self._as_ids(input_ids, "input_ids")
            if ids.dim() == 1:
                ids = ids.unsqueeze(0)
            if ids.dim() != 2:
                raise ValueError(f"input_ids must have shape [B, L], got {tuple(ids.shape)}")
            if attention_mask is not None and tuple(torch.as_tensor(attention_mask).shape) != tuple(ids.shape):
                raise ValueError(f"attention_mask shape {tuple(torch.as_tensor(attention_mask).shape)} differs "
                                 f"from input_ids {tuple(ids.shape)}")
            if attention_mask is None or bool(torch.as_tensor(attention_mask).all()):
                rows = None
                if ids.shape[0] < 1 or ids.shape[1] < 1:
                    raise ValueError(f"input_ids must hold a non-empty prompt, got shape {tuple(ids.shape)}")
                if ids.device != dev:
                    raise ValueError(f"input_ids is on {ids.device} but the target model on {dev}; move it there")
                self._check_vocab(ids, "input_ids")
                return ids, [ids.shape[1]] * ids.shape[0]
            mask = torch.as_tensor(attention_mask)
            rows = []
            for b in range(ids.shape[0]):
                keep = torch.nonzero(mask[b].to("cpu") != 0).flatten()
                if keep.numel() and keep[-1] - keep[0] + 1 != keep.numel():
                    raise ValueError(
                        f"attention_mask row {b} has zeros between ones; only left or right padding is supported"
                    )
                rows.append(ids[b, keep.to(ids.device)])
        lengths = [int(r.numel()) for r in rows]
        if min(lengths) < 1:
            raise ValueError(f"every prompt must hold at least one token, got lengths {lengths}")
        for i, r in enumerate(rows):
            if r.device != dev:
                raise ValueError(f"prompt {i} is on {r.device} but the target model on {dev}; move it there")
            self._check_vocab(r, f"prompt {i}")
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.int64, device=dev)
        for b, r in enumerate(rows):
            ids[b, : lengths[b]] = r
        return ids, lengths

    @staticmethod
    def _as_ids(t: torch.Tensor, name: str) -> torch.Tensor:
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise InputTypeError(f"{name} must be an integer tensor (int64 token ids), got dtype {t.dtype}")
        return t if t.dtype in (torch.int32, torch.int64) else t.long()  # embeddings take int32/int64

    def _check_vocab(self, ids: torch.Tensor, name: str) -> None:
        vocab = self._adapter.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} must lie in [0, {vocab}), got values in [{lo}, {hi}]")

    def _check_call(self, input_ids, max_new_tokens, temperature, top_p, top_k, eos_token_id, generator, tree: bool,
                    attention_mask=None) -> "_Request":
        if self._closed:
            raise RuntimeError("this TreeSpecDecoder was closed; create a new one")
        input_ids, lengths = self._prompts(input_ids, attention_mask)
        length = max(lengths)
        vocab = self._adapter.vocab_size
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        temperature, top_p, top_k = _check_sampling(temperature, top_p, top_k)
        if eos_token_id is None:
            # As transformers' generate: fall back to the model's generation config.
            gen_cfg = getattr(self.target, "generation_config", None)
            eos_token_id = getattr(gen_cfg, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = []
        items = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else eos_token_id
        try:
            items = list(items)
        except TypeError:
            raise ValueError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}") from None
        for e in items:
            if isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < vocab:
                raise ValueError(f"eos_token_id entries must be ints in [0, {vocab}), got {eos_token_id!r}")
        eos = frozenset(int(e) for e in items)
        # Padding of sequences that stop early (B > 1), as transformers: pad id, else first EOS.
        pad = getattr(getattr(self.target, "generation_config", None), "pad_token_id", None)
        pad_id = int(pad) if isinstance(pad, numbers.Integral) else (int(items[0]) if items else 0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        extra = self.config.total_tokens if tree else 1
        need = length + max_new_tokens + extra
        limit = self._adapter.max_positions
        if limit is not None and need > limit:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) + {extra} verify slots = {need} "
                f"exceeds the model's max_position_embeddings={limit}"
            )
        cap = self.config.max_length
        if cap is not None and need > cap:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) + {extra} verify slots = {need} "
                f"exceeds the decoder's max_length={cap}"
            )
        return _Request(input_ids, lengths, max_new_tokens, temperature, top_p, top_k, eos, need, generator, pad_id)

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
            req = self._check_call(input_ids, max_new_tokens, temperature, top_p, top_k, eos_token_id, generator,
                                   True, attention_mask)
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
            req = self._check_call(input_ids, max_new_tokens, temperature, top_p, top_k, eos_token_id, generator,
                                   False, attention_mask)
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
        req = self._check_call(
            input_ids, max_new_tokens, temperature, top_p, top_k, eos_token_id, generator, not plain, attention_mask
        )
        return self._locked_rounds(not plain, req)

    def _locked_rounds(self, tree, req: "_Request"):
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

    # ------------------------------------------------------------------ loops
    def _collect(self, tree, req: "_Request"):
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
        sequences = torch.cat([ids, out], dim=1)
        stats = self.last_stats
        stats.other_s += time.perf_counter() - t0
        return GenerateOutput(sequences=sequences, stats=stats)

    def _sync(self) -> None:
        if self._adapter.device.type == "cuda":
            torch.cuda.synchronize(self._adapter.device)

    def _uniforms(self, shape, generator) -> torch.Tensor:
        dev = self._adapter.device
        if generator is None:
            return torch.rand(shape, device=dev)
        return torch.rand(shape, generator=generator, device=generator.device).to(dev)

    def _pick(self, logits, temperature, top_p, top_k, generator) -> torch.Tensor:
        """First token / plain step from [B, V] logits: argmax or processed sampling. [B] int64."""
        if temperature == 0.0:
            return logits.argmax(dim=-1)
        probs = process_logits(logits, temperature, top_p, top_k)
        return sample_from_probs(probs, self._uniforms(logits.shape[:1], generator))

    @staticmethod
    def _cut(tokens: list[int], budget: int, eos: frozenset) -> tuple[list[int], bool]:
        """Truncate a round's tokens at the first EOS (kept) and at the token budget."""
        done = False
        if eos:
            for i, t in enumerate(tokens):
                if t in eos:
                    tokens, done = tokens[: i + 1], True
                    break
        if len(tokens) >= budget:
            tokens, done = tokens[:budget], True
        return tokens, done

    def _commit(self, proposals, active, budgets, eos, stats) -> list[list[int]]:
        """Cut each active sequence's proposed tokens (EOS, budget); record the round."""
        chunks, total = [], 0
        for b, tokens in enumerate(proposals):
            if not active[b]:
                chunks.append([])
                continue
            chunk, done = self._cut(tokens, budgets[b], eos)
            budgets[b] -= len(chunk)
            active[b] = not done
            total += len(chunk)
            chunks.append(chunk)
        stats.record(total)
        if self._lookup_run is not None:
            self._lookup_run.extend(chunks)  # the context the next lookup searches
        return chunks

    def _run(self, tree, req: "_Request"):
        """The decoding loop; yields, per round, one list of committed token ids per sequence.

        Sequences of a batch advance in lockstep; one that has stopped (EOS or budget) keeps
        riding along with frozen cache lengths and its tokens are discarded.
        """
        stats = DecodeStats()
        self.last_stats = stats
        self._epoch += 1
        epoch = self._epoch
        if req.max_new_tokens == 0:
            return
        t_start = time.perf_counter()
        input_ids, lengths = req.input_ids, req.lengths
        temperature, top_p, top_k, eos, generator = req.temperature, req.top_p, req.top_k, req.eos, req.generator
        batch, length = input_ids.shape
        self._ensure_buffers(batch, req.need)
        tc, dc, ad = self._tcache, self._dcache, self._adapter
        backend = self.config.backend
        budgets = [req.max_new_tokens] * batch
        active = [True] * batch

        # ---- prefill: one target forward over the prompts commits the first token. Prompts
        # of different lengths are right-padded: causal attention keeps each valid position
        # blind to the padding after it, and the cache lengths then drop the padding's KV.
        tc.set_length(0)
        if dc is not None:
            dc.set_length(0)
        ctx = DecodeContext(tc, 0, None, length, backend)
        last = torch.tensor(lengths, device=input_ids.device) - 1
        keep = 1 if not req.ragged else torch.unique(last)
        logits, feats = ad.forward(input_ids, self._positions[:length].expand(batch, length), ctx,
                                   logits_to_keep=keep)
        tc.set_lengths(lengths)
        if req.ragged:  # row b's last prompt position among the kept ones
            logits = logits[torch.arange(batch, device=logits.device), torch.searchsorted(keep, last)][:, None]
        root = self._pick(logits[:, -1], temperature, top_p, top_k, generator)  # [B]
        t_verify = time.perf_counter()
        stats.verify_s += t_verify - t_start
        # Context lookup (runtime/lookup.py): its store sees every chunk committed from here on.
        lookup = None
        if tree and not self.uses_static_round and (self.config.lookup or self.draft is None):
            from eagle2_kernels.runtime.lookup import LookupDrafter

            lookup = LookupDrafter(input_ids, lengths, req.need)
        self._lookup_run = lookup
        chunks = self._commit([[t] for t in root.tolist()], active, budgets, eos, stats)
        if tree and self.uses_static_round:
            stats.other_s += time.perf_counter() - t_verify
            yield chunks
            yield from self._static_loop(input_ids, lengths, feats, root, active, budgets, temperature, top_p,
                                         top_k, eos, generator, stats, epoch)
            return
        if not tree:
            yield from self._plain_loop(chunks, root, active, budgets, temperature, top_p, top_k, eos, generator,
                                        stats, epoch)
            return
        if self.draft is None:
            from eagle2_kernels.runtime.lookup import lookup_rounds

            stats.other_s += time.perf_counter() - t_verify
            yield chunks
            yield from lookup_rounds(self, req, root, active, budgets, lookup, stats, epoch)
            return
        # Pending catch-up: the prompt's pairs (f_t, x_{t+1}), t = 1..L (row b: its own L).
        pending = _Pending(batch)
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        nxt.scatter_(1, last.view(batch, 1), root.view(batch, 1))
        pending.add(feats, nxt, lengths)
        stats.other_s += time.perf_counter() - t_verify
        yield chunks
        t_mark = time.perf_counter()
        first_catchup = True
        cfg = self.config
        K = cfg.top_k
        head = self.draft
        policy = self._policy(batch) if cfg.adaptive else None
        self.last_policy = policy
        while any(active):
            self._check_epoch(epoch)
            if policy is not None and policy.plain_due > 0:
                # Backoff: drafting has not paid lately. A plain step; its pair waits for the
                # next catch-up, which takes all the pending pairs in one draft forward.
                root = yield from self._plain_round(root, pending, active, budgets, temperature, top_p, top_k,
                                                    eos, generator, stats)
                policy.take_plain_step()
                t_mark = time.perf_counter()
                continue
            # ---------------- draft: catch-up, root expansion, expansions, build
            lround = lookup.begin_round(active) if lookup is not None else None  # context continuations
            stable = dc.host_lengths
            pend_feats, pend_tokens, pend_n = pending.take(active)
            n = pend_tokens.shape[1]
            with torch.no_grad():
                if first_catchup:
                    hs = head.prefill(pend_feats, pend_tokens, dc)
                    first_catchup = False
                else:
                    # Rows past a sequence's own count are padding: later slots, never visible.
                    mask = self._chain_mask(n).unsqueeze(0).expand(batch, n, -1)
                    positions = dc.lengths[:, None].to(torch.int64) + self._positions[:n]
                    hs = head.tree_step(pend_feats, pend_tokens, positions, dc, stable, mask, n, backend,
                                        from_target=True)
                last = torch.tensor([max(c - 1, 0) for c in pend_n], device=hs.device)
                h_parent = hs.gather(1, last.view(batch, 1, 1).expand(batch, 1, hs.shape[-1]))
                # Stopped sequences keep their lengths (their tokens are discarded).
                stable = [s + c for s, c in zip(stable, pend_n)]
                dc.set_lengths(stable)
                slots = lambda j: [s + (j - 1) * K for s in stable]  # noqa: E731
                if policy is None:
                    draft_tree, sizing = self._expand_and_build(h_parent, root, slots, backend, lookup=lround), None
                else:
                    draft_tree, sizing = self._expand_adaptive(h_parent, root, slots, backend, policy, n,
                                                               tc.host_lengths, active, lookup=lround)
            self._sync()
            t_draft = time.perf_counter()
            stats.draft_s += t_draft - t_mark
            if draft_tree is None:
                # The policy chose n = 0: verifying any draft would not pay. Plain step.
                t_mark = t_draft
                root = yield from self._plain_round(root, pending, active, budgets, temperature, top_p, top_k,
                                                    eos, generator, stats)
                t_mark = time.perf_counter()
                continue
            T = draft_tree.tokens.shape[1]

            # ---------------- verify: one target forward over the tree, then acceptance
            prefix = tc.host_lengths
            ctx = DecodeContext(tc, prefix[0] if batch == 1 else prefix, draft_tree.mask, T, backend)
            positions = draft_tree.depth.to(torch.int64) + tc.lengths[:, None]
            logits, feats = ad.forward(draft_tree.tokens, positions, ctx)
            if temperature == 0.0:
                path, alen, bonus = ops.verify_greedy(draft_tree, logits, backend=backend)
            else:
                uniforms = self._uniforms((batch, T), generator)
                path, alen, bonus = ops.verify_sample(
                    draft_tree, logits, uniforms, temperature, top_p, top_k, backend=backend
                )
            self._sync()
            t_verify = time.perf_counter()
            stats.verify_s += t_verify - t_draft

            # ---------------- commit: compact KV, one host read, EOS / budget
            tc.compact(path, alen, backend=backend)
            path_tokens = draft_tree.tokens.gather(1, path.clamp(min=0))
            P = path.shape[1]
            packed = torch.cat([alen.view(batch, 1), bonus.view(batch, 1), path_tokens, path], dim=1).tolist()
            pend_n = [row[0] for row in packed]
            proposals = [row[3 : 2 + row[0]] + [row[1]] for row in packed]
            was_active = list(active)
            tc.set_lengths([p + (a if was_active[b] else 0) for b, (p, a) in enumerate(zip(prefix, pend_n))])
            if sizing is not None:
                paths = [row[2 + P + 1 : 2 + P + row[0]] if was_active[b] else None for b, row in enumerate(packed)]
                sizing.record(policy, stats, paths)
            if lround is not None:
                lookup.record(lround, [row[2 + P + 1 : 2 + P + row[0]] if was_active[b] else None
                                       for b, row in enumerate(packed)], T, stats)
            chunks = self._commit(proposals, active, budgets, eos, stats)
            stats.tree_sizes.append(T)
            if any(active):
                # Next catch-up: pairs (feature of path node i, token after it), i < accept_len;
                # the token after the deepest node is the bonus.
                a_max = max(pend_n)
                sel = path[:, :a_max].clamp(min=0)
                toks = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], dim=1)
                toks.scatter_(1, (alen - 1).view(batch, 1), bonus.view(batch, 1))
                pending.add(feats.gather(1, sel[:, :, None].expand(batch, a_max, feats.shape[-1])),
                            toks[:, :a_max], pend_n)
                root = bonus.view(batch)
            t_mark = time.perf_counter()
            stats.other_s += t_mark - t_verify
            yield chunks
            t_mark = time.perf_counter()

    def _plain_round(self, root, pending, active, budgets, temperature, top_p, top_k, eos, generator, stats):
        """One plain step inside the speculative loop: the target over the root alone (the
        tree of one node). Its pair (feature of the root, next token) joins the pending
        catch-up. Yields the round's chunks; returns the next root."""
        t0 = time.perf_counter()
        tc, ad = self._tcache, self._adapter
        batch = root.shape[0]
        prefix = tc.host_lengths
        ctx = DecodeContext(tc, prefix[0] if batch == 1 else prefix, self._one_mask, 1, self.config.backend)
        logits, feats = ad.forward(root.view(batch, 1), tc.lengths.to(torch.int64).view(batch, 1), ctx)
        counts = [1 if a else 0 for a in active]
        tc.set_lengths([p + c for p, c in zip(prefix, counts)])
        token = self._pick(logits[:, -1], temperature, top_p, top_k, generator)
        pending.add(feats, token.view(batch, 1), counts)
        t1 = time.perf_counter()
        stats.verify_s += t1 - t0
        chunks = self._commit([[t] for t in token.tolist()], active, budgets, eos, stats)
        stats.tree_sizes.append(1)
        stats.other_s += time.perf_counter() - t1
        yield chunks
        return token

    # ------------------------------------------------------------------ the static round
    @property
    def uses_static_round(self) -> bool:
        """True when ``generate`` runs the static-shape round (config ``static_round``; by
        default on CUDA targets only)."""
        forced = self.config.static_round
        if self.draft is None:
            return False  # lookup trees alone run in the dynamic round
        return self._adapter.device.type == "cuda" if forced is None else forced

    @property
    def compile_status(self) -> str:
        """How the target's decode forwards run: "compiled (...)" or "eager (<reason>)"."""
        return self._adapter.compile_status

    def precompile(self, batch: int = 1) -> None:
        """Compile the target's forwards for ``batch`` sequences now rather than on first use
        (about 40 s per bucket for a 30-layer model on 2 cores; once per process). A no-op when
        they run eagerly (see :attr:`compile_status`)."""
        with self._lock.held():
            self._adapter.precompile(batch)

    @property
    def graph_status(self) -> str:
        """How the last static call ran its round: "graphs", "eager (<reason>)", or "dynamic"."""
        sr = self._static
        if sr is None:
            return "dynamic"
        return "graphs" if sr.graphs else f"eager ({sr.graph_error or 'cuda_graphs off'})"

    def _expand_and_build(self, h_parent, root, level_slots, backend, error_flag=None, sizer=None,
                          total_tokens=None, lookup=None):
        """Root expansion, the expansion levels and ``tree_build``: the draft tree of a round.

        ``h_parent`` [B, 1, H] is the draft feature of each sequence's last committed token and
        ``root`` [B] that token; the draft cache's lengths already count the catch-up rows.
        ``level_slots(j)`` gives the first draft-cache slot of level ``j`` (1-based): a host list
        in the dynamic round, a device tensor in the static (graph-captured) one.

        Without ``sizer`` the shape is the config's: D levels, T nodes; trip count and shapes
        are fixed by the config alone (the static round captures this). With a
        :class:`_Sizer` (the adaptive dynamic round) the sizer sees each level's scores on the
        host, decides whether to expand further and how many nodes to keep; it may return
        None (verify no draft: a plain step). ``lookup`` (a ``runtime.lookup.LookupRound``)
        merges the context's continuations into the candidates before the sizing and the build.
        """
        head, dc = self.draft, self._dcache
        K, D = self.config.top_k, self.config.depth
        T = total_tokens or self.config.total_tokens
        d2t = head.draft_to_target
        batch, hidden = h_parent.shape[0], h_parent.shape[-1]
        ct, cs, ni, ns = ops.tree_expand(head.logits(h_parent), self._zero_scores, K, d2t, backend=backend)
        cand_tokens, cand_scores, cand_parents = [ct.view(batch, K)], [cs.view(batch, K)], [self._root_parent]
        f_tokens = ct.view(batch, K).gather(1, ni)
        f_index = ni  # candidate index of each frontier row
        f_scores = ns
        f_feats = h_parent.expand(batch, K, hidden)
        f_mask = self._own_bits[0]
        base = K
        draft_pos = dc.lengths[:, None].to(torch.int64).expand(batch, K)
        if sizer is not None and lookup is not None:
            sizer.seed(lookup.seed_scores)  # the expansion decisions see the lookup's nodes too
        j = 1
        while j <= D and (sizer is None or sizer.keep_going(cand_scores[-1], f_scores, j - 1)):
            hs = head.tree_step(f_feats, f_tokens, draft_pos + (j - 1), dc, level_slots(j), f_mask, j * K, backend)
            ct, cs, ni, ns = ops.tree_expand(head.logits(hs), f_scores, K, d2t, backend=backend)
            cand_tokens.append(ct.view(batch, K * K))
            cand_scores.append(cs.view(batch, K * K))
            cand_parents.append(f_index.repeat_interleave(K, dim=1))
            if j < D:
                rows = ni // K  # frontier row that is each new frontier node's parent
                f_tokens = ct.view(batch, K * K).gather(1, ni)
                f_index = ni + base
                f_scores = ns
                f_feats = hs.gather(1, rows[:, :, None].expand(batch, K, hidden))
                f_mask = f_mask.gather(1, rows[:, :, None].expand(batch, K, f_mask.shape[-1])) | self._own_bits[j]
            base += K * K
            j += 1
        tokens, scores, parents = torch.cat(cand_tokens, 1), torch.cat(cand_scores, 1), torch.cat(cand_parents, 1)
        if lookup is not None:
            # The context's continuations join the candidates here, before the size and the
            # tree are chosen. Like the head's, they come from draft-side information only
            # (committed tokens, earlier rounds' outcomes): the tree is fixed before the target
            # sees it, so greedy and sampled acceptance stay lossless.
            tokens, scores, parents = lookup.merge(tokens, scores, parents, batch, scores.device)
        if sizer is not None:
            T = sizer.size(cand_scores[-1], j - 1, merged=None if lookup is None else lookup.scores)
            if T is None:
                return None
        self._cand_scores = scores  # [B, C], read by the static round's profile (on device)
        return ops.tree_build(tokens, scores, parents, root, T, backend=backend, error_flag=error_flag)

    def _expand_adaptive(self, h_parent, root, level_slots, backend, policy, catchup_rows, prefix, active,
                         lookup=None):
        """The adaptive round's draft tree (or None for a plain step) and its sizer."""
        sizer = _Sizer(policy, catchup_rows, max(prefix), active)
        tree = self._expand_and_build(h_parent, root, level_slots, backend, sizer=sizer, lookup=lookup)
        return tree, (None if tree is None else sizer)

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
                cm = self._cost_models[batch] = costmodel.load(self, batch=batch, remeasure=remeasure,
                                                               progress=progress)
            return cm

    def _policy(self, batch: int):
        from eagle2_kernels.runtime.policy import RoundPolicy

        cfg = self.config
        return RoundPolicy(self.cost_model(batch), cfg.total_tokens - 1, cfg.depth, cfg.top_k)

    def _chain_mask(self, n: int) -> torch.Tensor:
        """[n, ceil(n/32)] int32: row i sees rows 0..i (the catch-up's causal mask)."""
        if n <= self._chain.shape[0]:
            return self._chain[:n, : (n + 31) // 32]
        mask = self._chain_masks.get(n)
        if mask is None:
            words = pack_bits(torch.tril(torch.ones(n, n, dtype=torch.bool)))
            mask = self._chain_masks[n] = words.to(self._adapter.device)
        return mask

    def _static_round(self, batch: int, total_tokens: int):
        from eagle2_kernels.runtime.graphs import StaticRound

        sr = self._statics.get((batch, total_tokens))
        if sr is None or sr.tcache is not self._tcache or sr.dcache is not self._dcache:
            sr = self._statics[(batch, total_tokens)] = StaticRound(self, batch, total_tokens)
        self._static = sr
        return sr

    # Tree sizes the static round captures graphs for (each its own StaticRound).
    STATIC_BUCKETS = (2, 4, 8, 16, 32, 60)

    def _static_tree_size(self, batch: int) -> int:
        """T of this static call. Fixed shapes: the config's. Adaptive: the size bucket that the
        cost model and the draft's confidence profile of earlier static calls (accumulated on the
        device, read after each call) predict to be fastest; the config's T until one exists.
        The choice reads nothing of this call's target outputs, so acceptance stays lossless."""
        cfg = self.config
        profile = self._static_profile.get(batch)
        if not cfg.adaptive or profile is None:
            return cfg.total_tokens
        from eagle2_kernels.runtime.policy import predicted_rates

        sizes = sorted({t for t in self.STATIC_BUCKETS if t < cfg.total_tokens} | {cfg.total_tokens})
        rates = predicted_rates(profile, self.cost_model(batch), cfg.depth, catchup_rows=min(cfg.depth + 2, 8))
        best = max(sizes, key=lambda t: rates[min(t - 1, len(rates) - 1)][2])
        return best

    def _static_loop(self, input_ids, lengths, feats, root, active, budgets, temperature, top_p, top_k, eos,
                     generator, stats, epoch):
        """Rounds over static buffers (runtime/graphs.py): no host reads inside a round; the
        host reads each round's packed record one round late on CUDA (pinned copy + event)."""
        if not any(active):
            return
        t0 = time.perf_counter()
        batch, length = input_ids.shape
        dev = self._adapter.device
        cuda = dev.type == "cuda"
        dc, head = self._dcache, self.draft
        with torch.no_grad():
            # The draft catches up on the prompt's pairs but the last, (f_L, root): that one is
            # the first round's (padded) catch-up, so every round has the same shape. Rows of
            # shorter prompts hold padding after their own L - 1 pairs (then cut by the length).
            if length > 1:
                head.prefill(feats[:, : length - 1], input_ids[:, 1:], dc)
            dc.set_lengths([n - 1 for n in lengths])
            last = torch.tensor(lengths, device=dev) - 1
            feat_last = feats[torch.arange(batch, device=dev), last]
        sr = self._static_round(batch, self._static_tree_size(batch))
        sr.profile_sum.zero_()
        sr.profile_rounds.zero_()
        sr.set_sampling(temperature, top_p, top_k)
        sr.start(root, feat_last, torch.tensor(budgets), eos, torch.tensor(active, device=dev))
        want = self.config.cuda_graphs
        if cuda and want is not False and not sr.graphs and sr.graph_error is None:
            sr.enable_graphs()
        T = sr.T
        # Rounds the host reads behind the device: 1 on CUDA (round r+1 is launched before round
        # r's record is read, so the device never waits for Python); 0 on CPU, where the phases
        # run synchronously anyway. ``_read_lag`` overrides it (tests run the lagged loop on CPU).
        lag = self._read_lag if self._read_lag is not None else (1 if cuda else 0)
        host = torch.empty((2, batch, sr.record.shape[1]), dtype=torch.int64, pin_memory=cuda)
        queue: list[tuple[int, object]] = []
        events: list[tuple] = []
        pinned_u = torch.empty((2, batch, T), dtype=torch.float32, pin_memory=cuda)
        # Events record on the target's stream: a bare record() would use the *current*
        # device's stream, and for a target on cuda:1 the host could read a stale record.
        stream = torch.cuda.current_stream(dev) if cuda else None
        u_done: list = [None, None]
        stats.other_s += time.perf_counter() - t0
        r = 0
        try:
            while True:
                self._check_epoch(epoch)
                t0 = time.perf_counter()
                if temperature > 0.0:
                    if cuda and generator is not None and generator.device.type == "cpu":
                        # A CPU generator: draw into pinned memory and copy asynchronously (a
                        # pageable copy would wait for the device and end the overlap).
                        u = pinned_u[r % 2]
                        if u_done[r % 2] is not None:
                            u_done[r % 2].synchronize()  # its copy two rounds ago has finished
                        torch.rand((batch, T), generator=generator, out=u)
                        sr.uniforms.copy_(u, non_blocking=True)
                        u_done[r % 2] = torch.cuda.Event()
                        u_done[r % 2].record(stream)
                    else:
                        sr.uniforms.copy_(self._uniforms((batch, T), generator))
                if cuda:
                    marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                    marks[0].record(stream)
                    sr.run_draft()
                    marks[1].record(stream)
                    sr.run_verify()
                    marks[2].record(stream)
                    events.append(marks)
                    slot = r % 2
                    host[slot].copy_(sr.record, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(stream)
                    queue.append((slot, done))
                    stats.other_s += time.perf_counter() - t0
                else:
                    sr.run_draft()
                    t1 = time.perf_counter()
                    sr.run_verify()
                    t2 = time.perf_counter()
                    stats.draft_s += t1 - t0
                    stats.verify_s += t2 - t1
                    host[r % 2].copy_(sr.record)
                    queue.append((r % 2, None))
                r += 1
                if len(queue) <= lag:
                    continue
                t0 = time.perf_counter()
                slot, done = queue.pop(0)
                if done is not None:
                    done.synchronize()
                rows = host[slot].tolist()
                chunks = []
                for b, row in enumerate(rows):
                    n, still, err = row[0], row[1], row[2]
                    if err:
                        raise ValueError(
                            f"tree_build reported error code {err} for sequence {b} (a kept draft "
                            f"candidate's parent was dropped or invalid); the draft scores are not "
                            f"log-probabilities of paths"
                        )
                    chunks.append(row[3 : 3 + n] if active[b] else [])
                    budgets[b] -= n
                    active[b] = bool(still) and active[b]
                stats.record(sum(len(c) for c in chunks))
                stats.tree_sizes.append(T)
                stats.other_s += time.perf_counter() - t0
                yield chunks
                if not any(active):
                    break
        finally:
            if cuda and events:
                torch.cuda.synchronize(dev)
                d = sum(a.elapsed_time(b) for a, b, _ in events) / 1e3
                v = sum(b.elapsed_time(c) for _, b, c in events) / 1e3
                stats.draft_s += d
                stats.verify_s += v
            # The draft's confidence this call (one read, after the rounds): sizes the next call.
            rounds = float(sr.profile_rounds)
            if rounds > 0:
                self._static_profile[batch] = (sr.profile_sum / rounds).tolist()

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            raise RuntimeError(
                "this stream was overtaken: another generate/stream call on the same decoder ran "
                "while it was suspended and reused its caches; consume one stream at a time"
            )

    def _plain_loop(self, chunks, token, active, budgets, temperature, top_p, top_k, eos, generator, stats, epoch):
        """Plain decoding after the prefill: one target forward per token, same cache path."""
        yield chunks
        tc, ad = self._tcache, self._adapter
        backend = self.config.backend
        batch = token.shape[0]
        while any(active):
            self._check_epoch(epoch)
            t0 = time.perf_counter()
            prefix = tc.host_lengths
            ctx = DecodeContext(tc, prefix[0] if batch == 1 else prefix, self._one_mask, 1, backend)
            logits, _ = ad.forward(token.view(batch, 1), tc.lengths.to(torch.int64).view(batch, 1), ctx)
            # A stopped sequence keeps its length: its step is recomputed and discarded.
            tc.set_lengths([p + (1 if active[b] else 0) for b, p in enumerate(prefix)])
            token = self._pick(logits[:, -1], temperature, top_p, top_k, generator)
            proposals = [[t] for t in token.tolist()]
            t1 = time.perf_counter()
            stats.verify_s += t1 - t0
            chunks = self._commit(proposals, active, budgets, eos, stats)
            stats.other_s += time.perf_counter() - t1
            yield chunks


@dataclass(frozen=True)
class _Request:
    """One validated generate / stream call: prompts right-padded to the longest ([B, Lmax]
    int64 on the target's device) with their lengths, the budget, sampling and stop ids, and
    ``need``, the cache slots the call may use."""

    input_ids: torch.Tensor
    lengths: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    eos: frozenset
    need: int
    generator: torch.Generator | None
    pad_id: int  # pads sequences that stop early (and the prompts of a ragged batch)

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def ragged(self) -> bool:
        return min(self.lengths) != self.input_ids.shape[1]


class _Pending:
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
                rows.extend(range(offset, offset + c[2][b]))
                offset += w
            rows = rows or [0]
            index[b] = torch.tensor(rows + [rows[-1]] * (n - len(rows)))
        index = index.to(tokens.device)
        feats = feats.gather(1, index[:, :, None].expand(self.batch, n, feats.shape[-1]))
        return feats, tokens.gather(1, index), totals


class _Sizer:
    """Host side of one adaptive round: collects each level's candidate scores, asks the
    :class:`RoundPolicy` whether to expand further and how many nodes to verify, and after
    verification reports predicted vs accepted nodes. The draft seconds it charges come from
    the cost model (so the choice is reproducible), not from a clock."""

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

    def record(self, policy, stats, paths: list[list[int] | None]) -> None:
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
        policy.record(predicted, accepted)

