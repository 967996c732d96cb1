"""Microbenchmark: tree_attention vs the plain way (dense float mask + SDPA, GQA heads expanded).

Llama-3-8B attention heads (Hq 32, Hkv 8, Dh 128), the verify forward of a T = 60 tree over
prefixes of 1k to 32k slots, plus one draft-expansion shape (Tq = 10 frontier nodes over a
40-node partial tree). The plain way slices the cache to prefix + T, repeats the kv heads
(as HF's repeat_kv does) and calls SDPA with a prebuilt additive float mask [Tq, prefix + T]
(building the mask is not timed). Each row is checked against the plain way first; a mismatch
prints no speedup.

On a GPU (bfloat16): median / p20 / p80 ms via do_bench, CUDA-graph replay ms, and the share
of the HBM bound (K and V of prefix + T read once) reached. On CPU (float32) it says so and
times the CPU path of the op (the reference, or the native extension when built).

    python -m bench.bench_tree_attention [--json PATH] [--quick]
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from bench.common import add_timings, bench, bench_args, check_row, device_and_dtype, finish, print_cpu_note
from eagle2_kernels._backend import select_backend
from eagle2_kernels.ops import tree_attention
from eagle2_kernels.ops.tree import pack_bits, unpack_bits

HQ, HKV, DH, T = 32, 8, 128, 60
# Peak HBM bandwidth in bytes/s by device name (vendor figures), for the bandwidth bound.
PEAK_BW = {"H100": 3.35e12, "H200": 4.8e12, "H800": 3.35e12, "A100": 2.0e12}


def tree_rows(num_nodes: int, rng: random.Random) -> torch.Tensor:
    """Ancestor-or-self packed mask [num_nodes, W] of a random parents-first tree."""
    parents = [-1] + [rng.randrange(max(0, i - 12), i) for i in range(1, num_nodes)]
    rows = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    for i in range(num_nodes):
        n = i
        while n >= 0:
            rows[i, n] = True
            n = parents[n]
    return pack_bits(rows)


def dense_mask(packed: torch.Tensor, prefix: int, tree_len: int, dtype) -> torch.Tensor:
    """The plain way's additive mask [Tq, prefix + tree_len]: 0 visible, -inf hidden."""
    bits = unpack_bits(packed, tree_len)
    vis = torch.cat([torch.ones(packed.shape[0], prefix, dtype=torch.bool, device=packed.device),
                     bits], dim=1)
    zero = torch.zeros((), dtype=dtype, device=packed.device)
    return torch.where(vis, zero, torch.tensor(float("-inf"), dtype=dtype, device=packed.device))


def peak_bw() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BW.items() if key in name), None)


def run_case(mode: str, prefix: int, tq: int, tree_len: int, device: str, dtype) -> dict:
    rng = random.Random(prefix + tq)
    lmax = prefix + tree_len + 64
    g = torch.Generator(device="cpu").manual_seed(prefix)
    q = torch.randn(1, HQ, tq, DH, generator=g).to(device, dtype)
    cache = torch.randn(2, 1, HKV, lmax, DH, generator=g).to(device, dtype)
    k, v = cache[0], cache[1]
    packed = tree_rows(tree_len, rng)[tree_len - tq:].to(device)  # the last tq nodes query
    prefix_len = torch.tensor([prefix], dtype=torch.int32, device=device)
    mask = dense_mask(packed, prefix, tree_len, dtype)
    group = HQ // HKV

    def ours():
        return tree_attention(q, k, v, prefix_len, packed[None], tree_len)

    def plain():
        kk = k[:, :, : prefix + tree_len].repeat_interleave(group, dim=1)
        vv = v[:, :, : prefix + tree_len].repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    row = {"mode": mode, "prefix": prefix, "Tq": tq, "tree_len": tree_len,
           "dtype": str(dtype).split(".")[-1], "backend": select_backend(q)}
    a, b = ours().float(), plain().float()
    err = (a - b).abs().max().item()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    row["max_abs_diff"] = err
    if not check_row(row, math.isfinite(err) and err <= tol, f" (tol {tol})"):
        return row
    t_ours, t_plain = bench(ours, device), bench(plain, device)
    add_timings(row, t_ours, t_plain, device)
    if device == "cuda":
        bw = peak_bw()
        moved = 2 * HKV * (prefix + tree_len) * DH * cache.element_size()
        moved += 2 * q.numel() * q.element_size()  # q in, out back
        row["GB/s"] = moved / (t_ours["median_ms"] * 1e-3) / 1e9
        if bw is not None:
            row["hbm_bound_frac"] = moved / bw / (t_ours["median_ms"] * 1e-3)
    return row


def main(argv=None) -> None:
    args = bench_args(__doc__, "small sizes (the CPU default)", argv)
    device, dtype = device_and_dtype()
    quick = args.quick or device == "cpu"
    prefixes = [1024, 4096] if quick else [1024, 4096, 8192, 32768]
    if device == "cpu":
        print_cpu_note(f", float32, {'quick sizes' if quick else 'full sizes'}")
    rows = [run_case("verify", p, T, T, device, dtype) for p in prefixes]
    rows.append(run_case("draft", prefixes[1], 10, 40, device, dtype))
    finish(args.json, "tree_attention (Hq 32, Hkv 8, Dh 128, B 1)", rows, "tree_attention")


if __name__ == "__main__":
    main()
