"""Compiled target forwards: the round's verify and plain-step forwards as one Inductor graph.

Speculation multiplies whatever one target forward costs, and transformers' eager forward of
a small model on a CPU is mostly Python dispatch and unpacked bf16 matmuls. Here the decode
forward (n new tokens over our KV cache, n = 1 for a plain step, the tree size for a verify)
is compiled with ``torch.compile`` (``fullgraph=True``: one graph per forward, no breaks) and,
on CPU, Inductor's *freezing*: the weights become constants of the graph, prepacked for
oneDNN's blocked GEMM (AMX / AVX-512-BF16 where the CPU has them).

What makes that possible:

- The attention is ONE opaque operator, ``torch.ops.eagle2.cache_tree_attention``, registered
  with ``torch.library`` with a fake implementation and its in-place write declared
  (``mutates_args=("kv",)``): it stores the layer's rotated k/v at the prefix length and runs
  ``ops.tree_attention`` over prefix + tree. The compiler sees its shape and its side effect
  and nothing of its Python.
- Per-forward values are tensors, not host ints: the cache, the [B] prefix lengths and the
  packed [B, n, W] tree mask travel as keyword tensors through transformers' attention
  interface; nothing is counted or written on a Python object inside the graph.
- Tree sizes are bucketed: a forward over n tokens runs the graph of the smallest bucket
  >= n, its extra rows padded (token 0, the last real position, visible only to themselves;
  no real row sees them, and their KV lands in slots past the tree, which compaction never
  reads). A small model's forward costs nearly the same for 5 rows as for 8 (the weights are
  read once either way), and each bucket is one compilation (tens of seconds on 2 cores), so a
  handful of buckets beats one graph per size. The cost model times the buckets, so the policy
  sees the step function it will actually pay.

Start-up: here each bucket compiles once per process, on its first forward, about 40 s each
for a 30-layer model on 2 cores: Inductor cannot cache a frozen graph across processes
(oneDNN-packed weights do not pickle), so only its kernel-level pieces are reused from
``$EAGLE2_KERNELS_CACHE/inductor``. That is why the default is the ahead-of-time compiled form
of the same body (``models/compiled_aot.py``: one graph for every size, kept on disk, loaded in
under a second by later processes); this per-process path is what it falls back to when a model
cannot be exported, and what ``EAGLE2_KERNELS_COMPILE_CACHE=0`` selects. The prefill (a long,
causal forward run once per call) stays eager.

Frozen weights are copies taken at compilation: a model whose weights change afterwards
(fine-tuning, ``load_state_dict``) needs a new decoder.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import threading
import types
from typing import Optional

import torch
from torch import Tensor

__all__ = ["CompiledForward", "DEFAULT_BUCKETS", "compile_support", "cache_tree_attention"]

# Bucket sizes of the compiled forwards (new tokens per forward); larger trees run eagerly.
# Three graphs: each costs ~30-45 s of compilation per process on 2 cores, and once one forward
# is cheap the cost-aware policy rarely verifies more than 8 nodes (an exploratory run on a
# 2-core AMD EPYC with AVX-512-BF16, SmolLM2-135M bf16, 4 MT-bench turns: 47.4 tok/s with
# (1, 4, 8) against 42.9-47.0 with (1, 2, 4, 8, 16); not a committed result).
DEFAULT_BUCKETS = (1, 4, 8)
KV_KWARG, LEN_KWARG, MASK_KWARG = "eagle2_kv", "eagle2_lengths", "eagle2_mask"


# --- the attention as one operator ---------------------------------------------------------
@torch.library.custom_op("eagle2::cache_tree_attention", mutates_args=("kv",))
def cache_tree_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv: Tensor,
    layer: int,
    prefix_len: Tensor,
    tree_mask: Tensor,
    scale: float,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Write k/v [B, Hkv, n, Dh] of ``layer`` into ``kv`` ([2L, B, Hkv, Lmax, Dh], the
    StaticKVCache layout) at slots prefix_len[b] .. + n - 1, then tree attention of q
    [B, Hq, n, Dh] over the prefix and the n new slots (visibility among them: ``tree_mask``
    [B, n, W] int32). Returns [B, Hq, n, Dh]."""
    from eagle2_kernels.ops import tree_attention

    n = k.shape[2]
    keys, values = kv[2 * layer], kv[2 * layer + 1]
    if kv.device.type == "cpu":  # a host read is free here; slices beat a scatter
        for b, s0 in enumerate(prefix_len.tolist()):
            keys[b, :, s0 : s0 + n].copy_(k[b])
            values[b, :, s0 : s0 + n].copy_(v[b])
    else:
        bsz, h, _, d = k.shape
        offs = torch.arange(n, device=kv.device, dtype=torch.int64)
        idx = (prefix_len.to(torch.int64).view(bsz, 1, 1, 1) + offs.view(1, 1, n, 1)).expand(bsz, h, n, d)
        keys.scatter_(2, idx, k)
        values.scatter_(2, idx, v)
    local = {}
    if window is not None:
        local["window"] = window
    if softcap is not None:
        local["softcap"] = softcap
    if sinks is not None:
        local["sinks"] = sinks
    return tree_attention(q, keys, values, prefix_len, tree_mask, n, scale=scale, **local)


