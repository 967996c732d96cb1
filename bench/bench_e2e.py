"""End-to-end MT-bench benchmark: plain decoding vs EAGLE-2, side by side in one run.

A thin wrapper around ``eagle2 bench`` (the pieces are in ``eagle2_kernels/eval/``); every option of
that command works here, e.g.::

    python -m bench.bench_e2e --limit 10 --max-new-tokens 256 --out bench/results/cpu --json bench/results/cpu/mtbench.json

Correctness first: in fp32 a speculative output that differs from plain decoding fails the run
and no speedup is printed; in bf16 the exact-match fraction and first-divergence positions are
reported next to the speedups. Warm-up generations are excluded from the timings.
"""

from __future__ import annotations

import sys

from eagle2_kernels.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
