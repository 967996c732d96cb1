"""Per-round CPU time of the six ops: native extension vs torch reference, side by side.

One EAGLE-2 round of the SmolLM2-135M target (V = 49152, 30 layers, Hq = 9, Hkv = 3, Dh = 64)
with a tree T = 16, D = 4, K = 8 (larger than the CPU default 4,2,2, so every op has work) calls:

    tree_expand      1x root [B, 1, Vd] + D x [B, K, Vd]   (Vd: draft vocab, 49152 or reduced 8192)
    tree_attention   draft: catch-up + D expansions (1 layer, Tq = K, tree_len = j*K);
                     target verify: 30 layers, Tq = tree_len = T
    tree_build       C = K + D*K*K candidates -> T nodes
    verify_greedy    or verify_sample, target logits [B, T, 49152]
    kv_compact       cache [2*30, B, 3, Lmax, 64]

Every op is first checked against the reference on the benchmark inputs (integers and KV
moves bit-exact, floats within the op's contract); a mismatch prints no speedup and exits
non-zero. Times are CPU wall-clock medians (bench/common.py: bench_cpu) through the public
ops with ``backend="ext"`` and ``backend="reference"``.

    python -m bench.bench_ops_cpu [--prefix 512] [--batch 1] [--quick] [--json PATH]

With ``--decode N`` it also decodes N tokens of a chat prompt with the embedded default model
(SmolLM2-135M-Instruct; the shipped draft head, or a random one with ``--random-head``) once
per backend and reports the share of each decoding round spent in the ops.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import bench_cpu, write_results
from eagle2_kernels import ops
from eagle2_kernels._backend import ext_available
from eagle2_kernels.ops.tree import mask_words

# SmolLM2-135M (the embedded default target) and a 16,4,8 tree (the recorded results use it).
V_TARGET, LAYERS, HQ, HKV, DH = 49152, 30, 9, 3, 64
T, D, K = 16, 4, 8


def build_inputs(B: int, prefix: int, draft_vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {}
    x["d2t"] = (
        None if draft_vocab == V_TARGET else torch.randperm(V_TARGET, generator=g)[:draft_vocab].sort().values
    )
    x["root_logits"] = torch.randn(B, 1, draft_vocab, generator=g) * 3
    x["step_logits"] = torch.randn(B, K, draft_vocab, generator=g) * 3
    x["step_scores"] = -torch.rand(B, K, generator=g) * 4
    # candidates as the draft makes them: root children, then D levels of K*K
    C = K + D * K * K
    parents = torch.full((B, C), -1, dtype=torch.int64)
    scores = torch.empty(B, C)
    scores[:, :K] = -torch.rand(B, K, generator=g).sort(dim=1).values
    base = 0
    for j in range(D):
        start = K + j * K * K
        level = torch.arange(base, base + (K if j == 0 else K * K))
        frontier = level[torch.randperm(len(level), generator=g)[:K]].sort().values
        parents[:, start : start + K * K] = frontier.repeat_interleave(K)
        scores[:, start : start + K * K] = scores[:, frontier].repeat_interleave(K, dim=1) - torch.rand(
            B, K * K, generator=g
        ) * 3
        base = start
    x["cand"] = (torch.randint(0, V_TARGET, (B, C), generator=g), scores, parents, torch.randint(0, V_TARGET, (B,)))
    tree = ops.tree_build(*x["cand"], T, backend="reference")
    x["tree"] = tree
    # target logits with the argmax at some nodes on a child's token: walks of a few nodes
    logits = torch.randn(B, T, V_TARGET, generator=g)
    for b in range(B):
        node = 0
        for _ in range(3):
            kids = (tree.parents[b] == node).nonzero().flatten()
            if len(kids) == 0:
                break
            node = int(kids[0])
            logits[b, int(tree.parents[b, node]), int(tree.tokens[b, node])] += 10.0
    x["target_logits"] = logits
    x["uniforms"] = torch.rand(B, T, generator=g)
    lmax = prefix + 64
    x["target_cache"] = torch.randn(2 * LAYERS, B, HKV, lmax, DH, generator=g)
    x["draft_cache"] = torch.randn(2, B, HKV, lmax, DH, generator=g)
    x["prefix"] = torch.full((B,), prefix, dtype=torch.int64)
    x["q_verify"] = torch.randn(B, HQ, T, DH, generator=g)
    x["q_draft"] = torch.randn(B, HQ, K, DH, generator=g)
    x["draft_mask"] = torch.randint(-(2**31), 2**31 - 1, (B, K, mask_words(D * K)), generator=g, dtype=torch.int64).to(torch.int32)
    x["path"] = torch.full((B, T), -1, dtype=torch.int64)
    x["path"][:, :4] = torch.tensor([0, 2, 5, 9])
    x["accept"] = torch.full((B,), 4, dtype=torch.int64)
    return x


def op_calls(x: dict) -> list[tuple[str, str, int, object]]:
    """(op, shape, calls per round, fn(backend) -> outputs) for one round."""
    B, Vd = x["root_logits"].shape[0], x["root_logits"].shape[2]
    tree = x["tree"]
    kc = x["target_cache"]
    dkc = x["draft_cache"]
    prefix = x["prefix"]
    calls = [
        ("tree_expand", f"root [B,1,{Vd}] K={K}", 1,
         lambda be: ops.tree_expand(x["root_logits"], torch.zeros(B, 1), K, x["d2t"], backend=be)),
        ("tree_expand", f"step [B,{K},{Vd}] K={K}", D,
         lambda be: ops.tree_expand(x["step_logits"], x["step_scores"], K, x["d2t"], backend=be)),
        ("tree_build", f"C={K + D * K * K} -> T={T}", 1,
         lambda be: ops.tree_build(*x["cand"], T, backend=be)),
    ]
    for j in range(1, D + 1):  # draft expansions: K new nodes over the prefix + j*K tree slots
        calls.append((
            "tree_attention", f"draft Tq={K} tree_len={j * K}", 1,
            lambda be, j=j: ops.tree_attention(x["q_draft"], dkc[0], dkc[1], prefix, x["draft_mask"], j * K, backend=be),
        ))
    calls += [
        ("tree_attention", f"verify Tq={T} P={int(prefix[0])} x{LAYERS} layers", LAYERS,
         lambda be: ops.tree_attention(x["q_verify"], kc[0], kc[1], prefix, tree.mask, T, backend=be)),
        ("verify_greedy", f"[B,{T},{V_TARGET}]", 1,
         lambda be: ops.verify_greedy(tree, x["target_logits"], backend=be)),
        ("verify_sample", f"[B,{T},{V_TARGET}] t=0.8 p=0.95", 1,
         lambda be: ops.verify_sample(tree, x["target_logits"], x["uniforms"], 0.8, 0.95, 0, backend=be)),
        ("kv_compact", f"[{2 * LAYERS},B,{HKV},{kc.shape[3]},{DH}] a=4", 1,
         lambda be: ops.kv_compact(kc, prefix, x["path"], x["accept"], backend=be)),
    ]
    return calls


def check(name: str, got, want) -> str | None:
    """None when ``got`` meets the op's contract against ``want``, else what differs."""
    if hasattr(got, "tokens"):  # DraftTree
        got, want = (got.tokens, got.parents, got.depth, got.mask), (want.tokens, want.parents, want.depth, want.mask)
    if isinstance(got, torch.Tensor):
        got, want = (got,), (want,)
    for i, (a, b) in enumerate(zip(got, want)):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"output {i}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.is_floating_point():
            tol = 1e-4 if name == "tree_attention" else 2e-5
            if not torch.allclose(a, b, rtol=0, atol=tol):
                return f"output {i}: max abs diff {(a - b).abs().max().item():.3g}"
        elif not torch.equal(a, b):
            return f"output {i} differs"
    return None


