"""Context lookup in the tree, side by side in one run: plain decoding vs head-only EAGLE-2 vs
head + lookup vs lookup alone (no head), greedy, on MT-bench first turns and on code prompts.

Every method decodes every prompt in rotation (the order rotates per prompt) after one warm-up
generation each; the target, the head and the dtype are shared. Reports tokens/s, the speedup
over plain decoding, tau (tokens per target forward), how many committed drafted tokens came from
the head, the lookup or both, and how many outputs equal plain decoding's (in bf16, tree-batched
numerics may flip near-ties: the mean common prefix is given too).

    python bench/bench_lookup.py --sets mtbench,code --limit 8 --max-new-tokens 128 --json out.json --plot out.png
    python bench/bench_lookup.py --replot out.json --plot out.png     # the plot of an earlier run

The plot stacks each method's committed tokens by where they came from: drafted and accepted
nodes proposed by the head alone, by the lookup alone, or by both; and the token each round
commits from the target itself (the bonus, or the only token of a plain step).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import torch

from eagle2_kernels import TreeSpecDecoder
from eagle2_kernels.eval.environment import environment

# Held-out-style code prompts: two completions (HumanEval-like), two edits of given code (the
# answer repeats much of the prompt, where lookup pays most).
CODE_PROMPTS = [
    "Complete this Python function and explain it briefly.\n\n```python\ndef running_max(values: list[int]) "
    "-> list[int]:\n    \"\"\"Return the list of running maxima of values, e.g. running_max([1, 3, 2, 5]) == "
    "[1, 3, 3, 5].\"\"\"\n```",
    "Write a Python function `is_palindrome(text: str) -> bool` that ignores case and non-letters, with a "
    "docstring and three doctest examples.",
    "Add type hints and a docstring to this function, and return the whole function:\n\n```python\ndef "
    "merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
    "            out.append(a[i])\n            i += 1\n        else:\n            out.append(b[j])\n"
    "            j += 1\n    out.extend(a[i:])\n    out.extend(b[j:])\n    return out\n```",
    "Rename the variable `x` to `total` in this code and return the full code:\n\n```python\ndef score(items):\n"
    "    x = 0\n    for item in items:\n        if item.valid:\n            x += item.weight * item.value\n"
    "        else:\n            x -= item.penalty\n    return x\n\n\ndef report(items):\n    x = score(items)\n"
    "    print(f\"score: {x}\")\n    return x\n```",
]


def prompts_of(name: str, limit: int | None, tokenizer) -> list[torch.Tensor]:
    if name == "mtbench":
        from eagle2_kernels.eval.questions import load_questions

        texts = [q.turns[0] for q in load_questions(limit=limit)]
    elif name == "code":
        texts = CODE_PROMPTS[:limit]
    else:
        raise SystemExit(f"unknown prompt set {name!r}; valid: mtbench, code")
    out = []
    for text in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt")
        out.append(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="mtbench,code")
    ap.add_argument("--limit", type=int, default=8, help="prompts per set (MT-bench: spread over categories)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--hf", action="store_true",
                    help="also transformers' generate, plain and with prompt lookup (prompt_lookup_num_tokens=10)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG: committed tokens by source, per method and prompt set")
    ap.add_argument("--replot", default=None, metavar="JSON", help="only plot an earlier run's --json")
    ap.add_argument("--no-compile", action="store_true", help="eager target forwards (default: as a user gets)")
    args = ap.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot_sources(json.load(f), args.plot or args.replot.replace(".json", "_sources.png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    base = TreeSpecDecoder.from_pretrained()  # the default model (bf16) and its shipped head
    model, head, tok = base.target, base.draft, base.tokenizer
    extra = {}
    if args.no_compile and "compile" in inspect.signature(TreeSpecDecoder.__init__).parameters:
        extra["compile"] = False  # eager forwards for every method
    decs = {
        "head": TreeSpecDecoder(model, head, tokenizer=tok, lookup=False, **extra),
        "head+lookup": TreeSpecDecoder(model, head, tokenizer=tok, **extra),
        "lookup": TreeSpecDecoder(model, None, tokenizer=tok, **extra),
    }
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    methods = {"plain": lambda ids, n: decs["head"].generate_plain(ids, n, eos_token_id=eos)}
    for name, dec in decs.items():
        methods[name] = (lambda d: lambda ids, n: d.generate(ids, n, eos_token_id=eos))(dec)
    if args.hf:
        from eagle2_kernels.runtime.stats import DecodeStats, GenerateOutput

        def hf(ids, n, **kw):
            with torch.no_grad():
                seq = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0],
                                     **kw)
            return GenerateOutput(seq, DecodeStats())  # rounds unknown: no tau

        methods["hf"] = hf
        methods["hf-lookup"] = lambda ids, n: hf(ids, n, prompt_lookup_num_tokens=10)
    warm = prompts_of("code", 1, tok)[0]
    for name, fn in methods.items():  # warm-up (and the cost-model measurement on first use)
        fn(warm, 16)

    env = environment()
    print(f"# {env.get('processor', '')} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"bf16 | greedy | {args.max_new_tokens} new tokens")
    results = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "json"}, "sets": {}}
    for set_name in args.sets.split(","):
        prompts = prompts_of(set_name, args.limit, tok)
        rows = {m: {"tokens": 0, "seconds": 0.0, "rounds": 0, "head": 0, "lookup": 0, "both": 0, "same": 0,
                    "prefix": 0, "per_prompt": []} for m in methods}
        for i, ids in enumerate(prompts):
            order = list(methods)[i % len(methods):] + list(methods)[: i % len(methods)]
            outs = {}
            for m in order:
                t0 = time.perf_counter()
                out = methods[m](ids, args.max_new_tokens)
                dt = time.perf_counter() - t0
                new = out.sequences[0, ids.shape[1]:].tolist()
                outs[m] = new
                r, s = rows[m], out.stats
                r["tokens"] += len(new)
                r["seconds"] += dt
                r["rounds"] += s.rounds
                r["head"] += s.head_tokens
                r["lookup"] += s.lookup_tokens
                r["both"] += s.both_tokens
                r["per_prompt"].append({"tokens": len(new), "seconds": dt, "tau": s.mean_accept_length})
            for m in methods:
                a, b = outs[m], outs["plain"]
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                rows[m]["same"] += int(a == b)
                rows[m]["prefix"] += k
        plain_rate = rows["plain"]["tokens"] / rows["plain"]["seconds"]
        print(f"\n## {set_name}: {len(prompts)} prompts")
        print(f"{'method':<12} {'tok/s':>7} {'vs plain':>9} {'tau':>6} {'same':>6} {'prefix':>7} "
              f"{'head':>6} {'lookup':>7} {'both':>6}")
        for m, r in rows.items():
            rate = r["tokens"] / r["seconds"]
            tau = r["tokens"] / r["rounds"] if r["rounds"] else 0.0
            r.update(rate=rate, speedup=rate / plain_rate, tau=tau)
            print(f"{m:<12} {rate:7.2f} {rate / plain_rate:8.2f}x {tau:6.2f} {r['same']:>3}/{len(prompts):<2} "
                  f"{r['prefix'] / len(prompts):7.1f} {r['head']:6d} {r['lookup']:7d} {r['both']:6d}")
        results["sets"][set_name] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot_sources(results, args.plot)


def plot_sources(results: dict, path: str) -> None:
    """Stacked bars: each method's committed tokens per prompt set, split by source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = results["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.2), squeeze=False)
    colours = {"target (bonus / plain step)": "#bbbbbb", "head": "#4c72b0", "lookup": "#dd8452",
               "head and lookup": "#8172b3"}
    for ax, (name, rows) in zip(axes[0], sets.items()):
        methods = [m for m, r in rows.items() if r.get("rounds")]  # tau known: our own methods
        bottom = [0.0] * len(methods)
        for label, colour in colours.items():
            key = {"head": "head", "lookup": "lookup", "head and lookup": "both"}.get(label)
            vals = [rows[m][key] if key else rows[m]["tokens"] - rows[m]["head"] - rows[m]["lookup"] - rows[m]["both"]
                    for m in methods]
            ax.bar(methods, vals, bottom=bottom, color=colour, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, m in enumerate(methods):
            r = rows[m]
            ax.text(i, bottom[i], f"tau {r['tokens'] / r['rounds']:.2f}\n{r['tokens'] / r['seconds']:.1f} tok/s",
                    ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{name}: {len(rows[methods[0]]['per_prompt'])} prompts")
        ax.set_ylabel("committed tokens")
        ax.set_ylim(0, max(bottom) * 1.18)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    env = results.get("environment", {})
    fig.suptitle(f"committed tokens by source ({env.get('processor', '')}, torch {env.get('torch', '')}, "
                 f"{env.get('threads', '')} threads)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
