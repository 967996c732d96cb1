"""Compiled vs eager target forwards, side by side in one run, with transformers' generate.

Methods (the default model, SmolLM2-135M-Instruct in bf16, and its shipped head; greedy):
  hf              transformers ``generate`` (eager, its default attention)
  plain-eager     our plain loop (``generate_plain``), eager forwards (``compile=False``)
  plain-compiled  our plain loop, compiled forwards (the default on CPU)
  eagle2-eager    the default adaptive EAGLE-2 tree (head + lookup), eager forwards
  eagle2-compiled the same with compiled forwards: what a user gets by default

Correctness first: an fp32 gate decodes two prompts of a tiny random Llama with compiled
forwards and compares them with transformers' greedy generate token for token; on a mismatch
nothing is timed. In bf16 the outputs are compared with ``hf`` (same count and mean common
prefix: tree-batched bf16 numerics flip near-ties, so equality is checked in fp32).

Every method decodes every prompt in rotation (the order rotates per prompt) after a warm-up;
compilation (about 40 s per bucket on 2 cores) and the cost-model measurement happen before
any timing and are reported as start-up.

    python bench/bench_compiled.py --limit 4 --max-new-tokens 128 --json out.json

``--startup`` measures start-up instead, each row a fresh process in turn over one empty cache
folder: per-process ``torch.compile`` (frozen, buckets 1/4/8; what every process paid before
the disk cache), the cached AOTInductor forward cold (it compiles and stores) and warm (a
second process loads it); each then times 1/4/8-token forwards at prefix 128 (min and median
of 40, after 5 warm-ups), with the eager forward as the baseline:

    python bench/bench_compiled.py --startup --json startup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lookup import prompts_of  # noqa: E402

from eagle2_kernels import DecodeConfig, TreeSpecDecoder  # noqa: E402
from eagle2_kernels.eval.environment import environment  # noqa: E402


def fp32_gate() -> bool:
    """Compiled forwards on a tiny random Llama in fp32 equal transformers' greedy generate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    dec = TreeSpecDecoder(model, None, config=DecodeConfig(total_tokens=8, depth=3, top_k=4, compile=True))
    for seed in (1, 2):
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=32, do_sample=False)
        if not torch.equal(dec.generate(ids, 32, eos_token_id=[]).sequences, ref):
            return False
    return True


def draft_step_times(head, compiled_head, rows: int = 8, prefix: int = 128) -> str:
    """One expansion step (tree_step over ``rows`` frontier nodes + their logits) of the eager
    head and of the compiled one, at ``prefix`` cached slots: min and median of 60 (ms)."""
    from eagle2_kernels.cache import StaticKVCache
    from eagle2_kernels.ops.tree import pack_bits

    dtype = next(head.parameters()).dtype
    cache = StaticKVCache(1, 1, head.num_kv_heads, 512, head.head_dim, dtype, "cpu")
    cache.set_length(prefix)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, rows, head.hidden_size, generator=g).to(dtype)
    toks = torch.randint(0, 1000, (1, rows), generator=g)
    pos = torch.full((1, rows), prefix, dtype=torch.int64)
    mask = pack_bits(torch.eye(rows, dtype=torch.bool)).view(1, rows, -1)
    out = []
    for name, h in (("eager", head), ("compiled", compiled_head)):
        samples = []
        with torch.no_grad():
            for i in range(65):
                t = time.perf_counter()
                h.logits(h.tree_step(feats, toks, pos, cache, [prefix], mask, rows, None))
                if i >= 5:
                    samples.append(1e3 * (time.perf_counter() - t))
        out.append(f"{name} {min(samples):.2f} / {statistics.median(samples):.2f}")
    return f"draft step ({rows} rows + logits, prefix {prefix}; min / median ms): " + ", ".join(out)


