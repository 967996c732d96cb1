"""Robustness of the decoder as a new user meets it: every valid tree bound decodes exactly
(adaptive and fixed, measured and given cost models), damaged files give messages that name the
file and what is wrong with it, targets the decoder cannot run exactly are refused with the
reason, and bad inputs say what is wrong with them.

Exactness is fp32 greedy against transformers' greedy generate of the same tiny model."""

from __future__ import annotations

import functools
import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import EagleDraftHead, TreeSpecDecoder  # noqa: E402
from eagle2_kernels.models import default as default_mod  # noqa: E402
from eagle2_kernels.models.eagle3_head import Eagle3DraftHead  # noqa: E402
from eagle2_kernels.runtime import costmodel  # noqa: E402
from eagle2_kernels.runtime.costmodel import CostModel  # noqa: E402
from tiny_models import (  # noqa: E402
    hf_greedy,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_model,
    trained_setup,
)

NEW = 14  # new tokens per call: several rounds of every tree shape, in well under a second

# (T, D, K): the shapes that crashed the measured cost model (T < K, T < D + 2, chains), then
# more odd ones: one drafted node with a wide or deep draft, T = K + 1, a full tree (T - 1 = K +
# D*K*K), T not a power of two.
ISSUE_BOUNDS = [(2, 1, 1), (3, 4, 2), (4, 1, 8), (5, 5, 5), (3, 1, 10), (2, 6, 3)]
MORE_BOUNDS = [(2, 1, 10), (4, 3, 1), (7, 1, 2), (9, 3, 3), (11, 2, 9), (13, 1, 3)]
BOUNDS = [pytest.param(*b, id=f"T{b[0]}-D{b[1]}-K{b[2]}") for b in ISSUE_BOUNDS + MORE_BOUNDS]

# Given cost curves: FLAT makes every round verify the largest tree the bounds allow; STEEP2
# makes a 2-token forward cheap and anything larger dear (rounds of 1 drafted node, plain steps).
FLAT = CostModel.synthetic([0.04] * 16, draft_s=0.0)
STEEP2 = CostModel.synthetic([0.04, 0.045, 1.0], draft_s=0.001)


@functools.lru_cache(maxsize=None)
def _reference():
    """(model, head, prompts [2, 6] int64, hf greedy sequences [2, 6 + NEW])."""
    model, head, prompts = trained_setup("llama")
    ids = prompts[:2]
    ref = torch.cat([hf_greedy(model, ids[b: b + 1], NEW) for b in range(2)])
    return model, head, ids, ref


@pytest.fixture
def cost_cache(tmp_path, monkeypatch):
    """A private cost-model cache directory (measurements never touch the user's)."""
    monkeypatch.setenv("EAGLE2_KERNELS_CACHE", str(tmp_path))
    return tmp_path / "costs"


