"""Which kernel multiplies by a model's bfloat16 weights: torch's, or ours for AVX2 CPUs.

On x86 CPUs with AVX-512-BF16 or AMX, torch's bf16 matmul (oneDNN) is fast at every row
count. On CPUs with only AVX2 + FMA it is not: each extra row of activations costs about what
the first one does, so a verify forward over a draft tree costs several plain forwards and a
prompt's prefill seconds. ``torch.ops.eagle2.linear_bf16w`` (``csrc/linear_bf16.cpp``, native
extension) widens each weight to fp32 and multiplies it against all rows while it is in L1.
Every linear of SmolLM2-135M (30 layers and the lm_head, weights streamed from memory) on a
2-core AMD EPYC with AVX2 only: 1 / 8 / 64 rows 17.8 / 117 / 965 ms with torch, 16.6 / 35.5 /
165 ms with the kernel (``bench/bench_matmul.py``, ``bench/results/cpu/matmul_avx2/``).

Which one a model uses is measured, not assumed from the CPU's name: :func:`choice` times both
on the model's own linear shapes at 1 and 8 rows once per machine (about a second) and keeps
the answer on disk (``$EAGLE2_KERNELS_CACHE/matmul/``), so every process, and every compiled
graph keyed by it, sees the same choice. The compiled forwards (target and draft head) are
traced with :func:`patched` active, so the choice is frozen into their graphs; the eager
forwards of the decoder apply it per call (``TargetAdapter.scoped``).

Both kernels compute fp32 products and sums with one rounding to bf16 at the end, differing
in the order of the fp32 sum. The decoder's plain loop and its speculative rounds use the
same forward, so its output is unchanged by speculation either way; fp32 models never use it.

``EAGLE2_KERNELS_MATMUL=torch`` (or ``eagle2``) overrides the measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import types
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["KERNEL_VERSION", "available", "bf16_linears", "choice", "linear", "linear_bf16w", "patched"]

KERNEL_VERSION = 1  # bump when csrc/linear_bf16.cpp changes what it computes
_ENV = "EAGLE2_KERNELS_MATMUL"
_CHOICES: dict = {}  # shapes -> "eagle2" | "torch", this process
_ACTIVE = [0]  # depth of `patched` bodies: `linear` uses the kernel inside them


def available() -> bool:
    """True when the native kernel is built and this CPU has AVX2 + FMA."""
    from eagle2_kernels import _native
    from eagle2_kernels.models.machine import cpu_info

    if not _native.available() or not hasattr(torch.ops.eagle2, "linear_bf16w"):
        return False
    flags = set(cpu_info()["flags"])
    return {"avx2", "fma"} <= flags


def linear_bf16w(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a bf16 ``weight`` [out, in] on CPU with the AVX2
    kernel: fp32 accumulation, the result in x's dtype (bf16 or fp32)."""
    _register_fake()
    return torch.ops.eagle2.linear_bf16w(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, through the kernel inside a :func:`patched` body when ``weight`` is bf16
    on the CPU (for a head's products with plain weight tensors, e.g. its lm_head rows)."""
    if _ACTIVE[0] and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        return torch.ops.eagle2.linear_bf16w(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


_FAKE = []


def _register_fake() -> None:
    """The operator's shape function, for tracing (registered once, on first use)."""
    from eagle2_kernels import _native

    if _FAKE or not _native.available() or not hasattr(torch.ops.eagle2, "linear_bf16w"):
        return
    _FAKE.append(True)

    @torch.library.register_fake("eagle2::linear_bf16w")
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def bf16_linears(module: torch.nn.Module) -> list:
    """The ``nn.Linear`` submodules of ``module`` whose weights are bf16 on the CPU.
    (Exactly ``nn.Linear``: a subclass may compute something else in its ``forward``.)"""
    return [m for m in module.modules() if type(m) is torch.nn.Linear
            and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]


def _shapes(linears: Iterable) -> list:
    """Distinct (out, in) weight shapes with their counts, largest first."""
    counts: dict = {}
    for m in linears:
        shape = tuple(m.weight.shape)
        counts[shape] = counts.get(shape, 0) + 1
    return sorted(([o, i, c] for (o, i), c in counts.items()), key=lambda s: -s[0] * s[1] * s[2])


def choice(module: torch.nn.Module) -> str:
    """'eagle2' when the AVX2 kernel is faster for ``module``'s bf16 linears on this machine,
    else 'torch' (no bf16 linears, no kernel, or torch measured faster)."""
    linears = bf16_linears(module)
    if not linears:
        return "torch"
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced in ("torch", "eagle2"):
        return forced if forced == "torch" or available() else "torch"
    if not available():
        return "torch"
    shapes = _shapes(linears)
    key = json.dumps(shapes)
    if key not in _CHOICES:
        _CHOICES[key] = _measured_choice(shapes)
    return _CHOICES[key]


def _measured_choice(shapes: list) -> str:
    """The faster kernel for these shapes, read from the disk cache or timed and stored."""
    from eagle2_kernels.models.machine import environment_key
    from eagle2_kernels.models.default import _file_lock, cache_dir

    key = {"shapes": shapes, "kernel": KERNEL_VERSION, "threads": torch.get_num_threads(), **environment_key()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "matmul" / f"{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.parent / f".{digest}.lock", timeout_s=600.0):
        with contextlib.suppress(OSError, ValueError, KeyError):
            return json.loads(path.read_text())["choice"]
        timings = _time_kernels(shapes)
        pick = "eagle2" if timings["eagle2"] < 0.9 * timings["torch"] else "torch"
        path.write_text(json.dumps({"choice": pick, "ms": timings, "key": key}, indent=1))
        return pick


def _time_kernels(shapes: list, rows=(1, 8), budget_s: float = 0.25) -> dict:
    """Milliseconds of one pass over every linear of ``shapes`` (random weights of the same
    shapes; shapes are what decide the speed), summed over ``rows``, for each kernel.
    Min over repeats: noise on a shared machine only adds time."""
    out = {"torch": 0.0, "eagle2": 0.0}
    gen = torch.Generator().manual_seed(0)
    for o, i, count in shapes:
        w = (torch.randn(o, i, generator=gen) * 0.05).to(torch.bfloat16)
        for m in rows:
            x = torch.randn(m, i, generator=gen).to(torch.bfloat16)
            for name, fn in (("torch", torch.nn.functional.linear), ("eagle2", linear_bf16w)):
                fn(x, w)
                best, t_end = float("inf"), time.perf_counter() + budget_s / len(rows) / 2
                for _ in range(50):
                    t0 = time.perf_counter()
                    fn(x, w)
                    best = min(best, time.perf_counter() - t0)
                    if t0 > t_end:
                        break
                out[name] += best * 1e3 * count
    return {k: round(v, 3) for k, v in out.items()}


def _forward(self, x: Tensor) -> Tensor:
    return torch.ops.eagle2.linear_bf16w(x, self.weight, self.bias)


@contextlib.contextmanager
def patched(linears: list):
    """Run the given ``nn.Linear`` modules, and :func:`linear`, through ``linear_bf16w`` inside
    the body (an instance attribute shadows the class's ``forward``; removed on the way out).
    An empty list: nothing changes."""
    if not linears:
        yield
        return
    _register_fake()
    # Straight into the instance dicts: nn.Module.__setattr__ costs ~2 us a module, and the
    # eager forwards enter this twice a round.
    saved = [(m.__dict__, m.__dict__.get("forward")) for m in linears]
    for m in linears:
        m.__dict__["forward"] = types.MethodType(_forward, m)
    _ACTIVE[0] += 1
    try:
        yield
    finally:
        _ACTIVE[0] -= 1
        for d, previous in saved:
            if previous is None:
                d.pop("forward", None)
            else:
                d["forward"] = previous

