"""Summaries and the report: per-category / per-turn / per-question statistics, the markdown
tables, the fp32 correctness gate, the whole ``eagle2 bench`` report, and the JSON file."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from eagle2_kernels.eval.methods import HF, LOOP, SPEC
from eagle2_kernels.eval.runner import TurnRecord, pooled_speedup
from eagle2_kernels.eval.tally import histogram, pooled_reliability


def _group_summary(records: Sequence[TurnRecord], methods: Sequence[str]) -> dict:
    out: dict = {"turns": len(records), "methods": {}}
    for name in methods:
        gens = [r.results[name] for r in records]
        tokens = sum(len(g.new_ids) for g in gens)
        seconds = sum(g.seconds for g in gens)
        row = {
            "new_tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        }
        if gens and all(g.speculative for g in gens):
            lengths = [a for g in gens for a in g.accept_lengths]
            row["rounds"] = len(lengths)
            row["tau"] = sum(lengths) / len(lengths) if lengths else float("nan")
            for part in ("draft_s", "verify_s", "other_s"):
                row[part] = sum(getattr(g, part) or 0.0 for g in gens)
        ref = records[0].reference if records else None
        if name != ref and records:
            divs = [r.first_divergence[name] for r in records]
            mism = [d for d in divs if d is not None]
            prefixes = [
                len(r.results[ref].new_ids) if d is None else d for r, d in zip(records, divs)
            ]
            ref_tokens = sum(len(r.results[ref].new_ids) for r in records)
            row["match_fraction"] = sum(r.match[name] for r in records) / len(records)
            row["mismatches"] = len(mism)
            row["mean_first_divergence"] = statistics.fmean(mism) if mism else None
            row["mean_common_prefix"] = statistics.fmean(prefixes)
            # share of the reference's tokens reproduced before the first divergence
            row["common_prefix_fraction"] = sum(prefixes) / ref_tokens if ref_tokens else float("nan")
        out["methods"][name] = row
    speculative = [n for n, row in out["methods"].items() if "tau" in row]
    baselines = [n for n, row in out["methods"].items() if "tau" not in row]
    out["speedup"] = {
        m: {b: pooled_speedup(records, m, b) for b in baselines} for m in speculative
    }
    # tokens/s ratio: equals the speedup when both produced the same number of tokens; the
    # fairer figure when outputs diverge (bf16) and end at different lengths
    out["throughput_ratio"] = {
        m: {b: out["methods"][m]["tokens_per_s"] / out["methods"][b]["tokens_per_s"] for b in baselines}
        for m in speculative
    }
    return out


def summarize(records: Sequence[TurnRecord]) -> dict:
    """Overall, per-category, per-turn and per-question summaries of the records.

    Every group holds, per method: new tokens, seconds, tokens/s; for speculative methods
    also rounds, tau (pooled over rounds) and the draft/verify/other split; for methods other
    than the reference the fraction of turns matching the reference exactly, the number of
    mismatches, the mean first-divergence position (over mismatching turns) and the mean
    common prefix (over all turns). ``speedup[m][b]`` = total seconds of baseline ``b`` / total
    seconds of speculative method ``m`` over the group's turns; ``throughput_ratio[m][b]`` =
    tokens/s of ``m`` / tokens/s of ``b`` (equal to the speedup when both produced as many tokens).
    """
    if not records:
        raise ValueError("no records to summarize")
    methods = list(records[0].results)
    out = {"overall": _group_summary(records, methods), "categories": {}, "turns": {}, "questions": {}}
    for cat in dict.fromkeys(r.category for r in records):
        out["categories"][cat] = _group_summary([r for r in records if r.category == cat], methods)
    for t in sorted({r.turn for r in records}):
        out["turns"][str(t + 1)] = _group_summary([r for r in records if r.turn == t], methods)
    for qid in dict.fromkeys(r.question_id for r in records):
        group = [r for r in records if r.question_id == qid]
        out["questions"][str(qid)] = {
            "category": group[0].category,
            "speedup": _group_summary(group, methods)["speedup"],
        }
    spec = [m for m in methods if records[0].results[m].speculative]
    out["accept_length_histogram"] = {
        m: histogram([a for r in records for a in r.results[m].accept_lengths]) for m in spec
    }
    out["tree_size_histogram"] = {
        m: histogram([n for r in records for n in (r.results[m].tree_sizes or [])]) for m in spec
    }
    out["reliability"] = {m: rel for m in spec if (rel := pooled_reliability(records, m)) is not None}
    return out


def _f(x, digits=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def format_report(summary: dict, speculative: str = SPEC, baselines: Sequence[str] = (HF, LOOP)) -> str:
    """A markdown report: per-category table, then the overall line and match statistics."""
    overall = summary["overall"]
    methods = overall["methods"]
    if speculative not in methods:
        raise ValueError(f"method {speculative!r} is not in the summary ({list(methods)})")
    baselines = [b for b in baselines if b in methods]
    head = ["category", "turns"] + [f"{b} tok/s" for b in baselines] + [f"{speculative} tok/s", "tau"]
    head += [f"speedup vs {b}" for b in baselines] + ["exact match"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, group: dict) -> str:
        m = group["methods"]
        cells = [name, str(group["turns"])]
        cells += [_f(m[b]["tokens_per_s"], 1) for b in baselines]
        cells += [_f(m[speculative]["tokens_per_s"], 1), _f(m[speculative].get("tau"))]
        cells += [_f(group["speedup"][speculative][b]) + "x" for b in baselines]
        frac = m[speculative].get("match_fraction")
        cells.append("-" if frac is None else f"{100 * frac:.0f}%")
        return "| " + " | ".join(cells) + " |"

    for cat, group in summary["categories"].items():
        lines.append(row(cat, group))
    lines.append(row("**all**", overall))
    lines.append("")
    spec = methods[speculative]
    parts = [f"speedup vs {b}: {overall['speedup'][speculative][b]:.2f}x" for b in baselines]
    lines.append(f"overall: {', '.join(parts)}, tau {spec.get('tau', float('nan')):.2f}")
    ratios = [f"{overall['throughput_ratio'][speculative][b]:.2f}x vs {b}" for b in baselines]
    lines.append(f"tokens/s ratio (differs from the time ratio when outputs end at different lengths): "
                 f"{', '.join(ratios)}")
    for name, m in methods.items():
        if "match_fraction" in m:
            mfd = m["mean_first_divergence"]
            lines.append(
                f"{name} vs reference: {m['match_fraction'] * 100:.1f}% of turns identical "
                f"({m['mismatches']} differ; mean first divergence at token "
                f"{'-' if mfd is None else f'{mfd:.1f}'}; mean common prefix "
                f"{m['mean_common_prefix']:.1f} tokens, {100 * m['common_prefix_fraction']:.1f}% "
                f"of the reference's tokens)"
            )
    if "draft_s" in spec:
        total = spec["draft_s"] + spec["verify_s"] + spec["other_s"]
        if total > 0:
            lines.append(
                f"{speculative} time split: draft {100 * spec['draft_s'] / total:.0f}%, verify "
                f"{100 * spec['verify_s'] / total:.0f}%, other {100 * spec['other_s'] / total:.0f}%"
            )
    return "\n".join(lines)


def format_sweep(summary: dict, methods: Sequence[str], baselines: Sequence[str] = (HF, LOOP)) -> str:
    """A markdown table comparing several speculative methods (say, tree shapes) of one run."""
    overall = summary["overall"]
    baselines = [b for b in baselines if b in overall["methods"]]
    head = ["method", "tok/s", "tau"] + [f"speedup vs {b}" for b in baselines]
    head += ["exact match", "mean common prefix", "draft / verify / other"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in methods:
        m = overall["methods"][name]
        total = m["draft_s"] + m["verify_s"] + m["other_s"]
        split = "-" if total <= 0 else "/".join(
            f"{100 * m[p] / total:.0f}" for p in ("draft_s", "verify_s", "other_s")) + " %"
        cells = [name, _f(m["tokens_per_s"], 1), _f(m["tau"])]
        cells += [_f(overall["speedup"][name][b]) + "x" for b in baselines]
        frac = m.get("match_fraction")
        cells += ["-" if frac is None else f"{100 * frac:.0f}%", _f(m.get("mean_common_prefix"), 1), split]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)



def lossless_failures(records: Sequence[TurnRecord], methods: Sequence[str]) -> list[tuple[int, int, int]]:
    """The turns on which one of ``methods`` did not reproduce the reference's output.

    Returns:
        ``(question id, turn (1-based), first divergence)`` per differing turn and method, in
        method then record order; empty when every output matches.
    """
    return [(r.question_id, r.turn + 1, r.first_divergence[m]) for m in methods for r in records
            if not r.match[m]]


def bench_report(
    records: Sequence[TurnRecord],
    summary: dict,
    *,
    dtype: str,
    max_new_tokens: int,
    speculative: Sequence[str] = (SPEC,),
    reference: str = HF,
    baselines: Sequence[str] = (HF, LOOP),
    questions: int | None = None,
    context: Sequence[str] = (),
    plot_dir: str | Path | None = None,
    environment: dict | None = None,
) -> tuple[str, bool]:
    """The markdown report of ``eagle2 bench``, behind its correctness gate.

    Correctness first: in fp32 (``dtype == "fp32"``) every speculative method must reproduce the
    reference token for token on every turn. If one does not, the report names the differing
    turns, holds no speedup and no plots, and ``passed`` is False. Otherwise it holds
    ``context`` (lines about the machine and the policy), the draft calibration, the
    per-category table (:func:`format_report`) for ``speculative[0]``, the sweep table
    (:func:`format_sweep`) when there are more speculative methods, a note on rounding outside
    fp32, links to the PNGs written into ``plot_dir`` (None = no plots) and the environment.

    Args:
        records, summary: the run (:func:`~eagle2_kernels.eval.runner.run_side_by_side`) and its
            :func:`summarize`.
        dtype: the models' dtype name ("fp32", "bf16", "fp16").
        max_new_tokens: the per-turn budget, for the title.
        speculative: the speculative methods, the main one first.
        reference: the method the others were compared with (the plots' baseline too).
        baselines: the plain methods the speedups are given against.
        questions: how many questions were asked (default: those in ``records``).

    Returns:
        ``(markdown, passed)``.
    """
    main = speculative[0]
    if questions is None:
        questions = len({r.question_id for r in records})
    text = [f"# MT-bench, {len(records)} turns ({questions} questions), {dtype}, greedy, "
            f"max {max_new_tokens} new tokens", ""]
    strict = dtype == "fp32"
    failures = lossless_failures(records, speculative) if strict else []
    if failures:
        text.append(f"LOSSLESS CHECK FAILED in fp32: {len(failures)} turns differ from plain decoding "
                    f"(question, turn, first divergence): {failures[:20]}")
        text.append("No speedup is reported for a decoder that changes the output.")
        return "\n".join(text), False
    baselines = [b for b in baselines if b in summary["overall"]["methods"]]
    text += list(context)
    rel = summary.get("reliability", {}).get(main)
    if rel:
        text.append("draft calibration (verified nodes by path probability: predicted -> actual acceptance): " +
                    "; ".join(f"[{rel['edges'][i]:.2f}, {min(rel['edges'][i + 1], 1):.2f}) n={n} "
                              f"{rel['predicted'][i] / n:.2f} -> {rel['accepted'][i] / n:.2f}"
                              for i, n in enumerate(rel["nodes"]) if n))
    text.append("")
    text.append(format_report(summary, speculative=main, baselines=baselines))
    if len(speculative) > 1:
        text += ["", "Tree shapes side by side:", "", format_sweep(summary, speculative, baselines)]
    if not strict:
        text += ["", f"Exact-match statistics are against `{reference}`. In {dtype}, batched tree "
                 "verification and one-token decoding round differently, so near-ties can flip; compare "
                 "the speculative rows with the plain loop's own agreement with transformers."]
    if plot_dir is not None:
        from eagle2_kernels.eval import plots

        out = Path(plot_dir)
        hist = plots.plot_accept_histogram(records, out / "accept_hist.png", method=main)
        per_q = plots.plot_question_speedup(records, out / "question_speedup.png", method=main,
                                            baseline=reference)
        text += ["", f"![acceptance lengths]({hist.name})", f"![per-question speedup]({per_q.name})"]
        rel_png = plots.plot_reliability(records, out / "reliability.png", method=main)
        sizes = plots.plot_tree_sizes(records, out / "tree_sizes.png", method=main)
        text += [f"![{p.stem}]({p.name})" for p in (rel_png, sizes) if p is not None]
    if environment is not None:
        text += ["", "Environment: " + json.dumps(environment)]
    return "\n".join(text), True


def write_json(
    path: str | Path,
    records: Sequence[TurnRecord],
    summary: dict,
    config: dict | None = None,
    environment: dict | None = None,
    include_ids: bool = False,
) -> Path:
    """Write the run (configuration, environment, summary, per-turn records) as JSON."""
    head = {
        "benchmark": "mt-bench end to end",
        "config": config or {},
        "environment": environment or {},
        "summary": summary,
    }
    # the summary indented, each per-turn record on one line (long lists stay compact)
    text = json.dumps(head, indent=1, allow_nan=True)[:-2]
    rows = ",\n  ".join(json.dumps(r.to_dict(include_ids=include_ids), allow_nan=True) for r in records)
    text += ',\n "records": [\n  ' + rows + "\n ]\n}\n"
    path = Path(path)
    path.write_text(text)
    return path
