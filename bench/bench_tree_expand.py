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


import torch

from bench.common import add_timings, bench, bench_args, check_row, device_and_dtype, finish, print_cpu_note
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
    if not check_row(row, ok):
        return row
    t_ours = bench(lambda: tree_expand(logits, parents, K, d2t), device)
    t_plain = bench(lambda: composite(logits, parents, K, d2t), device)
    return add_timings(row, t_ours, t_plain, device, graph_speedup=True)


def main(argv=None) -> None:
    args = bench_args(__doc__, "only V=32000", argv)
    device, dtype = device_and_dtype()
    if device == "cpu":
        print_cpu_note(", float32", kernels="kernels are")
    cases = [(1, 10, 32000, 10, False), (1, 10, 128256, 10, False), (1, 10, 151936, 10, False),
             (1, 1, 128256, 10, False), (1, 10, 32000, 10, True)]
    if args.quick:
        cases = [c for c in cases if c[2] == 32000]
    rows = [run_case(B, R, V, K, device, dtype, m) for B, R, V, K, m in cases]
    finish(args.json, "tree_expand vs log_softmax+topk+gather+topk", rows, "tree_expand")


if __name__ == "__main__":
    main()
