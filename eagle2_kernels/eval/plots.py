"""PNG plots of a run (matplotlib, imported on first use): acceptance lengths, per-question
speedup, draft calibration, verified tree sizes, and ``eagle2 tune``'s cost curve."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from eagle2_kernels.eval.methods import HF, SPEC
from eagle2_kernels.eval.runner import TurnRecord, pooled_speedup
from eagle2_kernels.eval.tally import histogram, pooled_reliability, pooled_tree_sizes


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib; install it with: pip install matplotlib "
            "(or the package's 'default' extra)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    """Lay out, write as a PNG and close ``fig``; returns the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accept_histogram(records: Sequence[TurnRecord], path: str | Path, method: str = SPEC) -> Path:
    """Bar chart of tokens committed per round (the acceptance-length histogram) as a PNG."""
    plt = _pyplot()
    lengths = [a for r in records for a in r.results[method].accept_lengths]
    hist = histogram(lengths)
    xs = [int(k) for k in hist]
    total = sum(hist.values())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(xs, [100 * hist[str(x)] / total for x in xs], color="#3b7dd8")
    ax.set_xlabel("tokens committed per round (accepted draft tokens + 1)")
    ax.set_ylabel("% of rounds")
    tau = sum(lengths) / total if total else float("nan")
    ax.set_title(f"{method}: acceptance lengths over {total} rounds, tau = {tau:.2f}")
    ax.set_xticks(xs)
    return _save(plt, fig, path)


def plot_question_speedup(
    records: Sequence[TurnRecord], path: str | Path, method: str = SPEC, baseline: str = HF
) -> Path:
    """Per-question speedup (baseline seconds / method seconds, turns summed) as a PNG bar chart."""
    plt = _pyplot()
    qids = list(dict.fromkeys(r.question_id for r in records))
    cats = {r.question_id: r.category for r in records}
    speed = [pooled_speedup([r for r in records if r.question_id == q], method, baseline) for q in qids]
    palette = plt.get_cmap("tab10")
    cat_order = list(dict.fromkeys(cats[q] for q in qids))
    colors = [palette(cat_order.index(cats[q]) % 10) for q in qids]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(qids) + 2), 3.8))
    ax.bar(range(len(qids)), speed, color=colors)
    ax.axhline(1.0, color="black", lw=0.8)
    overall = pooled_speedup(records, method, baseline)
    ax.axhline(overall, color="gray", ls="--", lw=0.8, label=f"overall {overall:.2f}x")
    ax.set_xticks(range(len(qids)))
    ax.set_xticklabels([str(q) for q in qids], rotation=90, fontsize=6)
    ax.set_xlabel("MT-bench question id")
    ax.set_ylabel(f"speedup vs {baseline}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette(i % 10)) for i in range(len(cat_order))]
    ax.legend(handles + [ax.lines[-1]], cat_order + [f"overall {overall:.2f}x"], fontsize=6, ncol=3)
    ax.set_title(f"{method} vs {baseline}: per-question speedup")
    return _save(plt, fig, path)


def plot_reliability(records: Sequence[TurnRecord], path: str | Path, method: str = SPEC) -> Path | None:
    """Reliability diagram: actual vs predicted acceptance of verified draft nodes per bin of
    path probability, with node counts; None when the method recorded none (fixed trees)."""
    rel = pooled_reliability(records, method)
    if rel is None or not sum(rel["nodes"]):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    xs, ys, labels = [], [], []
    for i, n in enumerate(rel["nodes"]):
        if n:
            xs.append(rel["predicted"][i] / n)
            ys.append(rel["accepted"][i] / n)
            labels.append(n)
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--", label="calibrated")
    ax.plot(xs, ys, "o-", color="#3b7dd8", label=method)
    for x, y, n in zip(xs, ys, labels):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted: mean path probability exp(score) in the bin")
    ax.set_ylabel("actual: fraction of nodes accepted")
    ax.set_title(f"draft calibration over {sum(rel['nodes'])} verified nodes (counts shown)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_tree_sizes(records: Sequence[TurnRecord], path: str | Path, method: str = SPEC) -> Path | None:
    """Histogram of the tree nodes verified per round (1 = a plain step); None without rounds."""
    sizes = pooled_tree_sizes(records, method)
    if not sizes:
        return None
    plt = _pyplot()
    hist = histogram(sizes)
    xs = [int(k) for k in hist]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(xs, [100 * hist[str(x)] / len(sizes) for x in xs], color="#d8843b")
    ax.set_xlabel("tree nodes verified in the round, root included (1 = plain step)")
    ax.set_ylabel("% of rounds")
    ax.set_title(f"{method}: verified tree size per round, {len(sizes)} rounds, mean {sum(sizes) / len(sizes):.1f}")
    ax.set_xticks(xs)
    return _save(plt, fig, path)


def plot_tune(costs, rates: Sequence[tuple[int, float, float]], path: str | Path, title: str = "") -> Path:
    """``eagle2 tune``'s picture: target forward cost vs new tokens (both prefixes) and the
    predicted tokens/s of verifying n drafted nodes, against plain decoding."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    ns = list(costs.n_grid)
    a.plot(ns, [1e3 * t for t in costs.target_short_s], "o-", label=f"prefix {costs.short_prefix}")
    if costs.long_prefix != costs.short_prefix:
        a.plot(ns, [1e3 * t for t in costs.target_long_s], "s-", label=f"prefix {costs.long_prefix}")
    a.set_xlabel("new tokens in one target forward (n)")
    a.set_ylabel("ms")
    a.set_title("target forward cost", fontsize=9)
    a.legend(fontsize=8)
    xs = [r[0] for r in rates]
    b.plot(xs, [r[2] for r in rates], "o-", color="#3b7dd8", label="predicted, tree of n + 1")
    b.axhline(rates[0][2], color="gray", ls="--", lw=0.8, label="plain decoding")
    best = max(rates, key=lambda r: r[2])
    b.plot([best[0]], [best[2]], "*", color="#d83b3b", ms=12, label=f"best n = {best[0]}")
    b.set_xlabel("drafted nodes verified per round (n)")
    b.set_ylabel("tokens/s")
    b.set_title("predicted throughput (draft confidence of a real answer)", fontsize=9)
    b.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(plt, fig, path)

