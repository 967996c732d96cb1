"""Microbenchmark: the paged ops vs the plain-torch way (gather the pages, call the dense op).

- ``tree_attention_paged``: the verify forward of a T-node tree over a paged pool (pages
  shuffled through a block table). The plain way gathers each sequence's logical slots
  0 .. prefix + T - 1 into a dense [B, Hkv, L, Dh] cache with one advanced-indexing copy
  (``k_pages[block_table[:, pos // ps], pos % ps]``) and calls the dense ``tree_attention``.
- ``kv_compact_paged``: after the verify step each sequence keeps a path of a few nodes; the
  plain way converts the logical moves to (page, slot) pairs once (not timed) and loops over
  the 2 x layers page tensors with ``pool[n, dst_page, dst_slot] = pool[n, src_page, src_slot]``.
- ``remap_slots``: the page-size-1 commit; the plain way is the per-sequence torch code an
  engine would write (gather the path's slots, mask out the rejected ones, write back).

Every row is checked first (attention within float tolerance, the other two exact); a
mismatch prints no speedup. GPU (bfloat16): Llama-3-8B shapes (Hq 32, Hkv 8, Dh 128,
32 layers), T = 60, prefix 4096, pages of 16; medians and 20/80 percentiles via do_bench and
CUDA-graph replay. CPU (float32): SmolLM2-135M shapes (Hq 9, Hkv 3, Dh 64, 30 layers), T = 16,
prefix 512, pages of 16; wall-clock medians of the CPU path (on CPU the paged attention itself
gathers and runs the dense kernel, so expect a ratio near 1 there; the Triton kernels are not
timed).

    python -m bench.bench_paged [--json PATH] [--quick]
"""

from __future__ import annotations

import json
import math
import os
import random

import torch

from bench.common import (add_timings, bench, bench_args, check_row, device_and_dtype, environment,
                          finish, print_cpu_note)
from eagle2_kernels._backend import select_backend
from eagle2_kernels.ops import kv_compact_paged, remap_slots, tree_attention, tree_attention_paged
from eagle2_kernels.ops.tree import pack_bits

GPU_SHAPE = dict(Hq=32, Hkv=8, Dh=128, layers=32, T=60, prefix=4096, page=16)
CPU_SHAPE = dict(Hq=9, Hkv=3, Dh=64, layers=30, T=16, prefix=512, page=16)


def tree_mask(T: int, rng: random.Random) -> torch.Tensor:
    """Packed ancestor-or-self rows [T, W] of a random parents-first tree."""
    parents = [-1] + [rng.randrange(max(0, i - 8), i) for i in range(1, T)]
    rows = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        n = i
        while n >= 0:
            rows[i, n] = True
            n = parents[n]
    return pack_bits(rows)


def block_table(lengths: list[int], page: int, rng: random.Random, device) -> tuple[torch.Tensor, int]:
    """Shuffled distinct pages for each sequence: (table [B, max_blocks] int32, num_blocks)."""
    need = [math.ceil(n / page) for n in lengths]
    num_blocks = sum(need) + 4
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    table = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    for b, m in enumerate(need):
        table[b, :m] = torch.tensor([ids.pop() for _ in range(m)])
    return table.to(device), num_blocks


