#!/usr/bin/env bash
# All GPU checks in one go (for a short lease on a CUDA machine): the CUDA benchmark, the CUDA tests,
# and a short real training + evaluation run on synthetic 128^3 shards. Writes JSON/logs under $OUT.
#   OUT=out bash benchmarks/gpu_checks.sh
set -u
. "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

echo "== CUDA tests"
timeout 60 python3 -m pytest -q tests -k "cuda" -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/pytest_cuda.txt"

echo "== benchmark (cuda)"
timeout 180 python3 tools/benchmark.py --device cuda --size 128 --batch 2 --repeats 5 --warmup 2 \
  --sections train bezier inference sdg --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.log" | tail -30

echo "== synthetic data + shards"
timeout 40 python3 tools/make_synthetic_brats.py --output "$work/raw" --n-cases 40 \
  --shape 176 176 140 --workers 12 --seed 0 2>&1 | tail -2
timeout 50 python3 tools/prepare_brats.py --input "$work/raw" --output "$work/shards" --size 128 \
  --workers 12 2>&1 | tail -3

echo "== training (VFFC + GRL, batch 2, bf16)"
timeout 100 python3 tools/train.py --preset segresnet_t2_vffc_grl --data "$work/shards" \
  --out "$work/runs" --set optim.epochs=4 --set optim.batch_size=2 --set data.workers=6 \
  --set run.log_every=5 --set run.val_every=4 2>&1 | tee "$OUT/train.log" | tail -15
cp "$work/runs/segresnet_t2_vffc_grl/log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null

echo "== evaluation on all four modalities"
timeout 50 python3 tools/evaluate.py --checkpoint "$work/runs/segresnet_t2_vffc_grl/best.pt" \
  --data "$work/shards" --out "$work/eval" --device cuda 2>&1 | tee "$OUT/eval.log" | tail -12
cp "$work/eval/summary.json" "$OUT/eval_summary.json" 2>/dev/null
ls -la "$OUT"