# ---------------------------------------------------------------------------------- tree bounds
@pytest.mark.parametrize("T,D,K", BOUNDS)
@pytest.mark.parametrize("mode", ["fixed", "adaptive-flat", "adaptive-steep"])
def test_every_bound_decodes_exactly(T, D, K, mode):
    model, head, ids, ref = _reference()
    kw = {"fixed": dict(adaptive=False), "adaptive-flat": dict(cost_model=FLAT),
          "adaptive-steep": dict(cost_model=STEEP2)}[mode]
    dec = TreeSpecDecoder(model, head, total_tokens=T, depth=D, top_k=K, **kw)
    out = dec.generate(ids, NEW)
    assert torch.equal(out.sequences, ref)
    assert max(out.stats.tree_sizes) <= T
    if mode == "fixed" or mode == "adaptive-flat":
        # The full-tree modes really verify the largest tree (T nodes): the bounds are used.
        assert set(out.stats.tree_sizes) == {T}, out.stats.tree_sizes
    # And the stream of the same call yields the same tokens.
    assert sum(dec.stream(ids[:1], NEW), []) == ref[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("T,D,K", [pytest.param(*b, id=f"T{b[0]}-D{b[1]}-K{b[2]}") for b in ISSUE_BOUNDS])
def test_measured_cost_model_on_odd_bounds(T, D, K, cost_cache):
    """The real ``measure`` (the default adaptive decoder's first call) over bounds where T is
    smaller than K or than D + 2: its grids cover what a round can run, and decoding is exact."""
    model, head, ids, ref = _reference()
    dec = TreeSpecDecoder(model, head, total_tokens=T, depth=D, top_k=K)
    out = dec.generate(ids, NEW)
    assert torch.equal(out.sequences, ref)
    cm = dec.cost_model(2)
    assert cm.n_grid[0] == 1 and cm.n_grid[-1] == T  # target forwards over 1..T tokens
    assert cm.k_grid[-1] == max(K, D + 2)  # draft steps up to the widest catch-up or level
    assert all(t > 0 for t in cm.target_short_s + cm.draft_step_s)
    assert len(list(cost_cache.glob("*.json"))) == 1


@pytest.mark.parametrize("T,D,K", [(2, 1, 1), (3, 4, 2), (4, 1, 8)], ids=["T2-D1-K1", "T3-D4-K2", "T4-D1-K8"])
def test_static_round_on_odd_bounds(T, D, K):
    """The static-shape round (the GPU path, eager here) under odd bounds, adaptive and fixed."""
    model, head, ids, ref = _reference()
    for kw in (dict(adaptive=False), dict(cost_model=FLAT)):
        dec = TreeSpecDecoder(model, head, total_tokens=T, depth=D, top_k=K, static_round=True, **kw)
        for _ in range(2):  # the second adaptive call is sized from the first one's profile
            assert torch.equal(dec.generate(ids, NEW).sequences, ref)


def test_direct_measure_with_larger_draft_rows_than_tree(cost_cache):
    """``measure`` called directly (``eagle2 tune``) with n_max below the draft rows."""
    model, head, _, _ = _reference()
    dec = TreeSpecDecoder(model, head, total_tokens=2, depth=6, top_k=3)
    cm = costmodel.measure(dec._state.adapter, dec.draft, dec.config, batch=1, n_max=2, reps=1)
    assert cm.n_grid == (1, 2) and cm.k_grid == (1, 2, 4, 8)


# ---------------------------------------------------------------------------- cost-model cache
DAMAGED_ENTRIES = [
    pytest.param(b"", "not readable JSON", id="empty"),
    pytest.param(b'{"schema": 2, "n_grid": [1, 2', "not readable JSON", id="truncated"),
    pytest.param(b"\xff\xfe\x00garbage", "not readable JSON", id="binary"),
    pytest.param(b"[1, 2, 3]", "JSON list", id="json-list"),
    pytest.param(b'{"schema": 2, "n_grid": [1]}', "fields missing", id="missing-fields"),
    pytest.param(None, "needs float values", id="string-value"),
    pytest.param(None, "increasing positive ints", id="bad-grid"),
]


@pytest.mark.parametrize("content,problem", DAMAGED_ENTRIES)
def test_damaged_cost_cache_entry_is_measured_again(content, problem, cost_cache, request):
    model, head, ids, ref = _reference()
    dec = TreeSpecDecoder(model, head, total_tokens=4, depth=2, top_k=2)
    good = dec.cost_model(1)
    (path,) = cost_cache.glob("*.json")
    if content is None:  # a valid entry with one field spoiled
        d = json.loads(path.read_text())
        if request.node.callspec.id == "string-value":
            d["target_short_s"][0] = "fast"
        else:
            d["n_grid"] = [2, 1] + d["n_grid"][2:]
        content = json.dumps(d).encode()
    path.write_bytes(content)
    fresh = TreeSpecDecoder(model, head, total_tokens=4, depth=2, top_k=2)
    with pytest.warns(UserWarning, match=f"{path.name} is damaged: .*{problem}"):
        cm = fresh.cost_model(1)
    assert cm.n_grid == good.n_grid and cm.info["key"] == good.info["key"]
    assert CostModel.from_json(json.loads(path.read_text())) == cm  # the entry was replaced
    assert torch.equal(fresh.generate(ids, NEW).sequences, ref)


def test_stale_cost_cache_entry_is_replaced_quietly(cost_cache):
    model, head, _, _ = _reference()
    TreeSpecDecoder(model, head, total_tokens=4, depth=2, top_k=2).cost_model(1)
    (path,) = cost_cache.glob("*.json")
    d = json.loads(path.read_text())
    d["schema"] = 1  # written by an older version of the package
    path.write_text(json.dumps(d))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TreeSpecDecoder(model, head, total_tokens=4, depth=2, top_k=2).cost_model(1)
    assert json.loads(path.read_text())["schema"] == costmodel.SCHEMA


def test_cost_model_from_json_names_the_bad_field():
    d = FLAT.to_json()
    for field, value, message in [("info", [1], "'info' must be an object"),
                                  ("short_prefix", 1.5, "'short_prefix' needs int"),
                                  ("long_prefix", float("inf"), "'long_prefix' needs int"),
                                  ("k_grid", "1", "'k_grid' must be a list")]:
        with pytest.raises(ValueError, match=message):
            CostModel.from_json({**d, field: value})
    with pytest.raises(ValueError, match="JSON object"):
        CostModel.from_json([d])


# ---------------------------------------------------------------------------------- head files
def _saved_head(tmp_path, kind="eagle2"):
    model = tiny_model("llama", vocab_size=101)
    if kind == "eagle2":
        head = EagleDraftHead.from_target(model)
    else:
        head = Eagle3DraftHead.from_target(model, feature_layers=(0, 1, 2))
    folder = tmp_path / kind
    head.save_pretrained(folder)
    return model, folder


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_broken_head_files_name_the_file(tmp_path, kind):
    model, folder = _saved_head(tmp_path, kind)
    weights, config = folder / "model.safetensors", folder / "config.json"
    good_w, good_c = weights.read_bytes(), config.read_text()

    def fails(match):
        with pytest.raises(ValueError, match=match):
            EagleDraftHead.from_pretrained(folder, target=model)
        weights.write_bytes(good_w)
        config.write_text(good_c)

    # Weights cut short (a download or a disk that filled up), emptied, replaced by an LFS pointer.
    weights.write_bytes(good_w[: len(good_w) // 2])
    fails(r"weights .*model\.safetensors cannot be read .*truncated or damaged.*safetensors file")
    weights.write_bytes(good_w[:5])
    fails(r"model\.safetensors cannot be read")
    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    fails(r"model\.safetensors cannot be read .*Git LFS pointer")
    # The config: cut short, not an object, a size missing or of the wrong type.
    config.write_text(good_c[: len(good_c) // 2])
    fails(r"config .*config\.json is not valid JSON .*line \d+ column \d+.*hidden_size")
    config.write_text("[]")
    fails(r"config\.json holds a JSON list")
    _edit_config(folder, hidden_size=None)
    fails(r"config\.json: hidden_size is missing")
    _edit_config(folder, num_attention_heads="4")
    fails(r"config\.json: num_attention_heads is '4', not a positive int")
    _edit_config(folder, num_key_value_heads=3)
    fails(r"config\.json: num_key_value_heads \(3\) does not divide num_attention_heads \(4\)")
    # After all that the intact files still load.
    assert EagleDraftHead.from_pretrained(folder, target=model).attached


def test_broken_bin_weights_name_the_file(tmp_path):
    model, folder = _saved_head(tmp_path)
    state = EagleDraftHead.from_pretrained(folder).state_dict()
    (folder / "model.safetensors").unlink()
    bin_path = folder / "pytorch_model.bin"
    torch.save(state, bin_path)
    assert EagleDraftHead.from_pretrained(folder, target=model).attached
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin cannot be read .*torch\.save'd state dict"):
        EagleDraftHead.from_pretrained(folder)
    torch.save([t for t in state.values()], bin_path)  # a list, not a dict of named tensors
    with pytest.raises(ValueError, match=r"pytorch_model\.bin hold a list that is not a flat dict"):
        EagleDraftHead.from_pretrained(folder)


def _tiny_copy(folder, damaged=False):
    """A default-model cache copy in the layout ``default._build_cache`` writes, of a tiny
    Llama and the word-level tokenizer; ``damaged`` cuts its weights short."""
    from tiny_chat import tiny_tokenizer

    torch.manual_seed(3)
    model = tiny_model("llama", vocab_size=64)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    if damaged:
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    (folder / "COMPLETE").write_text("test copy\n")
    return model


def test_damaged_default_copy_is_rebuilt_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE2_KERNELS_CACHE", str(tmp_path))
    target = default_mod._cached_copy_dir()
    target.mkdir(parents=True)
    _tiny_copy(target, damaged=True)
    builds = []

    def build(t):
        builds.append(t)
        if t.exists():
            import shutil

            shutil.rmtree(t)
        t.mkdir(parents=True)
        _tiny_copy(t)

    monkeypatch.setattr(default_mod, "_build_cache", build)
    with pytest.warns(UserWarning, match=f"{target.name} cannot be loaded .*rebuilding it"):
        model, tok = default_mod.load_default(dtype=torch.float32)
    assert builds == [target] and model.config.vocab_size == 64
    ref = _tiny_copy(tmp_path / "ref")
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    # The rebuilt copy loads without another rebuild.
    default_mod.load_default(dtype=torch.float32)
    assert builds == [target]


def test_default_copy_that_stays_broken_names_the_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE2_KERNELS_CACHE", str(tmp_path))
    target = default_mod._cached_copy_dir()
    target.mkdir(parents=True)
    _tiny_copy(target, damaged=True)

    def build(t):  # a rebuild that writes the same damage (say, a disk that is full)
        _tiny_copy(t, damaged=True)
        (t / "COMPLETE").write_text("rebuilt\n")

    monkeypatch.setattr(default_mod, "_build_cache", build)
    with pytest.warns(UserWarning, match="rebuilding"):
        with pytest.raises(RuntimeError, match=f"{target.name} cannot be loaded even after rebuilding it .*Delete"):
            default_mod.load_default(dtype=torch.float32)


# ------------------------------------------------------------------------- target compatibility
def _gpt2():
    # Real GPT-2: 12 layers, n_embd 768, 12 heads, vocab 50257, learned positions, no
    # intermediate_size (n_inner None = 4 * n_embd). Shrunk here.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128,
                                      bos_token_id=None, eos_token_id=None)).eval()


def test_gpt2_target_is_supported_exactly():
    """Learned absolute positions (GPT-2) work with tree attention: node positions are explicit.
    ``from_target`` shapes the head's MLP from n_inner (4 * n_embd) and decoding is exact."""
    model = _gpt2()
    head = EagleDraftHead.from_target(model)
    assert head.config.intermediate_size == 256 and head.config.hidden_act == "silu"
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = torch.cat([hf_greedy(model, ids[b: b + 1], NEW) for b in range(2)])
    for kw in (dict(adaptive=False), dict(cost_model=FLAT)):
        dec = TreeSpecDecoder(model, head, total_tokens=6, depth=2, top_k=3, **kw)
        assert torch.equal(dec.generate(ids, NEW).sequences, ref)
    # An EAGLE-3 head reads hidden states inside the stack, found in Llama-style layouts only.
    with pytest.raises(ValueError, match="GPT2LMHeadModel keeps its decoder layers elsewhere .*EAGLE-1/2 head"):
        Eagle3DraftHead.from_target(model, feature_layers=(0, 1, 2))


def _refused_targets():
    T = transformers
    small = dict(hidden_size=64, num_attention_heads=4, vocab_size=128)
    return {
        # Falcon with ALiBi and Bloom add position biases inside attention; tree attention does not.
        "falcon-alibi": (lambda: T.FalconForCausalLM(T.FalconConfig(num_hidden_layers=2, alibi=True, **small)),
                         "adds ALiBi position biases"),
        "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=64, n_head=4, n_layer=1, vocab_size=128)),
                  "adds ALiBi position biases"),
        # DeepSeek-V3's latent attention: keys 16 + 8 wide, values 16 (real: 192 and 128).
        "deepseek-v3-mla": (lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
            num_key_value_heads=4, num_hidden_layers=1, intermediate_size=96, moe_intermediate_size=32,
            n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1, **small)),
            "keys of head size 24 and values of head size 16"),
        # T5: an encoder-decoder, not a causal LM.
        "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=64, d_ff=96, num_layers=1, num_heads=4,
                                                               d_kv=16, vocab_size=128)),
               "is an encoder-decoder model"),
    }


