"""Round-cost benchmark: one EAGLE-2 round (draft + verify + accept + compact) against one plain
decode step, and against the round's memory floor.

Targets are random-weight models built from configs (no downloads), directly on the device:
Llama-3-8B shape (bf16, 32 layers, hidden 4096, 32/8 heads, vocab 128256) with a random EAGLE
head of the matching shape, once with the full vocabulary and once with a 32k reduced draft
vocabulary; and SmolLM2-135M shape. Contexts 1k and 8k; trees T=60/D=5/K=10 and T=16/D=5/K=10
(same draft work, a quarter of the verify tokens).

Per row: plain decode step (our static-cache loop, CUDA graph and eager; transformers'
generate per token), one round with graphs and eager, round / plain step, the round's memory
floor (bytes it must move / measured device copy bandwidth), measured / floor, host time per
round, and a PROJECTED speedup tau x plain step / round when a tau is given: ``--tau X`` for
every row, or ``--tau-from PATH``, a committed result with one tau per tree shape in this
schema (what ``eagle2_kernels.train.evaluate`` writes, e.g. the MT-bench taus of the shipped
head in ``bench/results/cpu/head_curve/final.json``):

    {"configs": [{"T": 60, "D": 5, "K": 10, "tau": 2.452, ...}, ...]}   (or under "mtbench")

A row whose tree is not in the table gets no projection; without either option no row does.

Correctness gate first: for each target shape, a float32 copy (same shape, fewer layers for the
8B; lm_head untied) decodes a prompt speculatively with the static round (graphs where
available) and must equal transformers' greedy generate token for token, with real multi-token
acceptance: the copy's lm_head is shaped so that greedy decoding only emits K tokens S (rows
+r_i / -r_i in pairs, all others 0: the largest logit is max_i |r_i . h| > 0) and the draft
vocabulary is S, so every expanded node has all of S as children. The timed trees are checked
this way with a head that drafts "the same token again" (the shaped target runs into repeats)
and must reach tau >= 1.5, and a covering tree (T=15, D=3, K=2: all 1 + K + D*K^2 candidates
kept) must commit at least 3 tokens in every round but the last (depths 1 and 2 always hold the
target's next two tokens), which exercises KV compaction and multi-pair catch-up. On a mismatch
or missing acceptance nothing is timed and the script exits 1. (Whether the timed bf16 model's
graph and eager rounds commit the same tokens is reported per row.)

    python -m bench.bench_round --json out.json --tau-from bench/results/cpu/head_curve/final.json
    python -m bench.bench_round --quick                     # tiny shapes; runs on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

from bench.common import environment

TREES = [(60, 5, 10), (16, 5, 10)]
# The gate's covering tree: T - 1 = K + D * K^2, so every candidate is kept and depths 1 and 2
# hold every continuation of two tokens from S.
COVERING_TREE = (15, 3, 2)
GATE_NEW_TOKENS = 24
# The timed trees in the gate: depth 1 holds all of S, so most rounds accept a drafted token
# (measured on CPU: tau 2.0-4.8 for the three shapes); the covering tree's bound is exact.
GATE_MIN_TAU = 1.5

# Real shapes (random weights). max_position_embeddings raised so that an 8k context plus
# the tree fits (the real SmolLM2-135M has 8192).
SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    # --quick: a Llama shrunk to 2 layers, hidden 64 (runs on a CPU in seconds).
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, tie_word_embeddings=False,
    ),
}


# ---------------------------------------------------------------------------- set-up
def build_target(shape: str, dtype, device, layers: int | None = None, untied: bool = False):
    """A random-weight LlamaForCausalLM of ``shape``, created directly on ``device``
    (``untied``: its own lm_head even where the shape ties it to the input embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    if untied:
        kw["tie_word_embeddings"] = False
    cfg = LlamaConfig(max_position_embeddings=16384, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, **kw)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create the weights in their final dtype (8B: 16 GB, not 32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_head(model, draft_vocab):
    """A random head attached to ``model``; ``draft_vocab``: None (full vocabulary), a size n
    (the ids 0..n-1) or a tensor of target ids."""
    from eagle2_kernels import EagleDraftHead

    dev = model.get_output_embeddings().weight.device
    if draft_vocab is None or isinstance(draft_vocab, torch.Tensor):
        d2t = draft_vocab
    else:
        d2t = torch.arange(draft_vocab, device=dev)
    torch.manual_seed(1)
    with torch.device(dev):
        head = EagleDraftHead.from_target(model, draft_to_target=d2t).eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, reps: int, warmup: int = 2) -> list[float]:
    """Per-call milliseconds of ``fn`` (CUDA events on a GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def copy_bandwidth(device) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), None on CPU."""
    if device.type != "cuda":
        return None
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, reps=10, warmup=3))
    del src, dst
    return 2 * n / (ms / 1e3)


