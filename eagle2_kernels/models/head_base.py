"""What every draft head shares: the base class the decoder drives, the layer pieces, and the
checks that read a head's files.

Two formats extend :class:`DraftHeadBase`: EAGLE-1/2 (:class:`~.draft_head.EagleDraftHead`)
and EAGLE-3 (:class:`~.eagle3_head.Eagle3DraftHead`). Each registers itself, when defined,
with :func:`~.head_loader.load_draft_head`, which reads a head's files (its file checks are
re-exported here), tells their format and has that format's class build the head. Imports go
one way: :mod:`.head_loader` <- this module <- each head module.

A head runs one Llama-style decoder layer (RoPE, GQA attention, SwiGLU MLP) over pairs of a
feature and the next token; what differs per format is how the layer's input is made
(:meth:`DraftHeadBase.project`), how logits are read (``logits``) and the file layout.
Shapes: B batch, N new rows, H the head's hidden size, Hq / Hkv heads, Dh head dim, Vd the
draft vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from eagle2_kernels.models.head_loader import (  # noqa: F401  (the file checks, re-exported)
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    check_head_config,
    load_draft_head,
    read_head_config,
    read_head_files,
    read_head_weights,
    register_format,
)


# ---------------------------------------------------------------------------------- loading
def load_checked(head: nn.Module, state: dict, target, dtype, device, where: str):
    """Load ``state`` into ``head`` after checking every shape, cast it (to the target's dtype
    and device when a target is given, else ``dtype`` / the file's), put it in eval mode and
    attach it to ``target``. Shared by the EAGLE-1/2 and EAGLE-3 loaders."""
    own = head.state_dict()
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, the config implies {tuple(own[k].shape)}")
    head.load_state_dict(state, strict=True)
    if target is not None:
        ref = target.get_output_embeddings().weight
        dtype = dtype or ref.dtype
        device = device or ref.device
    float_dtype = dtype or next(iter(v.dtype for v in state.values() if v.is_floating_point()))
    head.to(device=device or "cpu", dtype=float_dtype)
    head.eval()
    if target is not None:
        head.attach_target(target)
    return head


# ---------------------------------------------------------------------------------- targets
def target_problem(target_model) -> str | None:
    """Why the decoder cannot run ``target_model`` exactly, or None when nothing is known wrong.

    Tree attention (``ops.tree_attention``) replaces the model's attention with softmax(q k^T *
    scale) over the cached prefix and the tree, with positions already applied to q and k (RoPE,
    or learned positions added to the embeddings) and the per-layer sliding window, logit
    softcap and sinks that transformers hands it. A model whose attention needs anything else (a
    position bias inside attention, keys and values of different widths) would decode to other
    tokens than its own ``generate``, so it is refused rather than run inexactly. Attention
    that does not reach tree attention at all is caught by the target adapter; objects that are
    not transformers models are left to the adapter's message.
    """
    config = getattr(target_model, "config", None)
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    tc = get() if callable(get) else config
    name = type(target_model).__name__
    if getattr(config, "is_encoder_decoder", False) or getattr(tc, "is_encoder_decoder", False):
        return (f"{name} is an encoder-decoder model; speculative decoding here drafts for a decoder-only "
                f"causal LM (a model whose lm_head reads the last layer of one decoder stack)")
    # Attention-logit softcapping (Gemma-2), sliding windows and attention sinks (GPT-OSS) are
    # handed to tree attention per call by the target adapter.
    if getattr(tc, "alibi", False) is True or getattr(tc, "position_embedding_type", None) == "alibi" \
            or getattr(tc, "model_type", None) in ("bloom", "mpt"):
        return (f"{name} adds ALiBi position biases inside attention, which tree attention does not "
                f"(tree nodes need explicit positions: RoPE or learned position embeddings)")
    v_dim = getattr(tc, "v_head_dim", None)
    qk_dim = getattr(tc, "qk_head_dim", None) or getattr(tc, "head_dim", None)
    if v_dim is not None and qk_dim is not None and v_dim != qk_dim:
        return (f"{name} has keys of head size {qk_dim} and values of head size {v_dim} (latent attention); "
                f"the KV cache and tree attention here need one head size")
    return None


def check_pair(target_model, head, where: str) -> None:
    """Refuse, naming the reason, a target the decoder cannot run exactly (:func:`target_problem`).
    What a head must share with its target (hidden size, vocabulary, EAGLE-3 feature layers) is
    checked when it is attached (:meth:`DraftHeadBase.attach_target`), with both values named."""
    problem = target_problem(target_model)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")


# ---------------------------------------------------------------------------------- layer pieces
class _RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(dtype)


class _Attention(nn.Module):
    """q/k/v projections reading ``in_features`` (H for EAGLE-1/2, 2H for EAGLE-3), o_proj
    writing H; q/k/v biases when ``qkv_bias``."""

    def __init__(self, config, in_features: int, qkv_bias: bool):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)


class _MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.activations import ACT2FN

        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---------------------------------------------------------------------------------- the base
class DraftHeadBase(nn.Module):
    """A draft head as the decoder drives it: one decoder layer over (feature, next token)
    pairs, run causally (:meth:`prefill`, :meth:`forward`) or over a tree (:meth:`tree_step`)
    with its KV in a one-layer store (``cache.KVView``: ``write`` / ``attend``).

    A format extends this class: its ``__init__`` calls ``super().__init__(config, ...)`` and
    then builds ``fc`` and its layer (registered as ``layers[0]``, or a property returning it
    there), and it defines :meth:`project`, :meth:`logits`, ``target_feature_size``,
    ``_bind_target``, ``_config_dict`` and ``_from_files``. The rest lives here: RoPE,
    :meth:`finish`, the cached and causal forwards, the target's shared embedding
    (:meth:`attach_target`), the draft vocabulary, saving and loading.

    Args:
        config: a ``transformers.LlamaConfig``-like object for the head (hidden_size H,
            num_attention_heads, num_key_value_heads, head_dim, rope_parameters, vocab_size
            = the target's V, ...) with ``num_hidden_layers`` 1.
        target_hidden_size: Ht, the hidden size of the target the head reads (default H).

    Attributes the decoder reads: ``hidden_size``, ``target_hidden_size``, ``num_heads``,
    ``num_kv_heads``, ``head_dim``, ``draft_to_target`` (None or [Vd] int64 absolute target
    ids), ``draft_vocab_size``, ``feature_layers``, ``target_feature_size``, ``fc``, ``layers``.
    """

    feature_layers = None
    """Which target hidden states the head consumes: None = the post-norm last hidden state
    (EAGLE-1/2); a tuple of ``output_hidden_states`` indices, concatenated, otherwise."""

    file_format: ClassVar[str | None] = None
    """The file layout a format's class reads and writes ("eagle2", "eagle3"); a class that
    sets it is registered with :func:`~.head_loader.load_draft_head` when defined. Its
    subclasses inherit the format without replacing the registered class."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "file_format" in cls.__dict__:
            register_format(cls.file_format, cls)

    def __init__(self, config, target_hidden_size: int | None = None):
        super().__init__()
        name = type(self).__name__
        if getattr(config, "num_hidden_layers", 1) != 1:
            raise ValueError(
                f"{name}: the head has exactly one decoder layer, config says "
                f"num_hidden_layers={config.num_hidden_layers}"
            )
        self.config = config
        h = config.hidden_size
        self.hidden_size = h
        self.target_hidden_size = int(target_hidden_size or h)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.num_heads
        self.embed_tokens: nn.Embedding | None = None  # a format that owns one sets it
        self.draft_to_target: torch.Tensor | None = None  # see _set_draft_vocab
        # RoPE inverse frequencies: kept in float32 whatever the head's dtype (see _apply).
        self.attention_scaling = 1.0
        self.register_buffer("inv_freq", self._rope_inv_freq(), persistent=False)
        # Shared target pieces (plain attributes in a dict, so they are neither registered
        # modules nor saved): "embed" (its input embedding) and "target" (the model).
        self._shared: dict[str, Any] = {}

    # ------------------------------------------------------------------ set-up
    def _set_draft_vocab(self, draft_to_target, persistent: bool) -> None:
        """Check and register ``draft_to_target`` ([Vd] absolute target ids, or None: the
        whole vocabulary). ``persistent``: whether it is saved under that name."""
        if draft_to_target is None:
            self.draft_to_target = None
            return
        name, vocab = type(self).__name__, self.config.vocab_size
        d2t = torch.as_tensor(draft_to_target)
        if d2t.dim() != 1 or d2t.dtype not in (torch.int32, torch.int64) or d2t.numel() == 0:
            raise ValueError(
                f"{name}: draft_to_target must be a non-empty 1-D integer tensor, got "
                f"shape {tuple(d2t.shape)} dtype {d2t.dtype}"
            )
        if int(d2t.min()) < 0 or int(d2t.max()) >= vocab:
            raise ValueError(
                f"{name}: draft_to_target ids must lie in [0, {vocab}), got [{int(d2t.min())}, {int(d2t.max())}]"
            )
        del self.draft_to_target  # the plain None attribute, replaced by a buffer
        self.register_buffer("draft_to_target", d2t.to(torch.int64).clone(), persistent=persistent)

    def _rope_inv_freq(self) -> torch.Tensor:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(self.config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = float(params.get("rope_theta", getattr(self.config, "rope_theta", 10000.0)))
            dim = self.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, None)
        return inv_freq.float()

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast inv_freq; the target keeps it in float32, so must we.
        super()._apply(fn, recurse)
        self.inv_freq = self._rope_inv_freq().to(self.inv_freq.device)
        return self

    @classmethod
    def _config_from_target(cls, target_config):
        """A head config shaped after a target config. The head is always a Llama-style layer
        with its own RoPE, whatever the target's family: it takes the target's widths (and its
        RoPE, norm epsilon and activation where it has them) and falls back to Llama's choices
        where a family names them otherwise or not at all (GPT-2: learned positions, ``n_inner``
        = None meaning 4H, ``layer_norm_epsilon``, a GELU)."""
        from transformers import LlamaConfig
        from transformers.activations import ACT2FN

        get = getattr(target_config, "get_text_config", None)
        tc = get() if callable(get) else target_config
        name = type(tc).__name__
        missing = [k for k in ("hidden_size", "num_attention_heads", "vocab_size") if not getattr(tc, k, None)]
        if missing:
            raise ValueError(
                f"{cls.__name__}.from_target: the target's {name} has no {', '.join(missing)}; a draft head "
                f"is shaped from the target's hidden size, attention heads and vocabulary"
            )
        hidden, heads = int(tc.hidden_size), int(tc.num_attention_heads)
        head_dim = getattr(tc, "head_dim", None) or hidden // heads
        # An MLP width: the target's, or GPT-2's n_inner (None there means 4 * hidden).
        inter = getattr(tc, "intermediate_size", None) or getattr(tc, "n_inner", None) or 4 * hidden
        kv = getattr(tc, "num_key_value_heads", None) or heads
        if heads % kv:
            kv = heads  # a grouping the head's attention cannot mirror: plain multi-head
        rope = getattr(tc, "rope_parameters", None)
        if rope is None:
            rope = {"rope_type": "default", "rope_theta": getattr(tc, "rope_theta", None) or 10000.0}
        act = getattr(tc, "hidden_act", None)
        act = act if isinstance(act, str) and act in ACT2FN else "silu"
        eps = getattr(tc, "rms_norm_eps", None) or getattr(tc, "layer_norm_epsilon", None) or 1e-6
        return LlamaConfig(
            hidden_size=hidden,
            intermediate_size=int(inter),
            num_attention_heads=heads,
            num_key_value_heads=int(kv),
            head_dim=int(head_dim),
            rms_norm_eps=float(eps),
            rope_parameters=dict(rope),
            vocab_size=int(tc.vocab_size),
            max_position_embeddings=getattr(tc, "max_position_embeddings", None) or 4096,
            hidden_act=act,
            num_hidden_layers=1,
            attention_bias=False,
            tie_word_embeddings=False,
        )

    def _init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _place_and_attach(self, target_model, dtype):
        """The end of ``from_target``: on the target's device, in ``dtype`` (default its
        dtype), attached."""
        ref = target_model.get_output_embeddings().weight
        self.to(device=ref.device, dtype=dtype or ref.dtype)
        self.attach_target(target_model)
        return self

    # ------------------------------------------------------------------ the target
    def attach_target(self, target_model):
        """Check the head against ``target_model`` (hidden size, vocabulary and what the
        format reads) and share its input embedding and lm_head by reference (frozen, never
        saved). Returns self."""
        embed = target_model.get_input_embeddings()
        lm_head = target_model.get_output_embeddings()
        if embed is None or lm_head is None:
            raise ValueError(f"{type(self).__name__}.attach_target: the target has no input embedding or lm_head")
        self._bind_target(target_model, embed, lm_head)
        self._shared["embed"] = embed
        self._shared["target"] = target_model
        return self

    def _bind_target(self, target_model, embed: nn.Module, lm_head: nn.Module) -> None:
        """The format's part of :meth:`attach_target`: raise ValueError, naming both values,
        when the head does not fit the target (before changing anything), then keep what the
        format derives from it (EAGLE-1/2: the lm_head rows of the draft vocabulary)."""
        raise NotImplementedError(f"{type(self).__name__} must define _bind_target")

    def _check_vocab(self, t_vocab: int) -> None:
        if t_vocab != self.config.vocab_size:
            raise ValueError(
                f"{type(self).__name__}: head vocab size {self.config.vocab_size} does not match the "
                f"target's vocab size {t_vocab}"
            )

    @property
    def attached(self) -> bool:
        """Whether a target is attached (:meth:`attach_target`): the token embedding (unless
        the head owns one) and the target's logits need it."""
        return "target" in self._shared

    def _require_attached(self):
        if not self.attached:
            raise RuntimeError(
                f"{type(self).__name__}: no target attached; call head.attach_target(model) first (or use "
                f"from_target / from_pretrained(path, target=model))"
            )

    # ------------------------------------------------------------------ what the decoder asks
    @property
    def target_feature_size(self) -> int:
        """Width of the target features fed to :meth:`prefill` / catch-up :meth:`tree_step`."""
        raise NotImplementedError(f"{type(self).__name__} must define target_feature_size")

    @property
    def draft_vocab_size(self) -> int:
        """Vd: rows of the draft logits (the target's V without a reduced vocabulary)."""
        return self.config.vocab_size if self.draft_to_target is None else self.draft_to_target.numel()

    @property
    def scaling(self) -> float:
        """Attention scale of the head's layer (Dh ** -0.5)."""
        return self.layers[0].self_attn.scaling

    # ------------------------------------------------------------------ pieces
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, N, H] of ``input_ids`` [B, N] (own table if the head has one,
        scaled as the attached target's embedding module scales its table: Gemma's sqrt(H))."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(input_ids)
            scale = getattr(self._shared.get("embed"), "embed_scale", None)
            return x if scale is None else x * torch.as_tensor(scale, device=x.device).to(x.dtype)
        self._require_attached()
        return self._shared["embed"](input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., Vd] of head outputs ``hidden`` [..., H]."""
        raise NotImplementedError(f"{type(self).__name__} must define logits")

    def target_logits(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """The attached target's logits over the draft vocabulary [..., Vd] of its post-norm
        hidden states [..., Ht] (a training signal; not used in decoding)."""
        self._require_attached()
        lm_head = self._shared["target"].get_output_embeddings()
        w, b = lm_head.weight, getattr(lm_head, "bias", None)
        if self.draft_to_target is not None:
            idx = self.draft_to_target.to(w.device)
            w = w.index_select(0, idx)
            b = None if b is None else b.index_select(0, idx)
        return F.linear(target_hidden.to(w.dtype), w, b)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, N, Dh] for ``position_ids`` [B, N], computed in float32 like Llama's."""
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def _rotated_qkv(self, x: torch.Tensor, position_ids: torch.Tensor):
        """q [B,Hq,N,Dh], k and v [B,Hkv,N,Dh] of the layer's input ``x`` [B,N,*], q and k
        rotated for ``position_ids`` [B,N]."""
        attn = self.layers[0].self_attn
        b, n, _ = x.shape
        q = attn.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rope(position_ids, x.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def project(self, hidden_states, input_ids, position_ids, from_target: bool = False):
        """First half of the head, up to attention: the residual h [B,N,H] and rotated q
        [B,Hq,N,Dh], k and v [B,Hkv,N,Dh]. ``from_target``: whether ``hidden_states`` are
        target features [B, N, target_feature_size] or the head's own outputs [B, N, H].
        With :meth:`finish` this lets a caller run its own attention pattern."""
        raise NotImplementedError(f"{type(self).__name__} must define project")

    def finish(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Second half of the head, after attention: output projection and residual onto
        ``h`` [B,N,H] from :meth:`project`, then the MLP block; ``attn_out`` [B,Hq,N,Dh] ->
        [B,N,H] (no final norm: the next step's input)."""
        layer = self.layers[0]
        b, _, n, _ = attn_out.shape
        o = attn_out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        h = h + layer.self_attn.o_proj(o)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _causal_attention(self, q, k, v):
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)

    # ------------------------------------------------------------------ forwards
    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced causal forward over whole sequences (no cache).

        Args:
            hidden_states: [B, L, F] target features f_1..f_L (F = ``target_feature_size``).
            input_ids: [B, L] int64, the tokens shifted by one: x_2..x_{L+1}, so that the
                input at t is the pair (f_t, x_{t+1}).
            position_ids: [B, L] or [L] int64, default arange(L).

        Returns:
            [B, L, H] predicted features (apply ``logits`` for the draft logits).
        """
        if hidden_states.dim() != 3 or input_ids.dim() != 2 or hidden_states.shape[:2] != input_ids.shape:
            raise ValueError(
                f"{type(self).__name__}.forward: expected hidden_states [B, L, F] and input_ids [B, L], got "
                f"{tuple(hidden_states.shape)} and {tuple(input_ids.shape)}"
            )
        b, n = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(b, n)
        h, q, k, v = self.project(hidden_states, input_ids, position_ids, from_target=True)
        return self.finish(h, self._causal_attention(q, k, v))

    def prefill(self, hidden_states, input_ids, cache) -> torch.Tensor:
        """Causal forward over N pairs written at cache slots 0..N-1 (the cache starts empty;
        later pairs go through :meth:`tree_step`'s catch-up).

        Args:
            hidden_states: [B, N, F] target features; input_ids: [B, N]; cache: a one-layer
                KV store (``cache.StaticKVCache`` or anything with its ``write``).
        Returns:
            [B, N, H] predicted features. Positions are the slot indices.
        """
        n = input_ids.shape[1]
        pos = torch.arange(n, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], n)
        h, q, k, v = self.project(hidden_states, input_ids, pos, from_target=True)
        cache.write(0, 0, k, v)
        return self.finish(h, self._causal_attention(q, k, v))

    def tree_step(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        slot,
        tree_mask: torch.Tensor,
        tree_len: int,
        backend: str | None = None,
        from_target: bool = False,
    ) -> torch.Tensor:
        """Forward of N new nodes with tree attention over the head's cache.

        The N nodes' k/v are written at slots ``slot .. slot+N-1``; each query sees every slot
        below ``cache.lengths`` (the stable prefix) and tree slot ``lengths + j`` (j < tree_len)
        iff bit j of its row of ``tree_mask`` is set. The cache does both (``write``,
        ``attend``), so a dense or a paged store serves alike.

        Args:
            hidden_states: [B, N, F] target features (``from_target``, the catch-up) or
                [B, N, H] the head's own outputs (the expansion); input_ids: [B, N] tokens;
            position_ids: [B, N] draft positions; cache: a one-layer KV store;
            slot: first slot to write (lengths + offset in the tree region), an int, a list
                of B ints, or a [B] integer device tensor (no host read; the static round);
            tree_mask: [B, N, W] int32 packed mask; tree_len: tree slots in use after the write.
            from_target: True when ``hidden_states`` are target features (the catch-up),
                False when they are the head's own outputs (the expansion). An EAGLE-1/2
                head treats both alike; EAGLE-3 reads it.
        Returns:
            [B, N, H] predicted features.
        """
        h, q, k, v = self.project(hidden_states, input_ids, position_ids, from_target=from_target)
        cache.write(0, slot, k, v)
        out = cache.attend(0, q, tree_mask, tree_len, self.scaling, backend)
        return self.finish(h, out)

    # ------------------------------------------------------------------ save / load
    def _config_dict(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must define _config_dict")

    def _files_state(self) -> dict[str, torch.Tensor]:
        """The tensors written to ``model.safetensors`` (CPU, contiguous)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` in the format's released layout into
        directory ``path``: the head's own tensors only (``embed_tokens.weight`` only when the
        head owns an embedding)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(self._config_dict(), f, indent=2, sort_keys=True)
        save_file(self._files_state(), os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})

    @classmethod
    def _from_files(cls, folder: str, raw: dict, state: dict, target=None, dtype=None, device=None):
        """Build a head of this format from a parsed config and state dict."""
        raise NotImplementedError(f"{cls.__name__} must define _from_files")

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        target=None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "DraftHeadBase":
        """Load a head, EAGLE-1/2 or EAGLE-3, recognised from its files
        (:func:`~eagle2_kernels.models.head_loader.load_draft_head`).

        Args:
            path: a directory holding ``config.json`` and ``model.safetensors`` (preferred) or
                ``pytorch_model.bin``; or the path of one of those files; or a Hugging Face hub
                repository id ("org/name", "org/name@revision"), resolved through
                ``huggingface_hub`` (``HF_HUB_OFFLINE`` = the local cache only).
            target: optional transformers causal LM to attach (its dtype and device are used
                unless ``dtype`` / ``device`` say otherwise).
            dtype: dtype of the head (default: the target's, else the file's).
            device: device of the head (default: the target's, else CPU).

        Returns:
            an :class:`~eagle2_kernels.models.draft_head.EagleDraftHead` for the released
            EAGLE-1/2 layout, an :class:`~eagle2_kernels.models.eagle3_head.Eagle3DraftHead`
            for the EAGLE-3 layouts (``midlayer.*`` / ``d2t`` / own ``lm_head``), called on
            this class or on ``EagleDraftHead``; ``Eagle3DraftHead.from_pretrained`` refuses
            EAGLE-1/2 files. Called on a subclass of a format, files of that format load as it.

        Raises:
            FileNotFoundError: no such path / repository, no config.json or no weights file.
            ValueError: keys that do not match the format (missing / unexpected named), a
                shape mismatch, or a head that does not fit the target; a config.json or weights
                file that cannot be read (not JSON, truncated, a Git LFS pointer, a size missing
                or not a positive int), with the file named.
        """
        return load_draft_head(path, target=target, dtype=dtype, device=device, head_class=cls)
