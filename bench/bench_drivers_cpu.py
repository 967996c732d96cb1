"""The two drivers of a round on this CPU, side by side: the dynamic round (the CPU default)
against the static-shape round (the GPU default, run eagerly here), on the default model.

Pairs of decoders differ only in the driver: the same fixed tree shapes (head only, since the
static round has no context lookup), and the adaptive policy. Every prompt is decoded by every
decoder in rotation (order rotating per prompt), greedy, bf16, after a warm-up; compiled target
forwards as a user gets them (``--no-compile`` for eager). Reports tokens/s, ms per round
(all phases: draft, verify, commit), tau, and whether the two drivers of a pair committed the
same tokens (they run the same trees; in bf16 the static round's padded catch-up rows may flip
a near-tie, which the fp32 tests rule out as a cause of real differences).

    python bench/bench_drivers_cpu.py --limit 4 --max-new-tokens 128 --out bench/results/cpu/drivers
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eagle2_kernels import TreeSpecDecoder
from eagle2_kernels.eval.environment import environment
from eagle2_kernels.eval.questions import load_questions

SHAPES = [(8, 3, 4), (16, 4, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=4, help="MT-bench first turns (spread over categories)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="bench/results/cpu/drivers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = TreeSpecDecoder.from_pretrained()
    model, head, tok = base.target, base.draft, base.tokenizer
    extra = {"compile": False} if args.no_compile else {}
    decs = {}
    for T, D, K in SHAPES:
        for driver in ("dynamic", "static"):
            decs[f"{driver} {T},{D},{K}"] = TreeSpecDecoder(
                model, head, total_tokens=T, depth=D, top_k=K, adaptive=False, lookup=False,
                static_round=(driver == "static"), **extra)
    for driver in ("dynamic", "static"):
        decs[f"{driver} adaptive"] = TreeSpecDecoder(model, head, lookup=False, static_round=(driver == "static"),
                                                     **extra)
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    prompts = []
    for q in load_questions(limit=args.limit):
        x = tok.apply_chat_template([{"role": "user", "content": q.turns[0]}], add_generation_prompt=True,
                                    return_tensors="pt")
        prompts.append(x["input_ids"] if hasattr(x, "keys") else x)
    for dec in decs.values():  # warm-up: compiles, the cost model, first calls of each shape
        dec.generate(prompts[0], 16, eos_token_id=eos)
        dec.generate(prompts[0], 16, eos_token_id=eos)  # the adaptive static round sizes from call 1
    rows = {n: {"tokens": 0, "seconds": 0.0, "rounds": 0, "phase_s": 0.0, "outputs": []} for n in decs}
    for i, ids in enumerate(prompts):
        names = list(decs)
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            out = decs[name].generate(ids, args.max_new_tokens, eos_token_id=eos)
            dt = time.perf_counter() - t0
            s, r = out.stats, rows[name]
            r["tokens"] += s.new_tokens
            r["seconds"] += dt
            r["rounds"] += s.rounds - 1  # the prefill's first token is no round
            r["phase_s"] += s.draft_s + s.verify_s + s.other_s
            r["outputs"].append(out.sequences[0, ids.shape[1]:].tolist())
    env = environment()
    lines = [f"# dynamic vs static round on CPU ({env.get('processor')}, torch {torch.__version__}, "
             f"{args.threads} threads, compile {'off' if args.no_compile else decs[names[0]].compile_status})", "",
             f"{len(prompts)} MT-bench first turns, {args.max_new_tokens} new tokens, greedy, bf16, head only.", "",
             "| decoder | tok/s | ms per round | tau | same tokens as its pair |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        driver, shape = name.split(" ", 1)
        other = rows[("static " if driver == "dynamic" else "dynamic ") + shape]
        same = sum(a == b for a, b in zip(r["outputs"], other["outputs"]))
        ms = 1e3 * r["phase_s"] / max(r["rounds"], 1)
        lines.append(f"| {name} | {r['tokens'] / r['seconds']:.1f} | {ms:.1f} | "
                     f"{r['tokens'] / max(r['rounds'] + len(prompts), 1):.2f} | {same}/{len(prompts)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    (out / "drivers.json").write_text(json.dumps({"environment": env, "args": vars(args),
                                                  "rows": {n: {k: v for k, v in r.items() if k != "outputs"}
                                                           for n, r in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
