"""A zoo of decoder-only architectures: each tiny random target (fp32, 2 layers, hidden 64)
decodes to exactly transformers' own greedy ``generate`` with a random draft head (dynamic
round for all; static round and paged KV for a few), or is refused with its reason stated.
The local-attention architectures (sliding windows, softcaps, sinks) are in test_any_model.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from eagle2_kernels import EagleDraftHead  # noqa: E402
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
@pytest.mark.parametrize("arch", ["gemma", "smollm3", "qwen3_moe"])
def test_zoo_static_and_paged_exact(zoo, arch, mode):
    model, head, ids, want = zoo(arch)
    out = fixed_decoder(model, head, 8, 3, 4, **mode).generate(ids, NEW)
    assert torch.equal(out.sequences, want), (arch, out.sequences[0, PROMPT:], want[0, PROMPT:])


@pytest.mark.parametrize("arch", sorted(ZOO_REFUSED))
def test_zoo_refused_with_reason(zoo, arch):
    model, head, ids, _ = zoo(arch)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError, TypeError), match=ZOO_REFUSED[arch]):
        fixed_decoder(model, head, 8, 3, 4).generate(ids, 4)