@cache_tree_attention.register_fake
def _(q, k, v, kv, layer, prefix_len, tree_mask, scale, window=None, softcap=None, sinks=None):
    return torch.empty_like(q)


_NATIVE_OPS: dict = {}  # name -> op or None, decided once per process


def native_op(name: str):
    """``torch.ops.eagle2.<name>``, a native CPU operator of the compiled graphs
    (``csrc/cache_attention.cpp``: the target's ``cache_tree_attention_cpu`` and the draft head's
    ``head_cache_attention_cpu``, dispatched in C++, where the Python operators cost ~250 us a
    call in the callback on a 2-core EPYC), with its fake registered; None when the extension is
    not built or an ops backend is forced by ``EAGLE2_KERNELS_BACKEND`` (then the graphs call
    the Python operators, which honour it). Each writes the cache and attends exactly as its
    Python counterpart does, on CPU tensors."""
    if name not in _NATIVE_OPS:
        from eagle2_kernels import _native
        from eagle2_kernels._backend import forced_backend

        op = None
        if forced_backend() is None and _native.available() and hasattr(torch.ops.eagle2, name):
            op = getattr(torch.ops.eagle2, name)
            torch.library.register_fake(f"eagle2::{name}")(_like_q)
        _NATIVE_OPS[name] = op
    return _NATIVE_OPS[name]


def _like_q(q, *args, **kwargs):
    return torch.empty_like(q)



# --- when compiling is possible --------------------------------------------------------------
def compile_disabled_by_env() -> bool:
    """``EAGLE2_KERNELS_COMPILE=0`` (or false/off/no) turns ``compile="auto"`` off."""
    return os.environ.get("EAGLE2_KERNELS_COMPILE", "").strip().lower() in ("0", "false", "off", "no")


def compile_support(device: torch.device) -> tuple[bool, str]:
    """(can compile, why not): Inductor on CPU needs a C++ compiler; CUDA forwards are
    captured as CUDA graphs by the static round instead."""
    if device.type != "cpu":
        return False, f"compiled forwards run on CPU; on {device.type} the static round captures CUDA graphs"
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None:
        return False, "no C++ compiler (g++) found: Inductor needs one to compile CPU kernels"
    return True, ""


# A cache folder the user chose for Inductor before importing us is kept.
_USER_INDUCTOR_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def _use_our_inductor_cache() -> None:
    """Point Inductor's on-disk cache at ``$EAGLE2_KERNELS_CACHE/inductor`` (beside the cost
    model) unless the user chose one; Inductor reads the variable at every cache lookup."""
    if _USER_INDUCTOR_DIR is None:
        from eagle2_kernels.models.default import cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


# --- the compiled forward ----------------------------------------------------------------------
class _Forward(torch.nn.Module):
    """The traced body: decoder -> final hidden (post-norm, the feature) -> lm_head -> the
    model's own final logit transform. A module, so that freezing turns its weights into
    constants."""

    def __init__(self, model, logit_fn):
        super().__init__()
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self._logit_fn = logit_fn

    def forward(self, input_ids, position_ids, kv, prefix_len, tree_mask):
        out = self.decoder(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            return_dict=True,
            **{KV_KWARG: kv, LEN_KWARG: prefix_len, MASK_KWARG: tree_mask},
        )
        h = out.last_hidden_state
        return self._logit_fn(self.lm_head(h)), h


def _logit_transform(model):
    """The transform a transformers causal LM applies between lm_head and its logits, from its
    config (final softcapping: Gemma-2/3; scaling: Granite, Cohere), as a function."""
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    cfg = get() if callable(get) else cfg
    cap = getattr(cfg, "final_logit_softcapping", None)
    div = getattr(cfg, "logits_scaling", None)
    mul = getattr(cfg, "logit_scale", None)

    def fn(logits):
        if div is not None and div != 1:
            logits = logits / div
        if mul is not None and mul != 1:
            logits = logits * mul
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return fn


