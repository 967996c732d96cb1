"""Tiny random local-attention targets (sliding windows, hybrid local/global layers, softcaps,
sinks) shared by the any-model and compiled-forward tests."""

from __future__ import annotations

import torch
import transformers

PROMPT, NEW = 30, 40
WINDOW = 8
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_hidden_layers=2, max_position_embeddings=256,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_local(arch: str):
    """A tiny random causal LM of ``arch`` with its local attention switched on (seeded)."""
    torch.manual_seed(11)
    T = transformers
    if arch == "mistral":
        model = T.MistralForCausalLM(T.MistralConfig(vocab_size=300, sliding_window=WINDOW, **SHAPE))
    elif arch == "qwen2":
        # Layer 0 global, layer 1 windowed (max_window_layers=1): a hybrid of the two.
        model = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=310, use_sliding_window=True, sliding_window=WINDOW,
                                                 max_window_layers=1, **SHAPE))
    elif arch == "starcoder2":
        model = T.Starcoder2ForCausalLM(T.Starcoder2Config(vocab_size=320, sliding_window=WINDOW, **SHAPE))
    elif arch == "gemma2":
        model = T.Gemma2ForCausalLM(T.Gemma2Config(
            vocab_size=330, sliding_window=WINDOW, attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
            query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"], **SHAPE))
        with torch.no_grad():  # scores far past the cap of 2.0, so that the cap matters here
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(30.0)
                layer.self_attn.k_proj.weight.mul_(30.0)
    elif arch == "gemma3":
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(
            vocab_size=340, sliding_window=WINDOW, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"], **SHAPE))
    elif arch == "gpt_oss":
        model = T.GptOssForCausalLM(T.GptOssConfig(
            vocab_size=350, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"], **SHAPE))
        with torch.no_grad():  # sinks of a trained model's size, so that they matter here
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    else:
        raise ValueError(arch)
    return model.float().eval()


LOCAL_ARCHS = ["mistral", "qwen2", "starcoder2", "gemma2", "gemma3", "gpt_oss"]
