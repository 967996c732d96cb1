"""The draft-head class layout: one base both formats extend, imports that go one way
(loader <- base <- each head module), one loader for both formats, unchanged file keys."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import eagle2_kernels  # noqa: E402
from eagle2_kernels.models.draft_head import DraftHeadBase, EagleDraftHead  # noqa: E402
from eagle2_kernels.models.eagle3_head import Eagle3DraftHead  # noqa: E402
from eagle2_kernels.models.head_loader import load_draft_head  # noqa: E402
from eagle3_models import deep_target, reduced_vocab  # noqa: E402
from tiny_models import one_thread  # noqa: E402,F401  (autouse fixture)

MODELS = Path(eagle2_kernels.__file__).parent / "models"
HEAD_MODULES = ("head_loader", "head_base", "draft_head", "eagle3_head")
# The released EAGLE-1/2 names (README, "Draft head loader") and the official EAGLE-3 names.
EAGLE2_KEYS = {"fc.weight", "fc.bias", "layers.0.post_attention_layernorm.weight"} | {
    f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"} | {
    f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
EAGLE3_KEYS = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} | {
    f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")} | {
    f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"} | {
    f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(eagle2_kernels modules imported at module level, those imported anywhere) by ``module``."""
    tree = ast.parse((MODELS / f"{module}.py").read_text())
    top, anywhere = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eagle2_kernels"):
            names = {node.module}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names if a.name.startswith("eagle2_kernels")}
        else:
            continue
        anywhere |= names
        if node in tree.body:
            top |= names
    return top, anywhere


def _short(names: set[str]) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n in names if n.startswith("eagle2_kernels.models.")} & set(HEAD_MODULES)


def test_head_modules_import_one_way():
    # head_loader <- head_base <- each head module; the heads never import each other, and no
    # import inside a function turns an edge around (the package __init__ imports both heads).
    top = {m: _short(_imports(m)[0]) for m in HEAD_MODULES}
    anywhere = {m: _short(_imports(m)[1]) for m in HEAD_MODULES}
    assert top == anywhere == {"head_loader": set(), "head_base": {"head_loader"}, "draft_head": {"head_base"},
                               "eagle3_head": {"head_base", "head_loader"}}


@pytest.mark.parametrize("first", HEAD_MODULES)
def test_any_head_module_imports_first_and_both_formats_load(tmp_path, first):
    # A fresh interpreter that imports one head module (the package imports both) loads
    # either format through EagleDraftHead.from_pretrained.
    model = deep_target("llama")
    Eagle3DraftHead.from_target(model).save_pretrained(tmp_path / "e3")
    EagleDraftHead.from_target(model).save_pretrained(tmp_path / "e2")
    code = (f"import eagle2_kernels.models.{first} as m, eagle2_kernels.models.draft_head as d; "
            f"print(*(type(d.EagleDraftHead.from_pretrained(p)).__name__ for p in {[str(tmp_path / 'e3'), str(tmp_path / 'e2')]}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Eagle3DraftHead", "EagleDraftHead"]


def test_both_heads_extend_the_base_and_run_its_init():
    model = deep_target("llama")
    e2 = EagleDraftHead.from_target(model)
    e3 = Eagle3DraftHead.from_target(model, draft_to_target=reduced_vocab(320, 64))
    assert EagleDraftHead.__bases__ == (DraftHeadBase,) and Eagle3DraftHead.__bases__ == (DraftHeadBase,)
    assert not issubclass(Eagle3DraftHead, EagleDraftHead)
    for head in (e2, e3):
        assert isinstance(head, DraftHeadBase) and head.attached
        assert head.inv_freq.dtype == torch.float32 and "inv_freq" not in head.state_dict()
        assert head.target_hidden_size == 64 and head.layers[0].self_attn.scaling == head.head_dim ** -0.5
    assert (e2.feature_layers, e2.target_feature_size, e2.draft_vocab_size) == (None, 64, 320)
    assert (e3.feature_layers, e3.target_feature_size, e3.draft_vocab_size) == ((2, 4, 5), 192, 64)
    # The formats stay apart by type (the decoder checks DraftHeadBase, which both are).
    assert not isinstance(e3, EagleDraftHead) and not isinstance(e2, Eagle3DraftHead)
    assert not isinstance(model, EagleDraftHead) and not isinstance(model, DraftHeadBase)

    class Custom(EagleDraftHead):
        pass

    assert not isinstance(e3, Custom) and not isinstance(e2, Custom)
    # Both formats read the target's post-norm logits the same way (a training signal).
    x = torch.randn(2, 64)
    full = model.lm_head(x)
    torch.testing.assert_close(e2.target_logits(x), full)
    torch.testing.assert_close(e3.target_logits(x), full[:, reduced_vocab(320, 64)])
    torch.testing.assert_close(e2.target_logits(x), e2.logits(x))  # EAGLE-1/2 logits are the target's


