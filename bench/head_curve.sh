#!/usr/bin/env bash
# Draft-head quality against data size and data source, on a CPU (see bench/results/cpu/head_curve/).
#
#   bash bench/head_curve.sh [RESULTS_DIR]
#
# Every stage is resumable: feature chunks and self-distilled answers continue where they
# stopped, and a head whose eval JSON exists is not trained again. Features live outside the
# repository, under $EAGLE2_KERNELS_CACHE/train (default ~/.cache/eagle2_kernels/train).
#
# Stages:
#   1. features of ShareGPT conversations [0, SHAREGPT_CONVS) with the dataset's answers, and of
#      held-out conversations [12000, 12048);
#   2. the target's own greedy answers to the first prompts of conversations [0, SD_PROMPTS)
#      (self-distillation), and their features;
#   3. data source at equal token counts: a head on the self-distilled answers and one on the same
#      number of dataset-answer tokens, same options, SMALL_EPOCHS epochs each;
#   4. data size: one head trained for one epoch over all the dataset-answer features (no token
#      seen twice), saved every 1/SNAPSHOTS of the epoch, so that snapshot k has seen
#      k/SNAPSHOTS of the data once;
#   5. the final head: the one-epoch head trained one more epoch on both sources together (and a
#      third epoch after it, measured for the curve);
#   6. for each head (and the head shipped before this study): held-out 1..5-step accuracy and tau on MT-bench first turns at the CPU
#      default tree (4,2,2) (and, for the final heads, at (60,5,10)), into RESULTS_DIR/*.json;
#      then bench/head_curve_report.py writes the table and the plot.
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

FIT_OPTS=(--bf16 --ttt-steps 2 --lr 1e-3 --warmup 30 --batch-tokens 2048 --seq-len 768
          --noise 0.05 --draft-vocab 8192 --eval-features "$WORK/heldout" --eval-tokens 4000)
EVAL=(eval --features "$WORK/heldout" --max-tokens 8000 --max-new-tokens 128
      --mtbench "${MTBENCH_QUESTIONS:-5}")

keep_log() {  # keep_log HEAD_DIR NAME: the fit log, with paths of this machine cut to their last part
    "$PY" - "$1/train_log.json" "$RESULTS/$2.train_log.json" <<'PYEOF'
import json, os, sys
log = json.load(open(sys.argv[1]))
cfg = log["summary"]["config"]
if cfg.get("init_from"):
    cfg["init_from"] = os.path.basename(cfg["init_from"].rstrip("/"))
open(sys.argv[2], "w").write(json.dumps(log, indent=2) + "\n")
PYEOF
}
fit_head() {  # fit_head NAME FEATURE_DIR EPOCHS [MAX_TRAIN_TOKENS] [more fit options]
    local name=$1 dir=$2 epochs=$3 limit=${4:-}
    shift 4 || shift $#
    if [ ! -f "$WORK/heads/$name/model.safetensors" ] || [ ! -f "$RESULTS/$name.train_log.json" ]; then
        $TRAIN fit --features "$dir" --out "$WORK/heads/$name" "${FIT_OPTS[@]}" --epochs "$epochs" \
            ${limit:+--max-train-tokens $limit} "$@"
        keep_log "$WORK/heads/$name" "$name"
    fi
}
eval_head() {  # eval_head HEAD_DIR NAME CONFIGS
    [ -f "$RESULTS/$2.json" ] || $TRAIN "${EVAL[@]}" --head "$1" --configs "$3" --json "$RESULTS/$2.json"
}

SMALL_EPOCHS=${SMALL_EPOCHS:-2}
fit_head selfdistill "$WORK/selfdistill" "$SMALL_EPOCHS" "" --eval-every 50
eval_head "$WORK/heads/selfdistill" selfdistill "4,2,2;60,5,10"
fit_head sharegpt_same_tokens "$WORK/sharegpt" "$SMALL_EPOCHS" "$SD_TOKENS" --eval-every 50
eval_head "$WORK/heads/sharegpt_same_tokens" sharegpt_same_tokens "4,2,2;60,5,10"

# One epoch over everything, a snapshot every 1/SNAPSHOTS epoch (the cosine schedule spans the
# whole epoch, so early snapshots are taken at a higher learning rate than a run of their size
# would end with: they understate what that much data gives).
SNAPSHOTS=${SNAPSHOTS:-6}
STEPS_PER_EPOCH=$("$PY" - "$WORK/sharegpt" <<'PYEOF'
import random, sys
from eagle2_kernels.train.features import load_sequences
from eagle2_kernels.train.fit import _windows, make_batches
print(len(make_batches(_windows(load_sequences([sys.argv[1]]), 768), 2048, random.Random(0))))
PYEOF
)
EVERY=$(( (STEPS_PER_EPOCH + SNAPSHOTS - 1) / SNAPSHOTS ))
fit_head sharegpt_epoch "$WORK/sharegpt" 1 "" --eval-every 0 --snapshot-every "$EVERY"
for snap in "$WORK"/heads/sharegpt_epoch/snapshots/step_*; do
    eval_head "$snap" "sharegpt_epoch_$(basename "$snap")" "4,2,2"
    cp "$snap/progress.json" "$RESULTS/sharegpt_epoch_$(basename "$snap").progress.json"
done
eval_head "$WORK/heads/sharegpt_epoch" sharegpt_epoch "4,2,2;60,5,10"

# The shipped head: the one-epoch head trained one more epoch over both sources together, at half
# the learning rate.
if [ ! -f "$RESULTS/final.json" ]; then
    if [ ! -f "$RESULTS/final.train_log.json" ]; then
        $TRAIN fit --features "$WORK/sharegpt" "$WORK/selfdistill" --out "$WORK/heads/final" \
            --init-from "$WORK/heads/sharegpt_epoch" "${FIT_OPTS[@]}" --epochs 1 --lr 5e-4 \
            --warmup 10 --eval-every 200
        keep_log "$WORK/heads/final" final
    fi
    eval_head "$WORK/heads/final" final "4,2,2;60,5,10"
fi
# A third pass at a lower learning rate (measured; not shipped: its gain at (4,2,2) was within noise).
if [ ! -f "$RESULTS/final_pass3.json" ]; then
    if [ ! -f "$RESULTS/final_pass3.train_log.json" ]; then
        $TRAIN fit --features "$WORK/sharegpt" "$WORK/selfdistill" --out "$WORK/heads/final_pass3" \
            --init-from "$WORK/heads/final" "${FIT_OPTS[@]}" --epochs 1 --lr 3e-4 --warmup 10 \
            --eval-every 400
        keep_log "$WORK/heads/final_pass3" final_pass3
    fi
    eval_head "$WORK/heads/final_pass3" final_pass3 "4,2,2;60,5,10"
fi
# The head shipped before this study, evaluated the same way, for reference.
eval_head eagle2_kernels/heads/smollm2-135m-instruct previous_head "4,2,2;60,5,10"
"$PY" bench/head_curve_report.py "$RESULTS"
