#!/usr/bin/env bash
# The offline VLM pipeline on easy-VQA, every stage in order, each stage's wall time printed (docs/vlm_pipeline.md):
#   0. pretrain_siglip.py     contrastive image-caption pretraining of a random-init siglip-tiny encoder (exported
#                             to $RUNS/siglip/model, the folder stage 1 takes as --vision-encoder)
#   1. pretrain_captioner.py  caption pretraining of the projector under frozen SmolLM2-135M, encoder frozen
#   2. sft.py                 question answering, one multi-turn chat per image (easy-vqa:chats-train): projector +
#                             LM trained, encoder frozen
#   3. eval_vqa.py            VQA accuracy on 1000 easy-vqa test questions (colour, shape, yes/no)
#   4. grpo.py + eval_vqa.py  (only with GRPO=1) RL with the VQA reward from the stage-2 model, evaluated again
#
# Usage, from the repository root (runs go to $RUNS, default runs/; the times are appended to $RUNS/pipeline_times.txt):
#   scripts/vlm_pipeline.sh
#   RUNS=/tmp/vlm GRPO=1 FROM=1 scripts/vlm_pipeline.sh     # stages 1-4, on the stage-0 encoder already in /tmp/vlm
# Extra flags for one stage: SIGLIP_ARGS, CAPTIONER_ARGS, SFT_ARGS, EVAL_ARGS, GRPO_ARGS (appended: they override).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
FROM=${FROM:-0}
mkdir -p "$RUNS"
START=$(date +%s)

stage() { # stage N NAME COMMAND...: run it (unless N < $FROM), then print its wall time and the machine's load
  local n=$1 name=$2 t0
  shift 2
  if [ "$n" -lt "$FROM" ]; then return; fi
  echo "=== stage $n, $name: $*"
  t0=$(date +%s)
  "$@"
  local t=$(($(date +%s) - t0))
  printf '=== stage %s, %s: %dm%02ds wall (load average %s)\n' "$n" "$name" $((t / 60)) $((t % 60)) \
    "$(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$RUNS/pipeline_times.txt"
}

# shellcheck disable=SC2086  # the *_ARGS are word-split on purpose
stage 0 siglip python pretrain_siglip.py --output-dir "$RUNS/siglip" ${SIGLIP_ARGS:-}
# shellcheck disable=SC2086
stage 1 captioner python pretrain_captioner.py --vision-encoder "$RUNS/siglip/model" --lr-vision 0 \
  --max-steps 40 --max-len 256 --batch-size 2 --warmup-steps 5 --eval-every 0 --eval-size 50 --eval-samples 30 \
  --save-every 0 --output-dir "$RUNS/captioner" ${CAPTIONER_ARGS:-}
# shellcheck disable=SC2086
stage 2 sft python sft.py --model-path "$RUNS/captioner/model" --dataset easy-vqa:chats-train --dataset-records 2000 \
  --eval-dataset easy-vqa:chats-test --eval-dataset-records 20 --eval-samples 0 --max-len 512 --batch-size 2 \
  --max-steps 300 --warmup-steps 5 --lr 1e-4 --lr-projector 1e-3 --lr-vision 0 --eval-every 0 --save-every 0 \
  --output-dir "$RUNS/vqa_sft" ${SFT_ARGS:-}
# shellcheck disable=SC2086
stage 3 eval python eval_vqa.py --model-path "$RUNS/vqa_sft/model" --max-new-tokens 4 --output-dir "$RUNS/eval_vqa" \
  ${EVAL_ARGS:-}
if [ "${GRPO:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  stage 4 grpo python grpo.py --model-path "$RUNS/vqa_sft/model" --dataset easy-vqa:train --eval-dataset easy-vqa:test \
    --rewards vqa --max-new-tokens 8 --output-dir "$RUNS/vqa_grpo" ${GRPO_ARGS:-}
  stage 4 "grpo eval" python eval_vqa.py --model-path "$RUNS/vqa_grpo/model" --output-dir "$RUNS/eval_vqa_grpo"
fi
T=$(($(date +%s) - START))
printf '=== pipeline (stages %s-): %dm%02ds wall in all\n' "$FROM" $((T / 60)) $((T % 60)) | tee -a "$RUNS/pipeline_times.txt"
