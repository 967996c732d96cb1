"""Microbenchmark: kv_compact (one launch) vs a per-layer index_select / index_copy_ loop.

A Llama-3-8B KV cache (32 layers: N = 64 K and V tensors, Hkv 8, Dh 128) after a verify step of
a T = 60 tree; each sequence accepted a path of a few nodes (random increasing node indices).
The plain way loops over the 64 tensors and the sequences: ``c.index_copy_(1, dst,
c.index_select(1, src))`` on ``cache[n, b]`` (index tensors built once, outside the timing).
Both results are compared bit for bit first; a mismatch prints no speedup.

On a GPU (bfloat16): median / p20 / p80 ms via do_bench and CUDA-graph replay ms. On CPU
(float32, smaller Lmax) it says so and times the CPU path of the op (reference or native
extension).

    python -m bench.bench_kv_compact [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import random

import torch

from bench.common import bench, write_results
from eagle2_kernels._backend import select_backend
from eagle2_kernels.ops import kv_compact

LAYERS, HKV, DH, T = 32, 8, 128, 60


def run_case(batch: int, accepted: int, lmax: int, device: str, dtype) -> dict:
    rng = random.Random(batch * 100 + accepted)
    n = 2 * LAYERS
    cache = torch.randn(n, batch, HKV, lmax, DH, device=device, dtype=dtype)
    prefixes = [rng.randrange(0, lmax - T) for _ in range(batch)]
    paths = [[0] + sorted(rng.sample(range(1, T), accepted - 1)) for _ in range(batch)]
    prefix_len = torch.tensor(prefixes, device=device)
    path = torch.tensor([p + [-1] * (T - accepted) for p in paths], device=device)
    accept_len = torch.full((batch,), accepted, device=device)
    src = [torch.tensor(p, device=device) + prefixes[b] for b, p in enumerate(paths)]
    dst = [torch.arange(accepted, device=device) + prefixes[b] for b in range(batch)]

    def ours(c):
        return lambda: kv_compact(c, prefix_len, path, accept_len)

    def plain(c):
        def run():
            for i in range(n):
                for b in range(batch):
                    layer = c[i, b]  # [Hkv, Lmax, Dh]
                    layer.index_copy_(1, dst[b], layer.index_select(1, src[b]))
        return run

    row = {"layers": LAYERS, "B": batch, "accepted": accepted, "Lmax": lmax,
           "dtype": str(dtype).split(".")[-1], "backend": select_backend(cache)}
    a, b = cache.clone(), cache.clone()
    ours(a)()
    plain(b)()
    same = torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                       b.view(torch.int16 if b.element_size() == 2 else torch.int32))
    row["status"] = "ok" if same else "MISMATCH"
    if not same:
        return row
    # Repeating a compaction on its own output is the same amount of work: time in place.
    t_ours, t_plain = bench(ours(a), device), bench(plain(b), device)
    row["ours_ms"] = t_ours["median_ms"]
    row["ours_p20_ms"], row["ours_p80_ms"] = t_ours["p20_ms"], t_ours["p80_ms"]
    row["plain_ms"] = t_plain["median_ms"]
    row["speedup"] = t_plain["median_ms"] / t_ours["median_ms"]
    if device == "cuda":
        row["ours_graph_ms"] = t_ours.get("graph_ms")
        row["plain_graph_ms"] = t_plain.get("graph_ms")
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="small Lmax (the CPU default)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    quick = args.quick or device == "cpu"
    lmax = 512 if quick else 4096
    if device == "cpu":
        print("# no GPU: timing the CPU path of the op (reference or native extension), float32, "
              f"Lmax {lmax}; the Triton kernel is not timed")
    rows = [run_case(b, a, lmax, device, dtype) for b, a in [(1, 5), (4, 5), (1, 8)]]
    write_results(args.json, "kv_compact (32 layers, Hkv 8, Dh 128, T 60)", rows)
    if any(r["status"] != "ok" for r in rows):
        raise SystemExit("kv_compact benchmark: output mismatch, no speedup reported")


if __name__ == "__main__":
    main()