def check_kv(x: dict) -> str | None:
    a, b = x["target_cache"].clone(), x["target_cache"].clone()
    ops.kv_compact(a, x["prefix"], x["path"], x["accept"], backend="ext")
    ops.kv_compact(b, x["prefix"], x["path"], x["accept"], backend="reference")
    return None if torch.equal(a, b) else "cache differs"


def run(B: int, prefix: int, draft_vocab: int, repeat: int) -> tuple[list[dict], bool]:
    x = build_inputs(B, prefix, draft_vocab)
    rows, ok = [], True
    for name, shape, count, fn in op_calls(x):
        err = check_kv(x) if name == "kv_compact" else check(name, fn("ext"), fn("reference"))
        row = {"draft_vocab": draft_vocab, "op": name, "shape": shape, "calls": count}
        if err is not None:
            ok = False
            row.update(ref_ms=None, ext_ms=None, speedup=f"MISMATCH: {err}")
            rows.append(row)
            continue
        ref = bench_cpu(lambda: fn("reference"), warmup=1, repeat=repeat)["median_ms"]
        ext = bench_cpu(lambda: fn("ext"), warmup=1, repeat=repeat)["median_ms"]
        row.update(ref_ms=ref, ext_ms=ext, speedup=ref / ext,
                   ref_round_ms=ref * count, ext_round_ms=ext * count)
        rows.append(row)
    return rows, ok


