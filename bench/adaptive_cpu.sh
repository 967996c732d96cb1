#!/usr/bin/env bash
# The cost-aware decoder on this CPU, side by side (one process per command, method order rotating):
#   0. fp32 gate: every method equals plain decoding on 2 MT-bench turns (no timing is trusted otherwise)
#   1. eagle2 tune: measure the machine, print the curve and the implied policy (tune.png)
#   2. eagle2 tune --curve: the policy on a CPU without AVX-512-BF16 (injected curves, bf16 and fp32)
#   3. eagle2 bench: 8 MT-bench first turns, 128 new tokens, bf16: transformers generate, the plain
#      loop, the adaptive decoder and the fixed trees (4,2,2), (8,3,4), (16,4,8)
#   4. eagle2 demo (what `make demo` prints)
# Usage: bash bench/adaptive_cpu.sh [OUT_DIR]   (default bench/results/cpu/adaptive)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/cpu/adaptive}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
{
  grep -m1 'model name' /proc/cpuinfo || true
  echo "avx512 flags: $(grep -o 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "amx flags: $(grep -o 'amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "threads: $THREADS; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

# Correctness first: in fp32 the adaptive decoder and every fixed tree must reproduce plain
# decoding token for token (eagle2 bench exits 1 on a mismatch, and set -e stops the script).
"$PY" -m eagle2_kernels.cli bench --dtype fp32 --limit 2 --turns 1 --max-new-tokens 48 --threads "$THREADS" \
  --configs "4,2,2;8,3,4;16,4,8" --no-progress --no-plots --out "$OUT/fp32_gate" | tee "$OUT/fp32_gate.txt"
"$PY" -m eagle2_kernels.cli tune --remeasure --threads "$THREADS" --out "$OUT/tune" | tee "$OUT/tune.txt"
# Zen 3 (AVX2 only) curves of SmolLM2-135M from the cost-aware issue: bf16 emulated, and fp32.
"$PY" -m eagle2_kernels.cli tune --threads "$THREADS" --curve "1:42,2:53,4:92,8:169,16:270" \
  --out "$OUT/tune_zen3_bf16" | tee "$OUT/tune_zen3_bf16.txt"
"$PY" -m eagle2_kernels.cli tune --threads "$THREADS" --curve "1:69,2:114,4:135,8:136,16:137" \
  --out "$OUT/tune_zen3_fp32" | tee "$OUT/tune_zen3_fp32.txt"
"$PY" -m eagle2_kernels.cli bench --limit 8 --turns 1 --max-new-tokens 128 --threads "$THREADS" \
  --configs "4,2,2;8,3,4;16,4,8" --no-progress --out "$OUT/mtbench_turn1" | tee "$OUT/mtbench_turn1.txt"
"$PY" -m eagle2_kernels.cli demo --threads "$THREADS" | tee "$OUT/demo.txt"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
