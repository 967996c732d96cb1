"""A measured cost model of the machine a decoder runs on.

The best draft tree depends on how the target's forward cost grows with the number of new
tokens n on *this* hardware: flat up to a knee on a GPU, nearly flat on a CPU with native bf16
matmul (AVX-512-BF16 / AMX), linear on one without (bf16 emulated), a step at n = 2 in fp32
(GEMV -> GEMM). No fixed tree shape is right everywhere, so the decoder times the pieces of a
round where it runs and sizes every round from these times (``runtime/policy.py``).

:class:`CostModel` holds seconds of
    target forward over n new tokens (n on a grid up to ``n_max``) at a short and a long prefix,
    one draft step (head forward + lm_head + top-k) over k rows (k on a grid),
    the fixed per-round overhead of building, verifying and committing a tree,
and interpolates between grid points. :func:`measure` times them for a (target, head, config); :func:`load`
returns the cached measurement for the same (model, head, dtype, device, CPU, threads, torch,
batch) from disk, measuring on first use. Cache: ``$EAGLE2_KERNELS_CACHE/costs`` (default
``~/.cache/eagle2_kernels/costs``), one JSON file per key.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from eagle2_kernels.ops.tree import pack_bits

__all__ = ["CostModel", "machine_info", "cost_key", "measure", "load", "cache_path"]

SCHEMA = 2
# Forward sizes timed (clipped to n_max): dense where curves bend, sparse where they are linear.
_N_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128)
_K_GRID = (1, 2, 4, 8, 16, 32)


def _interp(grid: Sequence[int], values: Sequence[float], x: float) -> float:
    """Piecewise-linear in x over an increasing grid; linear extrapolation past its ends."""
    if len(grid) == 1:
        return float(values[0]) * max(x, 1) / grid[0]
    i = bisect.bisect_left(grid, x)
    i = min(max(i, 1), len(grid) - 1)
    x0, x1 = grid[i - 1], grid[i]
    y0, y1 = values[i - 1], values[i]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return max(float(y), float(min(values)))


_ROWS: dict = {}  # id(CostModel) -> (the model, {(prefix, upto): target_row})


@dataclass(frozen=True)
class CostModel:
    """Seconds of the pieces of a speculative round on one machine, for one batch size.

    Attributes:
        n_grid: forward sizes timed (new tokens per sequence), increasing, starting at 1.
        target_short_s: target forward over each ``n_grid`` size at ``short_prefix`` cached tokens.
        target_long_s: the same at ``long_prefix`` (equal to short when only one was timed).
        short_prefix, long_prefix: the prefix lengths of the two curves.
        k_grid: draft rows timed.
        draft_step_s: one draft step (head forward + lm_head + tree_expand) over each ``k_grid``
            row count: the catch-up, the root expansion and every expansion level cost one.
        round_overhead_s: tree_build + verify + KV compaction + host bookkeeping of a round,
            on top of the target forward (a plain step pays none of it).
        info: what the measurement was made for (machine, model, dtype, batch, ...).

    Example::

        cm = CostModel.synthetic([0.042, 0.053, 0.070, 0.092])   # t(1..4), seconds
        cm.target(3), cm.draft(4)
    """

    n_grid: tuple[int, ...]
    target_short_s: tuple[float, ...]
    target_long_s: tuple[float, ...]
    short_prefix: int
    long_prefix: int
    k_grid: tuple[int, ...]
    draft_step_s: tuple[float, ...]
    round_overhead_s: float = 0.0
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for name in ("n_grid", "k_grid"):
            grid = getattr(self, name)
            if not grid or grid[0] < 1 or any(b <= a for a, b in zip(grid, grid[1:])):
                raise ValueError(f"CostModel: {name} must be increasing positive ints, got {grid}")
        for name, grid in (("target_short_s", self.n_grid), ("target_long_s", self.n_grid),
                           ("draft_step_s", self.k_grid)):
            vals = getattr(self, name)
            if len(vals) != len(grid) or any(not (v >= 0.0) for v in vals):
                raise ValueError(f"CostModel: {name} needs {len(grid)} values >= 0, got {vals}")
        if self.long_prefix < self.short_prefix:
            raise ValueError("CostModel: long_prefix must be >= short_prefix")

    # ------------------------------------------------------------------ queries
    @property
    def n_max(self) -> int:
        return self.n_grid[-1]

    def target(self, n: int, prefix: int | None = None) -> float:
        """Seconds of one target forward over ``n`` new tokens at ``prefix`` cached tokens
        (linear in the prefix between the two measured curves, clamped below at the short one)."""
        short = _interp(self.n_grid, self.target_short_s, n)
        if prefix is None or self.long_prefix == self.short_prefix:
            return short
        long = _interp(self.n_grid, self.target_long_s, n)
        w = (prefix - self.short_prefix) / (self.long_prefix - self.short_prefix)
        return max(short + w * (long - short), min(short, long))

    def target_row(self, prefix: int | None, upto: int) -> list[float]:
        """[target(n, prefix) for n = 0..upto] (index 0 unused: 0.0), memoised for the last few
        (prefix, upto): the policy reads the whole curve several times per expansion level."""
        key = (prefix, upto)
        memo = _ROWS.get(id(self))
        if memo is None or memo[0] is not self:
            if len(_ROWS) > 16:
                _ROWS.clear()
            memo = _ROWS[id(self)] = (self, {})
        row = memo[1].get(key)
        if row is None:
            if len(memo[1]) > 64:
                memo[1].clear()
            row = memo[1][key] = [0.0] + [self.target(n, prefix) for n in range(1, upto + 1)]
        return row

    def draft(self, rows: int) -> float:
        """Seconds of one draft step over ``rows`` rows."""
        return _interp(self.k_grid, self.draft_step_s, rows)

    # ------------------------------------------------------------------ construction
    @classmethod
    def synthetic(cls, target_s: Sequence[float], draft_s: float | Sequence[float] = 0.0,
                  round_overhead_s: float = 0.0, n_grid: Sequence[int] | None = None,
                  k_grid: Sequence[int] | None = None, info: dict | None = None) -> "CostModel":
        """A cost model from given numbers (tests, or a curve measured elsewhere).

        ``target_s[i]`` is the forward over ``n_grid[i]`` tokens (default n = 1, 2, ...);
        ``draft_s`` one step's seconds (a constant) or one per ``k_grid`` entry.
        """
        n_grid = tuple(range(1, len(target_s) + 1)) if n_grid is None else tuple(n_grid)
        if isinstance(draft_s, (int, float)):
            k_grid, draft_s = (1,), (float(draft_s),)
        else:
            k_grid = tuple(range(1, len(draft_s) + 1)) if k_grid is None else tuple(k_grid)
        t = tuple(float(x) for x in target_s)
        return cls(n_grid=n_grid, target_short_s=t, target_long_s=t, short_prefix=0, long_prefix=0,
                   k_grid=tuple(k_grid), draft_step_s=tuple(float(x) for x in draft_s),
                   round_overhead_s=float(round_overhead_s), info=dict(info or {"source": "synthetic"}))

    def to_json(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CostModel":
        """The inverse of :meth:`to_json`. Raises ValueError naming the first missing or
        malformed field (a cache file edited by hand or cut short)."""
        if not isinstance(d, dict):
            raise ValueError(f"a cost model is a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise ValueError(f"cost model schema {d.get('schema')!r} is not {SCHEMA}")
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing:
            raise ValueError(f"cost model fields missing: {missing}")

        def number(k, v, kind):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (
                    kind is int and not (isinstance(v, int) or v.is_integer())):
                raise ValueError(f"cost model field {k!r} needs {kind.__name__} values, got {v!r}")
            return kind(v)

        fields = {k: number(k, d[k], int) for k in ("short_prefix", "long_prefix")}
        fields["round_overhead_s"] = number("round_overhead_s", d["round_overhead_s"], float)
        for k, kind in (("n_grid", int), ("k_grid", int), ("target_short_s", float), ("target_long_s", float),
                        ("draft_step_s", float)):
            if not isinstance(d[k], (list, tuple)):
                raise ValueError(f"cost model field {k!r} must be a list, got {d[k]!r}")
            fields[k] = tuple(number(k, v, kind) for v in d[k])
        if not isinstance(d["info"], dict):
            raise ValueError(f"cost model field 'info' must be an object, got {d['info']!r}")
        fields["info"] = d["info"]
        return cls(**fields)

    def describe(self) -> str:
        """A short table: t(n) in ms at both prefixes, draft step in ms."""
        ns = " ".join(f"{n:>6d}" for n in self.n_grid)
        ts = " ".join(f"{1e3 * t:6.1f}" for t in self.target_short_s)
        tl = " ".join(f"{1e3 * t:6.1f}" for t in self.target_long_s)
        ks = ", ".join(f"{k}: {1e3 * s:.2f}" for k, s in zip(self.k_grid, self.draft_step_s))
        return (f"target forward (ms)  n = {ns}\n"
                f"  prefix {self.short_prefix:>5d}          {ts}\n"
                f"  prefix {self.long_prefix:>5d}          {tl}\n"
                f"draft step (ms) by rows: {ks}; round overhead {1e3 * self.round_overhead_s:.2f} ms")


# ---------------------------------------------------------------------------------- the machine
def machine_info(device: torch.device | str = "cpu") -> dict:
    """CPU model and the matmul-relevant flags, threads, torch version, accelerator name."""
    device = torch.device(device)
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    keep = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    info = {
        "cpu": cpu,
        "cpu_flags": [f for f in keep if f in flags],
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def cost_key(adapter, head, config, batch: int) -> dict:
    """Everything a measurement depends on, as a JSON-able dict (its hash names the file)."""
    ad, cfg = adapter, adapter.model.config
    try:
        model_cfg = cfg.to_json_string(use_diff=False)
    except Exception:  # an unusual config class: its repr still pins the architecture
        model_cfg = repr(cfg)
    inner = getattr(head, "head", head)  # a CompiledHead names the head it wraps
    head_desc = None if head is None else [
        type(inner).__name__, "compiled" if inner is not head else "eager", head.hidden_size, head.draft_vocab_size, head.num_kv_heads,
        head.head_dim, getattr(head, "target_feature_size", head.hidden_size)]
    return {
        "model": hashlib.sha1(model_cfg.encode()).hexdigest()[:16],
        "head": head_desc,
        "dtype": str(ad.dtype),
        "batch": int(batch),
        "backend": config.backend,
        "top_k": config.top_k,
        "depth": config.depth,  # the draft rows timed reach max(K, D + 2)
        "n_max": config.total_tokens,
        "compile": getattr(ad, "compile_status", "eager"),  # compiled forwards cost less
        **machine_info(ad.device),
    }


def cache_path(key: dict) -> Path:
    from eagle2_kernels.models.default import cache_dir

    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "costs" / f"{digest}.json"


# ---------------------------------------------------------------------------------- measuring
def _monotone(values: Sequence[float]) -> list[float]:
    """t(n) <= t(m) for n < m (a forward over fewer tokens can always pad to more): clip each
    value to the minimum at or after it, which removes upward noise at small n."""
    out, low = [], float("inf")
    for v in reversed(values):
        low = min(low, v)
        out.append(low)
    return out[::-1]


def _timed(fn, reps: int, sync, before=None) -> float:
    """Min over ``reps`` timed calls after one warm-up (the noise on a shared CPU only adds);
    ``before()``, untimed, precedes each call when given."""
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        if before is not None:
            before()
            sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


class _Timings:
    """Scratch caches and inputs for timing the pieces of a round (``measure``)."""

    def __init__(self, adapter, head, config, batch: int, n_max: int, prefixes: tuple[int, int], progress):
        self.ad, self.head, self.cfg, self.batch = adapter, head, config, batch
        dev = self.dev = adapter.device
        self.short_prefix, self.long_prefix = prefixes
        self.n_grid = tuple(n for n in _N_GRID if n < n_max) + (n_max,)
        k_top = self.k_top = max(config.top_k, config.depth + 2)
        self.k_grid = tuple(k for k in _K_GRID if k < k_top) + (k_top,)
        self.sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        self.gen = torch.Generator(device="cpu").manual_seed(0)
        self.tc = adapter.new_cache(batch, self.long_prefix + n_max + 1)
        # One causal mask for every timed forward: the target's (up to n_max tokens) and the draft
        # step's (up to k_top rows); either may be the larger (T < K, or T < D + 2, are valid bounds).
        rows = max(n_max, k_top)
        self.mask = pack_bits(torch.tril(torch.ones(rows, rows, dtype=torch.bool))).to(dev)
        self.progress, self.done, self.total = progress, 0, 0

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def _rows_mask(self, n: int) -> torch.Tensor:
        return self.mask[:n, : (n + 31) // 32].unsqueeze(0).expand(self.batch, n, -1).contiguous()

    def target_curve(self, prefix: int, reps: int) -> list[float]:
        """Seconds of a target forward over each n of the grid at ``prefix``. The grid is swept
        ``reps`` times, keeping each size's minimum: a burst of noise from another process then
        spoils one sample of several sizes, not every sample of one."""
        from eagle2_kernels.models.target import DecodeContext

        ad, tc, dev, B = self.ad, self.tc, self.dev, self.batch
        tc.set_length(prefix)
        calls = []
        for n in self.n_grid:
            ids = torch.randint(0, ad.vocab_size, (B, n), generator=self.gen).to(dev)
            pos = (prefix + torch.arange(n)).to(dev).expand(B, n)
            ctx = DecodeContext(tc, prefix, self._rows_mask(n), n, self.cfg.backend)
            calls.append(lambda ids=ids, pos=pos, ctx=ctx: ad.forward(ids, pos, ctx))
        for call in calls:  # warm-up: first calls of a shape build kernels / allocate
            call()
        best = [float("inf")] * len(calls)
        for _ in range(reps):
            for i, call in enumerate(calls):
                self.sync()
                t0 = time.perf_counter()
                call()
                self.sync()
                best[i] = min(best[i], time.perf_counter() - t0)
            self.tick()
        return _monotone(best)

    def draft_steps(self, reps: int) -> list[float]:
        """Seconds of one draft step over k rows: head forward with tree attention, lm_head,
        tree_expand."""
        from eagle2_kernels import ops
        from eagle2_kernels.cache import StaticKVCache

        head, dev, B, P = self.head, self.dev, self.batch, self.short_prefix
        dtype, backend, K = self.ad.dtype, self.cfg.backend, self.cfg.top_k
        dc = StaticKVCache(1, B, head.num_kv_heads, P + 2 * self.k_top + 1, head.head_dim, dtype, dev)
        dc.set_length(P)
        draft = []
        for k in self.k_grid:
            feats = torch.randn(B, k, head.hidden_size, generator=self.gen).to(device=dev, dtype=dtype)
            toks = torch.randint(0, self.ad.vocab_size, (B, k), generator=self.gen).to(dev)
            pos = torch.full((B, k), P, dtype=torch.int64, device=dev)
            m, parent = self._rows_mask(k), torch.zeros(B, k, dtype=torch.float32, device=dev)

            def step():
                hs = head.tree_step(feats, toks, pos, dc, [P] * B, m, k, backend)
                return ops.tree_expand(head.logits(hs), parent, min(K, head.draft_vocab_size),
                                       head.draft_to_target, backend=backend)

            # In a round a draft step follows a target forward, which has pushed the head's
            # weights out of the caches: time it the same way (a step timed back to back
            # reads them from cache, ~1 ms less per step for a 135M target on a 2-core CPU).
            draft.append(_timed(step, reps, self.sync, before=self.evict))
            self.tick()
        return draft

    def evict(self) -> None:
        """A one-token target forward (untimed): what precedes a draft step in a round."""
        from eagle2_kernels.models.target import DecodeContext

        B, P = self.batch, self.short_prefix
        self.tc.set_length(P)
        ids = torch.zeros(B, 1, dtype=torch.int64, device=self.dev)
        pos = torch.full((B, 1), P, dtype=torch.int64, device=self.dev)
        self.ad.forward(ids, pos, DecodeContext(self.tc, P, self._rows_mask(1), 1, self.cfg.backend))

    def round_overhead(self, reps: int) -> float:
        """Seconds of tree_build over the full candidate set, verify and compaction."""
        from eagle2_kernels import ops

        dev, B, gen, backend, tc = self.dev, self.batch, self.gen, self.cfg.backend, self.tc
        C = self.cfg.num_candidates
        T = min(self.cfg.total_tokens, C + 1)
        vocab = self.ad.vocab_size
        scores = -torch.rand(B, C, generator=gen).to(dev).cumsum(1)
        cand = torch.randint(0, vocab, (B, C), generator=gen).to(dev)
        parents = torch.full((B, C), -1, dtype=torch.int64, device=dev)
        root = torch.zeros(B, dtype=torch.int64, device=dev)
        logits = torch.randn(B, T, vocab, generator=gen).to(device=dev, dtype=self.ad.dtype)
        tc.set_length(self.short_prefix)

        def overhead():
            tree = ops.tree_build(cand, scores, parents, root, T, backend=backend)
            path, alen, bonus = ops.verify_greedy(tree, logits, backend=backend)
            tc.compact(path, alen, backend=backend)
            return torch.cat([alen.view(B, 1), bonus.view(B, 1)], 1).tolist()

        over = _timed(overhead, reps, self.sync)
        self.tick()
        return over


def measure(adapter, head, config, batch: int = 1, n_max: int | None = None, reps: int = 5,
            progress=None, prefixes: tuple[int, int] = (64, 512)) -> CostModel:
    """Time the pieces of a round for a target (``adapter``: a TargetAdapter), a draft head (or
    None) and a DecodeConfig on the target's device, for ``batch`` sequences.

    Runs target forwards over n = 1..n_max new tokens (on a grid) with our tree attention at a
    short and a long prefix (``prefixes``, clipped to the model's positions), draft steps over
    1..max(K, D+2) rows, and one round's tree bookkeeping, all over scratch caches (a decoder's
    own are untouched). A few seconds on a small CPU model. ``progress(done, total)`` is called
    after every timing when given.
    """
    n_max = int(n_max or config.total_tokens)
    short_prefix, long_prefix = prefixes
    limit = adapter.max_positions or (long_prefix + n_max + 1)
    long_prefix = max(min(long_prefix, limit - n_max - 1), 1)
    short_prefix = max(min(short_prefix, long_prefix), 1)
    t = _Timings(adapter, head, config, batch, n_max, (short_prefix, long_prefix), progress)
    t.total = 2 * reps + (1 if head is None else len(t.k_grid)) + 1
    with torch.no_grad():
        short = t.target_curve(short_prefix, reps)
        long = t.target_curve(long_prefix, reps) if long_prefix > short_prefix else list(short)
        short = [min(a, b) for a, b in zip(short, long)]  # a shorter prefix is never slower
        if head is None:  # no draft head (lookup trees alone): no draft forward to time
            k_grid, draft = (1,), [0.0]
        else:
            k_grid, draft = t.k_grid, t.draft_steps(reps)
        over = t.round_overhead(reps)
    info = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **cost_key(adapter, head, config, batch)}
    return CostModel(n_grid=t.n_grid, target_short_s=tuple(short), target_long_s=tuple(long),
                     short_prefix=short_prefix, long_prefix=long_prefix, k_grid=k_grid,
                     draft_step_s=tuple(draft), round_overhead_s=over, info=info)


def _read_entry(path: Path, key: dict) -> CostModel | None:
    """The cached cost model at ``path`` if it is a valid entry for ``key``, else None.

    The cache only saves time, so nothing in it is fatal: an entry of an older schema or
    another key is silently replaced; an unreadable one (truncated by a crash, edited by hand,
    not JSON) is replaced after a warning that names the file and what is wrong with it."""
    import warnings

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError
        problem = f"not readable JSON ({type(exc).__name__}: {exc})"
    else:
        if not isinstance(data, dict):
            problem = f"a JSON {type(data).__name__}, not an object"
        elif data.get("schema") != SCHEMA:
            return None  # written by another version of this package: measure again quietly
        else:
            try:
                cm = CostModel.from_json(data)
            except Exception as exc:  # any malformed field: missing, wrong type, bad value
                problem = f"not a valid cost model ({type(exc).__name__}: {exc})"
            else:
                return cm if cm.info.get("key") == key else None
    warnings.warn(
        f"cost model cache entry {path} is damaged: {problem}; expected a JSON object written by "
        f"eagle2_kernels.runtime.costmodel (schema {SCHEMA}). Measuring again and replacing it.",
        stacklevel=3,
    )
    return None


def load(adapter, head, config, batch: int = 1, remeasure: bool = False, progress=None) -> CostModel:
    """The cost model of a (target adapter, head, config) for ``batch``: from the on-disk cache when one was
    measured for the same key, else measured now and written there (``remeasure`` forces it).
    The cache write is atomic (temporary file + rename); an unwritable cache only warns, and a
    damaged entry is measured again (with a warning naming the file), never fatal."""
    key = cost_key(adapter, head, config, batch)
    path = cache_path(key)
    if not remeasure and path.is_file():
        cm = _read_entry(path, key)
        if cm is not None:
            return cm
    cm = measure(adapter, head, config, batch=batch, progress=progress)
    cm = CostModel(**{**{f: getattr(cm, f) for f in cm.__dataclass_fields__}, "info": {**cm.info, "key": key}})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cm.to_json(), indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        import warnings

        warnings.warn(f"could not cache the cost model at {path}: {exc}", stacklevel=2)
    return cm
