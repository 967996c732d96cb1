"""Compiled draft-head steps: the head's cached tree step as one AOTInductor graph on disk.

Each round runs the draft head a few times (the catch-up over the accepted pairs, then one step
per expansion level, each followed by the draft logits). Eagerly a step of a one-layer head is
mostly Python and unpacked bf16 matmuls: ~1 ms for 8 rows of SmolLM2-135M's head on a 2-core
AMD EPYC, ~0.4 ms more for its logits. :class:`CompiledHead` wraps a head from outside (the head
is not modified) and runs ``tree_step`` as one ahead-of-time compiled graph (``project``, the
cache write and tree attention as one registered operator, ``finish``, then ``logits``), built
and kept like the target's forward (``models/compiled_aot.py``: same cache folder, key, probe and
recorded failures). Rows, key length, mask words and cache capacity are dynamic; a step's
logits come back with it and are handed out when ``logits`` is then asked for that very
output, as the round does after each expansion step. Everything else (``prefill``, any other
call, a paged draft cache, a forced ops backend) runs on the wrapped head.

    head = CompiledHead(dec.draft)                     # loads or builds on first use
    hs = head.tree_step(feats, tokens, positions, cache, slot, mask, tree_len)
    logits = head.logits(hs)                           # from the same graph, no second pass
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from eagle2_kernels.models.compiled import native_op
from eagle2_kernels.models.compiled_aot import (
    MAX_BATCH,
    _say,
    _weights_digest,
    artifact_path,
    compile_package,
    environment_key,
    load_checked,
    load_or_build,
    matmul_key,
    relative_error,
    source_digest,
)

__all__ = ["CompiledHead", "MAX_ROWS", "compile_head", "head_cache_attention"]

MAX_ROWS = 256  # new rows per step (catch-up pairs or frontier nodes)
_MAX_WORDS = 8  # packed mask words: tree regions of up to 256 slots
_FORMAT = 1


# --- the head's cache attention as one operator ---------------------------------------------
@torch.library.custom_op("eagle2::head_cache_attention", mutates_args=("kv",))
def head_cache_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv: Tensor,
    slot: Tensor,
    prefix_len: Tensor,
    tree_mask: Tensor,
    tree_len: Tensor,
    scale: float,
) -> Tensor:
    """Write k/v [B, Hkv, n, Dh] into ``kv`` ([2, B, Hkv, Lmax, Dh], a one-layer StaticKVCache)
    at slots slot[b] .. + n - 1, then tree attention of q [B, Hq, n, Dh] over the prefix
    (``prefix_len`` [B]) and the ``tree_len`` (0-dim int tensor) tree slots after it, visibility
    per ``tree_mask`` [B, n, W]. Returns [B, Hq, n, Dh]. What ``StaticKVCache.write`` then
    ``attend`` do for a head's tree step, as one opaque call."""
    from eagle2_kernels.ops import tree_attention

    n = k.shape[2]
    for b, s0 in enumerate(slot.tolist()):
        kv[0, b, :, s0 : s0 + n].copy_(k[b])
        kv[1, b, :, s0 : s0 + n].copy_(v[b])
    return tree_attention(q, kv[0], kv[1], prefix_len, tree_mask, int(tree_len), scale=scale)


@head_cache_attention.register_fake
def _(q, k, v, kv, slot, prefix_len, tree_mask, tree_len, scale):
    return torch.empty_like(q)


class _Step(torch.nn.Module):
    """The traced body: ``project``, the cache write and attention, ``finish``, ``logits``."""

    def __init__(self, head, from_target: bool):
        super().__init__()
        self.head = head
        self.from_target = from_target

    def forward(self, hidden, input_ids, position_ids, kv, slot, prefix_len, tree_mask, tree_len):
        head = self.head
        h, q, k, v = head.project(hidden, input_ids, position_ids, from_target=self.from_target)
        native = native_op("head_cache_attention_cpu") if kv.device.type == "cpu" else None
        out = (native or torch.ops.eagle2.head_cache_attention)(q, k, v, kv, slot, prefix_len, tree_mask, tree_len,
                                                                float(head.scaling))
        hs = head.finish(h, out)
        return hs, head.logits(hs)


def _sources(head) -> list[Path]:
    """This module, the shared AOT module and every package module the head's class (and its
    bases) is defined in: the code the step is traced from."""
    here = Path(__file__).resolve().parent
    files = {here / "compiled_head.py", here / "compiled_aot.py", here / "compiled.py", here / "matmul.py"}
    for cls in type(head).__mro__:
        if cls.__module__.startswith("eagle2_kernels."):
            files.add(Path(inspect.getfile(cls)).resolve())
    return sorted(files)


