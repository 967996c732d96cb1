"""Continuous-batching engine: tokens/s against the number of concurrent requests, batched vs
one request at a time (examples/continuous_engine.py), greedy.

For each concurrency N (default 1, 2, 4, 8) the same N requests are served
    batched     by one engine with N batch rows, all N submitted at once (one speculative round
                for all running requests per step; requests leave when done)
    sequential  one at a time through the same engine with one batch row (the sum of the
                single-request runs of those N requests)
and, as the floor, plain greedy decoding (transformers ``generate``, one request at a time).
Correctness first: every engine output (both modes) must equal that request's plain greedy
output token for token (float32 only: in bf16 batched numerics may flip near-ties); a mismatch
prints no speedup and exits 1. One warm-up engine run is excluded; every time is the best of ``--repeat`` runs (the modes
interleaved), because the cores may be shared.

    python -m bench.bench_engine                               # default model (SmolLM2-135M) fp32
    python -m bench.bench_engine --model tiny --new-tokens 48  # tiny random Llama + a quickly trained head
    python -m bench.bench_engine --json bench/results/cpu/engine_default_fp32.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from bench.common import environment

ENGINE_PATH = Path(__file__).resolve().parent.parent / "examples" / "continuous_engine.py"

# Short chat prompts for the default model (its ChatML template is applied).
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give three tips for better sleep.",
    "What is the capital of France, and why is it famous?",
    "Describe how photosynthesis works.",
    "Write a Python function that reverses a string.",
    "Summarize the plot of Romeo and Juliet.",
    "List the planets of the solar system in order.",
]


def _engine_module():
    spec = importlib.util.spec_from_file_location("continuous_engine", ENGINE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cpu_info() -> dict:
    """The CPU model line and whether the CPU has AVX512-BF16 (native bf16 matmul)."""
    name, flags = None, ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if name is None and line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    return {"cpu_model": name, "avx512_bf16": "avx512_bf16" in flags.split(), "cores": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def load_default(dtype):
    from eagle2_kernels.models.default import default_head_path, load_default as load
    from eagle2_kernels.models.draft_head import EagleDraftHead

    model, tok = load(dtype=dtype)
    head = EagleDraftHead.from_pretrained(str(default_head_path()), target=model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_tensors="pt") for p in PROMPTS]
    prompts = [p["input_ids"] if not torch.is_tensor(p) else p for p in prompts]
    return model, head, [p[0].tolist() for p in prompts], "SmolLM2-135M-Instruct + shipped head"


def load_tiny(dtype):
    """A peaked tiny Llama (2 layers, hidden 64, vocab 320; real Llama-3-8B: 32 / 4096 / 128256)
    and a head trained for ~1 s on its own greedy continuations of the benchmark's prompts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eagle2_kernels.models.draft_head import EagleDraftHead

    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    torch.manual_seed(7)
    prompts = torch.randint(0, 320, (8, 6))
    with torch.no_grad():
        seqs = model.generate(prompts, max_new_tokens=64, do_sample=False)
        out = model(seqs, output_hidden_states=True)
    feats, target_tok = out.hidden_states[-1], out.logits.argmax(-1)
    head = EagleDraftHead.from_target(model)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(200):
        pred = head(feats[:, :-1], seqs[:, 1:])
        loss = torch.nn.functional.cross_entropy(head.logits(pred).reshape(-1, 320), target_tok[:, 1:].reshape(-1)) \
            + 10.0 * torch.nn.functional.smooth_l1_loss(pred, feats[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval().requires_grad_(False)
    return model.to(dtype), head.to(dtype), prompts.tolist(), "tiny Llama (2x64, V=320) + trained head"


def serve(ce, model, head, prompts, n_new, max_batch, tree, block_size):
    """Run ``prompts`` through a fresh engine with ``max_batch`` rows; (outputs, seconds, engine)."""
    T, D, K = tree
    eng = ce.ContinuousEngine(model, head, total_tokens=T, depth=D, top_k=K, block_size=block_size,
                              max_batch=max_batch, max_model_len=max(map(len, prompts)) + n_new)
    t0 = time.perf_counter()
    rids = [eng.add_request(p, n_new) for p in prompts]
    eng.run()
    return [eng.requests[r].output for r in rids], time.perf_counter() - t0, eng


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["default", "tiny"], default="default")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--tree", default="8,3,4", help="T,D,K of the engine's fixed tree")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on shared cores OpenMP spin-waiting makes 2 far slower)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is kept")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    tree = tuple(int(x) for x in args.tree.split(","))
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    ce = _engine_module()
    model, head, prompts, label = (load_default if args.model == "default" else load_tiny)(dtype)
    n_max = max(levels)
    if n_max > len(prompts):
        ap.error(f"at most {len(prompts)} concurrent requests (prompts available)")
    prompts = prompts[:n_max]
    n = args.new_tokens

    R = args.repeat

    # ---- plain greedy reference, one request at a time (also the correctness oracle)
    refs, plain_s = [None] * n_max, [float("inf")] * n_max
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(R):
            for i, p in enumerate(prompts):
                t0 = time.perf_counter()
                out = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=None,
                                     eos_token_id=None)
                plain_s[i] = min(plain_s[i], time.perf_counter() - t0)
                refs[i] = out[0, len(p):].tolist()
    serve(ce, model, head, prompts[:1], 4, 1, tree, args.block_size)  # warm-up

    exact = args.dtype == "fp32"
    ok = True
    solo_s, solo_tau = [float("inf")] * n_max, [None] * n_max
    batched = {N: (float("inf"), None, None) for N in levels}
    for _ in range(R):  # repeats interleave the modes; each time is the best of R
        # ---- one request at a time through the engine
        for i, p in enumerate(prompts):
            outs, secs, eng = serve(ce, model, head, [p], n, 1, tree, args.block_size)
            solo_s[i] = min(solo_s[i], secs)
            r = eng.requests[0]
            solo_tau[i] = sum(r.accept_lengths) / len(r.accept_lengths)
            if exact and outs[0] != refs[i]:
                print(f"MISMATCH: request {i} alone differs from plain greedy", file=sys.stderr)
                ok = False
        # ---- N at once
        for N in levels:
            outs, secs, eng = serve(ce, model, head, prompts[:N], n, N, tree, args.block_size)
            same = [o == r for o, r in zip(outs, refs[:N])]
            if exact and not all(same):
                print(f"MISMATCH: concurrency {N}: requests {[i for i, s in enumerate(same) if not s]} differ",
                      file=sys.stderr)
                ok = False
            if secs < batched[N][0]:
                batched[N] = (secs, outs, eng)
    rows = []
    for N in levels:
        secs, outs, eng = batched[N]
        tokens = sum(len(o) for o in outs)
        seq_s, pl_s = sum(solo_s[:N]), sum(plain_s[:N])
        lengths = [a for r in eng.requests.values() for a in r.accept_lengths]
        st = eng.stats
        rows.append({
            "concurrency": N, "new_tokens": tokens,
            "batched_s": secs, "batched_tok_s": tokens / secs,
            "sequential_s": seq_s, "sequential_tok_s": tokens / seq_s,
            "plain_s": pl_s, "plain_tok_s": tokens / pl_s,
            "batched_vs_sequential": seq_s / secs, "batched_vs_plain": pl_s / secs,
            "sequential_vs_plain": pl_s / seq_s,
            "rounds": st.rounds, "tau": sum(lengths) / len(lengths),
            "mean_batch": sum(st.batch_sizes) / len(st.batch_sizes),
            "draft_s": st.draft_s, "verify_s": st.verify_s, "prefill_s": st.prefill_s, "other_s": st.other_s,
            "exact": all(o == r for o, r in zip(outs, refs[:N])),
        })
    env = {**environment(), **cpu_info()}
    print(f"# {label}, {args.dtype}, tree T,D,K={tree}, block {args.block_size}, {n} new tokens per request, "
          f"threads {args.threads}")
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if not ok:
        print("output mismatch: no speedup reported", file=sys.stderr)
        return 1
    keys = ["concurrency", "new_tokens", "batched_tok_s", "sequential_tok_s", "plain_tok_s",
            "batched_vs_sequential", "batched_vs_plain", "tau", "mean_batch", "exact"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    if args.json:
        import json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"benchmark": "engine", "model": label, "dtype": args.dtype, "tree": list(tree),
                       "block_size": args.block_size, "new_tokens_per_request": n, "threads": args.threads,
                       "repeat": R, "solo_tau": solo_tau, "environment": env, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
