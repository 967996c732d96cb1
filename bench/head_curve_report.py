"""Summarise ``bench/head_curve.sh`` results: a markdown table and a plot of tau against data.

    python bench/head_curve_report.py RESULTS_DIR

Reads ``<head>.json`` (from ``eagle2 train eval``) and ``<head>.train_log.json`` (from ``eagle2
train fit``) for every head in RESULTS_DIR and writes ``curve.md``, ``curve.json`` and, when
matplotlib is installed, ``curve.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _tau(result: dict, shape: tuple[int, int, int]) -> tuple[float | None, float | None]:
    for c in result.get("mtbench", {}).get("configs", []):
        if (c["T"], c["D"], c["K"]) == shape:
            return c["tau"], c.get("speedup_vs_plain_loop")
    return None, None


def collect(results: Path) -> list[dict]:
    """One row per evaluated head. A snapshot ``<run>_step_NNNNNN`` of a one-epoch run has seen
    the fraction ``step / steps`` of its run's data once; its data columns are scaled by it."""
    rows = []
    for path in sorted(results.glob("*.json")):
        if path.name.endswith((".train_log.json", ".progress.json")) or path.name.startswith("curve"):
            continue
        name = path.stem
        result = json.loads(path.read_text())
        run, snapshot = name, None
        if "_step_" in name:
            run = name.split("_step_")[0]
            snapshot = json.loads((results / f"{name}.progress.json").read_text())
        log_path = results / f"{run}.train_log.json"
        summary = json.loads(log_path.read_text())["summary"] if log_path.exists() else {}
        frac = 1.0
        if snapshot is not None and summary.get("steps"):
            frac = snapshot["step"] / summary["steps"]
        scaled = {k: (round(summary[k] * frac) if summary.get(k) is not None else None)
                  for k in ("train_tokens", "train_loss_tokens")}
        tau_cpu, speedup_cpu = _tau(result, (4, 2, 2))
        tau_60, speedup_60 = _tau(result, (60, 5, 10))
        rows.append({
            "head": name,
            "run": run,
            "source": "self-distilled" if "selfdistill" in name else "dataset answers",
            **scaled,
            "steps": snapshot["step"] if snapshot else summary.get("steps"),
            "epochs": round(summary["epochs"] * frac, 3) if summary.get("epochs") else None,
            "train_seconds": snapshot["seconds"] if snapshot else summary.get("seconds"),
            "init_from": (summary.get("config") or {}).get("init_from"),
            "vocab_miss_train": summary.get("vocab_miss_train"),
            "heldout_acc": result.get("acc"),
            "heldout_chain_tokens": result.get("expected_chain_tokens"),
            "greedy_outside_draft_vocab": result.get("target_greedy_outside_draft_vocab"),
            "tau_4_2_2": tau_cpu, "speedup_4_2_2": speedup_cpu,
            "tau_60_5_10": tau_60, "speedup_60_5_10": speedup_60,
        })
    return rows


def _fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _speed(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown(rows: list[dict]) -> str:
    lines = ["| head | answers | train tokens (reply) | epochs | held-out acc 1/2/3 | "
             "tau (4,2,2) | vs plain loop | tau (60,5,10) | vs plain loop |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["run"], r["train_tokens"] or 0)):
        acc = "/".join(f"{a:.3f}" for a in (r["heldout_acc"] or [])[:3]) or "-"
        tokens = (f"{_fmt(r['train_tokens'])} ({_fmt(r['train_loss_tokens'])})"
                  if r["train_tokens"] else "-")
        lines.append(f"| {r['head']} | {r['source']} | {tokens} | {_fmt(r['epochs'])} | {acc} | "
                     f"{_fmt(r['tau_4_2_2'])} | {_speed(r['speedup_4_2_2'])} | "
                     f"{_fmt(r['tau_60_5_10'])} | {_speed(r['speedup_60_5_10'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tau, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = sorted({r["run"] for r in rows})
    for run in runs:
        pts = sorted((r["train_loss_tokens"], r["tau_4_2_2"], (r["heldout_acc"] or [None])[0])
                     for r in rows if r["run"] == run and r["train_loss_tokens"])
        if not pts:
            continue
        xs, taus, accs = zip(*pts)
        many = len(pts) > 1
        first = next(r for r in rows if r["run"] == run)
        label = (f"{run}: one epoch, snapshots" if many else
                 f"{run} ({first['epochs']} epochs"
                 + (f", continued from {Path(first['init_from']).name})" if first["init_from"]
                    else ")"))
        marker = "o-" if many else ("D" if "selfdistill" in run else "s")
        ax_tau.plot(xs, taus, marker, markersize=7, label=label)
        ax_acc.plot(xs, accs, marker, markersize=7, label=label)
    for r in rows:
        if r["tau_60_5_10"] is not None and r["train_loss_tokens"]:
            ax_tau.plot([r["train_loss_tokens"]], [r["tau_60_5_10"]], "x", color="k")
    ax_tau.plot([], [], "x", color="k", label="same head at T,D,K = 60,5,10")
    for r in rows:  # heads without a training log here (e.g. an earlier shipped head)
        if not r["train_loss_tokens"] and r["tau_4_2_2"] is not None:
            ax_tau.axhline(r["tau_4_2_2"], color="grey", ls=":", label=f"{r['head']} (4,2,2)")
            if r["heldout_acc"]:
                ax_acc.axhline(r["heldout_acc"][0], color="grey", ls=":", label=r["head"])
    ax_tau.axhline(3.0, color="grey", lw=0.8, ls="--")
    ax_tau.set_ylabel("tau on MT-bench first turns, T,D,K = 4,2,2")
    ax_acc.set_ylabel("held-out 1-step top-1 accuracy")
    for ax in (ax_tau, ax_acc):
        ax.set_xscale("log")
        ax.set_xlabel("reply tokens trained on")
        ax.grid(alpha=0.3)
    ax_tau.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    results = Path(argv[0])
    rows = collect(results)
    if not rows:
        print(f"no eval JSON files in {results}", file=sys.stderr)
        return 1
    (results / "curve.json").write_text(json.dumps(rows, indent=2) + "\n")
    (results / "curve.md").write_text(markdown(rows))
    plotted = plot(rows, results / "curve.png")
    print(markdown(rows))
    if not plotted:
        print("(no plot: matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
