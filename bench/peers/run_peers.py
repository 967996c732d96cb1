"""Peer benchmark on CPU: our decoder against the engines a CPU user could pick instead, in rotation.

Every system is loaded once, in its own process (``bench/peers/worker.py`` run with the Python of
the system's virtual environment; ``bash bench/peers/setup.sh`` creates the peers' ones), warmed
up, and then all of them decode the same prompt ids in rotation (the order rotates per prompt and
per repeat): 4 HumanEval-like code prompts and 8 MT-bench first turns (one per category),
chat-templated with the default tokenizer, greedy, bf16, batch 1, the same thread count.

Systems (those whose environment or model file is missing are skipped, with the reason):
  ours         TreeSpecDecoder.from_pretrained() with its defaults (adaptive EAGLE-2, compile="auto")
  ours-plain   the same decoder's plain loop (generate_plain), same process
  ours-nohead  TreeSpecDecoder.from_pretrained(None, False): no draft head, lookup trees alone
               (the CLI's --draft none), otherwise the defaults (adaptive, compile="auto")
  ours-headonly  TreeSpecDecoder.from_pretrained(lookup=False): the head's trees alone
  hf-eager     transformers generate, eager (sdpa), on the same bf16 weights
  hf-compiled  transformers generate with a static cache (decode step torch.compile'd, freezing on;
               one StaticCache sized for the longest prompt + new tokens, reset before each call)
  hf-lookup10  transformers generate with prompt-lookup decoding, prompt_lookup_num_tokens=10
  hf-lookup3   the same with prompt_lookup_num_tokens=3
  llama-bf16   llama.cpp on a BF16 GGUF of the same weights, plain
  llama-q4_1   llama.cpp on the Q4_1 GGUF the default model ships as, plain
  vllm         vLLM CPU, plain, on the transformers copy of the same weights
  vllm-ngram   vLLM CPU with n-gram (prompt lookup) speculation, k = 3

Reported per prompt set: tokens/s (total tokens / total seconds of the set) as the median and
range over repeats, tau (tokens per target forward) for speculative systems, output agreement with
transformers' eager greedy output (identical outputs, mean common prefix), and the load time
(load + warm-up, including compiles). A disagreement is checked at its first differing token with
the fp32 model: when the two tokens' fp32 logits are within ``--near-tie`` of each other it is a
bf16 near-tie, otherwise the system is flagged. Writes ``peers.json`` and ``table.md`` to --out.

    nice -n 19 bash bench/peers/setup.sh                       # once: the peers' environments
    .venv/bin/python bench/peers/run_peers.py --lock LOCKFILE --repeats 3 --max-new-tokens 128

The full run (both sets, every system, 3 repeats) takes about 35-50 minutes on 2 cores; see
bench/peers/README.md for the time split, the smoke run and the systems' settings.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ENVS = HERE / ".envs"
WORKER = HERE / "worker.py"

# HumanEval-style completions: a signature and a docstring with examples, the body to write.
CODE_PROMPTS = [
    "Complete the following Python function.\n\n```python\nfrom typing import List\n\n\n"
    "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    "    \"\"\"Check if in the given list of numbers, any two numbers are closer to each other than the\n"
    "    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n"
    "    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    \"\"\"\n```",
    "Complete the following Python function.\n\n```python\ndef count_vowels(word: str) -> int:\n"
    "    \"\"\"Return the number of vowels (a, e, i, o, u, either case) in word; 'y' counts as a vowel\n"
    "    only at the end of the word.\n    >>> count_vowels('abcde')\n    2\n"
    "    >>> count_vowels('ACEDY')\n    3\n    \"\"\"\n```",
    "Complete the following Python function.\n\n```python\nfrom typing import List\n\n\n"
    "def rolling_sum(numbers: List[int], window: int) -> List[int]:\n"
    "    \"\"\"Return the sums of every run of `window` consecutive numbers, in order.\n"
    "    >>> rolling_sum([1, 2, 3, 4, 5], 2)\n    [3, 5, 7, 9]\n    >>> rolling_sum([4, 4], 3)\n    []\n"
    "    \"\"\"\n```",
    "Complete the following Python function.\n\n```python\ndef fizz_count(n: int) -> int:\n"
    "    \"\"\"Return how many times the digit 7 appears in integers less than n which are divisible\n"
    "    by 11 or 13.\n    >>> fizz_count(50)\n    0\n    >>> fizz_count(79)\n    3\n    \"\"\"\n```",
]

# The untimed warm-up prompt of every system (in neither set).
WARM_PROMPT = ("Write a Python class `Stack` with push, pop and peek methods and a short docstring for each, "
               "then explain when a stack is the right data structure.")

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def cpu_line() -> tuple[str, list[str]]:
    """The CPU's model name and which of avx512_bf16 / amx_* / avx512f it has."""
    name, flags = platform.processor() or "unknown CPU", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            name = m.group(1).strip()
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        have = set(f.group(1).split()) if f else set()
        flags = sorted(x for x in have if x in ("avx512_bf16", "avx512f", "avx2") or x.startswith("amx"))
    except OSError:
        pass
    return name, flags