@pytest.mark.parametrize("name", ["falcon-alibi", "bloom", "deepseek-v3-mla", "t5"])
def test_incompatible_targets_are_refused_with_the_reason(name):
    make, reason = _refused_targets()[name]
    model = make().eval()
    with pytest.raises(ValueError, match=f"EagleDraftHead.from_target: .*{reason}"):
        EagleDraftHead.from_target(model)
    with pytest.raises(ValueError, match=f"Eagle3DraftHead.from_target: .*{reason}"):
        Eagle3DraftHead.from_target(model)
    # A head made elsewhere (same widths) is refused by the decoder for the same reason.
    llama = tiny_model("llama", vocab_size=128)
    head = EagleDraftHead.from_target(llama)
    with pytest.raises(ValueError, match=f"TreeSpecDecoder: .*{reason}"):
        TreeSpecDecoder(model, head, total_tokens=4, depth=2, top_k=2)


def test_from_target_without_the_sizes_says_which():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.PretrainedConfig()

    with pytest.raises(ValueError, match="has no hidden_size, num_attention_heads, vocab_size"):
        EagleDraftHead.from_target(Bare())


def test_mismatched_head_is_refused_at_construction():
    model, head, _, _ = _reference()  # a llama of vocab 320, hidden 64
    other = tiny_model("llama", vocab_size=101)
    with pytest.raises(ValueError, match="vocab size 320 does not match the target's vocab size 101"):
        TreeSpecDecoder(other, head, total_tokens=4, depth=2, top_k=2)
    narrow = tiny_model("llama", vocab_size=320, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="hidden size 64 does not match the target's hidden size 32"):
        TreeSpecDecoder(narrow, head, total_tokens=4, depth=2, top_k=2)
    head.attach_target(model)  # the shared cached head stays attached to its own target


