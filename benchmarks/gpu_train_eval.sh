#!/usr/bin/env bash
# A short real experiment on one GPU: synthetic cases -> 128^3 shards -> train the presets
# (default: no-aug and VFFC+GRL; same shortened schedule) -> evaluate all on all four modalities.
#   OUT=out EPOCHS=40 bash benchmarks/gpu_train_eval.sh
#   OUT=out PRESETS="segresnet_t2_noaug segresnet_t2_sdg_bezier" bash benchmarks/gpu_train_eval.sh
set -u
EPOCHS=${EPOCHS:-40}
PRESETS=${PRESETS:-segresnet_t2_noaug segresnet_t2_vffc_grl}
LR=${LR:-5e-4}
. "$(dirname "$0")/gpu_env.sh"

timeout 60 python3 tools/make_synthetic_brats.py --output "$work/raw" --n-cases 60 \
  --shape 176 176 140 --workers 14 --seed 0 2>&1 | tail -1
timeout 60 python3 tools/prepare_brats.py --input "$work/raw" --output "$work/shards" --size 128 \
  --workers 14 2>&1 | tail -1

checkpoints=()
for preset in $PRESETS; do
  echo "== train $preset ($EPOCHS epochs, lr $LR)"
  timeout ${TRAIN_TIMEOUT:-150} python3 tools/train.py --preset "$preset" --data "$work/shards" \
    --out "$work/runs" --set optim.epochs="$EPOCHS" --set optim.lr="$LR" --set data.workers=7 \
    --set run.log_every=50 --set run.val_every=10 2>&1 | tee "$OUT/train_$preset.log" | grep -E "done|error|Error" | tail -6
  cp "$work/runs/$preset/log.jsonl" "$OUT/log_$preset.jsonl" 2>/dev/null
  checkpoints+=("$work/runs/$preset/best.pt")
done

echo "== evaluate on all four modalities"
timeout ${EVAL_TIMEOUT:-120} python3 tools/evaluate.py --device cuda --data "$work/shards" --out "$work/eval" \
  --checkpoint "${checkpoints[@]}" \
  2>&1 | tee "$OUT/eval.log" | grep -v "^\[eval\]" | tail -30
cp "$work/eval/summary.json" "$OUT/eval_summary.json" 2>/dev/null
cp "$work/eval/table.md" "$OUT/eval_table.md" 2>/dev/null
