"""Microbenchmark: tree_build (one Triton program per sequence) vs a straightforward torch
composite, for the default EAGLE-2 tree: K=10, D=5 -> C = 10 + 5*100 = 510 candidates,
T = 60 nodes.

The composite is what one writes in plain torch without Python loops over nodes: topk of
the scores, sort the kept indices, map candidate -> node with a scatter, gather parents, then
walk every node up to the root one level at a time (D+1 steps, known from the draft depth) to
mark ancestors, and pack the mask bits with a weighted sum. It does not check for dropped
parents (ours does, on device). Both are compared with the reference first (exactly); a
mismatch prints no speedup. On a GPU: median / p20 / p80 ms via do_bench and CUDA-graph
replay ms. On CPU it says so and times the CPU path of the op (reference or extension).

    python -m bench.bench_tree_build [--json PATH] [--quick]
"""

from __future__ import annotations


import torch

from bench.common import add_timings, bench, bench_args, check_row, device_and_dtype, finish, print_cpu_note
from eagle2_kernels._backend import select_backend
from eagle2_kernels.ops import tree_build
from eagle2_kernels.ops.tree import pack_bits


def draft_candidates(B: int, K: int, D: int, device: str, seed: int = 0):
    """Candidates as the draft loop makes them (scores are log path probabilities)."""
    g = torch.Generator().manual_seed(seed)
    logp = lambda n: torch.log(torch.rand(B, n, generator=g) * 0.9 + 0.05)  # noqa: E731
    tokens, scores, parents = [torch.randint(0, 32000, (B, K), generator=g)], [logp(K)], [
        torch.full((B, K), -1)
    ]
    offset, front_scores, front = 0, scores[0], torch.arange(K).expand(B, K)
    for _ in range(D):
        child = front_scores.repeat_interleave(K, 1) + logp(K * K)
        tokens.append(torch.randint(0, 32000, (B, K * K), generator=g))
        parents.append((offset + front).repeat_interleave(K, 1))
        offset += scores[-1].shape[1]
        scores.append(child)
        front_scores, front = child.topk(K, dim=-1)
    return tuple(torch.cat(x, 1).to(device) for x in (tokens, scores, parents))


def composite(tokens, scores, parents, roots, T, max_depth):
    B, C = scores.shape
    dev = scores.device
    kept = scores.topk(T - 1, dim=-1).indices.sort(dim=-1).values  # [B, T-1]
    node_of = torch.full((B, C), -1, dtype=torch.int64, device=dev)
    node_of.scatter_(1, kept, torch.arange(1, T, device=dev).expand(B, T - 1))
    par = parents.long().gather(1, kept)
    par_node = torch.where(par < 0, 0, node_of.gather(1, par.clamp(min=0)))
    node_parents = torch.cat([torch.full((B, 1), -1, device=dev, dtype=torch.int64), par_node], 1)
    node_tokens = torch.cat([roots[:, None].long(), tokens.gather(1, kept).long()], 1)
    # walk up one level at a time, marking each ancestor and counting the depth
    anc = torch.eye(T, dtype=torch.bool, device=dev).expand(B, T, T).clone()
    depth = torch.zeros(B, T, dtype=torch.int64, device=dev)
    cur = node_parents
    for _ in range(max_depth):
        up = cur >= 0
        col = cur.clamp(min=0)[..., None]
        anc.scatter_(2, col, up[..., None] | anc.gather(2, col))
        depth += up.long()
        cur = torch.where(up, node_parents.gather(1, cur.clamp(min=0)), -1)
    mask = pack_bits(anc)
    return node_tokens, node_parents.to(torch.int32), depth.to(torch.int32), mask


def run_case(B: int, K: int, D: int, T: int, device: str) -> dict:
    tokens, scores, parents = draft_candidates(B, K, D, device, seed=B)
    roots = torch.zeros(B, dtype=torch.int64, device=device)
    C = scores.shape[1]
    row = {"B": B, "K": K, "D": D, "C": C, "T": T, "backend": select_backend(scores)}
    ours = tree_build(tokens, scores, parents, roots, T)
    ref = tree_build(tokens.cpu(), scores.cpu(), parents.cpu(), roots.cpu(), T, backend="reference")
    plain = composite(tokens, scores, parents, roots, T, D + 1)
    fields = (ref.tokens, ref.parents, ref.depth, ref.mask)
    got = (ours.tokens, ours.parents, ours.depth, ours.mask)
    ok = all(torch.equal(a.cpu(), b) for a, b in zip(got, fields))
    ok = ok and all(torch.equal(a.cpu(), b) for a, b in zip(plain, fields))
    if not check_row(row, ok):
        return row
    t_ours = bench(lambda: tree_build(tokens, scores, parents, roots, T), device)
    t_plain = bench(lambda: composite(tokens, scores, parents, roots, T, D + 1), device)
    return add_timings(row, t_ours, t_plain, device, graph_speedup=True)


def main(argv=None) -> None:
    args = bench_args(__doc__, "only B=1", argv)
    device, _ = device_and_dtype()  # int64 / float32 inputs on every device
    if device == "cpu":
        print_cpu_note()
    cases = [(1, 10, 5, 60), (8, 10, 5, 60)]
    if args.quick:
        cases = cases[:1]
    rows = [run_case(B, K, D, T, device) for B, K, D, T in cases]
    finish(args.json, "tree_build vs torch composite (C=510, T=60)", rows, "tree_build")


if __name__ == "__main__":
    main()
