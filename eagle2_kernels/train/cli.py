"""Command line of the training pipeline: ``eagle2 train <command> ...``.

Commands::

    features    cache the target's features for a slice of ShareGPT (or a JSONL of chats)
    selfdistill write the target's own greedy answers to ShareGPT prompts as a JSONL of chats
    fit         train a head on cached features
    eval        held-out 1..5-step accuracy of a head, as JSON
    run         features (train + held-out) -> fit -> eval, with defaults for a small CPU

``--target`` (a local model directory or hub id, loaded with transformers' Auto classes and its
tokenizer) trains for another causal LM than the embedded default; pass the same one to every
command of a pipeline.

Feature directories are large (2*H bytes per token); keep them outside the repository, by
default under ``$EAGLE2_KERNELS_CACHE/features``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _default_work_dir() -> Path:
    from eagle2_kernels.models.default import cache_dir

    return cache_dir() / "train"


def _load_conversations(source: str, start: int, count: int | None) -> tuple[list, str]:
    """Slice ``[start, start+count)`` of the usable conversations; negative start counts from
    the end. ``source`` is ``sharegpt`` or the path of a JSONL file of message lists."""
    from eagle2_kernels.train.data import iter_sharegpt

    if source == "sharegpt":
        convs = list(iter_sharegpt())
    else:
        path = Path(source)
        if not path.is_file():
            raise SystemExit(f"--source must be 'sharegpt' or a JSONL file of chats; {source!r} "
                             "is neither")
        convs = [json.loads(line).get("messages") for line in path.read_text().splitlines()]
        convs = [c for c in convs if c]  # skipped prompts are recorded as empty lines
    n = len(convs)
    if not -n <= start < n:
        raise SystemExit(f"--start {start} is outside the {n} usable conversations of {source}")
    begin = start % n
    end = n if count is None else min(n, begin + count)
    label = f"{Path(source).name if source != 'sharegpt' else 'sharegpt'}[{begin}:{end}]"
    return convs[begin:end], label


def _load_target(dtype_name: str, target: str | None = None):
    """(model, tokenizer): the embedded default, or ``target`` (a local directory or hub id)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if target is None:
        from eagle2_kernels.models.default import load_default

        return load_default(dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--target {target!r}: cannot load a causal LM and its tokenizer ({exc})") from None
    return model, tokenizer


def _target_model(args, dtype_name: str = "fp32"):
    """The ``--target`` model for fit / eval (None: the functions load the default)."""
    return None if args.target is None else _load_target(dtype_name, args.target)[0]


def cmd_features(args) -> int:
    from eagle2_kernels.train.features import generate_features

    convs, label = _load_conversations(args.source, args.start, args.count)
    model, tokenizer = _load_target(args.dtype, args.target)
    layers = None
    if args.arch == "eagle3":
        from eagle2_kernels.models.eagle3_head import default_feature_layers

        layers = default_feature_layers(int(model.config.num_hidden_layers))
    meta = generate_features(model, tokenizer, convs, args.out, source=label,
                             max_len=args.max_len, chunk_size=args.chunk_size,
                             stop_after_chunks=args.stop_after_chunks, feature_layers=layers)
    print(json.dumps({k: meta[k] for k in ("source", "tokens", "loss_tokens", "seconds",
                                             "complete")}))
    return 0


def cmd_selfdistill(args) -> int:
    from eagle2_kernels.train.selfdistill import generate_answers

    convs, label = _load_conversations("sharegpt", args.start, args.count)
    model, tokenizer = _load_target(args.dtype, args.target)
    n = generate_answers(model, tokenizer, convs, args.out, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens,
                         window_batches=args.window_batches)
    print(json.dumps({"source": label, "written": n, "out": str(args.out)}))
    return 0


def cmd_fit(args) -> int:
    from eagle2_kernels.train.fit import FitConfig, fit

    cfg = FitConfig(
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup,
        batch_tokens=args.batch_tokens, seq_len=args.seq_len, noise=args.noise,
        p_weight=args.p_weight, ttt_steps=args.ttt_steps, ttt_decay=args.ttt_decay,
        draft_vocab=args.draft_vocab, seed=args.seed, time_limit_s=args.time_limit,
        init_from=None if args.init_from is None else str(args.init_from),
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, bf16=args.bf16,
        max_train_tokens=args.max_train_tokens, snapshot_every=args.snapshot_every,
        arch=args.arch,
    )
    result = fit(args.features, args.out, cfg, eval_dirs=args.eval_features, target=_target_model(args))
    print(json.dumps(result, indent=2))
    return 0


def cmd_eval(args) -> int:
    from eagle2_kernels.train.evaluate import evaluate_head

    result = evaluate_head(args.head, args.features, steps=args.steps, max_tokens=args.max_tokens,
                           target=_target_model(args))
    if args.mtbench:
        from eagle2_kernels.train.evaluate import mtbench_tau

        configs = []
        for item in args.configs.split(";"):
            parts = item.split(",")
            if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
                raise SystemExit(f"--configs wants 'T,D,K;T,D,K', got {item!r}")
            configs.append(tuple(int(p) for p in parts))
        result["mtbench"] = {
            "questions": args.mtbench, "turn": 1, "max_new_tokens": args.max_new_tokens,
            "dtype": "bf16", "greedy": True,
            "configs": mtbench_tau(args.head, configs, questions=args.mtbench,
                                   max_new_tokens=args.max_new_tokens,
                                   target=None if args.target is None else _load_target("bf16", args.target)),
        }
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def cmd_run(args) -> int:
    """The whole pipeline with one command (each stage resumes / reuses finished work)."""
    work = Path(args.work_dir)
    train_dir, eval_dir = work / "features-train", work / "features-heldout"
    t0 = time.perf_counter()
    if args.arch == "eagle3":  # multi-layer features (they also train an EAGLE-1/2 head)
        train_dir, eval_dir = work / "features3-train", work / "features3-heldout"
    arch = ["--arch", args.arch] + ([] if args.target is None else ["--target", str(args.target)])
    sub = [("features", ["--out", str(eval_dir), "--start", str(-args.heldout),
                         "--count", str(args.heldout), "--max-len", str(args.max_len), *arch]),
           ("features", ["--out", str(train_dir), "--start", "0", "--count",
                         str(args.conversations), "--max-len", str(args.max_len), *arch])]
    for name, extra in sub:
        rc = main([name, *extra])
        if rc:
            return rc
    fit_args = ["fit", "--features", str(train_dir), "--eval-features", str(eval_dir),
                "--out", str(args.out), "--epochs", str(args.epochs),
                "--draft-vocab", str(args.draft_vocab), "--ttt-steps", str(args.ttt_steps), *arch]
    if args.time_limit is not None:
        fit_args += ["--time-limit", str(args.time_limit)]
    rc = main(fit_args)
    if rc:
        return rc
    rc = main(["eval", "--head", str(args.out), "--features", str(eval_dir),
               "--json", str(Path(args.out) / "eval.json")]
              + ([] if args.target is None else ["--target", str(args.target)]))
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s")
    return rc


def _target_arg(parser) -> None:
    parser.add_argument("--target", default=None,
                        help="the target: a local model directory or hub id with its tokenizer "
                             "(default: the embedded SmolLM2-135M-Instruct)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eagle2 train",
                                description="Train an EAGLE draft head for the default model or --target.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sp = p.add_subparsers(dest="command", required=True)

    f = sp.add_parser("features", help="cache target features for a slice of conversations")
    f.add_argument("--out", type=Path, required=True, help="feature directory (outside the repo)")
    f.add_argument("--source", default="sharegpt",
                   help="'sharegpt' (the wheel's ShareGPT V3) or a JSONL from `selfdistill`")
    f.add_argument("--start", type=int, default=0,
                   help="first usable conversation (negative: from the end)")
    f.add_argument("--count", type=int, default=None, help="how many conversations (default all)")
    f.add_argument("--max-len", type=int, default=1024, help="tokens per conversation (cut)")
    f.add_argument("--chunk-size", type=int, default=32, help="conversations per chunk")
    f.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    f.add_argument("--stop-after-chunks", type=int, default=None,
                   help="write at most this many new chunks, then stop (resume later)")
    f.add_argument("--arch", choices=["eagle2", "eagle3"], default="eagle2",
                   help="eagle3: store the hidden states entering layers 2, L//2, L-3 and the "
                        "post-norm one (4x the disk; trains either head kind)")
    _target_arg(f)
    f.set_defaults(func=cmd_features)

    s = sp.add_parser("selfdistill", help="target's greedy answers to ShareGPT first prompts")
    s.add_argument("--out", type=Path, required=True, help="JSONL file (appended; resumable)")
    s.add_argument("--start", type=int, default=0)
    s.add_argument("--count", type=int, default=256)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--batch-size", type=int, default=32,
                   help="prompts generated together (left-padded; larger is faster per token)")
    s.add_argument("--max-prompt-tokens", type=int, default=512,
                   help="longer prompts are skipped (recorded as skipped lines)")
    s.add_argument("--window-batches", type=int, default=8,
                   help="batches per window inside which prompts are sorted by length")
    s.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    _target_arg(s)
    s.set_defaults(func=cmd_selfdistill)

    t = sp.add_parser("fit", help="train a head on cached features")
    t.add_argument("--features", type=Path, nargs="+", required=True)
    t.add_argument("--eval-features", type=Path, nargs="*", default=None,
                   help="held-out feature directories, evaluated during and after training")
    t.add_argument("--out", type=Path, required=True, help="head directory to write")
    t.add_argument("--epochs", type=float, default=4.0)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--time-limit", type=float, default=None,
                   help="stop after this many seconds (cosine schedule fitted to the budget)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--batch-tokens", type=int, default=8192)
    t.add_argument("--seq-len", type=int, default=1024, help="training window (tokens)")
    t.add_argument("--noise", type=float, default=0.1,
                   help="uniform noise amplitude on input features, relative to their std")
    t.add_argument("--p-weight", type=float, default=0.1, help="weight of the token loss")
    t.add_argument("--ttt-steps", type=int, default=1,
                   help="draft steps per position (1: teacher forcing only; >1 rolls the draft "
                        "on its own predicted features)")
    t.add_argument("--ttt-decay", type=float, default=0.8, help="weight of step j is decay**j")
    t.add_argument("--draft-vocab", type=int, default=8192,
                   help="reduced draft vocabulary size (0: the full target vocabulary)")
    t.add_argument("--init-from", type=Path, default=None, help="start from this head")
    t.add_argument("--eval-every", type=int, default=500, help="steps between held-out checks")
    t.add_argument("--eval-tokens", type=int, default=8000,
                   help="held-out tokens used by the periodic checks")
    t.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the forward and backward (weights stay fp32)")
    t.add_argument("--max-train-tokens", type=int, default=None,
                   help="use only the first N tokens of the training features (data-size curves)")
    t.add_argument("--snapshot-every", type=int, default=0,
                   help="also save the head every N steps under OUT/snapshots/step_NNNNNN")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--arch", choices=["eagle2", "eagle3"], default="eagle2",
                   help="head kind: eagle2 (fc + one layer on the last feature) or eagle3 "
                        "(multi-layer features, own lm_head; token loss only; official "
                        "--ttt-steps 7); eagle3 needs `features --arch eagle3`")
    _target_arg(t)
    t.set_defaults(func=cmd_fit)

    e = sp.add_parser("eval", help="held-out 1..N-step draft accuracy")
    e.add_argument("--head", type=Path, required=True)
    e.add_argument("--features", type=Path, nargs="+", required=True)
    e.add_argument("--steps", type=int, default=5)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--json", type=Path, default=None, help="write the result here too")
    e.add_argument("--mtbench", type=int, default=0,
                   help="also measure tau with the decoder on this many MT-bench first turns")
    e.add_argument("--configs", default="4,2,2;60,5,10",
                   help="fixed tree shapes T,D,K;T,D,K (default: a small CPU tree and the GPU paper shape)")
    e.add_argument("--max-new-tokens", type=int, default=128)
    _target_arg(e)
    e.set_defaults(func=cmd_eval)

    r = sp.add_parser("run", help="features -> fit -> eval with defaults")
    r.add_argument("--work-dir", type=Path, default=None,
                   help="where features go (default $EAGLE2_KERNELS_CACHE/train)")
    r.add_argument("--out", type=Path, required=True, help="head directory to write")
    r.add_argument("--conversations", type=int, default=2000)
    r.add_argument("--heldout", type=int, default=64)
    r.add_argument("--max-len", type=int, default=1024)
    r.add_argument("--epochs", type=float, default=4.0)
    r.add_argument("--time-limit", type=float, default=None)
    r.add_argument("--draft-vocab", type=int, default=8192)
    r.add_argument("--ttt-steps", type=int, default=1)
    r.add_argument("--arch", choices=["eagle2", "eagle3"], default="eagle2")
    _target_arg(r)
    r.set_defaults(func=cmd_run)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        import torch

        # On a small shared CPU one thread per process is often faster than two that wait on
        # each other; the default keeps torch's choice.
        torch.set_num_threads(args.threads)
    if getattr(args, "work_dir", "unset") is None:
        args.work_dir = _default_work_dir()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