def head_key(head, from_target: bool) -> dict:
    """Everything a compiled step of ``head`` depends on: its class, config, weights (its own and
    the target embedding table it reads), dtype, the traced source, versions and machine."""
    cfg = getattr(head, "config", None)
    try:
        cfg_text = cfg.to_json_string(use_diff=False)
    except Exception:
        cfg_text = repr(cfg)
    # Tensors the trace reads besides the head's own state: plain tensor attributes (an EAGLE-1/2
    # head's copy of the target's lm_head rows) and the target embedding table it borrows.
    extra = hashlib.sha256()
    for name, value in sorted(vars(head).items()):
        if isinstance(value, Tensor):
            extra.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
            extra.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    embed = getattr(head, "_shared", {}).get("embed") if getattr(head, "embed_tokens", None) is None else None
    return {
        "format": _FORMAT,
        "model_class": f"{type(head).__name__}-step{'-target' if from_target else ''}",
        "config": hashlib.sha256(cfg_text.encode()).hexdigest(),
        "weights": _weights_digest(head),
        "borrowed": extra.hexdigest(),
        "embed": None if embed is None else [_weights_digest(embed), repr(getattr(embed, "embed_scale", None))],
        "dtype": str(next(head.parameters()).dtype),
        "source": source_digest(_sources(head)),
        "limits": [MAX_BATCH, MAX_ROWS],
        **matmul_key(head),
        **environment_key(),
    }