def test_one_loader_for_both_formats_and_unchanged_file_keys(tmp_path):
    model = deep_target("llama")
    e2 = EagleDraftHead.from_target(model)
    e3 = Eagle3DraftHead.from_target(model, draft_to_target=reduced_vocab(320, 64))
    e2.save_pretrained(tmp_path / "e2")
    e3.save_pretrained(tmp_path / "e3")
    assert set(load_file(str(tmp_path / "e2" / "model.safetensors"))) == EAGLE2_KEYS
    assert set(load_file(str(tmp_path / "e3" / "model.safetensors"))) == EAGLE3_KEYS
    for folder, cls, ref in (("e2", EagleDraftHead, e2), ("e3", Eagle3DraftHead, e3)):
        for load in (load_draft_head, EagleDraftHead.from_pretrained, DraftHeadBase.from_pretrained):
            head = load(tmp_path / folder, target=model)
            assert type(head) is cls
            assert set(head.state_dict()) == set(ref.state_dict())
            for k, v in ref.state_dict().items():
                assert torch.equal(head.state_dict()[k], v), k
    assert type(Eagle3DraftHead.from_pretrained(tmp_path / "e3")) is Eagle3DraftHead
    with pytest.raises(ValueError, match="Eagle3DraftHead.from_pretrained: .* holds an EAGLE-1/2 head.*"
                                         "load it with EagleDraftHead.from_pretrained"):
        Eagle3DraftHead.from_pretrained(tmp_path / "e2")
    with pytest.raises(FileNotFoundError, match="load_draft_head: no config.json"):
        load_draft_head(tmp_path)

    # A subclass of a format loads that format's files as itself.
    class Custom(EagleDraftHead):
        pass

    assert type(Custom.from_pretrained(tmp_path / "e2")) is Custom
    assert type(Custom.from_pretrained(tmp_path / "e3")) is Eagle3DraftHead
    assert type(load_draft_head(tmp_path / "e2")) is EagleDraftHead  # Custom did not replace it


def test_shipped_head_loads_as_before(tmp_path):
    folder = Path(eagle2_kernels.__file__).parent / "heads" / "smollm2-135m-instruct"
    head = load_draft_head(folder, dtype=torch.float32)
    assert type(head) is EagleDraftHead and not head.attached
    on_disk = load_file(str(folder / "model.safetensors"))
    assert set(head.state_dict()) == set(on_disk) and EAGLE2_KEYS <= set(on_disk)
    assert (head.hidden_size, head.num_heads, head.num_kv_heads, head.head_dim) == (576, 9, 3, 64)
    head.save_pretrained(tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(again) == set(on_disk)
    for k, v in on_disk.items():
        assert torch.equal(again[k], v.float() if v.is_floating_point() else v), k


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_heads_attend_through_their_store(kind):
    # prefill / tree_step reach the store only through write / attend (cache.KVView): a store
    # that records the calls and serves them from a dense cache gives the causal forward's output.
    from eagle2_kernels.cache import KVView, StaticKVCache

    model = deep_target("llama")
    head = EagleDraftHead.from_target(model) if kind == "eagle2" else Eagle3DraftHead.from_target(model)
    calls = []

    class Recording:
        def __init__(self, inner):
            self.inner, self.lengths = inner, inner.lengths

        def write(self, layer, start, k, v):
            calls.append(("write", layer, start))
            self.inner.write(layer, start, k, v)

        def attend(self, layer, q, tree_mask, tree_len, scale, backend=None, **local):
            calls.append(("attend", layer, tree_len, scale))
            return self.inner.attend(layer, q, tree_mask, tree_len, scale, backend, **local)

    feats, ids = torch.randn(1, 6, head.target_feature_size), torch.randint(0, 320, (1, 6))
    cache = StaticKVCache(1, 1, head.num_kv_heads, 16, head.head_dim, torch.float32, "cpu")
    assert isinstance(Recording(cache), KVView)
    with torch.no_grad():
        full = head(feats, ids)
        head.prefill(feats[:, :4], ids[:, :4], Recording(cache))
        cache.set_length(4)
        chain = torch.tensor([[[1], [3]]], dtype=torch.int32)
        out = head.tree_step(feats[:, 4:], ids[:, 4:], torch.arange(4, 6)[None], Recording(cache), 4, chain, 2,
                             from_target=True)
    torch.testing.assert_close(out, full[:, 4:], rtol=1e-5, atol=1e-5)
    assert calls == [("write", 0, 0), ("write", 0, 4), ("attend", 0, 2, head.head_dim ** -0.5)]