# ------------------------------------------------------------------------------------- inputs
BAD_INPUTS = [
    pytest.param([[1, 2], []], ValueError, "prompt 1 of the list is empty", id="empty-list-prompt"),
    pytest.param([[1, 2], torch.tensor([], dtype=torch.int64)], ValueError, "prompt 1 of the list is empty",
                 id="empty-tensor-prompt"),
    pytest.param([], ValueError, "empty list; give at least one prompt", id="no-prompts"),
    pytest.param([1, 2, 3], ValueError, r"flat list of 3 ints; .*\[\[\.\.\.\]\]", id="flat-list"),
    pytest.param("hello there", TypeError, "input_ids is text .*tokenize it first", id="text"),
    pytest.param(["hello", "there"], TypeError, "prompt 0 of the list is text", id="list-of-text"),
    pytest.param([[1, 2], [[3], [4, 5]]], TypeError, "prompt 1 of the list must be a 1-D tensor or a list of int",
                 id="ragged-nested"),
    pytest.param([[1.5, 2.0]], TypeError, "prompt 0 must be an integer tensor", id="float-ids"),
    pytest.param({"ids": torch.tensor([[1, 2]])}, ValueError, r"mapping without an 'input_ids' key \(keys: \['ids'\]\)",
                 id="mapping-without-input-ids"),
    pytest.param(torch.zeros(1, 0, dtype=torch.int64), ValueError, "non-empty prompt, got shape", id="empty-tensor"),
    pytest.param([[1, 400]], ValueError, r"prompt 0 must lie in \[0, 320\), got values in \[1, 400\]",
                 id="id-out-of-vocab"),
]