# ---------------------------------------------------------------------------- byte counts
def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def floor_bytes(model, head, ctx: int, T: int, D: int) -> dict:
    """Bytes a round and a plain step must move at least (weights once, KV prefix read once,
    new KV written once)."""
    emb = model.get_input_embeddings().weight
    lm = model.get_output_embeddings().weight
    params = {id(p): p for p in model.parameters()}
    if emb.data_ptr() != lm.data_ptr():
        params.pop(id(emb), None)  # an untied input embedding is only gathered (T rows)
    target_w = _nbytes(params.values())
    cfg = model.config
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    es = lm.element_size()
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * dh * es  # one token, all layers
    head_w = _nbytes(head.parameters())
    draft_lm = head._lm_weight.numel() * es
    draft_kv_tok = 2 * head.num_kv_heads * head.head_dim * es
    draft_fwd = D + 1  # catch-up + D expansions (the root expansion reuses the catch-up output)
    rnd = (target_w + ctx * kv_tok + T * kv_tok
           + draft_fwd * (head_w + draft_lm + ctx * draft_kv_tok))
    plain = target_w + ctx * kv_tok + kv_tok
    return {"round_bytes": rnd, "plain_bytes": plain}


# ---------------------------------------------------------------------------- measurements
def hf_ms_per_token(model, ctx: int, device, new: int) -> float:
    """transformers' generate (greedy, its default cache), milliseconds per new token."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (1, ctx), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run(n):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    run(2)  # warm-up
    t1 = min(run(1) for _ in range(2))
    tn = min(run(1 + new) for _ in range(2))
    return (tn - t1) / new * 1e3


def prepared_round(dec, ctx: int, device):
    """Prefill a ``ctx``-token random prompt and set up the static round (graphs captured
    when the decoder uses them); returns the decoder's StaticRound, ready to replay."""
    vocab = dec.target.config.vocab_size
    g = torch.Generator().manual_seed(ctx)
    ids = torch.randint(0, vocab, (1, ctx), generator=g).to(device)
    it = dec.stream(ids, max_new_tokens=400)
    next(it)  # prefill
    next(it)  # the first round(s): set-up and capture
    it.close()
    return dec._statics.last


def measure_round(sr, device, reps: int) -> dict:
    """Round time (draft + verify replayed back to back), host time per round, with the
    decode state saved and restored so the context length stays put."""
    saved = [t.clone() for t in sr.state_tensors()]

    def restore():
        for t, s in zip(sr.state_tensors(), saved):
            t.copy_(s)

    def one():
        sr.run_draft()
        sr.run_verify()

    ms = time_ms(one, device, reps)
    restore()
    # Host time: Python and launch cost of issuing one round (the device runs behind).
    sync(device)
    host = []
    for _ in range(reps):
        t0 = time.perf_counter()
        one()
        host.append((time.perf_counter() - t0) * 1e3)
        sync(device)
    restore()
    return {"round_ms": statistics.median(ms), "round_p20_ms": _q(ms, 0), "round_p80_ms": _q(ms, 3),
            "host_ms": statistics.median(host)}


