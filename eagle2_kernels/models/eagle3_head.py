"""The EAGLE-3 draft head and its loader (README: "EAGLE-3 heads").

The head reads several target hidden states instead of the last one, and predicts with its own
norm, lm_head and (optionally reduced) vocabulary:

    g = fc(cat(t_low, t_mid, t_high))              Linear 3*Ht -> H, no bias (target features)
    a = cat(input_layernorm(embed(x_{t+1})), hidden_norm(g))                      [.., 2H]
    h = g + o_proj(attn(rope(q_proj a), rope(k_proj a), v_proj a))   residual = the un-normed g
    h = h + mlp(post_attention_layernorm(h))                          SwiGLU
    logits = lm_head(norm(h))                                         [.., Vd], the head's own

``t_*`` are the residual streams entering target layers 2, L//2 and L-3 (transformers
``output_hidden_states`` indices; no norm). Deeper tree steps feed the head its own pre-norm
output h as ``g`` (no ``fc``): ``tree_step(..., from_target=False)``. With
``norm_before_residual`` (a variant of vLLM's speculators) the residual is ``hidden_norm(g)``.

Official layout (SafeAILab EAGLE-3 releases): ``config.json`` (Llama fields with
``num_hidden_layers: 1`` and ``draft_vocab_size``; ``rope_theta`` absent means 10000) and
``pytorch_model.bin`` or ``model.safetensors`` holding ``fc.weight``,
``midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight``,
``midlayer.self_attn.{q,k,v,o}_proj.weight``, ``midlayer.mlp.{gate,up,down}_proj.weight``,
``norm.weight``, ``lm_head.weight``, ``d2t`` (int64 [Vd], target id = draft id + d2t[draft id])
and ``t2d`` (bool [V]), plus ``embed_tokens.weight`` when the head has its own embedding (it must
when ``target_hidden_size`` differs from ``hidden_size``; otherwise the target's is shared).
Accepted variants: ``layers.0.`` for ``midlayer.``, a ``model.`` prefix on every key, a
speculators ``transformer_layer_config``, ``norm_before_residual``, and explicit feature layer ids
(see :func:`feature_layers_from_config`).

In memory the draft vocabulary map is ``draft_to_target``, ABSOLUTE target ids (what
``ops.tree_expand`` takes); it is converted from / to the offsets ``d2t`` at load / save.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from eagle2_kernels.models.head_base import (
    CONFIG_NAME,
    DraftHeadBase,
    _Attention,
    _MLP,
    _RMSNorm,
    check_head_config,
    check_pair,
    load_checked,
)
from eagle2_kernels.models.head_loader import _strip_model_prefix, is_eagle3  # noqa: F401  (is_eagle3 re-exported)

__all__ = ["Eagle3DraftHead", "default_feature_layers", "feature_layers_from_config"]

# Keys of an EAGLE-3 config that describe the head and are not LlamaConfig fields (or that
# LlamaConfig would misread).
_HEAD_ONLY_KEYS = ("bias", "qkv_bias", "eagle_config", "eagle_aux_hidden_state_layer_ids",
                   "norm_before_residual", "transformer_layer_config", "speculators_config",
                   "speculators_model_type", "speculators_version", "target_hidden_size",
                   "draft_vocab_size", "architectures", "model_type", "auto_map")


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's feature layers for a target of ``num_layers`` layers: the hidden states
    entering layers 2, L//2 and L-3 (``output_hidden_states`` indices)."""
    return (2, num_layers // 2, num_layers - 3)


def feature_layers_from_config(raw: dict[str, Any]) -> tuple[int, ...] | None:
    """Explicit feature layer ids of a head config, as ``output_hidden_states`` indices, or
    None (the default, :func:`default_feature_layers`).

    Two spellings exist and the engines that define them count differently:

    * ``eagle_config.eagle_aux_hidden_state_layer_ids`` (nested) is written by SpecForge and read
      by SGLang, which captures the OUTPUT of layer k for id k: hidden-state index k + 1 (their
      default ids 1, L//2-1, L-4 are the official layers 2, L//2, L-3).
    * a top-level ``eagle_aux_hidden_state_layer_ids`` is written by vLLM's speculators and read
      by vLLM, which captures the INPUT of layer j for id j: hidden-state index j.

    We read each spelling the way the engine that writes it reads it, so a head gets the
    features it was trained on; when both are present they must name the same layers.
    """
    nested = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    top = raw.get("eagle_aux_hidden_state_layer_ids")
    from_nested = None if nested is None else tuple(int(i) + 1 for i in nested)
    from_top = None if top is None else tuple(int(i) for i in top)
    if from_nested is not None and from_top is not None and from_nested != from_top:
        raise ValueError(
            f"the head config names two different feature layer sets: eagle_config."
            f"eagle_aux_hidden_state_layer_ids={list(nested)} (SGLang ids: layer outputs, hidden "
            f"states {list(from_nested)}) and eagle_aux_hidden_state_layer_ids={list(top)} (vLLM ids: "
            f"hidden states {list(from_top)})"
        )
    return from_nested if from_nested is not None else from_top


class _Eagle3Layer(nn.Module):
    """The head's one layer (``midlayer`` in the official files)."""

    def __init__(self, config):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = _RMSNorm(h, eps)
        self.hidden_norm = _RMSNorm(h, eps)
        self.self_attn = _Attention(config, 2 * h, qkv_bias=False)  # q/k/v read [embedding | hidden]
        self.post_attention_layernorm = _RMSNorm(h, eps)
        self.mlp = _MLP(config)


def _llama_config(values: dict[str, Any]):
    from transformers import LlamaConfig

    values = {k: v for k, v in values.items() if k not in _HEAD_ONLY_KEYS}
    values["num_hidden_layers"] = 1
    if "rope_theta" not in (values.get("rope_parameters") or {}):
        values.setdefault("rope_theta", 10000.0)  # the official configs omit it: Llama's default
    return LlamaConfig(**values)


class Eagle3DraftHead(DraftHeadBase):
    """EAGLE-3 draft head: ``fc`` over concatenated target hidden states, one layer over
    [embedding | hidden], its own norm and lm_head over a draft vocabulary.

    The interface of :class:`~eagle2_kernels.models.head_base.DraftHeadBase`, which it extends
    like the EAGLE-1/2 head (so the decoder drives both alike): ``feature_layers`` /
    ``target_feature_size`` tell the target adapter what to capture; ``prefill`` and catch-up ``tree_step(..., from_target=True)`` take target features
    [B, N, target_feature_size]; expansion ``tree_step`` takes the head's own outputs [B, N, H].

    Args:
        config: a ``transformers.LlamaConfig``-like object for the head (hidden_size H,
            intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
            rms_norm_eps, rope_parameters, vocab_size = the target's V, draft_vocab_size Vd,
            max_position_embeddings, hidden_act).
        target_hidden_size: Ht, the target's hidden size (default H).
        draft_to_target: optional [Vd] int64 ABSOLUTE target ids of the draft vocabulary
            (None: Vd = V, the identity).
        feature_layers: ``output_hidden_states`` indices of the target features (None: EAGLE-3's
            default (2, L//2, L-3), fixed when a target is attached).
        norm_before_residual: the first residual is ``hidden_norm(g)`` instead of ``g``.
        own_embedding: the head has its own ``embed_tokens`` [V, H] (required when Ht != H).

    Example::

        head = Eagle3DraftHead.from_target(model, draft_to_target=torch.arange(64))
        dec = TreeSpecDecoder(model, head, total_tokens=60, depth=7, top_k=10)
    """

    file_format = "eagle3"

    def __init__(
        self,
        config,
        target_hidden_size: int | None = None,
        draft_to_target: torch.Tensor | None = None,
        feature_layers: tuple[int, ...] | None = None,
        norm_before_residual: bool = False,
        own_embedding: bool = False,
    ):
        super().__init__(config, target_hidden_size=target_hidden_size)
        self.bias = False
        self.qkv_bias = False
        h = config.hidden_size
        self._explicit_layers = None if feature_layers is None else tuple(int(i) for i in feature_layers)
        self._layers_for: tuple[int, ...] | None = self._explicit_layers
        n_feat = 3 if feature_layers is None else len(self._explicit_layers)
        if n_feat < 1:
            raise ValueError("Eagle3DraftHead: feature_layers must name at least one hidden state")
        self.norm_before_residual = bool(norm_before_residual)
        self.fc = nn.Linear(n_feat * self.target_hidden_size, h, bias=False)
        self.midlayer = _Eagle3Layer(config)
        self.norm = _RMSNorm(h, config.rms_norm_eps)
        vocab = config.vocab_size
        # Not persistent: the files hold the offsets d2t (written by save_pretrained).
        self._set_draft_vocab(draft_to_target, persistent=False)
        draft_vocab = vocab if self.draft_to_target is None else self.draft_to_target.numel()
        declared = getattr(config, "draft_vocab_size", None)
        if declared is not None and int(declared) != draft_vocab:
            raise ValueError(
                f"Eagle3DraftHead: config draft_vocab_size={declared} but the draft vocabulary map has "
                f"{draft_vocab} entries"
            )
        self.lm_head = nn.Linear(h, draft_vocab, bias=False)
        if self.target_hidden_size != h and not own_embedding:
            raise ValueError(
                f"Eagle3DraftHead: hidden size {h} differs from the target's {self.target_hidden_size}, so "
                f"the head needs its own embed_tokens (own_embedding=True)"
            )
        if own_embedding:
            self.embed_tokens = nn.Embedding(vocab, h)

    # ------------------------------------------------------------------ the interface
    @property
    def explicit_feature_layers(self) -> tuple[int, ...] | None:
        """The feature layers given at construction (or by the config), None for the default
        (:func:`default_feature_layers` of the attached target's depth)."""
        return self._explicit_layers

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """``output_hidden_states`` indices of the target features, in concatenation order."""
        if self._layers_for is None:
            raise RuntimeError(
                "Eagle3DraftHead: the default feature layers (2, L//2, L-3) depend on the target's depth; "
                "attach it first (head.attach_target(model), or from_pretrained(path, target=model))"
            )
        return self._layers_for

    @property
    def target_feature_size(self) -> int:
        """Width of the target features fed to :meth:`prefill` / catch-up :meth:`tree_step`."""
        return self.fc.in_features

    @property
    def layers(self) -> tuple[nn.Module]:
        """The head's one layer, as ``layers[0]`` (the EAGLE-1/2 spelling callers use)."""
        return (self.midlayer,)

    def _bind_target(self, target_model, embed, lm_head) -> None:
        """Check the head against ``target_model`` (hidden size, vocabulary, feature layers,
        where its decoder layers are) and fix the default feature layers for its depth; the
        base class then shares its embedding (used unless the head has its own)."""
        from eagle2_kernels.models.target import _text_config

        cfg = _text_config(target_model)
        t_hidden, t_vocab = lm_head.weight.shape[1], lm_head.weight.shape[0]
        n_layers = int(cfg.num_hidden_layers)
        if t_hidden != self.target_hidden_size:
            raise ValueError(
                f"Eagle3DraftHead: the head reads target features of hidden size {self.target_hidden_size} "
                f"(target_hidden_size), the target's hidden size is {t_hidden}"
            )
        self._check_vocab(t_vocab)
        if self.embed_tokens is None and embed.weight.shape[1] != self.hidden_size:
            raise ValueError(
                f"Eagle3DraftHead: the head (hidden {self.hidden_size}) shares the target's embedding of "
                f"width {embed.weight.shape[1]}; a head of another width must carry its own embed_tokens"
            )
        layers = self._explicit_layers or default_feature_layers(n_layers)
        if self.fc.in_features != len(layers) * t_hidden:
            raise ValueError(
                f"Eagle3DraftHead: fc reads {self.fc.in_features} features, {len(layers)} hidden states "
                f"{layers} of the target give {len(layers) * t_hidden}"
            )
        bad = [i for i in layers if not 0 <= i <= n_layers]
        if bad:
            raise ValueError(
                f"Eagle3DraftHead: feature layers {layers} lie outside the target's hidden states 0..{n_layers} "
                f"({n_layers} layers)"
            )
        # The decoder captures those hidden states at the inputs of the target's decoder layers,
        # found where transformers' Llama-style models keep them; other layouts are refused here
        # rather than when decoding starts.
        get_decoder = getattr(target_model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        blocks = getattr(decoder, "layers", None)
        if blocks is None or len(blocks) < n_layers:
            raise ValueError(
                f"Eagle3DraftHead: {type(target_model).__name__} keeps its decoder layers elsewhere than "
                f"model.get_decoder().layers, so the hidden states {layers} an EAGLE-3 head reads cannot be "
                f"captured; an EAGLE-1/2 head (EagleDraftHead), which reads the last hidden state, works with it"
            )
        self._layers_for = tuple(layers)

    # ------------------------------------------------------------------ pieces
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., Vd] of head outputs ``hidden`` [..., H]: ``lm_head(norm(h))``."""
        return self.lm_head(self.norm(hidden))

    def project(self, hidden_states, input_ids, position_ids, from_target: bool = False):
        """First half of the head, up to attention.

        Args:
            hidden_states: [B, N, target_feature_size] target features (``from_target=True``)
                or [B, N, H] the head's own earlier outputs.
        Returns:
            the residual [B, N, H], rotated q [B, Hq, N, Dh], k and v [B, Hkv, N, Dh].
        """
        want = self.target_feature_size if from_target else self.hidden_size
        if hidden_states.shape[-1] != want:
            raise ValueError(
                f"Eagle3DraftHead: {'target features' if from_target else 'head outputs'} must have width "
                f"{want}, got {hidden_states.shape[-1]} (from_target={from_target})"
            )
        g = self.fc(hidden_states) if from_target else hidden_states
        layer = self.midlayer
        x = layer.input_layernorm(self.embed(input_ids).to(g.dtype))
        gn = layer.hidden_norm(g)
        residual = gn if self.norm_before_residual else g
        a = torch.cat((x, gn), dim=-1)
        q, k, v = self._rotated_qkv(a, position_ids)
        return residual, q, k, v

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_target(
        cls,
        target_model,
        draft_to_target: torch.Tensor | None = None,
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
        feature_layers: tuple[int, ...] | None = None,
        norm_before_residual: bool = False,
        dtype: torch.dtype | None = None,
    ) -> "Eagle3DraftHead":
        """A randomly initialised EAGLE-3 head for ``target_model``, attached, on its device.

        Args:
            draft_to_target: optional [Vd] absolute target ids (a reduced draft vocabulary).
            hidden_size: the head's H (default the target's; another width gives the head its
                own embedding); intermediate_size likewise (default: the target's, scaled).
            feature_layers: explicit hidden-state indices (default (2, L//2, L-3)).
        """
        check_pair(target_model, None, f"{cls.__name__}.from_target")
        config = cls._config_from_target(target_model.config)
        t_hidden = config.hidden_size
        if hidden_size is not None and hidden_size != t_hidden:
            config.intermediate_size = intermediate_size or max(1, config.intermediate_size * hidden_size // t_hidden)
            config.hidden_size = hidden_size
        elif intermediate_size is not None:
            config.intermediate_size = intermediate_size
        config.draft_vocab_size = None if draft_to_target is None else int(torch.as_tensor(draft_to_target).numel())
        head = cls(config, target_hidden_size=t_hidden, draft_to_target=draft_to_target,
                   feature_layers=feature_layers, norm_before_residual=norm_before_residual,
                   own_embedding=config.hidden_size != t_hidden)
        std = getattr(target_model.config, "initializer_range", 0.02)
        head._init_weights(std)
        if head.embed_tokens is not None:
            nn.init.normal_(head.embed_tokens.weight, mean=0.0, std=std)
        return head._place_and_attach(target_model, dtype)

    # ------------------------------------------------------------------ save / load
    def _config_dict(self) -> dict[str, Any]:
        c = self.config
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "rms_norm_eps": c.rms_norm_eps,
            "hidden_act": c.hidden_act,
            "max_position_embeddings": c.max_position_embeddings,
            "vocab_size": c.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "tie_word_embeddings": False,
            "initializer_range": getattr(c, "initializer_range", 0.02),
            "torch_dtype": str(self.fc.weight.dtype).replace("torch.", ""),
        }
        rope = dict(getattr(c, "rope_parameters", None) or {})
        d["rope_theta"] = float(rope.pop("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            d["rope_scaling"] = rope
        if self.target_hidden_size != self.hidden_size:
            d["target_hidden_size"] = self.target_hidden_size
        if self.norm_before_residual:
            d["norm_before_residual"] = True
        if self._explicit_layers is not None:
            # SpecForge / SGLang spelling: ids of layer OUTPUTS (hidden-state index - 1).
            d["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in self._explicit_layers]}
        return d

    def _files_state(self) -> dict[str, torch.Tensor]:
        """The official EAGLE-3 tensors (``save_pretrained``): the head's own, plus ``d2t`` as
        offsets and ``t2d`` as a bool mask over the target vocabulary."""
        state = super()._files_state()
        vd, vocab = self.draft_vocab_size, self.config.vocab_size
        ids = torch.arange(vd) if self.draft_to_target is None else self.draft_to_target.cpu()
        state["d2t"] = (ids - torch.arange(vd)).to(torch.int64).contiguous()
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[ids] = True
        state["t2d"] = t2d
        return state

    @classmethod
    def _from_files(cls, folder: str, raw: dict, state: dict, target=None, dtype=None, device=None):
        """Build a head from a parsed config and state dict (see :meth:`from_pretrained`)."""
        where = f"{cls.__name__}.from_pretrained({folder!r})"
        raw = dict(raw)
        layer_cfg = raw.get("transformer_layer_config")
        if isinstance(layer_cfg, dict):  # speculators: the Llama fields live one level down
            raw = {**raw, **{k: v for k, v in layer_cfg.items() if k not in ("architectures", "model_type")}}
        check_head_config(raw, os.path.join(folder, CONFIG_NAME))
        if int(raw.get("num_hidden_layers", 1)) != 1:
            raise ValueError(f"{where}: num_hidden_layers={raw['num_hidden_layers']}; only 1-layer heads are supported")
        for flag in ("attention_bias", "norm_before_fc"):
            if raw.get(flag):
                raise NotImplementedError(f"{where}: config {flag}=true is not supported")
        state = normalise_eagle3_keys(state)
        for key in ("fc.weight", "lm_head.weight"):
            if key not in state:
                raise ValueError(f"{where}: the weights have no {key!r} (keys: {sorted(state)[:12]} ...)")
        try:
            config = _llama_config(raw)
        except (TypeError, ValueError, KeyError) as exc:  # a field transformers rejects
            raise ValueError(f"{where}: {os.path.join(folder, CONFIG_NAME)} does not describe an EAGLE-3 head: "
                             f"{type(exc).__name__}: {exc}") from exc
        hidden = config.hidden_size
        t_hidden = int(raw.get("target_hidden_size") or hidden)
        vocab = config.vocab_size
        vd = int(state["lm_head.weight"].shape[0])
        declared = raw.get("draft_vocab_size")
        if declared is not None and int(declared) != vd:
            raise ValueError(f"{where}: config draft_vocab_size={declared} but lm_head.weight has {vd} rows")
        d2t = state.pop("d2t", None)
        t2d = state.pop("t2d", None)
        draft_to_target = None
        if d2t is not None:
            if d2t.dim() != 1 or d2t.numel() != vd or d2t.dtype.is_floating_point:
                raise ValueError(f"{where}: d2t must be an integer vector of {vd} offsets, got "
                                 f"shape {tuple(d2t.shape)} dtype {d2t.dtype}")
            absolute = torch.arange(vd, dtype=torch.int64) + d2t.to(torch.int64)
            lo, hi = int(absolute.min()), int(absolute.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"{where}: d2t maps draft ids to target ids [{lo}, {hi}], outside the "
                                 f"vocabulary [0, {vocab})")
            if not (vd == vocab and bool((d2t == 0).all())):
                draft_to_target = absolute
        elif vd != vocab:
            raise ValueError(f"{where}: a draft vocabulary of {vd} tokens (target {vocab}) needs a d2t map")
        if t2d is not None and draft_to_target is not None:
            if t2d.numel() != vocab or int(t2d.to(torch.int64).sum()) != vd or not bool(t2d.bool()[draft_to_target].all()):
                raise ValueError(f"{where}: t2d does not mark exactly the {vd} target ids that d2t maps to")
        if draft_to_target is not None and torch.unique(draft_to_target).numel() != vd:
            raise ValueError(f"{where}: d2t maps two draft ids to the same target id")
        config.draft_vocab_size = vd
        fc_in = int(state["fc.weight"].shape[1])
        layers = feature_layers_from_config(raw)
        if layers is None and fc_in != 3 * t_hidden:
            raise ValueError(f"{where}: fc.weight reads {fc_in} features; three target hidden states of "
                             f"width {t_hidden} give {3 * t_hidden} (set target_hidden_size?)")
        if layers is not None and fc_in != len(layers) * t_hidden:
            raise ValueError(f"{where}: fc.weight reads {fc_in} features; the {len(layers)} feature layers "
                             f"{list(layers)} of width {t_hidden} give {len(layers) * t_hidden}")
        head = cls(config, target_hidden_size=t_hidden, draft_to_target=draft_to_target, feature_layers=layers,
                   norm_before_residual=bool(raw.get("norm_before_residual", False)),
                   own_embedding="embed_tokens.weight" in state)
        expected, found = set(head.state_dict()), set(state)
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise ValueError(f"{where}: the weights do not match the EAGLE-3 head format: missing keys "
                             f"{missing}, unexpected keys {unexpected}")
        return load_checked(head, state, target, dtype, device, where)

    def extra_repr(self) -> str:
        layers = self._layers_for if self._layers_for is not None else "default (2, L//2, L-3)"
        return (
            f"hidden={self.hidden_size}, target_hidden={self.target_hidden_size}, "
            f"heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"feature_layers={layers}, draft_vocab={self.draft_vocab_size}, "
            f"norm_before_residual={self.norm_before_residual}"
        )


def normalise_eagle3_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the key spellings seen in the wild to the official ones: a ``model.`` prefix on
    every key is dropped and ``layers.0.`` becomes ``midlayer.``."""
    out = {}
    for k, v in _strip_model_prefix(state).items():
        if k.startswith("layers.0."):
            k = "midlayer." + k[len("layers.0."):]
        if k in out:
            raise ValueError(f"EAGLE-3 head: the weights hold {k!r} twice (as midlayer. and layers.0.)")
        out[k] = v
    return out