def gather_dense(pages: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The plain way's gather: logical slots 0 .. length-1 of every sequence -> [B, Hkv, L, Dh]
    (sequences shorter than ``length`` read their last page's slots past their end: unused)."""
    ps = pages.shape[1]
    pos = torch.arange(length, device=pages.device)
    blocks = table[:, (pos // ps).clamp(max=table.shape[1] - 1)].long()
    return pages[blocks, pos % ps].permute(0, 2, 1, 3)


def attention_case(B: int, s: dict, device, dtype) -> dict:
    rng = random.Random(B)
    T, P, ps = s["T"], s["prefix"], s["page"]
    prefixes = [P - 37 * b for b in range(B)]  # unequal lengths, odd page fill
    lengths = [p + T for p in prefixes]
    table, nb = block_table(lengths, ps, rng, device)
    k_pages = torch.randn(nb, ps, s["Hkv"], s["Dh"], device=device, dtype=dtype)
    v_pages = torch.randn(nb, ps, s["Hkv"], s["Dh"], device=device, dtype=dtype)
    q = torch.randn(B, s["Hq"], T, s["Dh"], device=device, dtype=dtype)
    mask = torch.stack([tree_mask(T, rng) for _ in range(B)]).to(device)
    prefix_len = torch.tensor(prefixes, dtype=torch.int32, device=device)
    L = max(lengths)

    def ours():
        return tree_attention_paged(q, k_pages, v_pages, table, prefix_len, mask, T)

    def plain():
        k, v = gather_dense(k_pages, table, L), gather_dense(v_pages, table, L)
        return tree_attention(q, k, v, prefix_len, mask, T)

    row = {"op": "tree_attention_paged", "B": B, "case": f"T {T}, prefix {P}, page {ps}",
           "dtype": str(dtype).split(".")[-1], "backend": select_backend(q)}
    err = (ours().float() - plain().float()).abs().max().item()
    if not check_row(row, err <= (2e-2 if dtype == torch.bfloat16 else 1e-4), f" {err:.3g}"):
        return row
    return add_timings(row, bench(ours, device), bench(plain, device), device)


def compact_case(B: int, accepted: int, s: dict, device, dtype) -> dict:
    rng = random.Random(100 + B)
    T, P, ps, N = s["T"], s["prefix"], s["page"], 2 * s["layers"]
    prefixes = [P - 5 * b for b in range(B)]
    table, nb = block_table([p + T for p in prefixes], ps, rng, device)
    pool = torch.randn(N, nb, ps, s["Hkv"], s["Dh"], device=device, dtype=dtype)
    paths = [[0] + sorted(rng.sample(range(1, T), accepted - 1)) for _ in range(B)]
    path = torch.tensor([p + [-1] * (T - accepted) for p in paths], device=device)
    prefix_len = torch.tensor(prefixes, device=device)
    accept_len = torch.full((B,), accepted, device=device)
    # The plain way's (page, slot) pairs, built once.
    src = torch.cat([torch.tensor(p, device=device) + prefixes[b] for b, p in enumerate(paths)])
    dst = torch.cat([torch.arange(accepted, device=device) + prefixes[b] for b in range(B)])
    seq = torch.arange(B, device=device).repeat_interleave(accepted)
    sp, ss = table[seq, src // ps].long(), src % ps
    dp, ds = table[seq, dst // ps].long(), dst % ps

    def ours(x):
        return lambda: kv_compact_paged(x, table, prefix_len, path, accept_len)

    def plain(x):
        def run():
            for n in range(N):
                x[n, dp, ds] = x[n, sp, ss]
        return run

    row = {"op": "kv_compact_paged", "B": B,
           "case": f"{s['layers']} layers, {accepted} of {T} accepted, page {ps}",
           "dtype": str(dtype).split(".")[-1], "backend": select_backend(pool)}
    a, b = pool.clone(), pool.clone()
    ours(a)()
    plain(b)()
    ints = torch.int16 if a.element_size() == 2 else torch.int32
    if not check_row(row, torch.equal(a.view(ints), b.view(ints))):
        return row
    # Repeating a compaction on its own output is the same amount of work: time in place.
    return add_timings(row, bench(ours(a), device), bench(plain(b), device), device)


def remap_case(B: int, accepted: int, s: dict, device) -> dict:
    rng = random.Random(200 + B)
    T, P = s["T"], s["prefix"]
    ctx = P + T + 8
    table = torch.randperm(B * ctx * 2, device=device)[: B * ctx].view(B, ctx).int()
    prefixes = [P - 3 * b for b in range(B)]
    paths = [[0] + sorted(rng.sample(range(1, T), accepted - 1)) for _ in range(B)]
    path = torch.tensor([p + [-1] * (T - accepted) for p in paths], device=device)
    prefix_len = torch.tensor(prefixes, device=device)
    accept_len = torch.full((B,), accepted, device=device)
    nodes = torch.tensor(paths, device=device)

    def ours(x):
        return lambda: remap_slots(x, prefix_len, path, accept_len)

    def plain(x):
        def run():
            acc, free = [], []
            for b in range(B):
                tree = x[b, prefixes[b]: prefixes[b] + T].clone()
                keep = torch.zeros(T, dtype=torch.bool, device=device)
                keep[nodes[b]] = True
                acc.append(tree[nodes[b]])
                free.append(tree[~keep])
                x[b, prefixes[b]: prefixes[b] + accepted] = acc[-1]
            return torch.stack(acc), torch.stack(free)
        return run

    row = {"op": "remap_slots", "B": B, "case": f"{accepted} of {T} accepted, page 1",
           "dtype": "int32", "backend": select_backend(table)}
    a, b = table.clone(), table.clone()
    got_acc, got_free, _ = ours(a)()
    want_acc, want_free = plain(b)()
    same = (torch.equal(a, b) and torch.equal(got_acc[:, :accepted], want_acc)
            and torch.equal(got_free[:, : T - accepted], want_free))
    if not check_row(row, same):
        return row
    return add_timings(row, bench(ours(a), device), bench(plain(b), device), device)


def main(argv=None) -> None:
    args = bench_args(__doc__, "fewer rows (the CPU default)", argv)
    device, dtype = device_and_dtype()
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    quick = args.quick or device == "cpu"
    if device == "cpu":
        print_cpu_note(f", float32, prefix {shape['prefix']}", ops="paged ops",
                       kernels="kernels are")
    batches = [1, 4] if quick else [1, 4, 16]
    rows = [attention_case(b, shape, device, dtype) for b in batches]
    rows += [compact_case(b, 5, shape, device, dtype) for b in batches]
    rows += [remap_case(b, 5, shape, device) for b in batches]
    name = f"paged ops vs gather + dense ({shape})"
    if args.json:  # the common header plus the CPU model, which the ratios depend on
        with open(args.json, "w") as f:
            json.dump({"benchmark": name, "environment": {**environment(), "cpu": cpu_info()},
                       "rows": rows}, f, indent=2)
    finish(None, name, rows, "paged")


def cpu_info() -> dict:
    """CPU model name, core count, AVX-512 BF16 flag (/proc/cpuinfo) and the 1-minute load
    average at the end of the run (other processes on the cores move CPU timings)."""
    info = {"model_name": None, "avx512_bf16": None, "cores": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["model_name"] is None:
            info["model_name"] = line.split(":", 1)[1].strip()
        if line.startswith("flags") and info["avx512_bf16"] is None:
            info["avx512_bf16"] = "avx512_bf16" in line.split()
    return info


if __name__ == "__main__":
    main()