def profile_round(sr, device, path: str, rounds: int = 3) -> dict:
    """Profile ``rounds`` rounds (graph replays on CUDA: the kernels inside the graphs are
    recorded) and write the top kernels / ops by time to ``path``. Returns launches per round
    (device kernels on CUDA, aten ops on CPU) and the profile's file name."""
    from torch.profiler import ProfilerActivity, profile

    saved = [t.clone() for t in sr.state_tensors()]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sr.run_draft()
    sr.run_verify()
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(rounds):
            sr.run_draft()
            sr.run_verify()
        sync(device)
    for t, s in zip(sr.state_tensors(), saved):
        t.copy_(s)
    averages = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
        launches = len(kernels) / rounds
        sort = "self_cuda_time_total"
        if not any(hasattr(a, sort) for a in averages[:1]):
            sort = "self_device_time_total"
    else:
        launches = sum(a.count for a in averages if a.key.startswith("aten::")) / rounds
        sort = "self_cpu_time_total"
    try:
        table = averages.table(sort_by=sort, row_limit=30)
    except Exception:  # a renamed sort key in another torch version: unsorted beats nothing
        table = averages.table(row_limit=30)
    with open(path, "w") as f:
        f.write(f"# {rounds} rounds; launches per round: {launches:.0f}\n{table}\n")
    return {"launches_per_round": launches, "profile": os.path.basename(path)}


def measure_plain(dec, sr, device, reps: int, graph: bool) -> float:
    """Median ms of one plain greedy step over the same cache and context."""
    from eagle2_kernels.runtime.graphs import PlainStep

    tc = dec._state.tcache
    saved = tc.lengths.clone()
    step = PlainStep(dec._state, 1)
    step.token.copy_(sr.root)
    if graph:
        step.capture()
    ms = time_ms(step, device, reps)
    tc.lengths.copy_(saved)
    return statistics.median(ms)


def _q(xs, i):
    return statistics.quantiles(xs, n=5)[i] if len(xs) > 1 else xs[0]


