"""Shared helpers for the benchmarks: timing, environment header, JSON/markdown output.

On a GPU, times are medians with 20/80 percentiles from ``triton.testing.do_bench`` plus a
CUDA-graph replay timing; on CPU, medians of wall-clock repeats (the benchmarks say so).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def environment() -> dict:
    """Device and versions, for the header of every result file."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def bench_cpu(fn: Callable[[], object], warmup: int = 2, repeat: int = 10) -> dict:
    """Median / p20 / p80 wall-clock milliseconds of ``fn()`` on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3]}


def bench_gpu(fn: Callable[[], object], graph: bool = True) -> dict:
    """Median / p20 / p80 ms via do_bench, plus CUDA-graph replay ms when capturable."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    out = {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            out["graph_ms"] = triton.testing.do_bench(g.replay)
        except Exception as exc:  # not capturable: say so instead of failing the benchmark
            out["graph_ms"] = None
            out["graph_error"] = type(exc).__name__
    return out


def bench(fn: Callable[[], object], device: str, **kw) -> dict:
    return bench_gpu(fn, **kw) if device == "cuda" else bench_cpu(fn)


def write_results(path: str | None, name: str, rows: list[dict]) -> None:
    """Print a markdown table of ``rows`` and, with ``path``, write JSON with the environment."""
    env = environment()
    print(f"# {name}  |  " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if rows:
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    if path:
        with open(path, "w") as f:
            json.dump({"benchmark": name, "environment": env, "rows": rows}, f, indent=2)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
