"""torch.ops.eagle2.*: registration on import, opcheck of every op, results equal to the public
ops, use inside torch.compile graphs, the reference fallback without the extension, and a
pure-Python install (EAGLE2_KERNELS_BUILD_EXT=0)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import eagle2_kernels  # noqa: F401  (registers the ops)
from eagle2_kernels import _backend, ops
from eagle2_kernels.ops._library import OP_NAMES
from eagle2_kernels.ops.tree import mask_words

ROOT = Path(__file__).resolve().parents[2]


def candidates(B=2, C=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    parents = torch.full((B, C), -1, dtype=torch.int64)
    scores = torch.zeros(B, C)
    for c in range(C):  # a child's score is its parent's minus a positive step
        p = torch.randint(-1, c, (B,), generator=g) if c else torch.full((B,), -1)
        base = torch.where(p < 0, torch.zeros(B), scores.gather(1, p.clamp(min=0)[:, None])[:, 0])
        parents[:, c] = p
        scores[:, c] = base - torch.rand(B, generator=g)
    tokens = torch.randint(0, 64, (B, C), generator=g)
    return tokens, scores, parents, torch.tensor([1, 2][:B])


def samples():
    """One sample call per op: name -> (args, kwargs)."""
    B, T, V = 2, 12, 64
    tokens, scores, parents, roots = candidates(B)
    tree = ops.tree_build(tokens, scores, parents, roots, T, backend="reference")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, T, V, generator=g)
    cache = torch.randn(4, B, 3, 40, 16, generator=g)
    return {
        "tree_expand": ((torch.randn(B, 4, V, generator=g), torch.randn(B, 4), 5), {}),
        "tree_build": ((tokens, scores, parents, roots, T), {"error_flag": torch.zeros(B, dtype=torch.int32)}),
        "tree_attention": (
            (torch.randn(B, 6, T, 16, generator=g), cache[0], cache[1], torch.tensor([10, 20]),
             tree.mask, T),
            {"scale": 0.2},
        ),
        "verify_greedy": ((tree.tokens, tree.parents, logits), {}),
        "verify_sample": ((tree.tokens, tree.parents, logits, torch.rand(B, T, generator=g), 0.8),
                          {"top_p": 0.9, "top_k": 10}),
        "kv_compact": ((cache, torch.tensor([3, 7]), torch.tensor([[0, 2, 3, -1], [0, 1, 4, 6]]),
                        torch.tensor([3, 4])), {}),
    }


def test_every_op_is_registered():
    for name in OP_NAMES:
        packet = getattr(torch.ops.eagle2, name)
        assert packet.default is not None, name


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name):
    args, kwargs = samples()[name]
    torch.library.opcheck(getattr(torch.ops.eagle2, name).default, args, kwargs)


def test_torch_ops_equal_public_ops():
    s = samples()
    args, _ = s["tree_expand"]
    for got, want in zip(torch.ops.eagle2.tree_expand(*args), ops.tree_expand(*args)):
        assert torch.equal(got, want)
    args, _ = s["tree_build"]
    tree = ops.tree_build(*args)
    for got, want in zip(torch.ops.eagle2.tree_build(*args), (tree.tokens, tree.parents, tree.depth, tree.mask)):
        assert torch.equal(got, want)
    args, kw = s["tree_attention"]
    assert torch.equal(torch.ops.eagle2.tree_attention(*args, **kw), ops.tree_attention(*args, **kw))
    tokens, parents, logits = s["verify_greedy"][0]
    full = ops.tree_build(*s["tree_build"][0])
    for got, want in zip(torch.ops.eagle2.verify_greedy(tokens, parents, logits), ops.verify_greedy(full, logits)):
        assert torch.equal(got, want)
    (tokens, parents, logits, u, t), kw = s["verify_sample"]
    for got, want in zip(torch.ops.eagle2.verify_sample(tokens, parents, logits, u, t, **kw),
                         ops.verify_sample(full, logits, u, t, **kw)):
        assert torch.equal(got, want)
    (cache, prefix, path, accept), _ = s["kv_compact"]
    a, b = cache.clone(), cache.clone()
    assert torch.ops.eagle2.kv_compact(a, prefix, path, accept) is None
    ops.kv_compact(b, prefix, path, accept)
    assert torch.equal(a, b)


def test_tree_build_op_errors_and_flag():
    tokens = torch.tensor([[5, 6, 7]])
    scores = torch.tensor([[-3.0, -1.0, -0.5]])  # candidate 2 outscores its dropped parent 0
    parents = torch.tensor([[-1, -1, 0]])
    flag = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="parent was not kept"):
        torch.ops.eagle2.tree_build(tokens, scores, parents, torch.tensor([9]), 3, flag)
    assert flag.tolist() == [1]


def test_ops_inside_torch_compile():
    """One graph: expand the root, build a tree, verify it, compact the cache."""
    B, V, K, T = 1, 50, 4, 5

    def round_(logits, root, target_logits, cache, prefix):
        tok, sc, _, _ = torch.ops.eagle2.tree_expand(logits, torch.zeros(B, 1), K)
        parents = torch.full((B, K), -1, dtype=torch.int64)
        tokens, par, depth, mask = torch.ops.eagle2.tree_build(tok[:, 0], sc[:, 0], parents, root, T)
        path, accept, bonus = torch.ops.eagle2.verify_greedy(tokens, par, target_logits)
        torch.ops.eagle2.kv_compact(cache, prefix, path, accept)
        return tokens, mask, path, accept, bonus

    g = torch.Generator().manual_seed(3)
    logits, target = torch.randn(B, 1, V, generator=g), torch.randn(B, T, V, generator=g)
    root, prefix = torch.tensor([7]), torch.tensor([4])
    cache = torch.randn(2, B, 1, 16, 8, generator=g)
    eager_cache, compiled_cache = cache.clone(), cache.clone()
    want = round_(logits, root, target, eager_cache, prefix)
    compiled = torch.compile(round_, backend="aot_eager", fullgraph=True)
    got = compiled(logits, root, target, compiled_cache, prefix)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(compiled_cache, eager_cache)
    assert want[1].shape == (B, T, mask_words(T))


def test_extension_is_built(monkeypatch):
    """`make test` builds the extension: its absence is a failure unless the build was
    switched off on purpose (EAGLE2_KERNELS_BUILD_EXT=0). Kept out of tests/ops/test_native.py,
    whose module-wide skip without the extension would hide exactly this failure."""
    if os.environ.get("EAGLE2_KERNELS_BUILD_EXT", "").strip() == "0":
        pytest.skip("EAGLE2_KERNELS_BUILD_EXT=0: pure-Python install")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.ext_available(), "eagle2_kernels._C does not import; reinstall with a C++ compiler"
    assert _backend.select_backend(torch.zeros(1)) == "ext"


def test_cpu_kernel_falls_back_to_reference_without_extension(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "ext_available", lambda: False)
    assert _backend.select_backend(torch.zeros(1)) == "reference"
    args, _ = samples()["tree_expand"]
    from eagle2_kernels.ops.tree_expand.reference import tree_expand as ref

    for got, want in zip(torch.ops.eagle2.tree_expand(*args), ref(*args)):
        assert torch.equal(got, want)


def test_import_registers_ops_without_triton_or_gpu():
    code = (
        "import sys, torch, eagle2_kernels\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized()\n"
        "from eagle2_kernels.ops._library import OP_NAMES\n"
        "print(all(hasattr(torch.ops.eagle2, n) for n in OP_NAMES))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def _copy_tracked_tree(dest: Path) -> None:
    """The files a fresh clone has (tracked by git), without build outputs."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in files.stdout.split():
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("tests/", "bench/", "examples/", ".ci/")):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read_bytes())


