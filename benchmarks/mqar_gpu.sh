#!/usr/bin/env bash
# The MQAR sweep on one GPU (issue 4), about 8 minutes wall: Zoology's MQAR mix and test grid (V = 8192), every family
# (transformer, mamba2, gdn, oryx-tm, oryx-tg; 2 layers × 128, head dim 64), the five trained at once in separate
# processes on the one card, then tested per mode and under the cross-mode protocols (oryx.eval.mqar_run).
#
#   bash benchmarks/mqar_gpu.sh                 # from the repository root; results in $OUT (default ./out)
#
# Training: 8 epochs of the full mix (batch 256, 5,656 steps), AdamW lr 3e-3, cosine; each run is capped at
# TRAIN_MINUTES (default 5) by a timed probe before training, so a slower card or family trains fewer steps (the
# table's notes give the steps each family got; on an H100 the baselines probed 61-72 ms/step with five runs sharing
# the card, i.e. ~4,500 steps in 5 minutes). Ops run on the PyTorch reference backend (ORYX_BACKEND=torch): fla's
# Triton kernels compile and autotune for minutes on first use, longer than this whole run (benchmarks/README.md).
# Test grid: Zoology's seven settings plus three with K/L = 1/16 (256:16, 512:32, 1024:64), where the `queries`
# protocol (attention only at the K query tokens) runs 6.25% of the tokens in attention; on Zoology's own grid
# that fraction is K/L = 25% except at 64:4 (6.25%) and 64:8 (12.5%).
# $OUT gets mqar.md (tables + training notes), mqar.json (every row, the runs' summaries), mqar.png and mqar.log; the
# full run folder (per-run JSON) stays in $RUN_DIR. Redo the plot anywhere with `python -m oryx.eval report $OUT`.
set -euo pipefail
OUT=${OUT:-out}
RUN_DIR=${RUN_DIR:-/tmp/mqar-run}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} ORYX_BACKEND=${ORYX_BACKEND:-torch} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
start=$(date +%s)
timeout 570 python3 -m oryx.eval mqar --out "$RUN_DIR" --device cuda --jobs 5 --epochs 8 --lrs 3e-3 \
  --test-grid 64:4 64:8 64:16 128:32 256:64 512:128 1024:256 256:16 512:32 1024:64 \
  --train-minutes "${TRAIN_MINUTES:-5}" "$@" 2>&1 | tee "$OUT/mqar.log"
echo "wall: $(( $(date +%s) - start )) s" | tee -a "$OUT/mqar.log"
cp "$RUN_DIR"/mqar.md "$RUN_DIR"/mqar.json "$OUT"/
cp "$RUN_DIR"/mqar.png "$OUT"/ 2>/dev/null || true  # absent when the image has no matplotlib
