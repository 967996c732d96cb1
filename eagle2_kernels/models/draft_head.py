"""The EAGLE-1/2 draft head and its loader for the released checkpoint format.

The head predicts the target's next feature from (feature, next token) pairs:

    h = fc(cat(embed(x_{t+1}), f_t))                       Linear 2H -> H
    h = h + o_proj(attn(rope(q_proj h), rope(k_proj h), v_proj h))   no input RMSNorm
    h = h + mlp(post_attention_layernorm(h))                SwiGLU, no final norm

Its token logits are the target's ``lm_head`` applied to h. The target's embedding and
lm_head are shared by reference (attached with ``attach_target``): they are not parameters of
the head, never saved, never trained. An optional reduced draft vocabulary ``draft_to_target``
([Vd] int64, absolute target ids) makes ``logits`` cheaper: it uses only those rows of lm_head.

Released layout (EAGLE-1/2): a directory with ``config.json`` (a Llama config with
``num_hidden_layers: 1``, optional ``"bias": false``, optional ``qkv_bias`` / ``attention_bias``)
and ``model.safetensors`` or ``pytorch_model.bin`` holding ``fc.weight``, ``fc.bias`` (unless
bias is false), ``layers.0.self_attn.{q,k,v,o}_proj.weight`` (+ q/k/v biases when the config
says so), ``layers.0.mlp.{gate,up,down}_proj.weight``, ``layers.0.post_attention_layernorm.weight``
and optionally ``embed_tokens.weight`` and ``draft_to_target``.

``EagleDraftHead.from_pretrained`` also recognises EAGLE-3 heads from their files and returns an
:class:`~eagle2_kernels.models.eagle3_head.Eagle3DraftHead` (a subclass, driven the same way),
and resolves Hugging Face hub repository ids (:mod:`eagle2_kernels.models.hub`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"

# Keys of the config that describe the head itself and are not LlamaConfig fields.
_HEAD_ONLY_KEYS = ("bias", "qkv_bias")


def _llama_config(values: dict[str, Any]):
    from transformers import LlamaConfig

    values = {k: v for k, v in values.items() if k not in _HEAD_ONLY_KEYS}
    values["num_hidden_layers"] = 1
    # The released files say "architectures"/"model_type" of the target family; the head is
    # always a Llama-style layer.
    values.pop("model_type", None)
    return LlamaConfig(**values)


_WEIGHTS_FORMAT = (
    "the head's tensors by name (EAGLE-1/2: fc.weight, layers.0.self_attn.*, layers.0.mlp.*, ...; "
    "EAGLE-3: fc.weight, midlayer.*, norm.weight, lm_head.weight, d2t, ...)"
)


def _pointer_hint(path: str) -> str:
    """' (...)' when ``path`` is a Git LFS / git-annex pointer instead of the file itself."""
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return ""
    if head.startswith(b"version https://git-lfs"):
        return " (it is a Git LFS pointer, not the weights: fetch them with `git lfs pull`)"
    if b".git/annex/objects" in head:
        return " (it is a git-annex pointer, not the weights: fetch them with `git annex get`)"
    return ""


def read_head_config(cfg_path: str) -> dict[str, Any]:
    """The JSON object in a head's ``config.json``; ValueError naming the file otherwise."""
    try:
        with open(cfg_path, "rb") as f:
            text = f.read().decode("utf-8")
        raw = json.loads(text)
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        detail = exc.msg + f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) \
            else f"{type(exc).__name__}: {exc}"
        raise ValueError(
            f"draft head config {cfg_path} is not valid JSON ({detail}){_pointer_hint(cfg_path)}; expected a "
            f"JSON object with the head's Llama fields (hidden_size, intermediate_size, num_attention_heads, "
            f"vocab_size, ...)"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"draft head config {cfg_path} holds a JSON {type(raw).__name__}; expected an object with the "
            f"head's Llama fields (hidden_size, intermediate_size, num_attention_heads, vocab_size, ...)"
        )
    return raw


