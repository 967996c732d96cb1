"""The compiled forward's disk cache (models/compiled_aot.py): built once, loaded by the next
process with identical output; damaged or foreign entries are reported and rebuilt; a model
that cannot be compiled ahead of time falls back to per-process compilation, once recorded.

One AOTInductor build of a tiny Llama (fp32, ~15 s on 2 cores) is shared by the module: the
build runs in a first process, the load in a second; the in-process cases stand in a copy of
the built file for further builds.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels.models import compiled_aot  # noqa: E402
from eagle2_kernels.models.compiled import CompiledForward  # noqa: E402
from eagle2_kernels.models.target import DecodeContext, TargetAdapter  # noqa: E402
from eagle2_kernels.ops.tree import pack_bits  # noqa: E402
from tiny_models import tiny_target  # noqa: E402
from tolerances import FP32_COMPILED  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="Inductor needs a C++ compiler on CPU")
TESTS = str(Path(__file__).resolve().parents[1])

# One process: a tiny Llama's adapter with compile=True; a 5-token eager prefill of 2
# sequences, then a 6-node tree forward (2 mask words would not fit 6 nodes; 1 word) through
# the compiled graph and through the eager body; both saved, with how the graph was obtained.
_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, TESTS)
from tiny_models import tiny_target
from eagle2_kernels.models.target import DecodeContext, TargetAdapter
from eagle2_kernels.ops.tree import pack_bits

model = tiny_target("llama")
ad = TargetAdapter(model, compile=True, progress=lambda m: print("PROGRESS", m, file=sys.stderr))
g = torch.Generator().manual_seed(7)
prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=g)
tree = torch.randint(0, model.config.vocab_size, (2, 6), generator=g)
parents = [-1, 0, 0, 1, 1, 3]
bits = torch.zeros(6, 6, dtype=torch.bool)
for i, p in enumerate(parents):
    bits[i, i] = True
    while p >= 0:
        bits[i, p] = True
        p = parents[p]
mask = pack_bits(bits).expand(2, 6, -1).contiguous()
depth = torch.tensor([0, 1, 1, 2, 2, 3])
outs = {}
for name in ("compiled", "eager"):
    cache = ad.new_cache(2, 32)
    cache.set_length(0)
    saved, ad.compiled = ad.compiled, (ad.compiled if name == "compiled" else None)
    try:
        ad.forward(prompt, torch.arange(5).expand(2, 5), DecodeContext(cache, 0, None, 5))
        cache.set_length(5)
        logits, feats = ad.forward(tree, (5 + depth).expand(2, 6), DecodeContext(cache, 5, mask, 6))
    finally:
        ad.compiled = saved
    outs[name] = (logits, feats, cache.kv[:, :, :, :11].clone())
torch.save(outs, OUT)
print(json.dumps({"source": ad.compiled.source, "status": ad.compile_status, "path": str(ad.compiled.path)}))
"""