# One start-up measurement, run as its own process (python bench_compiled.py --startup-child MODE).
def startup_child(mode: str) -> dict:
    t0 = time.perf_counter()
    from eagle2_kernels.models.default import load_default
    from eagle2_kernels.models.target import DecodeContext, TargetAdapter
    from eagle2_kernels.ops.tree import pack_bits

    model, _ = load_default()
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    ad = TargetAdapter(model, compile=mode != "eager", compile_buckets=(1, 4, 8))
    ad.precompile(1)
    compile_s = time.perf_counter() - t1
    ready_s = time.perf_counter() - t0
    prefix, times = 128, {}
    cache = ad.new_cache(1, 512)
    for n in (1, 4, 8):
        mask = pack_bits(torch.ones(n, n, dtype=torch.bool).tril()).view(1, n, -1)
        ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        pos = (prefix + torch.arange(n)).view(1, n)
        samples = []
        for i in range(45):
            cache.set_length(prefix)
            t = time.perf_counter()
            ad.forward(ids, pos, DecodeContext(cache, prefix, mask, n))
            if i >= 5:
                samples.append(1e3 * (time.perf_counter() - t))
        times[str(n)] = {"min_ms": min(samples), "median_ms": statistics.median(samples)}
    source = getattr(ad.compiled, "source", "")
    return {"mode": mode, "load_s": load_s, "compile_s": compile_s, "ready_s": ready_s, "status": ad.compile_status,
            "source": source, "forward_ms": times}