def read_head_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict in a head's ``model.safetensors`` or ``pytorch_model.bin`` (the latter
    with ``weights_only=True``: a downloaded pickle never runs code); ValueError naming the file
    and what is wrong with it otherwise."""
    st = path.endswith(".safetensors")
    try:
        if st:
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip readers each raise their own kinds
        kind = "a safetensors file" if st else "a torch.save'd state dict (zip or legacy pickle)"
        raise ValueError(
            f"draft head weights {path} cannot be read ({type(exc).__name__}: {exc}){_pointer_hint(path)}: "
            f"is it truncated or damaged? Expected {kind} of {_WEIGHTS_FORMAT}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(
            f"draft head weights {path} hold a {type(state).__name__} that is not a flat dict of named "
            f"tensors; expected {_WEIGHTS_FORMAT}"
        )
    return state


_REQUIRED_INTS = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "num_hidden_layers", "max_position_embeddings")


def check_head_config(raw: dict[str, Any], cfg_path: str) -> None:
    """ValueError naming ``cfg_path`` and the field when a head config lacks a size the head's
    layer is built from, or holds one that is not a positive int (or heads that do not group)."""
    def bad(key, why):
        return ValueError(f"draft head config {cfg_path}: {key} {why}; expected a Llama-style head config "
                          f"with positive int {', '.join(_REQUIRED_INTS)}")

    for key in _REQUIRED_INTS + _OPTIONAL_INTS:
        if key not in raw or (key in _OPTIONAL_INTS and raw[key] is None):
            if key in _REQUIRED_INTS:
                raise bad(key, "is missing")
            continue
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(key, f"is {v!r}, not a positive int")
    heads, kv = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv:
        raise bad("num_key_value_heads", f"({kv}) does not divide num_attention_heads ({heads})")
    if not raw.get("head_dim") and raw["hidden_size"] % heads:
        raise bad("hidden_size", f"({raw['hidden_size']}) is not a multiple of num_attention_heads ({heads}) "
                                 f"and no head_dim is given")


def _read_head_files(folder: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) of the head in ``folder``; safetensors preferred over .bin."""
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"EagleDraftHead.from_pretrained: no {CONFIG_NAME} in {folder!r}")
    raw = read_head_config(cfg_path)
    st_path, bin_path = os.path.join(folder, SAFETENSORS_NAME), os.path.join(folder, BIN_NAME)
    if os.path.isfile(st_path):
        state = read_head_weights(st_path)
    elif os.path.isfile(bin_path):
        state = read_head_weights(bin_path)
    else:
        raise FileNotFoundError(
            f"EagleDraftHead.from_pretrained: neither {SAFETENSORS_NAME} nor {BIN_NAME} in {folder!r}"
        )
    return raw, state


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
    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
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


