"""bf16-weight linears: torch's kernel against ours (``torch.ops.eagle2.linear_bf16w``), per row count.

Every ``nn.Linear`` of a model (by default the embedded SmolLM2-135M-Instruct: 30 layers and the
lm_head), each with its own random bf16 weights of the model's shapes so that the weights stream
from memory as in a forward, timed over ``--rows`` rows of activations. Before timing, each
shape's output is checked against the fp32 product rounded once to bf16 (the kernel's contract).
Alternating rounds, median per kernel and row count.

    python bench/bench_matmul.py [--rows 1,2,4,8,16,32,64,128] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from eagle2_kernels.models import matmul
from eagle2_kernels.models.machine import cpu_info


def model_shapes() -> list:
    """(out, in) of every bf16 linear of the default model, in forward order."""
    from eagle2_kernels.models.default import load_default

    model, _ = load_default()
    return [tuple(m.weight.shape) for m in matmul.bf16_linears(model)]


def check(shapes, rows) -> float:
    """Largest error of the kernel against the correctly rounded product, in bf16 steps of the
    output's magnitude; raises when above one step."""
    worst = 0.0
    for o, i in sorted(set(shapes)):
        w = (torch.randn(o, i) * 0.05).to(torch.bfloat16)
        for m in rows:
            x = torch.randn(m, i).to(torch.bfloat16)
            exact = x.float() @ w.float().t()
            got = matmul.linear_bf16w(x, w).float()
            scale = (x.float().abs() @ w.float().abs().t()).clamp_min(1e-6)
            err = ((got - exact).abs() / scale).max().item() / 2 ** -8
            worst = max(worst, err)
            if err > 1.0:
                raise SystemExit(f"linear_bf16w is wrong for {o}x{i}, {m} rows: {err:.2f} bf16 steps")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not matmul.available():
        sys.exit("the kernel is unavailable here (needs the native extension and an AVX2 + FMA CPU)")
    rows = [int(r) for r in args.rows.split(",")]
    shapes = model_shapes()
    worst = check(shapes, rows)
    weights = [(torch.randn(o, i) * 0.05).to(torch.bfloat16) for o, i in shapes]
    kernels = {"torch": torch.nn.functional.linear, "eagle2": matmul.linear_bf16w}
    times = {k: {m: [] for m in rows} for k in kernels}
    for _ in range(args.rounds):
        for m in rows:
            xs = {i: torch.randn(m, i).to(torch.bfloat16) for i in {w.shape[1] for w in weights}}
            for name, fn in kernels.items():
                for w in weights:  # warm-up pass
                    fn(xs[w.shape[1]], w)
                t0 = time.perf_counter()
                for w in weights:
                    fn(xs[w.shape[1]], w)
                times[name][m].append((time.perf_counter() - t0) * 1e3)
    med = {k: {m: round(statistics.median(v), 2) for m, v in t.items()} for k, t in times.items()}
    info = cpu_info()
    print(f"# {info['cpu']} ({', '.join(info['flags'])}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# {len(shapes)} linears; kernel within {worst:.2f} bf16 steps of the exact product")
    print("rows  torch ms  eagle2 ms  speed-up")
    for m in rows:
        print(f"{m:>4}  {med['torch'][m]:>8.2f}  {med['eagle2'][m]:>9.2f}  {med['torch'][m] / med['eagle2'][m]:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "linears": len(shapes), "max_error_bf16_steps": worst, "median_ms": med,
                       "all_ms": times}, f, indent=1)


if __name__ == "__main__":
    main()
