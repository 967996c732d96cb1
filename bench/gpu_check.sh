#!/usr/bin/env bash
# One GPU check, meant to finish inside 8 minutes on an H100/H200:
#   1. the cuda-marked tests, 2. the op microbenchmarks, 3. the round-cost benchmark.
# Usage: bash bench/gpu_check.sh OUT_DIR [--quick]
#   Results: environment.txt, JSON + markdown per benchmark, and a log per step in OUT_DIR.
#   --quick (or no CUDA device): small shapes, for a smoke run on a CPU.
# Installs nothing: run it on a machine that already has torch, triton, transformers and
# pytest, from the repository root (PYTHONPATH=. is set here so no install is needed; the
# native CPU extension is not needed on a GPU).
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--quick]}
quick=${2:-}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
py=${PYTHON:-python}
status=0
budget=${GPU_CHECK_BUDGET_S:-465}   # whole script, seconds (the target is < 8 min)

if ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  quick=--quick
  echo "no CUDA device: CPU smoke run with --quick (cuda tests are skipped; numbers are CPU numbers)"
fi

{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $py -c "import torch, triton, transformers; print('python', __import__('platform').python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

step() {  # step NAME TIMEOUT_S CMD...   (the timeout is cut to what is left of the budget)
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  if [ $left -lt 20 ]; then
    echo "== $name: skipped (time budget spent)"; status=1; return
  fi
  [ $limit -gt $left ] && limit=$left
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s"; tail -n 25 "$out/$name.log"
  [ $rc -eq 0 ] || status=1
}

# --continue-on-collection-errors: a test module needing a package missing there (hypothesis,
# say) must not stop the others.
step cuda_tests 150 $py -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests
for b in tree_expand tree_build tree_attention kv_compact verify; do
  [ -f "bench/bench_$b.py" ] && step "bench_$b" 40 $py -m "bench.bench_$b" --json "$out/bench_$b.json" $quick
done
if [ -f bench/bench_round.py ]; then
  # Rows that would start past the bench's own time budget are skipped (and listed) so that
  # the script as a whole stays inside its budget.
  left=$((budget - SECONDS - 60)); [ $left -gt 170 ] && left=170; [ $left -lt 30 ] && left=30
  # Projected speedups use the shipped head's committed MT-bench tau per tree shape (CPU,
  # SmolLM2-135M): a projection, labelled so in the results; trees without one get none.
  step bench_round 230 $py -m bench.bench_round --json "$out/bench_round.json" --profile-dir "$out" \
    --time-budget "$left" --tau-from bench/results/cpu/head_curve/final.json $quick
fi
echo "total $SECONDS s, status $status"
exit $status
