"""Two revisions of this package side by side on this CPU: is a change slower end to end?

Each revision is checked out in a temporary git worktree and served by its own process
(``bench/peers/worker.py ours``: ``TreeSpecDecoder.from_pretrained()`` with the default
settings, compiled forwards included, warmed up before timing). The prompts are decoded in
rotation (revision order alternating per prompt and repeat), greedy, bf16, batch 1, and every
output of one revision must equal the other's token for token (same model, same ops: a
refactor must not change a single token; a mismatch fails the run).

    python bench/bench_commits.py --before 289da3c --after HEAD [--limit 8] [--repeats 2]

``--after WORKTREE`` uses the current checkout as it is (uncommitted changes included). The
native extension is copied from this checkout into each worktree when the revisions' ``csrc/``
agree with it, else built there. Writes ``summary.md`` and
``commits.json`` to ``--out`` (default ``bench/results/cpu/refactor``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "bench" / "peers" / "worker.py"


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def cpu_line() -> str:
    flags = ""
    model = platform.processor()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == platform.processor():
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]
    return f"{model}; flags: {' '.join(keep)}; {os.cpu_count()} cores"


class Rev:
    """One revision's worker process (PYTHONPATH = its worktree)."""

    def __init__(self, name: str, tree: Path, threads: int, log: Path, compile: bool = True):
        self.name, self.tree = name, tree
        env = dict(os.environ, PYTHONPATH=str(tree))
        env.pop("EAGLE2_KERNELS_COMPILE", None)  # the default a user gets
        if not compile:
            env["EAGLE2_KERNELS_COMPILE"] = "0"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "ours", "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     env=env, text=True, cwd=str(tree))
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{name}: worker failed to load:\n" + log.read_text(errors="replace")[-3000:])
        hello = json.loads(line)
        self.versions = hello.get("versions", {})

    def generate(self, ids: list[int], n: int, eos: list[int]) -> dict:
        self.proc.stdin.write(json.dumps({"ids": ids, "max_new_tokens": n, "eos": eos}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: worker died:\n" + self.log.read_text(errors="replace")[-3000:])
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()


def checkout(rev: str, tmp: Path) -> tuple[Path, str]:
    """A worktree of ``rev`` (or this checkout for WORKTREE) with the native extension."""
    if rev == "WORKTREE":
        return ROOT, git("rev-parse", "--short", "HEAD") + "+worktree"
    sha = git("rev-parse", "--short", rev)
    path = tmp / sha
    git("worktree", "add", "--detach", str(path), sha)
    if git("diff", sha, "--", "csrc", "setup.py"):  # its own sources: build its own extension
        print(f"building the native extension of {sha} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=path, check=True,
                       stdout=subprocess.DEVNULL)
    else:
        for so in (ROOT / "eagle2_kernels").glob("_C*.so"):
            shutil.copy2(so, path / "eagle2_kernels" / so.name)
    return path, sha


def prompts(limit: int):
    from transformers import AutoTokenizer

    from eagle2_kernels.eval.questions import load_questions
    from eagle2_kernels.models.default import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    eos = sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id} - {None})
    ids = []
    for q in load_questions(limit=limit):
        x = tok.apply_chat_template([{"role": "user", "content": q.turns[0]}], add_generation_prompt=True,
                                    return_tensors="pt")
        x = x["input_ids"] if hasattr(x, "keys") else x
        ids.append(x[0].tolist())
    return ids, eos


def rotate(revs: list[Rev], sets: list[list[int]], eos, args) -> dict:
    """Every prompt, every repeat, revisions alternating first; outputs compared."""
    times = {r.name: [[] for _ in sets] for r in revs}
    tokens = {r.name: [None] * len(sets) for r in revs}
    mismatches = []
    for rep in range(args.repeats):
        for i, ids in enumerate(sets):
            order = revs if (rep + i) % 2 == 0 else revs[::-1]
            for r in order:
                res = r.generate(ids, args.max_new_tokens, eos)
                times[r.name][i].append((len(res["tokens"]), res["seconds"]))
                if tokens[r.name][i] is None:
                    tokens[r.name][i] = res["tokens"]
            a, b = (tokens[r.name][i] for r in revs)
            if a != b and i not in mismatches:
                mismatches.append(i)
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    out = {}
    for r in revs:
        per_prompt = [statistics.median(n / s for n, s in runs) for runs in times[r.name]]
        total_n = sum(runs[0][0] for runs in times[r.name])
        total_s = sum(statistics.median(s for _, s in runs) for runs in times[r.name])
        out[r.name] = {"tok_s": total_n / total_s, "per_prompt_tok_s": per_prompt, "versions": r.versions}
    return {"systems": out, "mismatched_prompts": mismatches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a git revision")
    ap.add_argument("--after", default="WORKTREE", help="a git revision, or WORKTREE (this checkout as it is)")
    ap.add_argument("--limit", type=int, default=8, help="MT-bench first turns (one per category)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="eager target forwards in both (a quick check)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu" / "refactor"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets, eos = prompts(args.limit)
    tmp = Path(tempfile.mkdtemp(prefix="e2k-commits-"))
    revs: list[Rev] = []
    try:
        for label, rev in (("before", args.before), ("after", args.after)):
            tree, sha = checkout(rev, tmp)
            t0 = time.perf_counter()
            revs.append(Rev(f"{label} {sha}", tree, args.threads, out / f"{label}.log", not args.no_compile))
            print(f"{label} {sha}: loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        res = rotate(revs, sets, eos, args)
    finally:
        for r in revs:
            r.close()
        for p in tmp.iterdir():
            subprocess.run(["git", "worktree", "remove", "--force", str(p)], cwd=ROOT, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    res.update(cpu=cpu_line(), args=vars(args), python=platform.python_version())
    (out / "commits.json").write_text(json.dumps(res, indent=1))
    names = list(res["systems"])
    a, b = (res["systems"][n]["tok_s"] for n in names)
    lines = [f"# {names[0]} vs {names[1]}", "", f"CPU: {res['cpu']}; threads {args.threads}; "
             f"{args.limit} MT-bench first turns, {args.max_new_tokens} new tokens, greedy, bf16, batch 1, "
             f"default settings, {args.repeats} repeats in rotation (median per prompt).", "",
             "| revision | tok/s | compile |", "|---|---|---|"]
    for n in names:
        s = res["systems"][n]
        lines.append(f"| {n} | {s['tok_s']:.1f} | {s['versions'].get('compile', '?')} |")
    lines += ["", f"after / before: {b / a:.3f}x. Outputs identical on "
              f"{len(sets) - len(res['mismatched_prompts'])}/{len(sets)} prompts."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if res["mismatched_prompts"]:
        raise SystemExit(f"outputs differ on prompts {res['mismatched_prompts']}")


if __name__ == "__main__":
    main()