def totals(rows: list[dict], verify: str) -> dict:
    keep = [r for r in rows if r["op"] != ("verify_sample" if verify == "greedy" else "verify_greedy")]
    ref = sum(r["ref_round_ms"] for r in keep)
    ext = sum(r["ext_round_ms"] for r in keep)
    return {"draft_vocab": rows[0]["draft_vocab"], "op": f"ROUND ({verify})", "shape": "all ops of one round",
            "calls": sum(r["calls"] for r in keep), "ref_ms": None, "ext_ms": None,
            "speedup": ref / ext, "ref_round_ms": ref, "ext_round_ms": ext}


PROMPT = "Explain in a few sentences why the sky is blue."


def decode_share(new_tokens: int, dtype: str, random_head: bool) -> list[dict]:
    """Decode with the default model per backend; time every op call of the rounds."""
    import time

    import eagle2_kernels.ops as ops_module
    from eagle2_kernels import EagleDraftHead, TreeSpecDecoder
    from eagle2_kernels.models import default as default_model

    model, tok = default_model.load_default(dtype=getattr(torch, dtype))
    if random_head:
        torch.manual_seed(0)
        head = EagleDraftHead.from_target(model)
    else:
        head = EagleDraftHead.from_pretrained(default_model.default_head_path(), target=model)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = getattr(ids, "input_ids", ids)
    names = ("tree_expand", "tree_build", "tree_attention", "verify_greedy", "verify_sample", "kv_compact")
    spent = {n: 0.0 for n in names}
    originals = {n: getattr(ops_module, n) for n in names}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    rows, outputs = [], {}
    try:
        for n in names:
            setattr(ops_module, n, timed(n, originals[n]))
        for backend in ("reference", "ext"):
            dec = TreeSpecDecoder(model, head, total_tokens=T, depth=D, top_k=K, backend=backend)
            dec.generate(ids, max_new_tokens=8)  # warm-up
            for n in names:
                spent[n] = 0.0
            t0 = time.perf_counter()
            out = dec.generate(ids, max_new_tokens=new_tokens)
            total = time.perf_counter() - t0
            outputs[backend] = out.sequences
            rounds = out.stats.rounds
            op_s = sum(spent.values())
            rows.append({
                "backend": backend, "dtype": dtype, "new_tokens": out.sequences.shape[1] - ids.shape[1],
                "rounds": rounds, "round_ms": 1e3 * total / rounds, "ops_ms_per_round": 1e3 * op_s / rounds,
                "ops_share": op_s / total, "tokens_per_s": (out.sequences.shape[1] - ids.shape[1]) / total,
                **{f"{n}_ms": 1e3 * spent[n] / rounds for n in names if spent[n] > 0},
            })
    finally:
        for n in names:
            setattr(ops_module, n, originals[n])
    same = torch.equal(outputs["reference"], outputs["ext"])
    for r in rows:
        r["same_output"] = same
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefix", type=int, default=512, help="committed cache length (default 512)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[V_TARGET, 8192], help="draft vocab sizes")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--json", default=None)
    ap.add_argument("--decode", type=int, default=0, metavar="N",
                    help="also decode N tokens with the default model per backend (op share of a round)")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype for --decode (default bfloat16)")
    ap.add_argument("--random-head", action="store_true", help="--decode with a random draft head")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ext_available():
        print("the native extension eagle2_kernels._C is not built: nothing to compare", file=sys.stderr)
        return 2
    print(f"CPU benchmark (no GPU timing here): {torch.get_num_threads()} threads, batch {args.batch}, "
          f"prefix {args.prefix}, T={T} D={D} K={K}, target V={V_TARGET}, {LAYERS} layers")
    all_rows, ok = [], True
    for vd in args.vocab:
        rows, good = run(args.batch, args.prefix, vd, repeat=5 if args.quick else 15)
        ok &= good
        all_rows += rows
        if good:
            all_rows += [totals(rows, "greedy"), totals(rows, "sample")]
    write_results(args.json, "ops per round on CPU: native extension vs reference", all_rows)
    if args.decode and ok:
        share = decode_share(args.decode, args.dtype, args.random_head)
        path = None if args.json is None else args.json.replace(".json", "") + "_decode.json"
        write_results(path, "decoding rounds with the default model: ops share per backend", share)
        if not all(r["same_output"] for r in share):
            print("MISMATCH: the extension and the reference decoded different tokens", file=sys.stderr)
            if args.dtype == "float32":  # exact in fp32; bf16 rounding may flip near-ties
                return 1
    if not ok:
        print("MISMATCH between the extension and the reference: no speedup reported", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
