#!/usr/bin/env bash
# The GPU measurement of #9 (on an H200 on 2026-11-27 the eager, sync and compile steps took 4 min): TransFusion
# training and inference speed of the default and the published network, eager and torch.compile, the host
# synchronisations by site, the resume checkpoint's share of a real-length epoch, the loop with pageable
# batches (data.pin_memory=false), the published network in channels_last, the attention kernels, the real
# teacher stage before/after, GroupNorm in float32 vs bf16 under autocast, a profile of the step by kind of
# work, anomaly generation with textures from files (DTD), the Lightning loop's step by phase, and AdamW loop /
# foreach / fused. One device call runs at most 10 minutes: all thirteen steps take about 22, so name the
# steps to run (default: all) and split them over calls, most telling first: `... OUT 1 12 13 9`, then
# `... OUT 10 11 8 2`, then `... OUT 3 4 5 6 7`.
# Writes under OUT_DIR: {eager,pageable,compile,channels_last*}/transfusion_speed.md, sync_sites.md,
# resume_checkpoint.md, attention_backend.md, {,old/}teacher_stage.md, autocast_traffic.md, step_profile.md,
# texture_cache.md, loop_profile.md, epoch4/loop_profile.md, optimizer_step.md and a log per step; paste them
# into benchmarks/results/archive/ with the device named. Usage, from the repository root:
#   PYTHON=.venv/bin/python bash benchmarks/gpu_transfusion.sh [OUT_DIR] [STEP ...]
# On a bare device image (no hydra-core, omegaconf, segmentation-models-pytorch): `make gpu-wheels` here, carry
# `.whl` with the device call, and this script installs them into a folder of its own on the device.
set -euo pipefail
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${1:-outputs/benchmarks/gpu}
shift || true
STEPS=" ${*:-1 2 3 4 5 6 7 8 9 10 11 12 13} "
export PYTHONPATH=${PYTHONPATH:-$PWD} WANDB_MODE=disabled HF_HUB_OFFLINE=1
if ! "$PY" -c "import hydra, omegaconf, segmentation_models_pytorch" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "error: $PY lacks hydra-core/omegaconf/segmentation-models-pytorch and .whl/ has no wheels:" \
            "run make gpu-wheels and carry .whl" >&2
        exit 2
    fi
    SITE=${TMPDIR:-/tmp}/mvtec_seg_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH=$SITE:$PYTHONPATH
fi
mkdir -p "$OUT"
want() { [[ "$STEPS" == *" $1 "* ]]; }
run() {  # run LOG SECONDS ARGS...: one benchmark, its JSON lines shown, everything but warnings logged
    local log=$1 limit=$2
    shift 2
    timeout "$limit" "$PY" "$@" 2>&1 | grep -v Warning | tee "$OUT/$log.log" | grep '^{' || true
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
# 1. eager, bf16, batch 8: default network at 128 px and the published network at 256 px (~1.5 min)
want 1 && run eager 240 benchmarks/transfusion_speed.py --out "$OUT/eager" --steps 20 --batch 8 \
    --infer-batches 8,32,64
# 2. host synchronisations by call site: torch's set_sync_debug_mode("warn") and the aten read-back check,
#    3 training steps of the published network (~30 s)
want 2 && run sync_sites 90 benchmarks/sync_sites.py --net paper --out "$OUT"
# 3. last.ckpt every epoch vs every 60 s, published network, 26-step epochs as on bottle (~1 min)
want 3 && run resume_checkpoint 150 benchmarks/resume_checkpoint.py --net paper --size 256 --batch 8 \
    --steps-per-epoch 26 --epochs 4 --out "$OUT"
# 4. the Lightning loop with batches from pageable memory (each copy waits for the GPU; ~40 s)
want 4 && run pageable 120 benchmarks/transfusion_speed.py --out "$OUT/pageable" --nets paper --pageable \
    --steps 20 --batch 8 --infer-batches 0
# 5. torch.compile of network and loss, published network (compile time is in the table; ~2.5 min)
want 5 && run compile 240 benchmarks/transfusion_speed.py --out "$OUT/compile" --nets paper --compile \
    --steps 20 --batch 8 --infer-batches 32
# 6. the published network in channels_last, eager then compiled (NHWC without cuDNN's layout conversions;
#    eager NHWC was slower on the H100, compiled GroupNorm may change that; ~3.5 min)
want 6 && run channels_last 100 benchmarks/transfusion_speed.py --out "$OUT/channels_last" --nets paper \
    --channels-last --steps 20 --batch 8 --infer-batches 32
want 6 && run channels_last_compile 240 benchmarks/transfusion_speed.py --out "$OUT/channels_last_compile" \
    --nets paper --channels-last --compile --steps 20 --batch 8 --infer-batches 32
# 7. which attention kernel serves the published network's shapes, and each one's time (~30 s)
want 7 && run attention_backend 90 benchmarks/attention_backend.py --out "$OUT"
# 8. the real teacher stage (training, maps of ~340 images, pseudo masks) of a bottle-sized synthetic category,
#    published configuration, 5 epochs: this stop's defaults, then the old ones (pageable batches, last.ckpt
#    every epoch) for the before/after (~2.5 min)
STAGE=(experiment=transfusion_paper trainer=gpu teacher.trainer.max_epochs=5 category.generate.n_train=290
    category.generate.image_size=256 data.num_workers=6)
want 8 && run teacher_stage 200 benchmarks/teacher_stage.py --out "$OUT" "${STAGE[@]}"
want 8 && run teacher_stage_old 200 benchmarks/teacher_stage.py --out "$OUT/old" "${STAGE[@]}" \
    data.pin_memory=false checkpoint.last_every_s=0 data.eval_batch_size=8
# 9. GroupNorm upcast to float32 (CUDA autocast's rule, the network before) vs kept in bf16 (now): the published
#    network's step and inference, alternating, and a short bf16 loss curve with each (~1.5 min)
want 9 && run autocast_traffic 150 benchmarks/autocast_traffic.py --out "$OUT"
# 10. where the device time of 3 eager steps of the published network goes (torch.profiler: convolution, cuDNN
#     layout conversions, attention, GroupNorm, casts, optimizer, ...), both GroupNorm rules (~1 min)
want 10 && run step_profile 120 benchmarks/step_profile.py --out "$OUT"
# 11. anomaly generation with textures from files (the published recipe uses DTD): decoded every pick and
#     copied from pageable memory (before) vs cached on the device (now), ms and host waits per call (~30 s)
want 11 && run texture_cache 90 benchmarks/texture_cache.py --out "$OUT"
# 12. where the Lightning loop's step goes, eager and compiled (host time by phase, device busy against wall,
#     full GCs), published network, epochs of 26 batches as on bottle, then of 4 as transfusion_speed's loop
#     has: why the compiled loop lost its gain (~4 min)
want 12 && run loop_profile 300 benchmarks/loop_profile.py --out "$OUT"
want 12 && run loop_profile_4 200 benchmarks/loop_profile.py --out "$OUT/epoch4" --steps-per-epoch 4 \
    --modes compile
# 13. AdamW as a loop, foreach or fused (now the default): step time of both networks, fused's difference,
#     the default network's loss curve before/now (~1 min)
want 13 && run optimizer_step 120 benchmarks/optimizer_step.py --out "$OUT"
ls -R "$OUT"