def startup(args) -> None:
    import os
    import subprocess
    import tempfile

    env = environment()
    print(f"# {env.get('processor', '')} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"SmolLM2-135M bf16 | forward at prefix 128", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="e2k-startup-") as cache:
        runs = [("eager", "eager", {}), ("per-process (buckets 1/4/8)", "jit", {"EAGLE2_KERNELS_COMPILE_CACHE": "0"}),
                ("AOT cached, cold", "aot", {}), ("AOT cached, warm", "aot", {})]
        # The default model's copy is shared; only the compiled artifacts start from nothing.
        base = {**os.environ, "EAGLE2_KERNELS_CACHE": cache}
        from eagle2_kernels.models.default import default_model_dir

        os.symlink(default_model_dir(), Path(cache) / default_model_dir().name)
        for label, mode, extra in runs:
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--startup-child", mode], env={**base, **extra},
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(f"{label}: the child failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(label=label, process_s=wall)
            rows.append(row)
            f = row["forward_ms"]
            print(f"{label:<28} process {wall:6.1f} s  load {row['load_s']:5.1f} s  compile/load {row['compile_s']:6.1f} s"
                  f"  ms/forward n=1 {f['1']['min_ms']:6.2f} n=4 {f['4']['min_ms']:6.2f} n=8 {f['8']['min_ms']:6.2f}"
                  f" (min; median n=1 {f['1']['median_ms']:.2f})",
                  flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="mtbench,code")
    ap.add_argument("--limit", type=int, default=4, help="prompts per set (MT-bench: spread over categories)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile-head", action="store_true",
                    help="also run the compiled decoder with its draft head's steps compiled (models/compiled_head.py)")
    ap.add_argument("--startup", action="store_true", help="measure start-up (cold / warm) and forward times")
    ap.add_argument("--startup-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.startup_child:
        print(json.dumps(startup_child(args.startup_child)))
        return
    if args.startup:
        startup(args)
        return
    if not fp32_gate():
        raise SystemExit("fp32 gate FAILED: compiled decoding differs from transformers' greedy output; no timing")
    print("fp32 gate: compiled decoding equals transformers' greedy generate (tiny Llama, 2 prompts)", flush=True)

    t0 = time.perf_counter()
    eager = TreeSpecDecoder.from_pretrained(compile=False)
    model, tok = eager.target, eager.tokenizer
    compiled = TreeSpecDecoder(model, eager.draft, tokenizer=tok, compile="auto")
    if not compiled.compile_status.startswith("compiled"):
        raise SystemExit(f"compiled forwards unavailable here: {compiled.compile_status}")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled.precompile(1)
    compile_s = time.perf_counter() - t0
    head_dec, draft_line = None, None
    if args.compile_head:
        # The same compiled target, its draft head's steps compiled too (models/compiled_head.py),
        # swapped in from outside: what a decoder with compiled head steps runs.
        from eagle2_kernels.models.compiled_head import CompiledHead

        head_dec = TreeSpecDecoder(model, eager.draft, tokenizer=tok, compile="auto")
        t0 = time.perf_counter()
        head_dec._state.head = CompiledHead(eager.draft, progress=print)
        head_dec._state.head.ensure()
        print(f"draft head steps: {head_dec._state.head.status} in {time.perf_counter() - t0:.1f} s", flush=True)
        draft_line = draft_step_times(eager.draft, head_dec._state.head)
        print(draft_line, flush=True)
    t0 = time.perf_counter()
    compiled.cost_model(1, remeasure=True)
    eager.cost_model(1, remeasure=True)
    if head_dec is not None:
        head_dec.cost_model(1, remeasure=True)
    costs_s = time.perf_counter() - t0
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]

    def hf(ids, n):
        from eagle2_kernels.runtime.stats import DecodeStats, GenerateOutput

        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        return GenerateOutput(seq, DecodeStats())

    methods = {
        "hf": hf,
        "plain-eager": lambda ids, n: eager.generate_plain(ids, n, eos_token_id=eos),
        "plain-compiled": lambda ids, n: compiled.generate_plain(ids, n, eos_token_id=eos),
        "eagle2-eager": lambda ids, n: eager.generate(ids, n, eos_token_id=eos),
        "eagle2-compiled": lambda ids, n: compiled.generate(ids, n, eos_token_id=eos),
    }
    if head_dec is not None:
        methods["eagle2-comp+head"] = lambda ids, n: head_dec.generate(ids, n, eos_token_id=eos)
    warm = prompts_of("code", 1, tok)[0]
    for fn in methods.values():
        fn(warm, 16)

    env = environment()
    header = (f"# {env.get('processor', '')} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
              f"bf16 | greedy | {args.max_new_tokens} new tokens")
    print(header)
    print(f"start-up: load {load_s:.1f} s, compile {compile_s:.1f} s ({compiled.compile_status}), "
          f"cost models {costs_s:.1f} s")
    results = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "json"},
               "startup_s": {"load": load_s, "compile": compile_s, "cost_models": costs_s}, "draft_step": draft_line,
               "compile_status": compiled.compile_status, "sets": {}}
    for set_name in args.sets.split(","):
        prompts = prompts_of(set_name, args.limit, tok)
        rows = {m: {"tokens": 0, "seconds": 0.0, "rounds": 0, "same": 0, "prefix": 0, "rates": []} for m in methods}
        for i, ids in enumerate(prompts):
            order = list(methods)[i % len(methods):] + list(methods)[: i % len(methods)]
            outs = {}
            for m in order:
                t = time.perf_counter()
                out = methods[m](ids, args.max_new_tokens)
                dt = time.perf_counter() - t
                new = out.sequences[0, ids.shape[1]:].tolist()
                outs[m] = new
                r = rows[m]
                r["tokens"] += len(new)
                r["seconds"] += dt
                r["rounds"] += out.stats.rounds
                r["rates"].append(len(new) / dt)
            for m in methods:
                a, b = outs[m], outs["hf"]
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                rows[m]["same"] += int(a == b)
                rows[m]["prefix"] += k
        hf_rate = rows["hf"]["tokens"] / rows["hf"]["seconds"]
        print(f"\n## {set_name}: {len(prompts)} prompts")
        print(f"{'method':<16} {'tok/s':>7} {'range':>13} {'vs hf':>7} {'tau':>6} {'same as hf':>11} {'prefix':>7}")
        for m, r in rows.items():
            rate = r["tokens"] / r["seconds"]
            tau = r["tokens"] / r["rounds"] if r["rounds"] else 0.0
            r.update(rate=rate, vs_hf=rate / hf_rate, tau=tau, median_rate=statistics.median(r["rates"]))
            rng = f"{min(r['rates']):.1f}-{max(r['rates']):.1f}"
            print(f"{m:<16} {rate:7.2f} {rng:>13} {rate / hf_rate:6.2f}x {tau:6.2f} "
                  f"{r['same']:>6}/{len(prompts):<4} {r['prefix'] / len(prompts):7.1f}")
        results["sets"][set_name] = rows
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