@contextlib.contextmanager
def cpu_lock(path: str | None):
    """Hold an exclusive flock on ``path`` (the same lock ``flock(1)`` takes), or nothing."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Worker:
    """A system's process: started, waited for until loaded, then asked for one generation at a time."""

    def __init__(self, name: str, python: Path, argv: list[str], env: dict, log: Path, plain: bool = False):
        self.name, self.plain = name, plain
        full_env = dict(os.environ, **env)
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        self.log = log
        self.proc = subprocess.Popen([str(python), str(WORKER), *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), env=full_env, text=True, cwd=str(ROOT))
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"{name}: worker exited with code {self.proc.returncode} while loading:\n  "
                               + "\n  ".join(tail))
        hello = json.loads(line)
        self.load_s, self.versions = hello["load_s"], hello["versions"]

    def generate(self, ids: list[int], n: int, eos: list[int], plain: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"ids": ids, "max_new_tokens": n, "eos": eos, "plain": plain}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"{self.name}: worker died:\n  " + "\n  ".join(tail))
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        if self.proc.poll() is None:
            self.proc.kill()


def make_bf16_gguf(q4: Path, out: Path, python: Path) -> None:
    """The BF16 GGUF of the default model: the shipped Q4_1 file requantised by llama.cpp's own
    quantiser (allow_requantize: dequantised, then stored as bf16)."""
    code = (
        "import llama_cpp, sys\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16\n"
        "p.allow_requantize = True\n"
        "p.nthread = 2\n"
        "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
        "sys.exit(rc)\n"
    )
    tmp = out.with_suffix(".tmp")
    subprocess.run([str(python), "-c", code, str(q4), str(tmp)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    tmp.rename(out)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="ours,ours-plain,ours-nohead,hf-eager,hf-compiled,hf-lookup10,hf-lookup3,"
                                         "llama-bf16,llama-q4_1,vllm,vllm-ngram")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts of each set only (smoke runs)")
    ap.add_argument("--sets", default="code,mtbench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lock", default=None, help="flock this file while loading each system and for each rotation")
    ap.add_argument("--near-tie", type=float, default=0.5,
                    help="fp32 logit gap under which a first disagreement counts as a bf16 near-tie")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu" / "peers"))
    args = ap.parse_args()

    import torch

    from eagle2_kernels.models.default import default_gguf_path, default_model_dir, load_default

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = ENVS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model32, tok = load_default(torch.float32)
    eos = sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id} - {None})

    # Prompt ids, the same for every system.
    sets: dict[str, list[list[int]]] = {}
    for s in args.sets.split(","):
        if s == "code":
            texts = CODE_PROMPTS
        elif s == "mtbench":
            from eagle2_kernels.eval.questions import load_questions

            texts = [q.turns[0] for q in load_questions(limit=8)]
        else:
            raise SystemExit(f"unknown prompt set {s!r}; valid: code, mtbench")
        ids = []
        for t in texts[: args.limit]:
            x = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                        return_tensors="pt")
            x = x["input_ids"] if hasattr(x, "keys") else x
            ids.append(x[0].tolist())
        sets[s] = ids

    warm_ids = tok.apply_chat_template([{"role": "user", "content": WARM_PROMPT}], add_generation_prompt=True,
                                       return_tensors="pt")
    warm_ids = (warm_ids["input_ids"] if hasattr(warm_ids, "keys") else warm_ids)[0].tolist()

    ours_py = Path(sys.executable)
    llama_py, vllm_py = ENVS / "llama" / "bin" / "python", ENVS / "vllm" / "bin" / "python"
    models = ENVS / "models"
    models.mkdir(exist_ok=True)
    q4 = default_gguf_path()
    bf16 = models / "SmolLM2-135M-Instruct.BF16.gguf"
    th = ["--threads", str(args.threads)]
    # transformers' static cache: the longest prompt (warm-up included) plus the new tokens, rounded
    # up to 128 slots; every slot is attended to at every step, so it is sized to what is used.
    static_len = -(-(max(len(p) for p in [warm_ids, *sum(sets.values(), [])]) + args.max_new_tokens) // 128) * 128
    specs = {
        "ours": (ours_py, ["ours", *th], {}),
        "ours-nohead": (ours_py, ["ours", *th, "--no-head"], {}),
        "ours-headonly": (ours_py, ["ours", *th, "--no-lookup"], {}),
        "hf-eager": (ours_py, ["hf-eager", *th], {}),
        "hf-compiled": (ours_py, ["hf-compiled", *th, "--cache-len", str(static_len)], {}),
        "hf-lookup10": (ours_py, ["hf-lookup", *th, "--lookup-tokens", "10"], {}),
        "hf-lookup3": (ours_py, ["hf-lookup", *th, "--lookup-tokens", "3"], {}),
        "llama-bf16": (llama_py, ["llama", *th, "--model", str(bf16)], {}),
        "llama-q4_1": (llama_py, ["llama", *th, "--model", str(q4)], {}),
        "vllm": (vllm_py, ["vllm", *th, "--model", str(default_model_dir())],
                 dict(VLLM_ENV, VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}")),
        "vllm-ngram": (vllm_py, ["vllm-ngram", *th, "--model", str(default_model_dir())],
                       dict(VLLM_ENV, VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}")),
    }
    wanted = args.systems.split(",")
    bad = [w for w in wanted if w not in specs and w != "ours-plain"]
    if bad:
        raise SystemExit(f"unknown systems {bad}; valid: {', '.join(['ours-plain', *specs])}")
    if "hf-eager" not in wanted:
        raise SystemExit("hf-eager is the reference for output agreement; keep it in --systems")

    skipped: dict[str, str] = {}
    workers: dict[str, Worker] = {}
    for name in wanted:
        if name == "ours-plain":
            continue
        py, argv, env = specs[name]
        if not py.exists():
            skipped[name] = f"no environment ({py.relative_to(ROOT)}): run bash bench/peers/setup.sh"
            continue
        if name == "llama-bf16" and not bf16.exists():
            print("making the BF16 GGUF with llama.cpp's quantiser ...", flush=True)
            try:
                make_bf16_gguf(q4, bf16, llama_py)
            except subprocess.CalledProcessError as exc:
                skipped[name] = f"BF16 GGUF conversion failed: {exc}"
                continue
        print(f"loading {name} ...", flush=True)
        try:
            with cpu_lock(args.lock):
                workers[name] = Worker(name, py, argv, env, logs / f"{name}.log")
        except Exception as exc:  # a peer that does not start is reported, not fatal
            skipped[name] = str(exc)
            print(f"  {name} failed: {str(exc)[:2000]}", flush=True)
            continue
        # A full-length generation on a prompt outside the benchmark sets, untimed, so that any
        # compile left for real prompt lengths and sizes (ours: buckets the short warm-up did not
        # reach) happens here and not in the first timed run.
        with cpu_lock(args.lock):
            t0 = time.perf_counter()
            for plain in ([False, True] if name == "ours" else [False]):
                workers[name].generate(warm_ids, args.max_new_tokens, eos, plain=plain)
            workers[name].warm_s = time.perf_counter() - t0
        print(f"  {name}: {workers[name].load_s:.1f} s load + warm-up, {workers[name].warm_s:.1f} s first full "
              f"generation; {workers[name].versions}", flush=True)
    if "hf-eager" not in workers:
        raise SystemExit(f"the reference system hf-eager did not load: {skipped.get('hf-eager')}")
    # (system name, worker, plain flag) in rotation order.
    systems = []
    for name in wanted:
        if name == "ours-plain":
            if "ours" in workers:
                systems.append((name, workers["ours"], True))
            else:
                skipped[name] = "ours did not load"
        elif name in workers:
            systems.append((name, workers[name], False))

    # runs[system][set] = list over repeats of list over prompts of results
    runs = {s[0]: {k: [] for k in sets} for s in systems}
    for rep in range(args.repeats):
        with cpu_lock(args.lock):
            t_rep = time.perf_counter()
            for set_name, prompts in sets.items():
                per = {s[0]: [None] * len(prompts) for s in systems}
                for i, ids in enumerate(prompts):
                    k = (i + rep) % len(systems)
                    for name, w, plain in systems[k:] + systems[:k]:
                        time.sleep(0.3)  # let the previous system's worker threads go idle
                        per[name][i] = w.generate(ids, args.max_new_tokens, eos, plain=plain)
                for name in per:
                    runs[name][set_name].append(per[name])
            print(f"repeat {rep + 1}/{args.repeats}: {time.perf_counter() - t_rep:.0f} s", flush=True)
    for w in workers.values():
        w.close()

    # Agreement with transformers' eager greedy output (repeat 0), first disagreements in fp32.
    def fp32_gap(ids: list[int], prefix: list[int], a: int, b: int) -> float:
        with torch.no_grad():
            logits = model32(torch.tensor([ids + prefix])).logits[0, -1].float()
        return float(logits[a] - logits[b])

    table = {}
    for set_name, prompts in sets.items():
        ref = [r["tokens"] for r in runs["hf-eager"][set_name][0]]
        base_rates = None
        for name, _, _ in systems:
            reps = runs[name][set_name]
            rates = [sum(len(r["tokens"]) for r in rep) / sum(r["seconds"] for r in rep) for rep in reps]
            toks = [r["tokens"] for r in reps[0]]
            rounds = [r["rounds"] for rep in reps for r in rep]
            tau = None
            if rounds and all(x for x in rounds):
                tau = sum(len(r["tokens"]) for rep in reps for r in rep) / sum(rounds)
            diverge = []
            for i, (a, b) in enumerate(zip(toks, ref)):
                k = common_prefix(a, b)
                if a != b and k < min(len(a), len(b)):
                    gap = fp32_gap(prompts[i], b[:k], b[k], a[k])
                    diverge.append({"prompt": i, "at": k, "ref_token": b[k], "token": a[k], "fp32_gap": gap,
                                    "near_tie": abs(gap) <= args.near_tie})
                elif a != b:
                    diverge.append({"prompt": i, "at": k, "length_only": True, "near_tie": True})
            stable = all([r["tokens"] for r in rep] == toks for rep in reps)
            row = {
                "tok_s_median": statistics.median(rates), "tok_s_min": min(rates), "tok_s_max": max(rates),
                "tok_s_repeats": rates, "tau": tau,
                "tokens": sum(len(t) for t in toks),
                "same_as_hf": sum(int(a == b) for a, b in zip(toks, ref)), "prompts": len(prompts),
                "mean_common_prefix": statistics.mean(common_prefix(a, b) for a, b in zip(toks, ref)),
                "first_disagreements": diverge,
                "flagged": any(not d["near_tie"] for d in diverge),
                "same_output_every_repeat": stable,
                "load_s": (workers["ours"] if name == "ours-plain" else workers[name]).load_s,
                "first_generation_s": (workers["ours"] if name == "ours-plain" else workers[name]).warm_s,
                "per_prompt": [{"tokens": len(r["tokens"]), "seconds": r["seconds"], "rounds": r["rounds"]}
                               for r in reps[0]],
            }
            if name == "hf-eager":
                base_rates = row["tok_s_median"]
            table.setdefault(set_name, {})[name] = row
        for row in table[set_name].values():
            row["vs_hf_eager"] = row["tok_s_median"] / base_rates

    cpu, flags = cpu_line()
    versions = {n: w.versions for n, w in workers.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"cpu": cpu, "cpu_flags": flags, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
              "repeats": args.repeats, "limit": args.limit, "commit": commit, "python": platform.python_version(),
              "versions": versions,
              "skipped": skipped, "eos": eos, "near_tie_logit_gap": args.near_tie,
              "prompt_lengths": {k: [len(p) for p in v] for k, v in sets.items()}, "sets": table}
    (out_dir / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    (out_dir / "table.md").write_text(md)
    print(md)


def render(res: dict) -> str:
    """The markdown table of a result (one table per prompt set)."""
    lines = [f"CPU: {res['cpu']} (flags: {', '.join(res['cpu_flags']) or 'none of avx512_bf16/amx'}), "
             f"{res['threads']} threads, bf16, greedy, batch 1, {res['max_new_tokens']} new tokens "
             f"(stop at end of turn), {res['repeats']} repeats in rotation, commit {res['commit']}.", ""]
    names = {"ours": "ours, default adaptive EAGLE-2 (compile=auto)", "ours-plain": "ours, plain loop (generate_plain)",
             "ours-nohead": "ours, no draft head: lookup trees only (compile=auto)",
             "ours-headonly": "ours, head trees only: no lookup candidates (compile=auto)",
             "hf-eager": "transformers generate, eager (sdpa)",
             "hf-compiled": "transformers generate, static cache + torch.compile (freezing)",
             "hf-lookup10": "transformers generate, prompt lookup (10 tokens)",
             "hf-lookup3": "transformers generate, prompt lookup (3 tokens)",
             "llama-bf16": "llama.cpp, BF16 GGUF, plain", "llama-q4_1": "llama.cpp, Q4_1 GGUF, plain",
             "vllm": "vLLM CPU, plain", "vllm-ngram": "vLLM CPU, n-gram (k=3, lookup 2-4)"}
    for set_name, rows in res["sets"].items():
        lens = res["prompt_lengths"][set_name]
        lines += [f"### {set_name}: {len(lens)} prompts ({min(lens)}-{max(lens)} prompt tokens)", "",
                  "| system | tok/s median | range | vs transformers eager | tau | same as transformers | "
                  "mean common prefix | agreement | load + warm-up s | first full generation s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            tau = f"{r['tau']:.2f}" if r["tau"] else "-"
            agree = "reference" if name == "hf-eager" else (
                "FLAGGED" if r["flagged"] else ("near-ties only" if r["first_disagreements"] else "identical"))
            lines.append(f"| {names.get(name, name)} | {r['tok_s_median']:.1f} | {r['tok_s_min']:.1f}-{r['tok_s_max']:.1f}"
                         f" | {r['vs_hf_eager']:.2f}x | {tau} | {r['same_as_hf']}/{r['prompts']} | "
                         f"{r['mean_common_prefix']:.1f} | {agree} | {r['load_s']:.0f} | {r['first_generation_s']:.1f} |")
        lines.append("")
    if res["skipped"]:
        lines += ["Not run:", ""] + [f"- {k}: {v.splitlines()[0][:300]}" for k, v in res["skipped"].items()] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
