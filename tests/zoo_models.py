"""Tiny random targets of every decoder-only transformers architecture the model zoo test runs
(fp32, 2 layers, hidden 64), built through AutoConfig / AutoModelForCausalLM (seeded)."""

from __future__ import annotations

import torch
import transformers

ZOO_SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, num_hidden_layers=2, max_position_embeddings=256,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None)
ZOO_VOCAB = 300

# model_type -> config overrides beyond ZOO_SHAPE.
ZOO_EXTRA = {
    "smollm3": dict(no_rope_layers=[1, 0]),  # layer 1 without rotary positions (NoPE)
    # Per-head LayerNorm on q and k, q/k/v biases (partial rotary by default).
    "stablelm": dict(qk_layernorm=True, use_qkv_bias=True),
}
# GPT-NeoX keeps ZOO_SHAPE's num_key_value_heads=2 in its config but its attention runs all 4
# heads as KV heads: the adapter must size its cache from what the layers hand to attention.

# Architectures that decode exactly (greedy, fp32) against transformers' generate.
ZOO_EXACT = ["llama", "qwen3", "gemma", "phi3", "olmo2", "granite", "smollm3", "cohere", "phi", "olmo",
             "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "helium", "exaone4", "ernie4_5", "seed_oss",
             "cohere2", "granitemoe", "gpt_neox", "bitnet", "stablelm", "nemotron", "glm", "glm4"]

# Architectures refused, with a piece of the stated reason.
ZOO_REFUSED = {
    # Hybrid linear-attention layers never reach the attention interface.
    "minimax": "the per-forward attention switch does not reach every layer",
}


def build_zoo(model_type: str):
    """A tiny random causal LM of ``model_type`` (seed 3), eval mode, fp32, no special tokens."""
    cfg_cls = type(transformers.AutoConfig.for_model(model_type))
    cfg = cfg_cls(vocab_size=ZOO_VOCAB, **{**ZOO_SHAPE, **ZOO_EXTRA.get(model_type, {})})
    cfg.eos_token_id = None  # some configs keep their own default ids outside the tiny vocabulary
    torch.manual_seed(3)
    return transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
