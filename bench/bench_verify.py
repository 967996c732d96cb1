"""Microbenchmark: verify_greedy / verify_sample on device vs the plain-torch way.

A T = 60 draft tree (EAGLE-2 defaults: branching 10, depth up to 6) over target logits
[B, 60, V] for V = 32000 (Llama-2), 128256 (Llama-3), 151936 (Qwen2). The root's first
child, and usually (3 in 4) any node's first child, holds its parent's most likely token,
so accepted paths are a few nodes long, as in real decoding.

The plain-torch way a user would write:
- greedy: ``logits.argmax(-1).tolist()`` (one device->host copy), a Python walk over the tree
  lists, then the path / length / bonus tensors back on the device;
- sampling: ``process_logits`` (the same processing as ours), then a Python walk per sequence
  reading ``p[token].item()`` for every child tried, zeroing and renormalising ``p`` on the
  device after a rejection, and an inverse-CDF bonus draw: one host sync per step.

Both are compared with the reference first (integer outputs, exact); a mismatch prints no
speedup and exits non-zero. On a GPU: median / p20 / p80 ms via do_bench and CUDA-graph replay
(ours only: the plain way syncs with the host). On CPU it says so and times the CPU path of the
op (reference or native extension) at V = 32000.

    python -m bench.bench_verify [--json PATH] [--quick]
"""

from __future__ import annotations


import torch

from bench.common import add_timings, bench, bench_args, check_row, device_and_dtype, finish, print_cpu_note
from eagle2_kernels._backend import select_backend
from eagle2_kernels.ops import DraftTree, verify_greedy, verify_sample
from eagle2_kernels.ops.sampling import process_logits, sample_from_probs
from eagle2_kernels.ops.tree import mask_words
from eagle2_kernels.ops.verify_greedy.reference import verify_greedy as ref_greedy
from eagle2_kernels.ops.verify_sample.reference import verify_sample as ref_sample

T, BRANCH, MAX_DEPTH = 60, 10, 6
SAMPLE_PARAMS = (0.7, 0.9, 0)  # temperature, top_p, top_k


def make_inputs(batch: int, vocab: int, device: str, dtype, seed: int):
    """Random EAGLE-like trees and logits in which each node's first child is its argmax."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.full((batch, T), -1, dtype=torch.int32)
    tokens = torch.randint(0, vocab, (batch, T), generator=g)
    depth = torch.zeros(batch, T, dtype=torch.int32)
    for b in range(batch):
        kids = [0] * T
        for i in range(1, T):
            while True:  # parents-first, up to BRANCH children, depth <= MAX_DEPTH
                p = int(torch.randint(0, min(i, 1 + i // 2), (), generator=g))
                if kids[p] < BRANCH and depth[b, p] < MAX_DEPTH:
                    break
            kids[p] += 1
            parents[b, i], depth[b, i] = p, depth[b, p] + 1
    logits = torch.randn(batch, T, vocab, generator=g) * 2.0
    for b in range(batch):
        seen = set()
        for i in range(1, T):
            p = int(parents[b, i])
            if p not in seen:  # first child: usually the argmax, with a clear margin
                seen.add(p)
                if p == 0 or float(torch.rand((), generator=g)) < 0.75:
                    logits[b, p, int(tokens[b, i])] = float(logits[b, p].max()) + 3.0
    tree = DraftTree(tokens, parents, depth, torch.zeros(batch, T, mask_words(T), dtype=torch.int32))
    return tree.to(device), logits.to(device=device, dtype=dtype)


def plain_greedy(tree: DraftTree, logits: torch.Tensor):
    best = logits.argmax(-1).tolist()
    toks, pars = tree.tokens.tolist(), tree.parents.tolist()
    paths, lens, bonus = [], [], []
    for b in range(len(toks)):
        path, cur = [0], 0
        for i in range(1, T):
            if pars[b][i] == cur and toks[b][i] == best[b][cur]:
                path.append(i)
                cur = i
        lens.append(len(path))
        bonus.append(best[b][cur])
        paths.append(path + [-1] * (T - len(path)))
    dev = logits.device
    return torch.tensor(paths, device=dev), torch.tensor(lens, device=dev), torch.tensor(bonus, device=dev)


def plain_sample(tree: DraftTree, logits: torch.Tensor, u: torch.Tensor, params):
    probs = process_logits(logits, *params)
    toks, pars, uu = tree.tokens.tolist(), tree.parents.tolist(), u.tolist()
    paths, lens, bonus = [], [], []
    for b in range(len(toks)):
        path, cur = [0], 0
        p = probs[b, 0].double()
        for i in range(1, T):
            if pars[b][i] != cur:
                continue
            x = toks[b][i]
            px = p[x].item()
            if uu[b][i] < px:
                path.append(i)
                cur = i
                p = probs[b, i].double()
            elif px > 0:
                p = p.clone()
                p[x] = 0
                p = p / p.sum()
        bonus.append(int(sample_from_probs(p, u[b, 0].double())))
        lens.append(len(path))
        paths.append(path + [-1] * (T - len(path)))
    dev = logits.device
    return torch.tensor(paths, device=dev), torch.tensor(lens, device=dev), torch.tensor(bonus, device=dev)


def same(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def run_case(mode: str, batch: int, vocab: int, device: str, dtype) -> dict:
    tree, logits = make_inputs(batch, vocab, device, dtype, seed=vocab + batch)
    u = torch.rand(batch, T, generator=torch.Generator().manual_seed(batch)).to(device)
    if mode == "greedy":
        ours = lambda: verify_greedy(tree, logits)  # noqa: E731
        plain = lambda: plain_greedy(tree, logits)  # noqa: E731
        expected = ref_greedy(tree, logits)
    else:
        ours = lambda: verify_sample(tree, logits, u, *SAMPLE_PARAMS)  # noqa: E731
        plain = lambda: plain_sample(tree, logits, u, SAMPLE_PARAMS)  # noqa: E731
        expected = ref_sample(tree, logits, u, *SAMPLE_PARAMS)
    row = {"mode": mode, "B": batch, "T": T, "V": vocab, "dtype": str(dtype).split(".")[-1],
           "backend": select_backend(logits)}
    got_ours, got_plain = ours(), plain()
    ok = same(got_ours, expected) and same(got_plain, expected)
    row["mean_accept"] = float(expected[1].float().mean())
    if not check_row(row, ok):
        return row
    t_ours = bench(ours, device)
    t_plain = bench(plain, device, graph=False) if device == "cuda" else bench(plain, device)
    add_timings(row, t_ours, t_plain, device, plain_graph=False)
    if device == "cuda":
        if t_ours.get("graph_error"):
            row["graph_error"] = t_ours["graph_error"]
    return row


def main(argv=None) -> None:
    args = bench_args(__doc__, "V = 32000 and B = 1 only (the CPU default)", argv)
    device, dtype = device_and_dtype()
    quick = args.quick or device == "cpu"
    vocabs = [32000] if quick else [32000, 128256, 151936]
    batches = [1] if quick else [1, 4]
    if device == "cpu":
        print_cpu_note(", float32, V 32000", ops="ops", kernels="kernels are")
    rows = [run_case(m, b, v, device, dtype) for m in ("greedy", "sample") for v in vocabs for b in batches]
    finish(args.json, f"verify (T {T}; sampling: temperature {SAMPLE_PARAMS[0]}, top_p {SAMPLE_PARAMS[1]})", rows,
           "verify")


if __name__ == "__main__":
    main()