def _run(cache: Path, out: Path) -> tuple[dict, str, dict]:
    code = _SCRIPT.replace("TESTS", repr(TESTS)).replace("OUT", repr(str(out)))
    env = {**os.environ, "EAGLE2_KERNELS_CACHE": str(cache)}
    env.pop("EAGLE2_KERNELS_COMPILE_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return info, proc.stderr, torch.load(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache folder in which a first process built the tiny Llama's graph; its outputs."""
    root = tmp_path_factory.mktemp("e2k_cache")
    info, err, outs = _run(root, root / "first.pt")
    return root, info, err, outs


def test_second_process_loads_the_cached_graph_with_identical_output(built, tmp_path):
    root, first, err1, outs1 = built
    assert first["source"] == "built" and "AOTInductor" in first["status"], first
    assert "compiling the target's decode forward" in err1
    path = Path(first["path"])
    assert path.is_file() and path.parent == root / "compiled"
    key = json.loads(path.with_suffix(".json").read_text())
    assert key["torch"] == torch.__version__ and key["dtype"] == "torch.float32" and len(key["weights"]) == 64

    second, err2, outs2 = _run(root, tmp_path / "second.pt")
    assert second["source"] == "loaded" and second["path"] == first["path"], second
    assert "compiling" not in err2, err2[-2000:]
    # The same graph: bit-identical logits, features and cache writes in both processes.
    for a, b in zip(outs1["compiled"], outs2["compiled"]):
        assert torch.equal(a, b)
    # And it is the model's forward: close to the eager body in fp32.
    for a, b in zip(outs2["compiled"], outs2["eager"]):
        torch.testing.assert_close(a, b, **FP32_COMPILED)


def _adapter(model, progress=None) -> TargetAdapter:
    return TargetAdapter(model, compile=True, compile_buckets=(8,), progress=progress)


def _compiled_and_eager(ad: TargetAdapter):
    """(logits, features) of one 4-token forward after a 3-token prefix, through the adapter's
    compiled forward and then eagerly."""
    outs = []
    for compiled in (True, False):
        cache = ad.new_cache(1, 16)
        cache.set_length(0)
        saved, ad.compiled = ad.compiled, (ad.compiled if compiled else None)
        try:
            ad.forward(torch.tensor([[2, 7, 1]]), torch.arange(3).view(1, 3), DecodeContext(cache, 0, None, 3))
            cache.set_length(3)
            m = pack_bits(torch.ones(4, 4, dtype=torch.bool).tril()).view(1, 4, -1)
            outs.append(ad.forward(torch.tensor([[3, 1, 4, 1]]), (3 + torch.arange(4)).view(1, 4),
                                   DecodeContext(cache, 3, m, 4)))
        finally:
            ad.compiled = saved
    return outs


def test_a_damaged_entry_is_reported_and_rebuilt(built, monkeypatch):
    root, first, _, _ = built
    monkeypatch.setenv("EAGLE2_KERNELS_CACHE", str(root))
    good = Path(first["path"]).read_bytes()
    model = copy.deepcopy(tiny_target("llama"))  # the same weights and key, a fresh in-process state
    assert compiled_aot.artifact_key(model) == json.loads(Path(first["path"]).with_suffix(".json").read_text())
    Path(first["path"]).write_bytes(good[: len(good) // 3])  # cut short
    builds, messages = [], []

    def fake_build(self, path, key):  # a rebuild, without the compiler's 15 s
        builds.append(path)
        path.write_bytes(good)

    monkeypatch.setattr(compiled_aot.AOTForward, "_build", fake_build)
    # Graphs of the same model from older package source (superseded: pruned by the build)
    # and from another torch (another environment sharing the folder: kept).
    key = compiled_aot.artifact_key(model)
    folder = Path(first["path"]).parent
    for name, change in (("older-source", {"source": "0" * 64}), ("other-torch", {"torch": "0.0.0"})):
        (folder / f"{name}.json").write_text(json.dumps({**key, **change}))
        (folder / f"{name}.pt2").write_bytes(b"weights")
    ad = _adapter(model, messages.append)
    (logits, feats), (ref_logits, ref_feats) = _compiled_and_eager(ad)
    assert builds == [Path(first["path"])] and ad.compiled.source == "built"
    assert not (folder / "older-source.pt2").exists() and not (folder / "older-source.json").exists()
    assert (folder / "other-torch.pt2").exists() and (folder / "other-torch.json").exists()
    assert any("cannot be used" in m and "rebuilding" in m for m in messages), messages
    assert Path(first["path"]).read_bytes() == good
    torch.testing.assert_close(logits, ref_logits, **FP32_COMPILED)
    torch.testing.assert_close(feats, ref_feats, **FP32_COMPILED)


def test_a_foreign_entry_is_refused_and_a_failed_build_falls_back(built, monkeypatch):
    """Another model's graph under this model's key (a same-shape model with other weights)
    disagrees with the eager forward on the probe and is refused; when the rebuild fails too,
    the forward compiles per process, and the failure is recorded so the next process does not
    try again."""
    root, first, _, _ = built
    monkeypatch.setenv("EAGLE2_KERNELS_CACHE", str(root))
    a = tiny_target("llama")  # (shared and cached: read, never changed)
    torch.manual_seed(11)
    b = type(a)(a.config).eval()  # same shapes, other weights: another key
    key_b = compiled_aot.artifact_key(b)
    assert key_b["weights"] != compiled_aot.artifact_key(a)["weights"]
    assert {k: v for k, v in key_b.items() if k != "weights"} == {
        k: v for k, v in compiled_aot.artifact_key(a).items() if k != "weights"}
    messages = []

    def failing_build(self, path, key):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(compiled_aot.AOTForward, "_build", failing_build)
    # a's graph where b's belongs (the key's file name), as a stale or copied file would be.
    path_b = compiled_aot.artifact_path(key_b)
    shutil.copyfile(first["path"], path_b)
    ad = _adapter(b, messages.append)
    (logits, _), (ref_logits, _) = _compiled_and_eager(ad)
    assert any("disagrees with the eager forward" in m for m in messages), messages
    assert any("no compiler today" in m and "per process" in m for m in messages), messages
    assert "per process" in ad.compile_status and "no compiler today" in ad.compile_status
    assert isinstance(ad.compiled._fallback, CompiledForward)
    assert not path_b.exists() and path_b.with_suffix(".failed").is_file()
    # The per-process graph is the model's forward.
    torch.testing.assert_close(logits, ref_logits, **FP32_COMPILED)
    # The next process (a fresh model object, same weights) reads the record and builds nothing.
    monkeypatch.setattr(compiled_aot.AOTForward, "_build", lambda *a: pytest.fail("rebuilt a recorded failure"))
    c = type(a)(a.config).eval()
    c.load_state_dict(b.state_dict())
    ad_c = _adapter(c)
    ad_c.compiled.ensure()
    assert "no compiler today" in ad_c.compile_status


def test_the_key_follows_the_weights_not_the_object():
    a = tiny_target("llama")
    b = copy.deepcopy(a)  # equal weights in another object
    assert compiled_aot.artifact_key(a) == compiled_aot.artifact_key(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert compiled_aot.artifact_key(a)["weights"] != compiled_aot.artifact_key(b)["weights"]
