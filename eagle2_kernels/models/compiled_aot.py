"""Compiled target forwards kept on disk: one AOTInductor artifact per model and machine.

``torch.compile`` with frozen weights (``models/compiled.py``) gives the fastest CPU decode
forward, but Inductor cannot cache a frozen graph across processes (its oneDNN-packed weights
do not pickle), so every process paid ~40 s per bucket. Here the same forward (the
``_Forward`` body: decoder, final norm, lm_head, the model's logit transform, our attention as
the opaque ``torch.ops.eagle2.cache_tree_attention``) is exported once with ``torch.export``
and compiled ahead of time by AOTInductor with freezing on: the package holds the generated
kernels, the C++ wrapper and the prepacked weights, and a later process loads it in well under
a second. The attention operator is called back through the dispatcher, so its Python (and the
ops backend it picks) runs at call time, not frozen into the artifact.

One graph serves every forward size: batch, new tokens, mask words and cache capacity are
dynamic dimensions of the export (up to ``MAX_BATCH`` x ``MAX_TOKENS``), so there is no padding
and no per-size compilation. On a 2-core AMD EPYC (AVX-512-BF16, no AMX), SmolLM2-135M bf16,
torch 2.13: one ~70 s compilation, then ~0.3 s to load; a 1-token forward at prefix 128 costs
about what the per-process frozen graph costs (bench/bench_compiled.py --startup measures it).

Cache: ``$EAGLE2_KERNELS_CACHE/compiled/<class>-<key>.pt2`` (beside the cost model's ``costs``),
with ``.json`` holding the key. The key covers everything the artifact depends on: the
weights' bytes (SHA-256, ~0.15 s for 135M parameters), the config, dtype, torch /
transformers / Python versions, the CPU model, its matmul ISA flags, the source of the traced
code and the dynamic ranges. A file that does not load, or whose output disagrees with the
eager forward on a probe, is reported, deleted and rebuilt; a model that cannot be exported
is recorded (``.failed``) and compiled per process with ``torch.compile`` instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from eagle2_kernels.models.compiled import CompiledForward, _Forward, _logit_transform
from eagle2_kernels.models.machine import environment_key

__all__ = ["AOTForward", "MAX_BATCH", "MAX_TOKENS", "aot_cache_disabled_by_env", "artifact_key", "artifact_path", "matmul_key"]

# Dynamic ranges of the exported graph: larger forwards run eagerly (or per-process compiled).
MAX_BATCH = 64
MAX_TOKENS = 256  # new tokens per forward; the packed mask then has at most 8 words
_MAX_WORDS = (MAX_TOKENS + 31) // 32
_FORMAT = 1  # bump when the artifact's calling convention changes
_SOURCES = ("compiled.py", "compiled_aot.py", "matmul.py")  # code traced into (or deciding) the artifact


def aot_cache_disabled_by_env() -> bool:
    """``EAGLE2_KERNELS_COMPILE_CACHE=0`` (false/off/no): compile per process with
    ``torch.compile`` (frozen, bucketed) instead of the cached AOTInductor artifact."""
    return os.environ.get("EAGLE2_KERNELS_COMPILE_CACHE", "").strip().lower() in ("0", "false", "off", "no")


def _say(progress: Optional[Callable[[str], None]], message: str) -> None:
    if progress is not None:
        progress(message)
    else:
        print(f"eagle2_kernels: {message}", file=sys.stderr, flush=True)


def _weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes); tied tensors once."""
    h = hashlib.sha256()
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if ident in seen or t.numel() == 0:
            continue
        seen.add(ident)
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def source_digest(paths) -> str:
    """SHA-256 over the bytes of the source files a graph was traced from."""
    src = hashlib.sha256()
    for path in paths:
        src.update(Path(path).read_bytes())
    return src.hexdigest()


def artifact_key(model: torch.nn.Module) -> dict:
    """Everything the compiled artifact of ``model`` depends on, as a JSON-able dict."""
    cfg = model.config
    try:
        cfg_text = cfg.to_json_string(use_diff=False)
    except Exception:  # an unusual config class: its repr still pins the architecture
        cfg_text = repr(cfg)
    here = Path(__file__).resolve().parent
    # This module, the traced body and the adapter whose attention function the trace runs
    # (target.py, read as a file: importing it here would make an import cycle).
    return {
        "format": _FORMAT,
        "model_class": type(model).__name__,
        "config": hashlib.sha256(cfg_text.encode()).hexdigest(),
        "weights": _weights_digest(model),
        "dtype": str(model.get_output_embeddings().weight.dtype),
        "source": source_digest(here / name for name in (*_SOURCES, "target.py")),
        "limits": [MAX_BATCH, MAX_TOKENS],
        **matmul_key(model),
        **environment_key(),
    }


