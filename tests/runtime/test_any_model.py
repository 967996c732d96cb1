"""Local-attention targets decode exactly past their window: sliding-window (Mistral, Qwen2 with
use_sliding_window, Starcoder2), hybrid local/global layers (Gemma-2, Gemma-3, GPT-OSS), logit
softcapping (Gemma-2) and attention sinks (GPT-OSS).

Tiny random models (fp32, 2 layers, window 8), prompts of 30 tokens and 40 new tokens (so every
verify round attends past the window), greedy output equal to transformers' own greedy
``generate`` token for token: in the dynamic round, the static round, and with paged KV. The
softcap is small (2.0) and the sinks large enough to change the output, and a negative control
shows that ignoring the window changes it too, so these tests can fail.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from eagle2_kernels import EagleDraftHead  # noqa: E402
from eagle2_kernels.models import target as target_module  # noqa: E402
from tiny_models import fixed_decoder, hf_greedy, prompt  # noqa: E402

from local_models import LOCAL_ARCHS as ARCHS  # noqa: E402
from local_models import NEW, PROMPT, WINDOW  # noqa: E402
from local_models import build_local as _build  # noqa: E402


@pytest.fixture(scope="module")
def zoo():
    """arch -> (model, random draft head, prompt, transformers' greedy reference)."""
    built = {}

    def get(arch):
        if arch not in built:
            model = _build(arch)
            head = EagleDraftHead.from_target(model)
            ids = prompt(model.config.vocab_size, PROMPT, 5)
            built[arch] = (model, head, ids, hf_greedy(model, ids, NEW))
        return built[arch]

    return get


@pytest.mark.parametrize("mode", [
    pytest.param({}, id="dynamic"),
    pytest.param({"static_round": True}, id="static"),
    pytest.param({"kv_block_size": 4}, id="paged"),
])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_exact_past_the_window(zoo, arch, mode):
    model, head, ids, want = zoo(arch)
    dec = fixed_decoder(model, head, 8, 3, 3, **mode)
    out = dec.generate(ids, NEW)
    assert torch.equal(out.sequences, want), (arch, out.sequences[0, PROMPT:], want[0, PROMPT:])


def test_ignoring_the_window_would_be_caught(zoo, monkeypatch):
    # Negative control: the same decode with every window widened past the sequence differs
    # from transformers' output, so the exactness above depends on the window being applied.
    model, head, ids, want = zoo("mistral")
    real = target_module._local_attention

    def wide(module, kwargs):
        window, softcap, sinks = real(module, kwargs)
        return (None if window is None else 10**6), softcap, sinks

    monkeypatch.setattr(target_module, "_local_attention", wide)
    out = fixed_decoder(model, head, 8, 3, 3).generate(ids, NEW)
    assert not torch.equal(out.sequences, want)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_softcap_and_sinks_matter(zoo, arch, monkeypatch):
    # Dropping the softcap (Gemma-2) or the sinks (GPT-OSS) changes the output: they are applied.
    model, head, ids, want = zoo(arch)
    real = target_module._local_attention

    def without(module, kwargs):
        window, softcap, sinks = real(module, kwargs)
        return (window, None, sinks) if arch == "gemma2" else (window, softcap, None)

    monkeypatch.setattr(target_module, "_local_attention", without)
    out = fixed_decoder(model, head, 8, 3, 3).generate(ids, NEW)
    assert not torch.equal(out.sequences, want)


def test_window_in_config_that_no_layer_applies_is_refused(zoo, monkeypatch):
    # A model whose config names a window but whose attention calls pass none would attend to
    # the whole prefix: the forward raises instead of returning another model's output.
    model, head, ids, _ = zoo("mistral")
    real = target_module._local_attention
    monkeypatch.setattr(target_module, "_local_attention",
                        lambda module, kwargs: (None,) + tuple(real(module, kwargs)[1:]))
    with pytest.raises(RuntimeError, match="sliding_window=8"):
        fixed_decoder(model, head, 8, 3, 3).generate(ids, 5)
