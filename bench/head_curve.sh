#!/usr/bin/env bash
# Draft-head quality against data size and data source, on a CPU (see bench/results/cpu/head_curve/).
#
#   bash bench/head_curve.sh [RESULTS_DIR]
#
# Every stage is resumable: feature chunks and self-distilled answers continue where they
# stopped, and a head whose eval JSON exists is not trained again. Features live outside the
# repository, under $EAGLE2_KERNELS_CACHE/train (default ~/.cache/eagle2_kernels/train).
#
# Stages (all with the same fit options and the same training budget, STEPS optimizer steps of
# 2,048 tokens, so that only the data changes between heads):
#   1. features of ShareGPT conversations [0, 2400) with the dataset's answers, and of
#      held-out conversations [12000, 12048);
#   2. the target's own greedy answers to the first prompts of conversations [0, SD_PROMPTS)
#      (self-distillation), and their features;
#   3. heads: self-distilled answers; dataset answers with the same number of tokens; dataset
#      answers with 4x and with all the tokens;
#   4. for each head: held-out 1..5-step accuracy and tau on MT-bench first turns at the CPU
#      default tree (4,2,2) and at (60,5,10), into RESULTS_DIR/<head>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-bench/results/cpu/head_curve}
PY=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-2}
STEPS=${STEPS:-300}
SD_PROMPTS=${SD_PROMPTS:-512}
WORK=${EAGLE2_KERNELS_CACHE:-$HOME/.cache/eagle2_kernels}/train
TRAIN="$PY -m eagle2_kernels.train.cli --threads $THREADS"
mkdir -p "$RESULTS" "$WORK"

$TRAIN features --out "$WORK/heldout" --start 12000 --count 48 --max-len 768 --chunk-size 16
# Stop this one early (Ctrl-C) to train on fewer conversations; rerunning continues it.
$TRAIN features --out "$WORK/sharegpt" --start 0 --count "${SHAREGPT_CONVS:-2400}" --max-len 768 \
    --chunk-size 32 ${SHAREGPT_CHUNKS:+--stop-after-chunks $SHAREGPT_CHUNKS}
$TRAIN selfdistill --out "$WORK/selfdistill.jsonl" --start 0 --count "$SD_PROMPTS" \
    --batch-size 64 --window-batches 4 --max-new-tokens 256 --max-prompt-tokens 384
$TRAIN features --out "$WORK/selfdistill" --source "$WORK/selfdistill.jsonl" --max-len 768 \
    --chunk-size 32

tokens() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['tokens'])" "$1/meta.json"; }
SD_TOKENS=$(tokens "$WORK/selfdistill")
ALL_TOKENS=$(tokens "$WORK/sharegpt")

FIT_OPTS=(--bf16 --ttt-steps 2 --lr 1e-3 --warmup 30 --batch-tokens 2048 --seq-len 768
          --noise 0.05 --draft-vocab 8192 --max-steps "$STEPS" --epochs 1000
          --eval-features "$WORK/heldout" --eval-every 50 --eval-tokens 4000)

head() {  # head NAME FEATURE_DIR [MAX_TRAIN_TOKENS]
    local name=$1 dir=$2 limit=${3:-}
    if [ ! -f "$RESULTS/$name.json" ]; then
        $TRAIN fit --features "$dir" --out "$WORK/heads/$name" "${FIT_OPTS[@]}" \
            ${limit:+--max-train-tokens $limit}
        cp "$WORK/heads/$name/train_log.json" "$RESULTS/$name.train_log.json"
        $TRAIN eval --head "$WORK/heads/$name" --features "$WORK/heldout" --max-tokens 8000 \
            --mtbench "${MTBENCH_QUESTIONS:-5}" --configs "4,2,2;60,5,10" --max-new-tokens 128 \
            --json "$RESULTS/$name.json"
    fi
}

head selfdistill "$WORK/selfdistill"
head sharegpt_same_tokens "$WORK/sharegpt" "$SD_TOKENS"
head sharegpt_4x "$WORK/sharegpt" $((4 * SD_TOKENS))
head sharegpt_all "$WORK/sharegpt" "$ALL_TOKENS"
"$PY" bench/head_curve_report.py "$RESULTS"