def matmul_key(module: torch.nn.Module) -> dict:
    """The kernel the graph's bf16 linears are traced with (``models/matmul.py``)."""
    from eagle2_kernels.models import matmul

    pick = matmul.choice(module)
    return {"matmul": pick, **({"matmul_kernel": matmul.KERNEL_VERSION} if pick == "eagle2" else {})}


def artifact_path(key: dict) -> Path:
    """Where the artifact of ``key`` (see :func:`artifact_key`) lives: the ``compiled`` folder
    of the cache root (``$EAGLE2_KERNELS_CACHE``, beside ``costs``), named by the key's hash."""
    from eagle2_kernels.models.default import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "compiled" / f"{key['model_class']}-{digest}.pt2"


class _Shared:
    """Per-model state shared by every AOTForward over that model (one artifact, one runner)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.runner = None  # the loaded AOTIModelPackageLoader
        self.failed: str | None = None  # why the AOT path is off for this model (then: JIT)
        self.source = ""  # "loaded" or "built": how this process got the runner
        self.path: Path | None = None


_SHARED: dict = {}  # id(model) -> (model, _Shared); lives as long as the process, like graphs


class AOTForward:
    """The target's decode forward as one ahead-of-time compiled graph, cached on disk.

    Same calling convention as :class:`~eagle2_kernels.models.compiled.CompiledForward`: call
    with (input_ids [B, n], position_ids [B, n], kv, prefix_len [B] int32, tree_mask [B, n, W]
    int32) under ``torch.no_grad()``; returns (logits [B, n, V], features [B, n, H]) or None
    when the forward is outside the graph's ranges (the caller runs it eagerly).

    Args:
        model: the transformers causal LM.
        buckets: kept for the per-process fallback (``torch.compile``, one graph per bucket)
            and for :meth:`TargetAdapter.precompile`, which warms these sizes; the AOT graph
            itself serves every size up to ``MAX_TOKENS`` unpadded.
        progress: callable(str) told about compiling, loading and rebuilding.
        scoped: context-manager factory that switches the model to our attention (the
            adapter's ``scoped``), for the export and the probe.
        new_kv: callable(batch, capacity) -> a zeroed KV tensor in the cache layout.

    The artifact is loaded (or built) on the first forward or by :meth:`ensure`.
    """

    def __init__(self, model, buckets, progress, scoped, new_kv):
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        self.progress = progress
        self._model = model
        self._scoped = scoped
        self._new_kv = new_kv
        self._module = _Forward(model, _logit_transform(model))
        self._shared = _SHARED.setdefault(id(model), (model, _Shared()))[1]
        self._fallback: CompiledForward | None = None

    # --- status -------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        if self._shared.failed is not None:
            return f"compiled (Inductor, buckets {list(self.buckets)}, per process: {self._shared.failed})"
        return (f"compiled (AOTInductor, frozen weights, 1-{MAX_TOKENS} new tokens, batch <= {MAX_BATCH}, "
                f"cached across processes)")

    @property
    def jit_fallback(self) -> bool:
        """True when this model's forwards run the per-process ``torch.compile`` fallback
        (traced in the caller's scope) rather than the AOT graph."""
        return self._shared.failed is not None

    @property
    def source(self) -> str:
        """'loaded' (from the disk cache), 'built' (compiled by this process) or '' (not yet)."""
        return self._shared.source

    @property
    def path(self) -> Path | None:
        return self._shared.path

    def bucket(self, n: int) -> int | None:
        """The graph size that serves ``n`` new tokens (None: run eagerly)."""
        if self._shared.failed is not None:
            return self._jit().bucket(n)
        return n if 1 <= n <= MAX_TOKENS else None

    # --- the forward ----------------------------------------------------------------------------
    def __call__(self, input_ids, position_ids, kv, prefix_len, tree_mask):
        if self._shared.runner is None and self._shared.failed is None:
            self.ensure()
        if self._shared.failed is not None:
            return self._jit()(input_ids, position_ids, kv, prefix_len, tree_mask)
        B, n = input_ids.shape
        if not (B <= MAX_BATCH and 1 <= n <= MAX_TOKENS and tree_mask.shape[2] <= _MAX_WORDS
                and kv.is_contiguous()):
            return None
        # The generated code indexes by contiguous strides and fixed dtypes: normalise.
        args = [input_ids.to(torch.int64).contiguous(), position_ids.to(torch.int64).contiguous(), kv,
                prefix_len.to(torch.int32).contiguous(), tree_mask.to(torch.int32).contiguous()]
        logits, feats = self._shared.runner.run(args)
        return logits, feats

    def _jit(self) -> CompiledForward:
        if self._fallback is None:
            self._fallback = CompiledForward(self._model, self.buckets, self.progress)
        return self._fallback

    # --- load or build ----------------------------------------------------------------------------
    def ensure(self) -> None:
        """Load the artifact from the disk cache, or build and store it (once per machine and
        model); on failure fall back to per-process ``torch.compile``."""
        sh = self._shared
        with sh.lock:
            if sh.runner is not None or sh.failed is not None:
                return
            key = artifact_key(self._model)
            sh.path = artifact_path(key)
            sh.runner, sh.source, sh.failed = load_or_build(
                sh.path, key, self._build, self._load_checked, self.progress,
                fallback="compiling per process with torch.compile instead")

    def _build(self, path: Path, key: dict) -> None:
        _say(self.progress, "compiling the target's decode forward for this model and machine (AOTInductor, "
                            "about a minute per 100M parameters on 2 cores; once: later processes load it "
                            f"from {path.parent}) ...")
        t0 = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Example sizes all different (batch 3, 40 tokens, 2 mask words, capacity 64) so that
        # no two dynamic dimensions are unified by an accidental equality.
        B, n, cap = 3, 40, 64
        kv = self._new_kv(B, cap)
        vocab = self._model.get_output_embeddings().weight.shape[0]
        ids = (torch.arange(B * n, device=kv.device) % vocab).view(B, n)
        pos = (2 + torch.arange(n, device=kv.device)).expand(B, n).contiguous()
        lengths = torch.full((B,), 2, dtype=torch.int32, device=kv.device)
        mask = torch.zeros(B, n, (n + 31) // 32, dtype=torch.int32, device=kv.device)
        from torch.export import Dim

        batch, tokens = Dim("batch", min=1, max=MAX_BATCH), Dim("new_tokens", min=1, max=MAX_TOKENS)
        words, capacity = Dim("mask_words", min=1, max=_MAX_WORDS), Dim("capacity", min=2)
        shapes = ({0: batch, 1: tokens}, {0: batch, 1: tokens}, {1: batch, 3: capacity}, {0: batch},
                  {0: batch, 1: tokens, 2: words})
        compile_package(self._module, (ids, pos, kv, lengths, mask), shapes, path, key, self._scoped)
        _say(self.progress, f"compiled in {time.perf_counter() - t0:.0f} s; saved as {path}")

    def _load_checked(self, path: Path):
        """(runner, '') when ``path`` loads and agrees with the eager forward on a probe, else
        (None, why)."""
        return load_checked(path, self._probe, self._model.get_output_embeddings().weight.dtype)

    def _probe(self, runner) -> float:
        """Largest relative error (L2) of logits, features and written KV between the runner and
        the eager body on a 2-sequence, 3-token causal forward after a 2-token prefix."""
        from eagle2_kernels.ops.tree import pack_bits

        B, n, prefix = 2, 3, 2
        kv_ref = self._new_kv(B, 8)
        dev = kv_ref.device
        base = torch.arange(1, 1 + kv_ref[:, :, :, :prefix].numel(), device=dev, dtype=torch.float32)
        kv_ref[:, :, :, :prefix] = (torch.sin(base) * 0.5).view_as(kv_ref[:, :, :, :prefix]).to(kv_ref.dtype)
        kv_out = kv_ref.clone()
        vocab = self._model.get_output_embeddings().weight.shape[0]
        ids = ((torch.arange(B * n, device=dev) * 7919 + 11) % vocab).view(B, n)
        pos = (prefix + torch.arange(n, device=dev)).expand(B, n).contiguous()
        lengths = torch.full((B,), prefix, dtype=torch.int32, device=dev)
        mask = pack_bits(torch.ones(n, n, dtype=torch.bool, device=dev).tril()).expand(B, n, -1).contiguous()
        with torch.no_grad(), self._scoped():
            ref = self._module(ids, pos, kv_ref, lengths, mask)
            out = runner.run([ids, pos, kv_out, lengths, mask])
        return relative_error(list(zip(out, ref)) + [(kv_out, kv_ref)])


# --- shared by every cached graph (this target forward, the draft head's steps) ----------------
def load_or_build(path: Path, key: dict, build, check, progress, fallback: str):
    """Load the package at ``path`` or build it, under a lock across processes.

    ``build(path, key)`` compiles and writes it (may raise: recorded in ``<path>.failed``, so later
    processes do not try again); ``check(path)`` returns (runner, '') or (None, why). A file
    that fails its check is reported, deleted and rebuilt once. Returns (runner or None, source
    'loaded' / 'built' / '', why the graph is unavailable or None); ``fallback`` ends the message.
    """
    from eagle2_kernels.models.default import _file_lock

    failed = path.with_suffix(".failed")
    with _file_lock(path.parent / f".{path.stem}.lock", timeout_s=1800.0):
        if failed.is_file():
            return None, "", _read_reason(failed)
        if path.is_file():
            runner, why = check(path)
            if runner is not None:
                return runner, "loaded", None
            _say(progress, f"the cached compiled forward {path} cannot be used ({why}); deleting and rebuilding it")
            with contextlib.suppress(OSError):
                path.unlink()
        try:
            build(path, key)
        except Exception as exc:  # export or compilation refused this model
            reason = f"AOTInductor could not compile it: {type(exc).__name__}: {_short(exc)}"
            failed.write_text(json.dumps({"reason": reason, "key": key}, indent=1))
            _say(progress, f"{reason}; {fallback} (recorded in {failed}; delete it to try again)")
            return None, "", reason
        runner, why = check(path)
        if runner is None:  # deterministic for this key: recorded, not retried
            reason = f"the freshly compiled AOTInductor graph is unusable: {why}"
            for stale in (path, path.with_suffix(".json")):
                with contextlib.suppress(OSError):
                    stale.unlink()
            failed.write_text(json.dumps({"reason": reason, "key": key}, indent=1))
            _say(progress, f"{reason}; {fallback} (recorded in {failed}; delete it to try again)")
            return None, "", reason
        _prune_superseded(path, key)
        return runner, "built", None


def _prune_superseded(path: Path, key: dict) -> None:
    """Delete the graphs this build replaces: same model, weights, versions and machine, other
    package source or format (each upgrade or edit of the traced code would otherwise leave a
    copy of the weights behind). Graphs of other versions or machines sharing the folder stay."""
    same = {k: v for k, v in key.items() if k not in ("source", "format")}
    for other in path.parent.glob("*.json"):
        if other == path.with_suffix(".json"):
            continue
        try:
            old = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(old, dict) and {k: v for k, v in old.items() if k not in ("source", "format")} == same:
            for stale in (other.with_suffix(".pt2"), other.with_suffix(".failed"), other):
                with contextlib.suppress(OSError):
                    stale.unlink()


def compile_package(module, args, shapes, path: Path, key: dict, scoped=None) -> None:
    """``torch.export`` of ``module`` on ``args`` (dynamic ``shapes``), then AOTInductor with
    freezing into the package ``path`` (written whole or not at all) and its key beside it.
    ``key["matmul"] == "eagle2"``: the bf16 linears are traced as ``eagle2::linear_bf16w``."""
    from eagle2_kernels.models import matmul

    path.parent.mkdir(parents=True, exist_ok=True)
    linears = matmul.bf16_linears(module) if key.get("matmul") == "eagle2" else []
    with torch.no_grad(), (scoped() if scoped is not None else contextlib.nullcontext()), matmul.patched(linears):
        program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    # Inductor's build folder (another copy of the weights) goes once the package is made.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp, _inductor_dir(tmp):
        out = Path(tmp) / "graph.pt2"
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=str(out),
                                                     inductor_configs={"freezing": True})
        os.replace(out, path)
    path.with_suffix(".json").write_text(json.dumps(key, indent=1, sort_keys=True))


def load_checked(path: Path, probe, dtype: torch.dtype):
    """(runner, '') when the package at ``path`` loads and ``probe(runner)`` (the largest
    relative error against the eager body) is within the tolerance of ``dtype``, else
    (None, why)."""
    from eagle2_kernels import _native

    _native.available()  # registers the native operators a graph may call (eagle2::linear_bf16w)
    try:
        runner = torch._inductor.aoti_load_package(str(path)).loader
    except Exception as exc:
        return None, f"{type(exc).__name__}: {_short(exc)}"
    try:
        err = probe(runner)
    except Exception as exc:
        return None, f"its probe forward failed: {type(exc).__name__}: {_short(exc)}"
    # The probe catches a wrong or damaged artifact, not rounding: unrelated outputs of equal
    # norm differ by ~1.4 (sqrt 2); packed bf16 GEMMs vs eager ones by ~0.09 on SmolLM2-135M
    # (30 layers); fp32 ones by ~1e-6.
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 0.25
    if not err <= tol:
        return None, f"it disagrees with the eager forward (relative error {err:.3g} > {tol:g})"
    return runner, ""


def relative_error(pairs) -> float:
    """Largest L2 relative error ||a - b|| / ||b|| over (a, b) pairs."""
    return max(float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)) for a, b in pairs)


@contextlib.contextmanager
def _inductor_dir(directory: str):
    """Inductor's cache folder is ``directory`` inside the body (in-memory caches cleared on
    the way in and out, so nothing points into the folder after it is removed)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # an older layout: switch the variable only
        temporary_cache_dir = None
    if temporary_cache_dir is not None:
        with temporary_cache_dir(os.path.join(directory, "inductor")):
            yield
        return
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(directory, "inductor")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def _read_reason(path: Path) -> str:
    try:
        return str(json.loads(path.read_text())["reason"])
    except Exception:
        return f"an earlier AOTInductor export failed (see {path})"


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."