class CompiledHead:
    """A draft head whose cached tree steps run one AOTInductor graph each (see the module).

    Args:
        head: an attached draft head (``DraftHeadBase``) on CPU.
        progress: callable(str) told about compiling, loading and rebuilding.

    Every attribute other than ``tree_step`` / ``logits`` / ``ensure`` / ``status`` is the
    head's. An EAGLE-1/2 head (``EagleDraftHead``: its ``project`` does not depend on
    ``from_target``) needs one graph; another head gets one for its catch-up (target features)
    and one for its expansion steps.
    """

    def __init__(self, head, progress=None):
        self.head = head
        self.progress = progress
        from eagle2_kernels.models.draft_head import EagleDraftHead

        self._one_graph = isinstance(head, EagleDraftHead)
        self._lock = threading.Lock()
        self._runners: dict[bool, object] = {}  # from_target -> loaded runner
        self._failed: dict[bool, str] = {}
        self._source: dict[bool, str] = {}
        self._last: tuple | None = None  # (hs, logits) of the last compiled step

    def __getattr__(self, name):
        return getattr(self.__dict__["head"], name)

    @property
    def status(self) -> str:
        """'compiled (...)' or 'eager (<why>)' per graph."""
        parts = []
        for ft in sorted(set(self._runners) | set(self._failed)):
            what = "catch-up" if ft else "step"
            parts.append(f"{what}: {self._source[ft]}" if ft in self._runners else f"{what}: eager ({self._failed[ft]})")
        return "; ".join(parts) or "not loaded yet"

    # --- the step -------------------------------------------------------------------------------
    def tree_step(self, hidden_states, input_ids, position_ids, cache, slot, tree_mask, tree_len: int,
                  backend: str | None = None, from_target: bool = False) -> Tensor:
        """``head.tree_step`` (same arguments and result) through the compiled graph when it
        applies, else on the head."""
        from eagle2_kernels.cache import StaticKVCache

        B, n = input_ids.shape
        ft = False if self._one_graph else bool(from_target)
        usable = (backend is None and type(cache) is StaticKVCache and cache.kv.shape[0] == 2
                  and cache.kv.device.type == "cpu" and cache.kv.is_contiguous() and B <= MAX_BATCH
                  and 1 <= n <= MAX_ROWS and tree_mask.shape[-1] <= _MAX_WORDS and not torch.is_grad_enabled())
        runner = self._runner(ft) if usable else None
        if runner is None:
            self._last = None
            return self.head.tree_step(hidden_states, input_ids, position_ids, cache, slot, tree_mask, tree_len,
                                       backend, from_target=from_target)
        if isinstance(slot, Tensor):
            slots = slot.to(torch.int64).reshape(B).contiguous()
        else:
            slots = torch.tensor([slot] * B if isinstance(slot, int) else list(slot), dtype=torch.int64)
        hs, logits = runner.run([
            hidden_states.contiguous(), input_ids.to(torch.int64).contiguous(),
            position_ids.to(torch.int64).expand(B, n).contiguous(), cache.kv, slots,
            cache.lengths.to(torch.int32).contiguous(), tree_mask.to(torch.int32).expand(B, n, -1).contiguous(),
            torch.tensor(int(tree_len), dtype=torch.int64)])
        self._last = (hs, logits)
        return hs

    def logits(self, hidden: Tensor) -> Tensor:
        """The draft logits: those the compiled step computed when ``hidden`` is its output,
        else the head's."""
        last = self._last
        if last is not None and hidden is last[0]:
            return last[1]
        return self.head.logits(hidden)

    # --- load or build --------------------------------------------------------------------------
    def ensure(self, from_target: bool | None = None) -> None:
        """Load (or build and store) a graph now instead of on its first step: the catch-up
        (``from_target=True``) or expansion one, or (None) every graph this head uses."""
        for ft in ((False,) if self._one_graph else (False, True)) if from_target is None else (from_target,):
            self._runner(False if self._one_graph else bool(ft))

    def _runner(self, ft: bool):
        runner = self._runners.get(ft)
        if runner is not None or ft in self._failed:
            return runner
        with self._lock:
            if ft in self._runners or ft in self._failed:
                return self._runners.get(ft)
            key = head_key(self.head, ft)
            path = artifact_path(key)
            runner, source, failed = load_or_build(
                path, key, lambda p, k: self._build(p, k, ft), lambda p: self._load_checked(p, ft), self.progress,
                fallback="the draft head's steps run eagerly")
            if runner is None:
                self._failed[ft] = failed or "unavailable"
            else:
                self._runners[ft], self._source[ft] = runner, source
            return runner

    def _example(self, B: int, n: int, prefix: int, cap: int, ft: bool):
        """Inputs of a B x n step after ``prefix`` cached slots (deterministic values)."""
        head = self.head
        dtype = next(head.parameters()).dtype
        width = head.target_feature_size if ft else head.hidden_size
        vocab = getattr(head, "target_vocab_size", None) or head.draft_vocab_size
        g = torch.Generator().manual_seed(1234)
        hidden = torch.randn(B, n, width, generator=g).to(dtype)
        ids = ((torch.arange(B * n) * 7919 + 11) % vocab).view(B, n)
        pos = (prefix + torch.arange(n)).expand(B, n).contiguous()
        kv = torch.zeros(2, B, head.num_kv_heads, cap, head.head_dim, dtype=dtype)
        kv[:, :, :, :prefix] = (0.5 * torch.randn(2, B, head.num_kv_heads, prefix, head.head_dim,
                                                  generator=g)).to(dtype)
        slot = torch.full((B,), prefix, dtype=torch.int64)
        lengths = torch.full((B,), prefix, dtype=torch.int32)
        from eagle2_kernels.ops.tree import pack_bits

        mask = pack_bits(torch.ones(n, n, dtype=torch.bool).tril()).expand(B, n, -1).contiguous()
        return [hidden, ids, pos, kv, slot, lengths, mask, torch.tensor(n, dtype=torch.int64)]

    def _build(self, path: Path, key: dict, ft: bool) -> None:
        _say(self.progress, f"compiling the draft head's {'catch-up' if ft else 'tree'} step for this head and "
                            f"machine (AOTInductor, ~20 s on 2 cores; once: later processes load it) ...")
        t0 = time.perf_counter()
        from torch.export import Dim

        # Sizes all different (batch 3, 40 rows, 2 mask words, capacity 64, prefix 5).
        args = self._example(3, 40, 5, 64, ft)
        batch, rows = Dim("batch", min=1, max=MAX_BATCH), Dim("rows", min=1, max=MAX_ROWS)
        words, capacity = Dim("mask_words", min=1, max=_MAX_WORDS), Dim("capacity", min=2)
        shapes = ({0: batch, 1: rows}, {0: batch, 1: rows}, {0: batch, 1: rows}, {1: batch, 3: capacity},
                  {0: batch}, {0: batch}, {0: batch, 1: rows, 2: words}, None)
        compile_package(_Step(self.head, ft), tuple(args), shapes, path, key)
        _say(self.progress, f"compiled in {time.perf_counter() - t0:.0f} s; saved as {path}")

    def _load_checked(self, path: Path, ft: bool):
        return load_checked(path, lambda runner: self._probe(runner, ft), next(self.head.parameters()).dtype)

    def _probe(self, runner, ft: bool) -> float:
        """Largest relative error of (features, logits, cache) between the runner and the head's
        own ``tree_step`` + ``logits`` on 2 sequences x 3 causal rows after 2 cached slots."""
        from eagle2_kernels.cache import StaticKVCache

        args = self._example(2, 3, 2, 8, ft)
        hidden, ids, pos, kv, slot, lengths, mask, _ = args
        head = self.head
        cache = StaticKVCache(1, 2, head.num_kv_heads, 8, head.head_dim, kv.dtype, kv.device)
        cache.kv.copy_(kv)
        cache.set_lengths([2, 2])
        with torch.no_grad():
            hs = head.tree_step(hidden, ids, pos, cache, [2, 2], mask, 3, None, from_target=ft)
            ref = (hs, head.logits(hs))
            out = runner.run(args)
        return relative_error(list(zip(out, ref)) + [(kv, cache.kv)])


def compile_head(head, compile: bool | str = "auto", progress=None):
    """The head a decoder's rounds should drive: ``CompiledHead(head)`` where compiling is on
    and possible (a CPU head, a C++ compiler; ``"auto"`` honours ``EAGLE2_KERNELS_COMPILE=0``;
    ``EAGLE2_KERNELS_COMPILE_CACHE=0`` keeps the head eager), else ``head`` itself (also None)."""
    from eagle2_kernels.models.compiled import compile_disabled_by_env, compile_support
    from eagle2_kernels.models.compiled_aot import aot_cache_disabled_by_env

    if head is None or not compile or aot_cache_disabled_by_env():
        return head
    if compile == "auto" and compile_disabled_by_env():
        return head
    ok, _ = compile_support(next(head.parameters()).device)
    return CompiledHead(head, progress) if ok else head
