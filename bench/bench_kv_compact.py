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

import random

import torch

from bench.common import add_timings, bench, bench_args, check_row, device_and_dtype, finish, print_cpu_note
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
    if not check_row(row, same):
        return row
    # Repeating a compaction on its own output is the same amount of work: time in place.
    t_ours, t_plain = bench(ours(a), device), bench(plain(b), device)
    return add_timings(row, t_ours, t_plain, device)


def main(argv=None) -> None:
    args = bench_args(__doc__, "small Lmax (the CPU default)", argv)
    device, dtype = device_and_dtype()
    quick = args.quick or device == "cpu"
    lmax = 512 if quick else 4096
    if device == "cpu":
        print_cpu_note(f", float32, Lmax {lmax}")
    rows = [run_case(b, a, lmax, device, dtype) for b, a in [(1, 5), (4, 5), (1, 8)]]
    finish(args.json, "kv_compact (32 layers, Hkv 8, Dh 128, T 60)", rows, "kv_compact")


if __name__ == "__main__":
    main()