class CompiledForward:
    """The target's decode forward, compiled once per bucket size.

    Args:
        model: the transformers causal LM (attention switched by the caller, see
            ``TargetAdapter.scoped``).
        buckets: increasing forward sizes that get a graph; a forward over more new tokens
            than the last bucket returns None (the caller runs it eagerly).
        progress: optional callable(str) told when a bucket starts compiling.

    Call with (input_ids [B, n], position_ids [B, n], kv, prefix_len [B] int32, tree_mask
    [B, n, W] int32) under ``torch.no_grad()``; returns (logits [B, n, V], features [B, n, H])
    or None when n exceeds the largest bucket.
    """

    def __init__(self, model, buckets=DEFAULT_BUCKETS, progress=None):
        buckets = tuple(sorted({int(b) for b in buckets}))
        if not buckets or buckets[0] < 1:
            raise ValueError(f"compile buckets must be positive ints, got {buckets!r}")
        self.buckets = buckets
        self.progress = progress
        self._module = _Forward(model, _logit_transform(model))
        import torch._dynamo

        # One graph per (bucket, batch): keep them all rather than falling back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._fn = torch.compile(
            _own_forward(self._module),
            fullgraph=True,
            dynamic=False,
            # The graph reads only its inputs and frozen constants: no guard on module state.
            # That is safe because each instance compiles its own code object (_own_forward):
            # Dynamo's cache lives on the code, so no other model can match these graphs.
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
        )
        _use_our_inductor_cache()
        self._seen: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def bucket(self, n: int) -> int | None:
        """The graph size that serves a forward over ``n`` new tokens (None: run eagerly)."""
        for b in self.buckets:
            if b >= n:
                return b
        return None

    @contextlib.contextmanager
    def _compiling(self, key):
        import torch._inductor.config as inductor_config

        first = key not in self._seen
        if first and self.progress is not None:
            self.progress(f"compiling the target forward for {key[1]} new tokens (batch {key[0]}), once per "
                          f"process (compile=False or EAGLE2_KERNELS_COMPILE=0 skips it) ...")
        with inductor_config.patch(freezing=True):
            yield
        self._seen.add(key)

    def __call__(self, input_ids, position_ids, kv, prefix_len, tree_mask):
        B, n = input_ids.shape
        size = self.bucket(n)
        if size is None:
            return None
        if size > n and int(prefix_len.max()) + size > kv.shape[3]:
            return None  # no room for the padded rows (a cache sized by the caller): eager
        if size > n:  # pad to the bucket: extra rows see only themselves and the prefix
            pad = size - n
            input_ids = torch.cat([input_ids, input_ids.new_zeros(B, pad)], dim=1)
            position_ids = torch.cat([position_ids, position_ids[:, -1:].expand(B, pad)], dim=1)
            words = (size + 31) // 32
            mask = tree_mask.new_zeros(B, size, words)
            mask[:, :n, : tree_mask.shape[2]] = tree_mask
            idx = torch.arange(n, size)
            mask[:, idx, idx // 32] = _bit_words(idx, mask.dtype)
            tree_mask = mask
        torch._dynamo.maybe_mark_dynamic(kv, 3)  # the cache may grow: capacity is not a guard
        key = (B, size)
        if key in self._seen:
            logits, feats = self._fn(input_ids, position_ids, kv, prefix_len, tree_mask)
        else:
            with self._lock, self._compiling(key):
                logits, feats = self._fn(input_ids, position_ids, kv, prefix_len, tree_mask)
        if size > n:
            logits, feats = logits[:, :n], feats[:, :n]
        return logits, feats


_instances = itertools.count()


def _own_forward(module: _Forward):
    """``module.forward`` bound to a fresh copy of its code object. Dynamo keys compiled
    graphs by code object and the graphs hold frozen weights, so two models of the same
    shapes (two decoders in one process) must never share one: each gets its own code."""
    f = _Forward.forward
    code = f.__code__.replace(co_name=f"forward_{next(_instances)}")
    fn = types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)
    return types.MethodType(fn, module)


def _bit_words(idx: Tensor, dtype: torch.dtype) -> Tensor:
    """The int32 word holding bit ``idx % 32`` alone (bit 31 wraps to the sign bit)."""
    v = torch.ones_like(idx, dtype=torch.int64) << (idx % 32)
    v = torch.where(v >= 2**31, v - 2**32, v)
    return v.to(dtype)
