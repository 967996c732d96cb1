"""Shared helpers for the benchmarks: timing, environment header, JSON/markdown output.

The environment header is ``eagle2_kernels.eval.environment.environment``, re-exported here.

On a GPU, times are medians with 20/80 percentiles from ``triton.testing.do_bench`` plus a
CUDA-graph replay timing; on CPU, medians of wall-clock repeats (the benchmarks say so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

# The result-file header (device, versions, commit, CPU): one implementation, in the package.
from eagle2_kernels.eval.environment import environment


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


def bench_args(doc: str, quick_help: str, argv=None) -> argparse.Namespace:
    """The options every op benchmark takes: ``--json PATH`` and ``--quick`` (``quick_help``
    says what it keeps); ``doc`` is the module docstring, its first line the description."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap.parse_args(argv)


def device_and_dtype() -> tuple[str, torch.dtype]:
    """("cuda", bfloat16) with a GPU, else ("cpu", float32) (bfloat16 is slow and lossy there)."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def print_cpu_note(detail: str = "", ops: str = "op", kernels: str = "kernel is") -> None:
    """The header line of a CPU run: what is timed instead of the Triton kernels."""
    print(f"# no GPU: timing the CPU path of the {ops} (reference or native extension){detail}; "
          f"the Triton {kernels} not timed")


def check_row(row: dict, ok: bool, note: str = "") -> bool:
    """Record the correctness gate in ``row["status"]`` ("ok" or "MISMATCH" + ``note``); the
    caller times and reports a speedup only when this returns True."""
    row["status"] = "ok" if ok else "MISMATCH" + note
    return ok


def add_timings(row: dict, t_ours: dict, t_plain: dict, device: str, *,
                plain_graph: bool = True, graph_speedup: bool = False) -> dict:
    """Add ours/plain medians (ms), our p20/p80 and the speedup (plain / ours) to a row whose
    gate passed; on CUDA also the graph-replay times (``plain_graph``) and their ratio
    (``graph_speedup``). Raises ValueError for a row that did not pass check_row."""
    if row.get("status") != "ok":
        raise ValueError(f"no timings for a row with status {row.get('status')!r}; only 'ok' rows")
    row["ours_ms"] = t_ours["median_ms"]
    row["ours_p20_ms"], row["ours_p80_ms"] = t_ours["p20_ms"], t_ours["p80_ms"]
    row["plain_ms"] = t_plain["median_ms"]
    row["speedup"] = t_plain["median_ms"] / t_ours["median_ms"]
    if device == "cuda":
        row["ours_graph_ms"] = t_ours.get("graph_ms")
        if plain_graph:
            row["plain_graph_ms"] = t_plain.get("graph_ms")
        if graph_speedup and row["ours_graph_ms"] and row.get("plain_graph_ms"):
            row["graph_speedup"] = row["plain_graph_ms"] / row["ours_graph_ms"]
    return row


def finish(path: str | None, name: str, rows: list[dict], label: str) -> None:
    """Print / write the rows (write_results), then exit non-zero if any row failed its gate."""
    write_results(path, name, rows)
    if any(r["status"] != "ok" for r in rows):
        raise SystemExit(f"{label} benchmark: output mismatch, no speedup reported")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
