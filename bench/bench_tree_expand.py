"""Microbenchmark: tree_expand (fused kernels) vs log_softmax + topk + gather + topk in torch.

One draft expansion step at B=1 with R=K=10 frontier rows over the vocabularies of Llama-2
(32000), Llama-3 (128256) and Qwen2 (151936), plus the root expansion (R=1) at 128256.
The plain way a user writes it:

    logp = torch.log_softmax(logits.float(), -1)
    top_v, top_i = logp.topk(K, -1)
    child_scores = parent_scores[..., None] + top_v
    next_scores, next_index = child_scores.view(B, -1).topk(K, -1)
    child_tokens = draft_to_target[top_i]          (only with a reduced draft vocabulary)

Correctness first: our result must match the reference exactly in tokens and indices and
within 1e-5 in scores, and the plain way must agree in scores (its tie order is torch's);
a mismatch prints no speedup. On a GPU (bfloat16 logits): median / p20 / p80 ms via
do_bench and CUDA-graph replay ms. On CPU (float32) it says so and times the CPU path of
the op (reference or native extension) against the same composite.

    python -m bench.bench_tree_expand [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import bench, write_results
from eagle2_kernels._backend import select_backend
from eagle2_kernels.ops import tree_expand


def composite(logits, parent_scores, K, draft_to_target=None):
    B = logits.shape[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_v, top_i = logp.topk(K, dim=-1)
    child_scores = parent_scores[..., None] + top_v
    next_scores, next_index = child_scores.view(B, -1).topk(K, dim=-1)
    child_tokens = draft_to_target[top_i] if draft_to_target is not None else top_i
    return child_tokens, child_scores, next_index, next_scores


def run_case(B: int, R: int, V: int, K: int, device: str, dtype, mapped: bool) -> dict:
    g = torch.Generator().manual_seed(V + R)
    logits = (torch.randn(B, R, V, generator=g) * 3).to(dtype).to(device)
    parents = (torch.randn(B, R, generator=g) - 3).to(device)
    d2t = torch.randperm(2 * V, generator=g)[:V].to(device) if mapped else None
    row = {"B": B, "R": R, "V": V, "K": K, "dtype": str(dtype).split(".")[-1],
           "map": mapped, "backend": select_backend(logits)}

    ours = tree_expand(logits, parents, K, d2t)
    ref = tree_expand(logits.cpu(), parents.cpu(), K, None if d2t is None else d2t.cpu(),
                      backend="reference")
    plain = composite(logits, parents, K, d2t)
    ok = (
        torch.equal(ours[0].cpu(), ref[0])
        and torch.equal(ours[2].cpu(), ref[2])
        and torch.allclose(ours[1].cpu(), ref[1], rtol=1e-5, atol=1e-5)
        and torch.allclose(ours[3].cpu(), ref[3], rtol=1e-5, atol=1e-5)
        # the composite breaks ties its own way: compare its (sorted) scores only
        and torch.allclose(plain[1].cpu(), ref[1], rtol=1e-5, atol=1e-5)
        and torch.allclose(plain[3].cpu(), ref[3], rtol=1e-5, atol=1e-5)
    )
    row["status"] = "ok" if ok else "MISMATCH"
    if not ok:
        return row
    t_ours = bench(lambda: tree_expand(logits, parents, K, d2t), device)
    t_plain = bench(lambda: composite(logits, parents, K, d2t), device)
    row["ours_ms"] = t_ours["median_ms"]
    row["ours_p20_ms"], row["ours_p80_ms"] = t_ours["p20_ms"], t_ours["p80_ms"]
    row["plain_ms"] = t_plain["median_ms"]
    row["speedup"] = t_plain["median_ms"] / t_ours["median_ms"]
    if device == "cuda":
        row["ours_graph_ms"] = t_ours.get("graph_ms")
        row["plain_graph_ms"] = t_plain.get("graph_ms")
        if row["ours_graph_ms"] and row["plain_graph_ms"]:
            row["graph_speedup"] = row["plain_graph_ms"] / row["ours_graph_ms"]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="only V=32000")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        print("# no GPU: timing the CPU path of the op (reference or native extension), float32; "
              "the Triton kernels are not timed")
    cases = [(1, 10, 32000, 10, False), (1, 10, 128256, 10, False), (1, 10, 151936, 10, False),
             (1, 1, 128256, 10, False), (1, 10, 32000, 10, True)]
    if args.quick:
        cases = [c for c in cases if c[2] == 32000]
    rows = [run_case(B, R, V, K, device, dtype, m) for B, R, V, K, m in cases]
    write_results(args.json, "tree_expand vs log_softmax+topk+gather+topk", rows)
    if any(r["status"] != "ok" for r in rows):
        raise SystemExit("tree_expand benchmark: output mismatch, no speedup reported")


if __name__ == "__main__":
    main()
