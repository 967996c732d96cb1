"""A zoo of decoder-only architectures: each tiny random target (fp32, 2 layers, hidden 64)
decodes to exactly transformers' own greedy ``generate`` with a random draft head (dynamic
round for all; static round and paged KV for a few), or is refused with its reason stated. The
cache takes its KV shape from what the layers hand to attention (GPT-NeoX's config has no
usable num_key_value_heads), and layers that drop keyword arguments on the way to attention
(StableLM, Nemotron) still reach the decode context.
The local-attention architectures (sliding windows, softcaps, sinks) are in test_any_model.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from eagle2_kernels import EagleDraftHead  # noqa: E402
from eagle2_kernels.models.compiled import compile_support  # noqa: E402
from eagle2_kernels.models.target import TargetAdapter  # noqa: E402
from tiny_models import fixed_decoder, hf_greedy, one_thread, prompt  # noqa: E402,F401
from zoo_models import ZOO_EXACT, ZOO_REFUSED, ZOO_VOCAB, build_zoo  # noqa: E402

PROMPT, NEW = 24, 24


@pytest.fixture(scope="module")
def zoo():
    built = {}

    def get(arch):
        if arch not in built:
            model = build_zoo(arch)
            ids = prompt(ZOO_VOCAB, PROMPT, 5)
            built[arch] = (model, EagleDraftHead.from_target(model), ids, hf_greedy(model, ids, NEW))
        return built[arch]

    return get


@pytest.mark.parametrize("arch", ZOO_EXACT)
def test_zoo_greedy_exact(zoo, arch):
    model, head, ids, want = zoo(arch)
    out = fixed_decoder(model, head, 8, 3, 4).generate(ids, NEW)
    assert torch.equal(out.sequences, want), (arch, out.sequences[0, PROMPT:], want[0, PROMPT:])


@pytest.mark.parametrize("mode", [pytest.param({"static_round": True}, id="static"),
                                  pytest.param({"kv_block_size": 4}, id="paged")])
@pytest.mark.parametrize("arch", ["gemma", "smollm3", "qwen3_moe", "stablelm"])
def test_zoo_static_and_paged_exact(zoo, arch, mode):
    model, head, ids, want = zoo(arch)
    out = fixed_decoder(model, head, 8, 3, 4, **mode).generate(ids, NEW)
    assert torch.equal(out.sequences, want), (arch, out.sequences[0, PROMPT:], want[0, PROMPT:])


@pytest.mark.parametrize("arch", sorted(ZOO_REFUSED))
def test_zoo_refused_with_reason(zoo, arch):
    model, head, ids, _ = zoo(arch)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError, TypeError), match=ZOO_REFUSED[arch]):
        fixed_decoder(model, head, 8, 3, 4).generate(ids, 4)


def test_cache_shape_comes_from_the_layers():
    model = build_zoo("gpt_neox")
    assert model.config.num_key_value_heads == 2  # a config field its attention never reads
    assert (TargetAdapter(model).num_kv_heads, TargetAdapter(model).head_dim) == (4, 16)
    del model.config.num_key_value_heads  # as in real GPT-NeoX configs
    assert not hasattr(model.config, "num_key_value_heads")
    assert TargetAdapter(model).new_cache(1, 8).kv.shape == (4, 1, 4, 8, 16)  # [2 layers, B, Hkv, L, Dh]
    assert TargetAdapter(build_zoo("glm")).num_kv_heads == 2


@pytest.mark.parametrize("arch", ["stablelm", "nemotron"])
def test_layers_that_drop_keywords_are_not_compiled(arch):
    adapter = TargetAdapter(build_zoo(arch))
    assert not adapter.keywords_reach_attention
    assert TargetAdapter(build_zoo("llama")).keywords_reach_attention
    if not compile_support(adapter.device)[0]:
        pytest.skip(compile_support(adapter.device)[1])
    # The compiled forward hands the cache to attention as keywords: refused with the reason.
    with pytest.raises(ValueError, match="do not pass keyword arguments on to attention"):
        adapter.enable_compile(True)
