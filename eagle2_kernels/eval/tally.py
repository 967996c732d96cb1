"""Counts pooled over turn records: value histograms, verified tree sizes and the draft's
calibration table.

The lowest piece of the report: ``report.summarize`` puts them in the summary and ``plots``
draws them, so both import them from here (and neither imports the other for them).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from eagle2_kernels.eval.runner import TurnRecord


def pooled_reliability(records: Sequence[TurnRecord], method: str) -> dict | None:
    """Predicted vs actual node acceptance per probability bin, summed over the records."""
    rels = [r.results[method].reliability for r in records if r.results[method].reliability]
    if not rels:
        return None
    out = {"edges": rels[0]["edges"], "nodes": [0] * len(rels[0]["nodes"]),
           "predicted": [0.0] * len(rels[0]["nodes"]), "accepted": [0] * len(rels[0]["nodes"])}
    for rel in rels:
        for i in range(len(out["nodes"])):
            out["nodes"][i] += rel["nodes"][i]
            out["predicted"][i] += rel["predicted"][i]
            out["accepted"][i] += rel["accepted"][i]
    return out


def histogram(values: Iterable[int]) -> dict[str, int]:
    """Counts of each value, keyed by the value as a string (JSON keys), in increasing order."""
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def pooled_tree_sizes(records: Sequence[TurnRecord], method: str) -> list[int]:
    """The tree sizes ``method`` verified, round by round, over all records (empty for methods
    that record none)."""
    return [n for r in records for n in (r.results[method].tree_sizes or [])]
