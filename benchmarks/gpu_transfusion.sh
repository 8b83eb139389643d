#!/usr/bin/env bash
# The GPU measurement of #9 in one call (about 5-8 minutes on one H100): TransFusion training and inference
# speed of the default and the published network, eager and torch.compile, plus torch's own sync check.
# Writes outputs/benchmarks/gpu/{eager,compile}/transfusion_speed.md and sync_debug.txt; paste them into
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
# 2. the same with torch.compile of network and loss (compile time is in the table; ~3 min)
timeout 300 "$PY" benchmarks/transfusion_speed.py --out "$OUT/compile" --compile --steps 20 --batch 8 \
    --infer-batches 8,32 2>&1 | grep -v Warning | tee "$OUT/compile.log" | grep '^{' || true
# 3. torch's own check: warnings from set_sync_debug_mode("warn") during 3 plain training steps (published net)
timeout 60 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/sync_debug.txt"
import warnings, torch
from mvtec_seg.models.transfusion import AnomalyGenerator, TransFusionLoss, TransFusionModel, PAPER_CONFIG
dev = torch.device("cuda")
model, loss_fn = TransFusionModel(**PAPER_CONFIG).to(dev).train(), TransFusionLoss()
gen, x = AnomalyGenerator(seed=0), torch.rand(8, 3, 256, 256, device=dev)
paths = [f"{i}.png" for i in range(8)]
gen.generate(x, paths=paths)  # fills the foreground cache
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    for _ in range(3):
        m = gen.generate(x, paths=paths)
        t = model.sample_timesteps(8, dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model.training_forward(m["x0"], m["mask"], m["appearance"], m["prev_mask"], t))["loss"]
        loss.backward()
    torch.cuda.set_sync_debug_mode(0)
syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
print(f"sync warnings in 3 training steps (generation + forward + loss + backward): {len(syncs)}")
for s in sorted(set(syncs)):
    print("  ", s)
PYEOF
ls -R "$OUT"
