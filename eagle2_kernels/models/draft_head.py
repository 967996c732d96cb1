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

Both head formats extend :class:`~eagle2_kernels.models.head_base.DraftHeadBase` (the layer
pieces, the cached forwards, attaching, saving), which this module re-exports with the file
checks it used to define. ``EagleDraftHead.from_pretrained`` loads either format
(:func:`~eagle2_kernels.models.head_loader.load_draft_head` recognises EAGLE-3 heads from their
files and returns an :class:`~eagle2_kernels.models.eagle3_head.Eagle3DraftHead`) and resolves
Hugging Face hub repository ids (:mod:`eagle2_kernels.models.hub`); this module does not import
the EAGLE-3 one (both register with the loader when :mod:`eagle2_kernels.models` is imported).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from eagle2_kernels.models import matmul
from eagle2_kernels.models.head_base import (  # noqa: F401  (re-exported: the names callers import from here)
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    DraftHeadBase,
    _Attention,
    _MLP,
    _RMSNorm,
    check_head_config,
    check_pair,
    load_checked,
    read_head_config,
    read_head_weights,
    target_problem,
)

__all__ = [
    "DraftHeadBase", "EagleDraftHead", "check_head_config", "check_pair", "load_checked", "read_head_config",
    "read_head_weights", "target_problem", "CONFIG_NAME", "SAFETENSORS_NAME", "BIN_NAME",
]

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


class _Layer(nn.Module):
    """One Llama decoder layer without its input RMSNorm (the EAGLE head's layer 0)."""

    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        self.self_attn = _Attention(config, config.hidden_size, qkv_bias)
        self.mlp = _MLP(config)
        self.post_attention_layernorm = _RMSNorm(config.hidden_size, config.rms_norm_eps)


class EagleDraftHead(DraftHeadBase):
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

    file_format = "eagle2"

    def __init__(self, config, bias: bool = True, draft_to_target: torch.Tensor | None = None):
        super().__init__(config)
        self.bias = bool(bias)
        self.qkv_bias = bool(getattr(config, "qkv_bias", False) or getattr(config, "attention_bias", False))
        h = config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=self.bias)
        self.layers = nn.ModuleList([_Layer(config, self.qkv_bias)])
        self._set_draft_vocab(draft_to_target, persistent=True)
        # The target's lm_head rows of the draft vocabulary (set when attached; not saved).
        self._lm_weight: torch.Tensor | None = None
        self._lm_bias: torch.Tensor | None = None

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
        return head._place_and_attach(target_model, dtype)

    def _bind_target(self, target_model, embed, lm_head) -> None:
        """Check hidden size and vocabulary against the target; keep the lm_head rows of the
        draft vocabulary (all rows without ``draft_to_target``) for :meth:`logits`."""
        t_hidden = lm_head.weight.shape[1]
        t_vocab = lm_head.weight.shape[0]
        if t_hidden != self.hidden_size:
            raise ValueError(
                f"EagleDraftHead: head hidden size {self.hidden_size} does not match the target's "
                f"hidden size {t_hidden}"
            )
        self._check_vocab(t_vocab)
        if self.embed_tokens is not None and self.embed_tokens.weight.shape[0] != t_vocab:
            raise ValueError(
                f"EagleDraftHead: the head's own embed_tokens has {self.embed_tokens.weight.shape[0]} "
                f"rows, the target's vocab has {t_vocab}"
            )
        w = lm_head.weight.detach()
        b = getattr(lm_head, "bias", None)
        b = None if b is None else b.detach()
        if self.draft_to_target is not None:
            idx = self.draft_to_target.to(w.device)
            w = w.index_select(0, idx).contiguous()
            b = None if b is None else b.index_select(0, idx)
        self._lm_weight, self._lm_bias = w, b

    @property
    def target_feature_size(self) -> int:
        """Width of the target features fed to :meth:`prefill` / catch-up :meth:`tree_step`:
        the post-norm last hidden state, H."""
        return self.hidden_size

    # ------------------------------------------------------------------ pieces
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., Vd] of predicted features ``hidden`` [..., H] (target lm_head rows)."""
        self._require_attached()
        return matmul.linear(hidden, self._lm_weight, self._lm_bias)

    def project(self, hidden_states, input_ids, position_ids, from_target: bool = False):
        """First half of the head, up to attention: the input projection and rotated q, k, v.

        With :meth:`finish` this lets a caller run its own attention pattern (the cached tree
        steps, the training-time test's rolled steps). Returns h [B,N,H], q [B,Hq,N,Dh],
        k and v [B,Hkv,N,Dh]. ``from_target`` (whether ``hidden_states`` are target features or
        the head's own outputs) makes no difference to an EAGLE-1/2 head.
        """
        x = self.embed(input_ids).to(hidden_states.dtype)
        h = self.fc(torch.cat((x, hidden_states), dim=-1))
        q, k, v = self._rotated_qkv(h, position_ids)
        return h, q, k, v

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

    @classmethod
    def _from_files(cls, folder: str, raw: dict, state: dict, target=None, dtype=None, device=None):
        """Build an EAGLE-1/2 head from a parsed config and state dict (the loader,
        :func:`~eagle2_kernels.models.head_loader.load_draft_head`, read and recognised them)."""
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