@pytest.mark.parametrize("bad,kind,message", BAD_INPUTS)
def test_input_messages_say_what_is_wrong(bad, kind, message):
    model, head, ids, ref = _reference()
    dec = TreeSpecDecoder(model, head, total_tokens=4, depth=2, top_k=2, adaptive=False)
    for call in (dec.generate, dec.generate_plain, dec.stream):
        with pytest.raises(kind, match=message):
            call(bad, 3)
    assert torch.equal(dec.generate(ids, NEW).sequences, ref)  # the decoder is still fine


def test_files_are_left_as_they_were(tmp_path):
    """A failed load never writes into the head's directory."""
    model, folder = _saved_head(tmp_path)
    before = sorted(os.listdir(folder))
    (folder / "config.json").write_text("{")
    with pytest.raises(ValueError):
        EagleDraftHead.from_pretrained(folder)
    assert sorted(os.listdir(folder)) == before


def test_round_policy_takes_the_smallest_bounds_and_names_bad_ones():
    from eagle2_kernels.runtime.policy import RoundPolicy

    pol = RoundPolicy(FLAT, max_nodes=1, max_depth=1, top_k=1)
    choice = pol.choose([[0.9, 0.5, 0.2]], draft_s=0.0, prefix=None, levels_done=1)
    assert choice.n == 1  # one drafted node at most, however many candidates there are
    for bad, message in [(dict(max_nodes=0), "max_nodes must be an int >= 1, got 0"),
                         (dict(top_k=2.0), "top_k must be an int >= 1, got 2.0")]:
        with pytest.raises(ValueError, match=message):
            RoundPolicy(FLAT, **{**dict(max_nodes=3, max_depth=2, top_k=2), **bad})
    with pytest.raises(TypeError, match="costs must be a CostModel"):
        RoundPolicy({"t": 1}, max_nodes=3, max_depth=2, top_k=2)
