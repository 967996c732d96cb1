"""Sampling past the window is lossless on local-attention targets: the tokens a TreeSpecDecoder
samples from a vocabulary-8, 1-layer Gemma-2 (window 4, softcap 2) and GPT-OSS (window 4, sinks)
follow the exact law of plain sampling (enumerated), by chi-square on the joint of token pairs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import EagleDraftHead  # noqa: E402
from eagle2_kernels.ops.sampling import process_logits  # noqa: E402
from tiny_models import SAMPLING, exact_law, fixed_decoder, law_pvalues, one_thread  # noqa: E402,F401

ALPHA, N = 1e-3, 600
SHAPE = dict(vocab_size=8, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, num_hidden_layers=1, max_position_embeddings=64, sliding_window=4,
             layer_types=["sliding_attention"], bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _build(arch):
    torch.manual_seed(21)
    T = transformers
    if arch == "gemma2":
        model = T.Gemma2ForCausalLM(T.Gemma2Config(attn_logit_softcapping=2.0, query_pre_attn_scalar=8, **SHAPE))
    else:
        model = T.GptOssForCausalLM(T.GptOssConfig(num_local_experts=2, num_experts_per_tok=1, **SHAPE))
        with torch.no_grad():
            model.model.layers[0].self_attn.sinks.normal_(0.0, 2.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # spread, not uniform, next-token laws
    return model.float().eval()


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_sampling_law_past_the_window(arch):
    model = _build(arch)
    ids = torch.tensor([[3, 1, 4, 1, 5, 2, 6]])  # 7 tokens: past the window of 4
    law = exact_law(model, ids, 3, lambda lg: process_logits(lg, **SAMPLING))
    dec = fixed_decoder(model, EagleDraftHead.from_target(model), 6, 3, 3)
    g = torch.Generator().manual_seed(5)
    drawn = torch.stack([dec.generate(ids, 3, generator=g, **SAMPLING).sequences[0, ids.shape[1]:]
                         for _ in range(N)])
    pvalues = law_pvalues(drawn, law, [(0, 1), (1, 2)])
    assert min(pvalues.values()) > ALPHA, pvalues
