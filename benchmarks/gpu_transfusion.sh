#!/usr/bin/env bash
# The GPU measurement of #9 in one call (at most 10 minutes; 4 on an H200 on 2026-11-27; the sync check runs
# before the compile run, so a cut-off call still answers it): TransFusion training and inference speed of
# the default and the published network, eager and torch.compile, plus the host synchronisations by site,
# the resume checkpoint's share of a real-length epoch and the loop with pageable batches (data.pin_memory=false).
# Writes outputs/benchmarks/gpu/{eager,compile,pageable}/transfusion_speed.md, sync_sites.md and
# resume_checkpoint.md; paste them into
# benchmarks/RESULTS.md (#9 section) with the device named. Usage, from the repository root:
#   PYTHON=.venv/bin/python bash benchmarks/gpu_transfusion.sh [OUT_DIR]
set -euo pipefail
PY=${PYTHON:-python}
OUT=${1:-outputs/benchmarks/gpu}
export PYTHONPATH=${PYTHONPATH:-$PWD} WANDB_MODE=disabled HF_HUB_OFFLINE=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
# 1. eager, bf16, batch 8: default network at 128 px and the published network at 256 px (~1.5 min)
timeout 240 "$PY" benchmarks/transfusion_speed.py --out "$OUT/eager" --steps 20 --batch 8 \
    --infer-batches 8,32,64 2>&1 | grep -v Warning | tee "$OUT/eager.log" | grep '^{' || true
# 2. host synchronisations by call site: torch's set_sync_debug_mode("warn") and the aten read-back check,
#    3 training steps of the published network (~30 s)
timeout 90 "$PY" benchmarks/sync_sites.py --net paper --out "$OUT" 2>&1 | grep -v Warning \
    | tee "$OUT/sync_sites.log" || true
# 3. last.ckpt every epoch vs every 60 s, published network, 26-step epochs as on bottle (~1 min)
timeout 150 "$PY" benchmarks/resume_checkpoint.py --net paper --size 256 --batch 8 --steps-per-epoch 26 \
    --epochs 4 --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/resume_checkpoint.log" | grep '^{' || true
# 4. the Lightning loop with batches from pageable memory (each copy waits for the GPU; ~40 s)
timeout 120 "$PY" benchmarks/transfusion_speed.py --out "$OUT/pageable" --nets paper --pageable --steps 20 \
    --batch 8 --infer-batches 0 2>&1 | grep -v Warning | tee "$OUT/pageable.log" | grep '^{' || true
# 5. the same with torch.compile of network and loss (compile time is in the table; ~3 min)
timeout 240 "$PY" benchmarks/transfusion_speed.py --out "$OUT/compile" --compile --steps 20 --batch 8 \
    --infer-batches 8,32 2>&1 | grep -v Warning | tee "$OUT/compile.log" | grep '^{' || true
ls -R "$OUT"