# ---------------------------------------------------------------------------- correctness gate
def accepting_lm_head(model, n: int, seed: int = 11) -> torch.Tensor:
    """Shape ``model``'s (untied) lm_head so that greedy decoding only emits n tokens S: rows
    S[2i] = r_i, S[2i+1] = -r_i (random r_i; an odd n adds one more random row), every other
    row 0. The largest logit is then max_i |r_i . h| > 0 (for any hidden state h not
    orthogonal to every r_i), above the 0 of every other token. Returns S [n] int64, spread
    over the vocabulary."""
    lm = model.get_output_embeddings().weight
    V, H = lm.shape
    if model.get_input_embeddings().weight.data_ptr() == lm.data_ptr():
        raise ValueError("accepting_lm_head needs an untied lm_head (build_target(untied=True))")
    ids = torch.linspace(0, V - 1, n).round().to(torch.int64)
    g = torch.Generator().manual_seed(seed)
    r = torch.randn((n + 1) // 2, H, generator=g) * 0.05
    rows = torch.cat([r, -r], dim=1).view(-1, H)[:n]  # r_0, -r_0, r_1, -r_1, ...
    with torch.no_grad():
        lm.zero_()
        lm[ids.to(lm.device)] = rows.to(lm.device, lm.dtype)
    return ids.to(lm.device)


def repeat_head(model, draft_vocab: torch.Tensor):
    """A head over the draft vocabulary ``draft_vocab`` whose predicted feature is about its
    input feature (fc = [0 | I], the layer's output projections at 1e-2 of their random init:
    attention and MLP still run but barely move it), so it drafts "the target's next token
    again": right wherever the target repeats a token, as the shaped gate target does in runs."""
    head = build_head(model, draft_vocab)
    layer = head.layers[0]
    with torch.no_grad():
        H = head.fc.out_features
        head.fc.weight.zero_()
        head.fc.weight[:, -H:].copy_(torch.eye(H))  # fc(cat(embed(x), feature)): pass the feature
        if head.fc.bias is not None:
            head.fc.bias.zero_()
        layer.self_attn.o_proj.weight.mul_(1e-2)
        layer.mlp.down_proj.weight.mul_(1e-2)
    return head


def gate(shape: str, device, layers: int | None, trees) -> list[str]:
    """float32 copy of the shape: speculative (static round) greedy == transformers greedy, with
    multi-token acceptance (see the module docstring). Returns the failures (empty: passed)."""
    from eagle2_kernels import TreeSpecDecoder

    model = build_target(shape, torch.float32, device, layers, untied=True)
    n = GATE_NEW_TOKENS
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5)).to(device)
    bad, taus = [], {}
    for T, D, K in list(trees) + [COVERING_TREE]:
        S = accepting_lm_head(model, K)
        head = repeat_head(model, S)  # draft vocabulary S: all of it below every expanded node
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        dec = TreeSpecDecoder(model, head, total_tokens=T, depth=D, top_k=K, static_round=True)
        out = dec.generate(ids, n)
        name = f"{shape} fp32 T={T}/D={D}/K={K}"
        acc = out.stats.accept_lengths
        taus[(T, D, K)] = out.stats.mean_accept_length
        if not torch.equal(out.sequences, ref):
            bad.append(f"{name}: speculative {out.sequences[0, 16:].tolist()} != plain {ref[0, 16:].tolist()}")
        elif (T, D, K) == COVERING_TREE and (len(acc) < 3 or min(acc[1:-1]) < 3):
            # acc[0] is the prefill's token, the last round may be cut by the token budget.
            bad.append(f"{name}: the covering tree must commit >= 3 tokens per round, got {acc}")
        elif out.stats.mean_accept_length < GATE_MIN_TAU:
            bad.append(f"{name}: tau {out.stats.mean_accept_length:.2f} < {GATE_MIN_TAU}: drafted tokens "
                       f"were rarely accepted (accept lengths {acc})")
        dec.close()
        del head
    print(f"# gate {shape}: tau " + ", ".join(f"{t}/{d}/{k}={v:.2f}" for (t, d, k), v in taus.items()),
          flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return bad


# ---------------------------------------------------------------------------- main
def read_tau_table(path: str) -> dict[tuple[int, int, int], float]:
    """tau per tree shape (T, D, K) from a committed result in the schema of the module
    docstring: ``{"configs": [{"T", "D", "K", "tau", ...}, ...]}``, at the top level or under
    ``"mtbench"``. Raises ValueError naming the file when it does not hold such a table."""
    with open(path) as f:
        data = json.load(f)
    block = data.get("mtbench", data) if isinstance(data, dict) else None
    configs = block.get("configs") if isinstance(block, dict) else None
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"{path}: no 'configs' list of {{T, D, K, tau}} (at the top level or under 'mtbench')")
    table = {}
    for c in configs:
        try:
            table[(int(c["T"]), int(c["D"]), int(c["K"]))] = float(c["tau"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: config {c!r} needs integer T, D, K and a numeric tau") from None
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the results (with the environment) here")
    ap.add_argument("--quick", action="store_true", help="tiny shapes; for a CPU smoke run")
    taus = ap.add_mutually_exclusive_group()
    taus.add_argument("--tau", type=float, default=None,
                      help="tau for the projected speedup of every row (none: no projection)")
    taus.add_argument("--tau-from", default=None, metavar="PATH",
                      help="a committed result with a tau per tree shape: {\"configs\": [{\"T\", \"D\", "
                           "\"K\", \"tau\"}, ...]} at the top level or under \"mtbench\"")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    ap.add_argument("--profile-dir", default=None,
                    help="profile the first context / tree of each model (graph replays on CUDA) and "
                         "write the top kernels there")
    ap.add_argument("--time-budget", type=float, default=200.0,
                    help="seconds; rows that would start after this are skipped (and listed)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    if args.tau is not None:
        tau, tau_src = args.tau, "--tau"
        tau_of = lambda T, D, K: args.tau  # noqa: E731
    elif args.tau_from is not None:
        table = read_tau_table(args.tau_from)
        tau, tau_src = None, f"per tree from {args.tau_from}: " + ", ".join(
            f"{t},{d},{k}: {v}" for (t, d, k), v in sorted(table.items()))
        tau_of = lambda T, D, K: table.get((T, D, K))  # noqa: E731
    else:
        tau, tau_src = None, "no tau given (--tau or --tau-from): no projected speedup"
        tau_of = lambda T, D, K: None  # noqa: E731
    if not cuda:
        # Tiny CPU shapes: one thread (thread wake-ups cost more than the matmuls, and a shared
        # machine makes two threads erratic).
        torch.set_num_threads(1)
    if args.quick:
        plan = [("tiny", None, [64, 256])]
        gate_plan = [("tiny", None)]
        dtype, reps, hf_new = torch.float32, args.reps or 5, 8
    else:
        # The 32k draft vocabulary first: its round / plain step is the headline target.
        plan = [("smollm2-135m", None, [1024, 8192]), ("llama3-8b", 32000, [1024, 8192]),
                ("llama3-8b", None, [1024, 8192])]
        gate_plan = [("smollm2-135m", None), ("llama3-8b", 2)]
        dtype, reps, hf_new = torch.bfloat16, args.reps or 20, 16
    graphs_modes = [True, False] if cuda else [False]
    note = ("CUDA" if cuda else "CPU numbers (no CUDA device or --quick): graph rows skipped, "
            "no memory floor (no device copy bandwidth)")
    print(f"# bench_round: {note}; tau for the projected speedups: {tau_src}", flush=True)

    # ---- correctness gate
    trees = TREES
    failures = []
    for shape, layers in gate_plan:
        failures += gate(shape, device, layers, trees)
    if failures:
        print("CORRECTNESS GATE FAILED: no timings are reported", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    print(f"# gate passed: speculative greedy == transformers greedy (fp32), multi-token acceptance, for "
          f"{[s for s, _ in gate_plan]}", flush=True)

    bw = copy_bandwidth(device)
    rows, skipped = [], []

    def save(finished: bool) -> None:
        """Write JSON + markdown (after every row, so a run cut short still leaves results)."""
        if not args.json:
            return
        result = {
            "benchmark": "bench_round",
            "environment": environment(),
            "device_kind": "cuda" if cuda else "cpu",
            "note": note,
            "finished": finished,
            "copy_bandwidth_GBps": None if bw is None else bw / 1e9,
            "tau": tau,
            "tau_source": tau_src,
            "projected_speedup_is": "projected: tau x plain_step / round (not a measured end-to-end speedup); "
                                    "rows without a tau have none",
            "gate": "passed (fp32, equal to transformers greedy, multi-token acceptance)",
            "skipped": skipped,
            "rows": rows,
            "seconds": time.perf_counter() - t_start,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        env = ", ".join(f"{k}={v}" for k, v in result["environment"].items())
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(f"# Round cost ({note}){'' if finished else ' - UNFINISHED run'}\n\n{env}\n\n"
                    f"copy bandwidth: {_fmt(result['copy_bandwidth_GBps'])} GB/s; tau: {tau_src}; "
                    f"projected_speedup = tau x plain / round, projected, not measured end to end\n\n"
                    f"{_table(rows)}\n" + (f"\nskipped: {'; '.join(skipped)}\n" if skipped else ""))
    from eagle2_kernels import TreeSpecDecoder

    built, hf = {}, {}  # hf: transformers' generate ms/token per (shape, ctx)
    for shape, draft_vocab, contexts in plan:
        if time.perf_counter() - t_start > args.time_budget:
            skipped.append(f"{shape} vd={draft_vocab}: all rows (time budget)")
            continue
        if shape not in built:
            built.clear()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            built[shape] = build_target(shape, dtype, device)
        model = built[shape]
        head = build_head(model, draft_vocab)
        for T, D, K in trees:
            decs = {g: TreeSpecDecoder(model, head, total_tokens=T, depth=D, top_k=K, static_round=True,
                                       cuda_graphs=g, max_length=max(contexts) + 512)
                    for g in graphs_modes}
            # The timed model: graph and eager rounds commit the same tokens.
            ids = torch.randint(0, model.config.vocab_size, (1, 16),
                                generator=torch.Generator().manual_seed(9)).to(device)
            # (Reported, not a gate: bf16 random logits are nearly flat, so a different GEMM
            # algorithm under capture could flip an argmax; the fp32 gate above is the hard one.)
            outs = {g: d.generate(ids, 10).sequences for g, d in decs.items()}
            same = torch.equal(outs[True], outs[False]) if cuda else None
            if same is False:
                print(f"# WARNING: graph and eager rounds committed different tokens on {shape} "
                      f"vd={draft_vocab} T={T} (bf16)", flush=True)
            for ctx in contexts:
                elapsed = time.perf_counter() - t_start
                if elapsed > args.time_budget:
                    skipped.append(f"{shape} vd={draft_vocab} T={T} ctx={ctx} (time budget)")
                    continue
                row = {"model": shape, "draft_vocab": draft_vocab or model.config.vocab_size,
                       "ctx": ctx, "T": T, "D": D, "K": K}
                if same is not None:
                    row["graph_tokens_equal_eager"] = same
                try:
                    for g, dec in decs.items():
                        sr = prepared_round(dec, ctx, device)
                        tag = "graph" if g else "eager"
                        if g and not sr.graphs:
                            row["graph_error"] = sr.graph_error
                            continue
                        r = measure_round(sr, device, reps)
                        row[f"round_{tag}_ms"] = r["round_ms"]
                        row[f"host_{tag}_ms"] = r["host_ms"]
                        if args.profile_dir and ctx == min(contexts) and T == trees[0][0] and (g or not cuda):
                            name = f"profile_{shape}_vd{row['draft_vocab']}_ctx{ctx}_T{T}_{tag}.txt"
                            try:
                                row.update(profile_round(sr, device, os.path.join(args.profile_dir, name)))
                            except Exception as exc:  # profiling is extra: never lose the timings
                                row["profile_error"] = f"{type(exc).__name__}: {exc}"
                        row[f"plain_{tag}_ms"] = measure_plain(dec, sr, device, reps, graph=g)
                    if (shape, ctx) not in hf:
                        hf[(shape, ctx)] = hf_ms_per_token(model, ctx, device, hf_new)
                    row["hf_generate_ms_per_token"] = hf[(shape, ctx)]
                except torch.cuda.OutOfMemoryError:
                    skipped.append(f"{shape} vd={draft_vocab} T={T} ctx={ctx} (out of memory)")
                    torch.cuda.empty_cache()
                    continue
                best = "graph" if f"round_graph_ms" in row else "eager"
                rnd, plain = row[f"round_{best}_ms"], row[f"plain_{best}_ms"]
                row["round_over_plain"] = rnd / plain
                row["host_share"] = row[f"host_{best}_ms"] / rnd
                fb = floor_bytes(model, head, ctx, T, D)
                if bw is not None:
                    row["floor_ms"] = fb["round_bytes"] / bw * 1e3
                    row["measured_over_floor"] = rnd / row["floor_ms"]
                    row["plain_floor_ms"] = fb["plain_bytes"] / bw * 1e3
                    row["floor_round_over_plain"] = fb["round_bytes"] / fb["plain_bytes"]
                row_tau = tau_of(T, D, K)
                if row_tau is not None:
                    row["tau"] = row_tau
                    row["projected_speedup"] = row_tau * plain / rnd
                rows.append(row)
                print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
                save(finished=False)
            for d in decs.values():
                d.close()
        del head
    save(finished=True)
    print(_table(rows))
    if skipped:
        print("# skipped: " + "; ".join(skipped))
    print(f"# done in {time.perf_counter() - t_start:.1f} s")
    return 0


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(rows) -> str:
    """Markdown table of ``rows`` (the union of their keys)."""
    if not rows:
        return "(no rows)"
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
