#!/usr/bin/env bash
# One GPU check, meant to finish well inside 8 minutes on an H100/H200:
#   1. the cuda-marked tests, 2. the op microbenchmarks, 3. the round-cost benchmark.
# Usage: bash bench/gpu_check.sh OUT_DIR      (results: JSON + markdown + logs in OUT_DIR)
# Installs nothing: run it on a machine that already has torch, triton and transformers,
# from the repository root (PYTHONPATH=. is set here so no install is needed).
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
py=${PYTHON:-python}
status=0

{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'device', torch.cuda.get_device_name())"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s"; tail -n 25 "$out/$name.log"
  [ $rc -eq 0 ] || status=1
}

step cuda_tests 150 $py -m pytest -q -m cuda tests
for b in tree_expand tree_build tree_attention kv_compact verify; do
  [ -f "bench/bench_$b.py" ] && step "bench_$b" 60 $py -m "bench.bench_$b" --json "$out/bench_$b.json"
done
[ -f bench/bench_round.py ] && step bench_round 200 $py -m bench.bench_round --json "$out/bench_round.json"
exit $status