def _build_wheel(src: Path, out: Path, **env) -> subprocess.CompletedProcess:
    """Build a wheel of ``src`` with the PEP 517 backend (what pip --no-build-isolation runs)."""
    out.mkdir(exist_ok=True)
    env = dict(os.environ, **env)
    env.pop("EAGLE2_KERNELS_BACKEND", None)
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True,
                          text=True, timeout=300)


requires_checkout = pytest.mark.skipif(
    subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0,
    reason="needs the git checkout",
)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("clone") / "src"
    _copy_tracked_tree(src)
    return src


@requires_checkout
def test_pure_python_install(tmp_path, source_tree):
    """EAGLE2_KERNELS_BUILD_EXT=0: a py3-none-any wheel without a compiled module, which
    installs and runs the ops on the reference backend."""
    src = source_tree
    build = _build_wheel(src, tmp_path / "dist", EAGLE2_KERNELS_BUILD_EXT="0")
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dylib"))], names
    assert "eagle2_kernels/ops/tree_expand/native.py" in names
    # Install it on its own (a pure wheel installs by unpacking) and use it: the ops work,
    # on the reference backend.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        # hide a development (editable) install of the package from this interpreter
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import torch, eagle2_kernels\n"
        "from eagle2_kernels._backend import ext_available, select_backend\n"
        "assert eagle2_kernels.__file__.startswith(%r), eagle2_kernels.__file__\n"
        "assert not ext_available() and select_backend(torch.zeros(1)) == 'reference'\n"
        "out = torch.ops.eagle2.tree_expand(torch.randn(1, 2, 30), torch.zeros(1, 2), 3)\n"
        "print(out[0].shape)\n" % str(site)
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("EAGLE2_KERNELS_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "torch.Size([1, 2, 3])"


@requires_checkout
def test_build_without_compiler_falls_back_unless_forced(tmp_path, source_tree):
    """No C++ compiler: the default build warns and packages pure Python; with
    EAGLE2_KERNELS_BUILD_EXT=1 the build fails."""
    src = source_tree
    auto = _build_wheel(src, tmp_path / "auto", CXX=str(tmp_path / "no-such-c++"))
    assert auto.returncode == 0, auto.stderr
    assert "the native extension was not built" in auto.stderr + auto.stdout
    (wheel,) = (tmp_path / "auto").glob("*.whl")
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")]
    forced = _build_wheel(src, tmp_path / "forced", CXX=str(tmp_path / "no-such-c++"),
                          EAGLE2_KERNELS_BUILD_EXT="1")
    assert forced.returncode != 0
    assert not list((tmp_path / "forced").glob("*.whl"))