class _Layer(nn.Module):
    """One Llama decoder layer without its input RMSNorm (the EAGLE head's layer 0)."""

    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        self.self_attn = _Attention(config, qkv_bias)
        self.mlp = _MLP(config)
        self.post_attention_layernorm = _RMSNorm(config.hidden_size, config.rms_norm_eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
    checked when it is attached (:meth:`EagleDraftHead.attach_target`), with both values named."""
    problem = target_problem(target_model)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")


class EagleDraftHead(nn.Module):
    """EAGLE-1/2 draft head: ``fc`` + one Llama decoder layer (no input norm, no final norm).

    Args:
        config: a ``transformers.LlamaConfig``-like object for the head (hidden_size,
            intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
            rms_norm_eps, rope_parameters, vocab_size, max_position_embeddings, hidden_act;
            ``qkv_bias`` or ``attention_bias`` true gives q/k/v biases).
        bias: whether ``fc`` has a bias (the released config's ``"bias"``; default True).
        draft_to_target: optional [Vd] int64 tensor, the absolute target id of each draft id
            of a reduced draft vocabulary; saved with the head under ``draft_to_target``.

    The target's embedding and lm_head are attached with :meth:`attach_target` (shared by
    reference, frozen, never saved); ``from_target`` and ``from_pretrained(..., target=)``
    attach for you. Example::

        head = EagleDraftHead.from_target(model)              # random weights, attached
        feats = model(ids, output_hidden_states=True).hidden_states[-1]
        pred = head(feats[:, :-1], ids[:, 1:])                # [B, L-1, H] predicted features
        logits = head.logits(pred)                            # [B, L-1, V] (or Vd)
    """

    def __init__(self, config, bias: bool = True, draft_to_target: torch.Tensor | None = None):
        super().__init__()
        if getattr(config, "num_hidden_layers", 1) != 1:
            raise ValueError(
                f"EagleDraftHead: the head has exactly one decoder layer, config says "
                f"num_hidden_layers={config.num_hidden_layers}"
            )
        self.config = config
        self.bias = bool(bias)
        self.qkv_bias = bool(getattr(config, "qkv_bias", False) or getattr(config, "attention_bias", False))
        h = config.hidden_size
        self.hidden_size = h
        self.fc = nn.Linear(2 * h, h, bias=self.bias)
        self.layers = nn.ModuleList([_Layer(config, self.qkv_bias)])
        attn = self.layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.embed_tokens: nn.Embedding | None = None
        if draft_to_target is not None:
            d2t = torch.as_tensor(draft_to_target)
            if d2t.dim() != 1 or d2t.dtype not in (torch.int32, torch.int64) or d2t.numel() == 0:
                raise ValueError(
                    f"EagleDraftHead: draft_to_target must be a non-empty 1-D integer tensor, got "
                    f"shape {tuple(d2t.shape)} dtype {d2t.dtype}"
                )
            if int(d2t.min()) < 0 or int(d2t.max()) >= config.vocab_size:
                raise ValueError(
                    f"EagleDraftHead: draft_to_target ids must lie in [0, {config.vocab_size}), got "
                    f"[{int(d2t.min())}, {int(d2t.max())}]"
                )
            self.register_buffer("draft_to_target", d2t.to(torch.int64).clone())
        else:
            self.draft_to_target = None
        # RoPE inverse frequencies: kept in float32 whatever the head's dtype (see _apply).
        self.attention_scaling = 1.0
        self.register_buffer("inv_freq", self._rope_inv_freq(), persistent=False)
        # Shared target pieces (plain attributes, so they are neither parameters nor saved).
        self._shared: dict[str, nn.Module] = {}  # a dict, so the module is not registered
        self._lm_weight: torch.Tensor | None = None
        self._lm_bias: torch.Tensor | None = None

    # ------------------------------------------------------------------ set-up
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
        self.inv_freq = self._rope_inv_freq().to(self.fc.weight.device)
        return self

    @staticmethod
    def _config_from_target(target_config):
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
                f"EagleDraftHead.from_target: the target's {name} has no {', '.join(missing)}; a draft head "
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

    @classmethod
    def from_target(
        cls,
        target_model,
        bias: bool = True,
        draft_to_target: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> "EagleDraftHead":
        """A randomly initialised head shaped for ``target_model`` (a transformers causal LM),
        attached to it, on its device, in ``dtype`` (default: the target's dtype).

        Raises:
            ValueError: a target the decoder cannot run exactly (encoder-decoder, attention
                features tree attention lacks; see :func:`target_problem`), or whose config lacks
                the sizes a head is shaped from; the message names the reason.
        """
        check_pair(target_model, None, f"{cls.__name__}.from_target")
        head = cls(cls._config_from_target(target_model.config), bias=bias, draft_to_target=draft_to_target)
        head._init_weights(getattr(target_model.config, "initializer_range", 0.02))
        ref = target_model.get_output_embeddings().weight
        head.to(device=ref.device, dtype=dtype or ref.dtype)
        head.attach_target(target_model)
        return head

    def _init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def attach_target(self, target_model) -> "EagleDraftHead":
        """Share ``target_model``'s input embedding and lm_head (by reference, frozen).

        Checks that hidden size and vocabulary match; precomputes the lm_head rows of the
        draft vocabulary when ``draft_to_target`` is set. Returns self.
        """
        embed = target_model.get_input_embeddings()
        lm_head = target_model.get_output_embeddings()
        if embed is None or lm_head is None:
            raise ValueError("EagleDraftHead.attach_target: the target has no input embedding or lm_head")
        t_hidden = lm_head.weight.shape[1]
        t_vocab = lm_head.weight.shape[0]
        if t_hidden != self.hidden_size:
            raise ValueError(
                f"EagleDraftHead: head hidden size {self.hidden_size} does not match the target's "
                f"hidden size {t_hidden}"
            )
        if t_vocab != self.config.vocab_size:
            raise ValueError(
                f"EagleDraftHead: head vocab size {self.config.vocab_size} does not match the "
                f"target's vocab size {t_vocab}"
            )
        if self.embed_tokens is not None and self.embed_tokens.weight.shape[0] != t_vocab:
            raise ValueError(
                f"EagleDraftHead: the head's own embed_tokens has {self.embed_tokens.weight.shape[0]} "
                f"rows, the target's vocab has {t_vocab}"
            )
        self._shared["embed"] = embed
        w = lm_head.weight.detach()
        b = getattr(lm_head, "bias", None)
        b = None if b is None else b.detach()
        if self.draft_to_target is not None:
            idx = self.draft_to_target.to(w.device)
            w = w.index_select(0, idx).contiguous()
            b = None if b is None else b.index_select(0, idx)
        self._lm_weight, self._lm_bias = w, b
        return self

    @property
    def attached(self) -> bool:
        """Whether a target is attached (:meth:`attach_target`): the draft logits and the
        token embedding need its lm_head and embedding."""
        return self._lm_weight is not None

    # What the decoder asks of any draft head (EAGLE-1/2 here; other kinds answer the same):
    feature_layers = None
    """Which target hidden states the head consumes: None = the post-norm last hidden state
    (EAGLE-1/2); a tuple of ``output_hidden_states`` indices, concatenated, otherwise."""

    @property
    def target_feature_size(self) -> int:
        """Width of the target features fed to :meth:`prefill` / catch-up :meth:`tree_step`."""
        return self.hidden_size

    @property
    def draft_vocab_size(self) -> int:
        """Vd: rows of the draft logits (the target's V without a reduced vocabulary)."""
        return self.config.vocab_size if self.draft_to_target is None else self.draft_to_target.numel()

    def _require_attached(self):
        if not self.attached:
            raise RuntimeError(
                "EagleDraftHead: no target attached; call head.attach_target(model) first (or use "
                "from_target / from_pretrained(path, target=model))"
            )

    # ------------------------------------------------------------------ pieces
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, N, H] of ``input_ids`` [B, N] (own table if the head has one)."""
        if self.embed_tokens is not None:
            return self.embed_tokens(input_ids)
        self._require_attached()
        return self._shared["embed"](input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., Vd] of predicted features ``hidden`` [..., H] (target lm_head rows)."""
        self._require_attached()
        return F.linear(hidden, self._lm_weight, self._lm_bias)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, N, Dh] for ``position_ids`` [B, N], computed in float32 like Llama's."""
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def project(self, hidden_states, input_ids, position_ids, from_target: bool = False):
        """First half of the head, up to attention: the input projection and rotated q, k, v.

        With :meth:`finish` this lets a caller run its own attention pattern (the cached tree
        steps, the training-time test's rolled steps). Returns h [B,N,H], q [B,Hq,N,Dh],
        k and v [B,Hkv,N,Dh]. ``from_target`` (whether ``hidden_states`` are target features or
        the head's own outputs) makes no difference to an EAGLE-1/2 head.
        """
        x = self.embed(input_ids).to(hidden_states.dtype)
        h = self.fc(torch.cat((x, hidden_states), dim=-1))
        attn = self.layers[0].self_attn
        b, n, _ = h.shape
        q = attn.q_proj(h).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rope(position_ids, h.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return h, q, k, v

    def finish(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Second half of the head, after attention: output projection, residuals and MLP.
        ``h`` [B,N,H] from :meth:`project`, ``attn_out`` [B,Hq,N,Dh] -> [B,N,H]."""
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
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.layers[0].self_attn.scaling)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced causal forward over whole sequences (no cache).

        Args:
            hidden_states: [B, L, H] target features f_1..f_L (post-norm last hidden state).
            input_ids: [B, L] int64, the tokens shifted by one: x_2..x_{L+1}, so that the
                input at t is the pair (f_t, x_{t+1}).
            position_ids: [B, L] or [L] int64, default arange(L).

        Returns:
            [B, L, H] predicted features f^_2..f^_{L+1} (apply ``logits`` for token logits).
        """
        if hidden_states.dim() != 3 or input_ids.dim() != 2 or hidden_states.shape[:2] != input_ids.shape:
            raise ValueError(
                f"EagleDraftHead.forward: expected hidden_states [B, L, H] and input_ids [B, L], got "
                f"{tuple(hidden_states.shape)} and {tuple(input_ids.shape)}"
            )
        b, n = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(b, n)
        h, q, k, v = self.project(hidden_states, input_ids, position_ids)
        return self.finish(h, self._causal_attention(q, k, v))

    # ------------------------------------------------------------------ cached decoding
    def prefill(self, hidden_states, input_ids, cache) -> torch.Tensor:
        """Causal forward over N pairs written at cache slots 0..N-1 (the cache starts empty;
        later pairs go through :meth:`tree_step`'s catch-up).

        Args:
            hidden_states: [B, N, H]; input_ids: [B, N]; cache: a one-layer StaticKVCache.
        Returns:
            [B, N, H] predicted features. Positions are the slot indices.
        """
        n = input_ids.shape[1]
        pos = torch.arange(n, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], n)
        h, q, k, v = self.project(hidden_states, input_ids, pos)
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
        iff bit j of its row of ``tree_mask`` is set.

        Args:
            hidden_states: [B, N, H] parent features; input_ids: [B, N] tokens;
            position_ids: [B, N] draft positions; cache: one-layer StaticKVCache;
            slot: first slot to write (lengths + offset in the tree region), an int, a list
                of B ints, or a [B] integer device tensor (no host read; the static round);
            tree_mask: [B, N, W] int32 packed mask; tree_len: tree slots in use after the write.
            from_target: True when ``hidden_states`` are target features (the catch-up),
                False when they are the head's own outputs (the expansion). An EAGLE-1/2
                head treats both alike; heads whose inputs differ by source read it.
        Returns:
            [B, N, H] predicted features.
        """
        from eagle2_kernels.ops import tree_attention

        h, q, k, v = self.project(hidden_states, input_ids, position_ids)
        cache.write(0, slot, k, v)
        kwargs = {} if backend is None else {"backend": backend}
        out = tree_attention(
            q, cache.keys(0), cache.values(0), cache.lengths, tree_mask, tree_len,
            scale=self.layers[0].self_attn.scaling, **kwargs,
        )
        return self.finish(h, out)

    # ------------------------------------------------------------------ save / load
    def _config_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        for noise in ("id2label", "label2id", "_name_or_path", "transformers_version"):
            d.pop(noise, None)
        d["architectures"] = ["LlamaForCausalLM"]
        d["num_hidden_layers"] = 1
        d["bias"] = self.bias
        if self.qkv_bias:
            d["qkv_bias"] = True
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]  # also the released (pre-v5) spelling
        d.pop("dtype", None)
        d["torch_dtype"] = str(self.fc.weight.dtype).replace("torch.", "")
        return d

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` (released layout) into directory ``path``.

        Only the head's own tensors are saved (plus ``draft_to_target`` when set, and
        ``embed_tokens.weight`` only when the head owns an embedding).
        """
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(self._config_dict(), f, indent=2, sort_keys=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        target=None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "EagleDraftHead":
        """Load a head, EAGLE-1/2 or EAGLE-3, recognised from its files.

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
            an :class:`EagleDraftHead` for the released EAGLE-1/2 layout, an
            :class:`~eagle2_kernels.models.eagle3_head.Eagle3DraftHead` (a subclass) for the
            EAGLE-3 layouts (``midlayer.*`` / ``d2t`` / own ``lm_head``; see that module).

        Raises:
            FileNotFoundError: no such path / repository, no config.json or no weights file.
            ValueError: keys that do not match the format (missing / unexpected named), a
                shape mismatch, or a head that does not fit the target; a config.json or weights
                file that cannot be read (not JSON, truncated, a Git LFS pointer, a size missing
                or not a positive int), with the file named.
        """
        from eagle2_kernels.models.hub import resolve_head

        path = resolve_head(path)
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        raw, state = _read_head_files(folder)
        from eagle2_kernels.models.eagle3_head import Eagle3DraftHead, is_eagle3

        try:
            eagle3 = is_eagle3(raw, state.keys())
        except ValueError as exc:
            raise ValueError(f"{cls.__name__}.from_pretrained({folder!r}): {exc}") from None
        if eagle3:
            return Eagle3DraftHead._from_files(folder, raw, state, target=target, dtype=dtype, device=device)
        if issubclass(cls, Eagle3DraftHead):
            raise ValueError(
                f"{cls.__name__}.from_pretrained: {folder!r} holds an EAGLE-1/2 head (layers.0.*, no "
                f"midlayer / lm_head / d2t); load it with EagleDraftHead.from_pretrained"
            )
        cfg_path = os.path.join(folder, CONFIG_NAME)
        check_head_config(raw, cfg_path)
        if int(raw.get("num_hidden_layers", 1)) != 1:
            raise ValueError(
                f"EagleDraftHead.from_pretrained: {cfg_path} has num_hidden_layers="
                f"{raw['num_hidden_layers']}; an EAGLE-1/2 head has exactly 1"
            )
        try:
            config = _llama_config(raw)
            if raw.get("qkv_bias"):
                config.qkv_bias = True
            head = cls(config, bias=bool(raw.get("bias", True)), draft_to_target=state.get("draft_to_target"))
        except (TypeError, ValueError, KeyError) as exc:  # a field transformers or the head rejects
            raise ValueError(
                f"EagleDraftHead.from_pretrained: {cfg_path} (with the weights beside it) does not describe an "
                f"EAGLE-1/2 head: {type(exc).__name__}: {exc}"
            ) from exc
        if "embed_tokens.weight" in state:
            w = state["embed_tokens.weight"]
            head.embed_tokens = nn.Embedding(w.shape[0], w.shape[1])
        expected = set(head.state_dict().keys())
        found = set(state.keys())
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise ValueError(
                f"EagleDraftHead.from_pretrained: the weights in {folder!r} do not match the EAGLE "
                f"head format (config bias={head.bias}, qkv_bias={head.qkv_bias}): missing keys "
                f"{missing}, unexpected keys {unexpected}"
            )
        return load_checked(head, state, target, dtype, device, f"EagleDraftHead.from_pretrained({folder!r})")

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, heads={self.num_heads}/{self.num_kv_heads}, "
            f"head_dim={self.head_dim}, bias={self.bias}, qkv_bias={self.qkv_bias}, "
            f"draft_vocab={self.draft_vocab_size}"
        )
