"""Hugging Face target adapter: tree attention through transformers' public attention interface.

We register one attention function (and no mask function, so transformers builds no mask
and reads nothing from the inputs to make one) under a name unique to this package. A decoder switches the model to it
only around its own forwards (:meth:`TargetAdapter.forward` restores the previous
implementation before returning), so the user's ``model(...)`` / ``model.generate(...)``
behave exactly as before, even between two rounds of a ``stream``.

During our forward the model is called with explicit ``position_ids``, ``use_cache=False`` and
one extra keyword, ``eagle2_ctx``, that transformers passes through to every attention call
(where a family's decoder layers drop keywords on the way, StableLM and Nemotron, the attention
function finds the same context in a context variable set around the forward).
The attention function writes the layer's rotated k/v into our static cache
(:class:`eagle2_kernels.cache.StaticKVCache`) at ``ctx.slot`` and runs ``ops.tree_attention``
over the cache prefix plus the tree region (or a plain causal attention for the prefill).
Every call is counted on the context: a forward whose count differs from the number of layers
(transformers bound attention some other way, so the model ran its own attention and our cache
was not written) raises instead of returning wrong output silently.

The cache's shape (KV heads, head size) is what the layers hand to attention in one probe
forward of one token at construction, not config fields (GPT-NeoX has no num_key_value_heads).

Target features: by default the post-norm last hidden state (EAGLE-1/2 heads). With
``feature_layers`` (EAGLE-3 heads: transformers ``output_hidden_states`` indices, say
(2, L//2, L-3)) the adapter captures the residual stream entering those decoder layers with
forward pre-hooks that exist only for the duration of one of our forwards, and returns them
concatenated, [B, N, len(feature_layers) * H]; no other layer's hidden state is kept.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from eagle2_kernels.cache import PagedKVCache, StaticKVCache
from eagle2_kernels.models import matmul
from eagle2_kernels.models.compiled import (
    KV_KWARG,
    LEN_KWARG,
    MASK_KWARG,
    CompiledForward,
    compile_support,
    native_op,
)

ATTN_NAME = "eagle2_kernels_tree"
CTX_KWARG = "eagle2_ctx"


@dataclass
class DecodeContext:
    """What one of our forwards tells the attention function.

    Attributes:
        cache: the target's StaticKVCache; ``cache.lengths`` is the committed prefix.
        slot: first cache slot written by this forward: the prefix length, an int (same for
            the batch), a list of B ints, or a [B] device tensor (no host read: the static,
            graph-capturable round passes ``cache.lengths`` itself).
        tree_mask: [B, N, W] int32 packed visibility of the N new tokens among themselves;
            None for a causal prefill (empty prefix).
        tree_len: number of new tokens (the tree region's size).
        backend: optional forced ops backend.
        calls: attention calls of the current forward (set to 0 by ``TargetAdapter.forward``,
            counted by the attention function, checked against the number of layers).
    """

    cache: StaticKVCache
    slot: int | list[int] | torch.Tensor
    tree_mask: torch.Tensor | None
    tree_len: int
    backend: str | None = None
    calls: int = field(default=0, compare=False)
    windowed: int = field(default=0, compare=False)  # calls that carried a sliding window
    by_keyword: int = field(default=0, compare=False)  # calls that got this context as a keyword


# The context of the forward running in this thread (TargetAdapter.forward sets it around the
# model call), for models whose decoder layers do not pass the forward's keyword arguments on to
# their attention (StableLM, Nemotron): the attention function finds its context here then.
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("eagle2_current_ctx", default=None)


class _KVShapes:
    """A stand-in cache for the adapter's probe forward: records each layer's (Hkv, Dh of k,
    Dh of v) as the layer hands k/v to attention; attention over it returns zeros."""

    def __init__(self):
        self.shapes: dict[int, tuple[int, int, int]] = {}

    def write(self, layer, slot, key, value):
        self.shapes[layer] = (int(key.shape[1]), int(key.shape[-1]), int(value.shape[-1]))

    def attend(self, layer, query, *args, **kwargs):
        return query.new_zeros(*query.shape[:-1], self.shapes[layer][2])


def _local_attention(module, kwargs) -> tuple:
    """(window, softcap, sinks) of one attention call, as transformers hands them to an
    attention function: ``sliding_window`` (per layer, None on global layers; else the
    module's ``sliding_window`` attribute), ``softcap`` (Gemma-2's attn_logit_softcapping) and
    ``s_aux`` (GPT-OSS's per-head sinks). Plain ints / floats / a tensor, so that they pass
    through the compiled path's operator too."""
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap")
    return (int(window) if window else None, None if softcap is None else float(softcap), kwargs.get("s_aux"))


_CAUSAL: dict = {}
# id(model) -> (model, {(aot, buckets): AOTForward | CompiledForward}). The graphs hold the
# model (its frozen weights were copied from it), so an entry lives as long as the process:
# loaded or compiled graphs are per-process state like Dynamo's own caches.
_COMPILED: dict = {}


def _causal_mask(batch: int, n: int, device) -> torch.Tensor:
    """[B, n, ceil(n / 32)] int32 packed lower-triangular mask (a prefill as a tree: row i
    sees tokens 0..i), kept for the last few shapes."""
    key = (batch, n, str(device))
    mask = _CAUSAL.get(key)
    if mask is None:
        from eagle2_kernels.ops.tree import pack_bits

        bits = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        mask = pack_bits(bits).unsqueeze(0).expand(batch, -1, -1).contiguous()
        if len(_CAUSAL) >= 4:
            _CAUSAL.clear()
        _CAUSAL[key] = mask
    return mask


def _tree_attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Called by transformers per layer: q [B,Hq,N,Dh], k/v [B,Hkv,N,Dh] already rotated.

    Returns (out [B, N, Hq, Dh], None) as transformers expects.
    """
    ctx: DecodeContext | None = kwargs.get(CTX_KWARG)
    window, softcap, sinks = _local_attention(module, kwargs)
    if ctx is None and KV_KWARG in kwargs:
        # A compiled forward (models/compiled.py): plain tensors in, one opaque op, no Python
        # side effects, so the whole forward stays one graph.
        native = native_op("cache_tree_attention_cpu") if query.device.type == "cpu" else None
        out = (native or torch.ops.eagle2.cache_tree_attention)(
            query, key, value, kwargs[KV_KWARG], module.layer_idx, kwargs[LEN_KWARG], kwargs[MASK_KWARG],
            float(scaling if scaling is not None else query.shape[-1] ** -0.5), window, softcap, sinks,
        )
        return out.transpose(1, 2), None
    keyword = ctx is not None
    if ctx is None:
        ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError(
            f"the {ATTN_NAME!r} attention implementation only runs inside a TreeSpecDecoder "
            f"forward (it needs the {CTX_KWARG} keyword)"
        )
    ctx.calls += 1
    ctx.by_keyword += keyword
    ctx.windowed += window is not None
    layer = module.layer_idx
    cache = ctx.cache
    cache.write(layer, ctx.slot, key, value)
    local = window is not None or softcap is not None or sinks is not None
    if ctx.tree_mask is None and local:
        # A prefill with local attention: the tree op over a causal mask (SDPA has no window,
        # softcap or sinks); the cache lengths are 0 here, so the prompt is the tree region.
        mask = _causal_mask(query.shape[0], query.shape[2], query.device)
        out = cache.attend(layer, query, mask, ctx.tree_len, scaling, ctx.backend,
                           window=window, softcap=softcap, sinks=sinks)
    elif ctx.tree_mask is None:
        # Prefill over an empty prefix: ordinary causal attention over the new tokens.
        hq, hkv = query.shape[1], key.shape[1]
        if hq != hkv:
            key = key.repeat_interleave(hq // hkv, dim=1)
            value = value.repeat_interleave(hq // hkv, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:
        # Dense (StaticKVCache) or paged (PagedKVCache) storage: the cache runs the right op.
        out = cache.attend(layer, query, ctx.tree_mask, ctx.tree_len, scaling, ctx.backend,
                           window=window, softcap=softcap, sinks=sinks)
    return out.transpose(1, 2), None


_registered = False


def register_attention() -> str:
    """Register the tree attention with transformers (no mask function, see below); idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, _tree_attention_function)
        # No mask function is registered on purpose: for an attention implementation without
        # one, transformers' mask preparation exits at once and passes mask=None. A registered
        # mask function would first make it look for packed sequences in position_ids, a host
        # read (one device sync per forward, and a data-dependent branch that a CUDA graph
        # cannot hold).
        _registered = True
    return ATTN_NAME


def _text_config(model):
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


class TargetAdapter:
    """Drives a transformers causal LM with our static cache and tree attention.

    Args:
        model: a transformers causal LM (``PreTrainedModel`` with ``get_output_embeddings``)
            whose attention goes through transformers' attention interface.
        backend: optional forced ops backend for tree attention.
        feature_layers: None for the post-norm last hidden state as the feature (EAGLE-1/2);
            else a tuple of transformers ``output_hidden_states`` indices in [0, layers]
            (0 = the embeddings, i = the input of decoder layer i, layers = the post-norm
            output), whose hidden states are concatenated in that order (EAGLE-3:
            (2, L//2, L-3)).

    The model is never modified outside :meth:`forward`; its attention implementation is
    switched to ours for the duration of one forward and then restored, and the feature hooks
    exist only during that forward too.
    """

    def __init__(self, model, backend: str | None = None, feature_layers: tuple[int, ...] | None = None,
                 compile: bool | str = False, compile_buckets=None, progress=None):
        if not hasattr(model, "set_attn_implementation") or not hasattr(model, "get_output_embeddings"):
            raise TypeError(
                f"the target must be a transformers causal LM (a PreTrainedModel with an lm_head), "
                f"got {type(model).__name__}"
            )
        if model.get_output_embeddings() is None:
            raise TypeError(f"the target {type(model).__name__} has no lm_head (get_output_embeddings())")
        can_set = getattr(model, "_can_set_attn_implementation", None)
        if callable(can_set) and not can_set():
            raise TypeError(
                f"{type(model).__name__} does not route attention through transformers' "
                f"AttentionInterface, so tree attention cannot be plugged in"
            )
        self.model = model
        self.backend = backend
        cfg = _text_config(model)
        self.num_layers = cfg.num_hidden_layers
        # None: the post-norm last hidden state (EAGLE-1/2 heads); else hidden-state indices.
        self.feature_layers = None
        self._feature_modules: list = []
        if feature_layers is not None:
            self.feature_layers = tuple(int(i) for i in feature_layers)
            self._feature_modules = self._find_feature_modules(self.feature_layers)
        self.hidden_size = cfg.hidden_size
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        # The model's sliding window (None: none on any layer). Each attention call gets its
        # layer's window from transformers; this one is what a forward must have seen.
        window = getattr(cfg, "sliding_window", None) or None
        if getattr(cfg, "use_sliding_window", True) is False:
            window = None
        layer_types = getattr(cfg, "layer_types", None)
        if window is not None and layer_types is not None and "sliding_attention" not in layer_types:
            window = None
        self.sliding_window = window
        chunk = getattr(cfg, "attention_chunk_size", None)
        if chunk:
            raise NotImplementedError(
                f"{type(model).__name__} uses chunked local attention (attention_chunk_size={chunk}), "
                f"which the tree attention does not implement"
            )
        # bf16 linears that run through our AVX2 kernel inside `scoped` (measured per machine).
        self.fast_linears = matmul.bf16_linears(model) if matmul.choice(model) == "eagle2" else []
        register_attention()
        # Validate once through the public API (raises if the model cannot take our attention),
        # then put the previous implementation back: outside our forwards nothing changes.
        self._configs = self._collect_configs()
        saved = [(cfg, cfg._attn_implementation_internal) for cfg in self._configs]
        model.set_attn_implementation(ATTN_NAME)
        for cfg, previous in saved:
            cfg._attn_implementation_internal = previous
        self.compiled: CompiledForward | None = None
        self.compile_status = "eager (compile=False)"
        # The cache's KV shape comes from what the layers hand to attention, not from config
        # fields that some families lack or do not use (GPT-NeoX has no num_key_value_heads).
        self.num_kv_heads, self.head_dim, self.keywords_reach_attention = self._probe_attention()
        if compile:
            self.enable_compile(compile, compile_buckets, progress)

    def enable_compile(self, compile: bool | str = "auto", buckets=None, progress=None) -> None:
        """Compile the decode forwards when this target and machine allow it; otherwise record
        why not in ``compile_status``. ``compile=True`` raises instead of falling back;
        ``"auto"`` also honours ``EAGLE2_KERNELS_COMPILE=0``."""
        from eagle2_kernels.models.compiled import DEFAULT_BUCKETS, compile_disabled_by_env

        self.compiled = None
        if not compile:
            self.compile_status = "eager (compile=False)"
            return
        if compile == "auto" and compile_disabled_by_env():
            self.compile_status = "eager (EAGLE2_KERNELS_COMPILE=0)"
            return
        ok, why = compile_support(self.device)
        if ok:
            why = self._compile_blocker()
        if why:
            if compile is True:
                raise ValueError(f"compile=True, but the target's forward cannot be compiled: {why}")
            self.compile_status = f"eager ({why})"
            return
        buckets = tuple(sorted(set(DEFAULT_BUCKETS if buckets is None else buckets)))
        # Decoders over one model share its graphs (same weights, same code): a second decoder
        # (another tree shape, a benchmark's baseline) compiles nothing again.
        # By default one AOTInductor graph, kept on disk across processes (compiled_aot.py);
        # EAGLE2_KERNELS_COMPILE_CACHE=0: torch.compile per process, one graph per bucket.
        from eagle2_kernels.models.compiled_aot import AOTForward, aot_cache_disabled_by_env

        aot = not aot_cache_disabled_by_env()
        shared = _COMPILED.setdefault(id(self.model), (self.model, {}))[1]
        if (aot, buckets) not in shared:
            shared[aot, buckets] = (
                AOTForward(self.model, buckets, progress, self.scoped, lambda b, c: self.new_cache(b, c).kv)
                if aot else CompiledForward(self.model, buckets, progress))
        self.compiled = shared[aot, buckets]
        self.compile_status = f"compiled (Inductor, buckets {list(self.compiled.buckets)})"

    @property
    def compile_status(self) -> str:
        """How the decode forwards run: "compiled (...)" or "eager (<reason>)". An AOT forward
        reports its own (it falls back to per-process compilation if its export fails)."""
        status = getattr(getattr(self, "compiled", None), "status", None)
        status = status if status is not None else self._compile_status
        return status + ("; bf16 linears on the AVX2 kernel" if getattr(self, "fast_linears", None) else "")

    @compile_status.setter
    def compile_status(self, value: str) -> None:
        self._compile_status = value

    def precompile(self, batch: int = 1) -> None:
        """Compile now what the first forwards would otherwise compile (the AOT graph: load it
        from the disk cache or build it; per-process graphs: every bucket), then one forward per
        bucket size over a scratch cache. No-op when the forwards run eagerly."""
        if self.compiled is None:
            return
        ensure = getattr(self.compiled, "ensure", None)
        if ensure is not None:
            ensure()
        from eagle2_kernels.ops.tree import pack_bits

        top = self.compiled.buckets[-1]
        cache = self.new_cache(batch, top + 2)
        for n in self.compiled.buckets:
            cache.set_length(1)
            mask = pack_bits(torch.ones(n, n, dtype=torch.bool, device=self.device).tril())
            ids = torch.zeros(batch, n, dtype=torch.int64, device=self.device)
            pos = (1 + torch.arange(n, device=self.device)).expand(batch, n)
            self.forward(ids, pos, DecodeContext(cache, 1, mask.expand(batch, n, -1).contiguous(), n))

    def _compile_blocker(self) -> str:
        """Why this target's forward cannot take the compiled path ('' when it can)."""
        if self.feature_layers is not None:
            return "EAGLE-3 feature capture uses per-forward hooks"
        if not self.keywords_reach_attention:
            return "its decoder layers do not pass keyword arguments on to attention (the cache tensors travel as keywords)"
        if not hasattr(self.model, "get_decoder") or self.model.get_decoder() is None:
            return f"{type(self.model).__name__} has no get_decoder()"
        # The compiled body computes logits as transform(lm_head(final hidden)); check that on
        # a 4-token probe through the model's own forward (its own attention, no cache).
        from eagle2_kernels.models.compiled import _logit_transform

        probe = (torch.arange(1, 5, device=self.device) % self.vocab_size).view(1, 4)
        with torch.no_grad():
            out = self.model(input_ids=probe, use_cache=False, output_hidden_states=True, return_dict=True)
            mine = _logit_transform(self.model)(self.model.get_output_embeddings()(out.hidden_states[-1]))
        if not torch.allclose(mine.float(), out.logits.float(), rtol=1e-3, atol=1e-3):
            return "its logits are not a known transform of lm_head(final hidden state)"
        return ""

    def _probe_attention(self) -> tuple[int, int, bool]:
        """One forward over one token through our attention with a cache that only records
        what each layer writes. Returns (KV heads, head size) of the layers and whether every
        layer received the context as a keyword. Raises when layers hand attention keys of
        different shapes, or keys and values of different head sizes: one cache tensor of one
        head size holds all layers here."""
        shapes = _KVShapes()
        ctx = DecodeContext(shapes, 0, None, 1)
        ids = torch.zeros(1, 1, dtype=torch.int64, device=self.device)
        self.forward(ids, ids.clone(), ctx, logits_to_keep=1)
        kinds = sorted(set(shapes.shapes.values()))
        name = type(self.model).__name__
        if len(kinds) != 1:
            raise NotImplementedError(
                f"{name}'s layers hand attention keys/values of different shapes (KV heads, key and value "
                f"head sizes) {kinds}; the KV cache here holds one shape for all layers"
            )
        hkv, dk, dv = kinds[0]
        if dk != dv:
            raise NotImplementedError(
                f"{name} has keys of head size {dk} and values of head size {dv}; the KV cache and tree "
                f"attention here need one head size"
            )
        return hkv, dk, ctx.by_keyword == self.num_layers

    def _find_feature_modules(self, layers: tuple[int, ...]) -> list:
        """The module whose input (index i < L: decoder layer i) or output (index L: the final
        norm) is hidden state ``i`` of ``output_hidden_states``, for each requested index."""
        L = self.num_layers
        if not layers:
            raise ValueError("feature_layers must name at least one hidden-state index (or be None)")
        bad = [i for i in layers if not 0 <= i <= L]
        if bad:
            raise ValueError(
                f"feature_layers {layers} are outside the target's hidden states: valid indices are "
                f"0..{L} for its {L} layers (0 = embeddings, i = input of layer i, {L} = final norm)"
            )
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        blocks = getattr(decoder, "layers", None)
        if blocks is None or len(blocks) < L:
            raise TypeError(
                f"cannot find the {L} decoder layers of {type(self.model).__name__} (expected "
                f"model.get_decoder().layers) to capture the hidden states {layers}"
            )
        norm = getattr(decoder, "norm", None)
        if L in layers and norm is None:
            raise TypeError(f"{type(self.model).__name__} has no final norm module to capture hidden state {L}")
        return [("output", norm) if i == L else ("input", blocks[i]) for i in layers]

    @contextlib.contextmanager
    def _capturing(self, out: list):
        """Forward hooks on the feature modules for the body only: ``out[j]`` receives hidden
        state ``feature_layers[j]`` of the forward that runs inside."""
        handles = []

        def make(j, where):
            if where == "input":
                def pre(module, args, kwargs):
                    out[j] = args[0] if args else kwargs["hidden_states"]
                return pre

            def post(module, args, output):
                out[j] = output[0] if isinstance(output, tuple) else output
            return post

        try:
            for j, (where, module) in enumerate(self._feature_modules):
                if where == "input":
                    handles.append(module.register_forward_pre_hook(make(j, where), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(make(j, where)))
            yield
        finally:
            for h in handles:
                h.remove()

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_output_embeddings().weight.dtype

    def new_cache(self, batch_size: int, capacity: int, block_size: int | None = None) -> StaticKVCache:
        """A cache for all layers of the target: a StaticKVCache [2*layers, B, Hkv, capacity, Dh],
        or with ``block_size`` a PagedKVCache (pages of that many tokens and a block table)."""
        if block_size is not None:
            return PagedKVCache(self.num_layers, batch_size, self.num_kv_heads, capacity, self.head_dim,
                                self.dtype, self.device, block_size=block_size)
        return StaticKVCache(
            self.num_layers, batch_size, self.num_kv_heads, capacity, self.head_dim, self.dtype, self.device
        )

    def _collect_configs(self) -> list:
        """Every config object whose attention implementation a switch must cover."""
        from transformers import PreTrainedModel

        seen, todo = {}, [m.config for m in self.model.modules() if isinstance(m, PreTrainedModel)]
        while todo:
            cfg = todo.pop()
            if id(cfg) in seen:
                continue
            seen[id(cfg)] = cfg
            for key in getattr(cfg, "sub_configs", {}) or {}:
                sub = getattr(cfg, key, None)
                if sub is not None:
                    todo.append(sub)
        return list(seen.values())

    @contextlib.contextmanager
    def scoped(self, linears: bool = True):
        """Switch the model to our attention for the body only; restore the previous one after.
        With ``linears``, its bf16 linears run through our AVX2 kernel in the body where that was
        measured faster on this machine (``models/matmul.py``; ``fast_linears``).

        ``set_attn_implementation`` walks every module (~0.5 ms even for a 2-layer model), too
        slow for twice per round; it validated our implementation once in ``__init__``. Here we
        save and restore the exact per-config values, which is all that switch changes.
        """
        saved = [(cfg, cfg._attn_implementation_internal) for cfg in self._configs]
        for cfg, _ in saved:
            cfg._attn_implementation_internal = ATTN_NAME
        try:
            with matmul.patched(self.fast_linears if linears else []):
                yield
        finally:
            for cfg, previous in saved:
                cfg._attn_implementation_internal = previous

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        ctx: DecodeContext,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One target forward over N new tokens with our cache.

        Args:
            input_ids: [B, N] int64; position_ids: [B, N] int64 (explicit, e.g. prefix + depth).
            ctx: the decode context (cache, write slot, tree mask).
            logits_to_keep: 0 for logits at every position, else only the last ones.
        Returns:
            logits [B, N or logits_to_keep, V] and features [B, N, F]: the post-norm final
            hidden state (the lm_head input, F = H) without ``feature_layers``, else those
            hidden states concatenated (F = len(feature_layers) * H).
        Raises:
            RuntimeError: the model did not call our attention once per layer (its attention
                is bound in a way this adapter does not reach; the output would be wrong).
        """
        if (self.compiled is not None and ctx.tree_mask is not None and logits_to_keep == 0
                and type(ctx.cache) is StaticKVCache):
            # The compiled graph: attention calls cannot be counted inside it, but the eager
            # prefill of every call counted them on the same model code.
            # The AOT graph has its linears baked in: no eager patch around it (a per-process
            # torch.compile graph is traced inside the body, so it keeps it).
            linears = getattr(self.compiled, "jit_fallback", True)
            with torch.no_grad(), self.scoped(linears):
                out = self.compiled(input_ids, position_ids, ctx.cache.kv, ctx.cache.lengths, ctx.tree_mask)
            if out is not None:
                return out
        multi = self.feature_layers is not None
        captured: list = [None] * (len(self.feature_layers) if multi else 0)
        ctx.calls = ctx.windowed = ctx.by_keyword = 0
        current = _CURRENT.set(ctx)
        try:
            with torch.no_grad(), self.scoped(), self._capturing(captured):
                out = self.model(
                    input_ids=input_ids,
                    position_ids=position_ids,
                    use_cache=False,
                    output_hidden_states=not multi,
                    return_dict=True,
                    logits_to_keep=logits_to_keep,
                    **{CTX_KWARG: ctx},
                )
        finally:
            _CURRENT.reset(current)
        if ctx.calls != self.num_layers:
            import transformers

            raise RuntimeError(
                f"{type(self.model).__name__} called the {ATTN_NAME!r} attention {ctx.calls} times in one "
                f"forward, but it has {self.num_layers} layers: with transformers {transformers.__version__} "
                f"the per-forward attention switch does not reach every layer (the model ran its own "
                f"attention, so our KV cache was not written and the output would be wrong)"
            )
        if self.sliding_window is not None and ctx.windowed == 0:
            raise RuntimeError(
                f"{type(self.model).__name__}'s config has sliding_window={self.sliding_window}, but none of "
                f"its attention calls passed a window (no sliding_window keyword or module attribute): "
                f"attending to the whole prefix would not be the model's attention"
            )
        if not multi:
            return out.logits, out.hidden_states[-1]
        if any(c is None for c in captured):
            missing = [i for i, c in zip(self.feature_layers, captured) if c is None]
            raise RuntimeError(f"the target's forward did not pass through hidden states {missing}")
        return out.logits, torch.cat(captured, dim=-1)
