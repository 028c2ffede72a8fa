#!/usr/bin/env bash
# Issue 8 on a two-H200 host (device kind nvidia-h200-x2): the same cells of the
# Llama-3.1-8B shape run serially on GPU 0 (--gpus 0), then in parallel on both GPUs
# (--gpus 0,1), into two run folders; then cells per hour of both, the GPU each parallel
# cell was pinned to and read, and the per-cell agreement table (lora-harness agree:
# tokens/s, peak VRAM and torch's peak allocated bytes, parallel vs serial).
#
#   scripts/gpu-host.sh reports/runs/h200x2-scale -- bash scripts/h200x2-scale.sh
#   (carry .whl: the bitsandbytes wheel, see README "Running on the H200 test host";
#    gpu-host.sh exports NCCL_NVLS_ENABLE=0 and tars reports/runs/h200x2-scale into $OUT)
#
# Cells: bf16, nf4 x 2048, 4096 tokens x gc off, on, offload = 12, 8 measured steps each
# (2 warm-up), so the per-step spread the agreement uses has 8 values per cell.
# Estimated wall time (H200 facts in NOTES.md), about 4-5 minutes in all:
#   wheel install (gpu-host.sh)                                                   ~10 s
#   synthetic 8B checkpoint, written once before anything is timed (imports ~15 s,
#     write ~25 s); the nf4 cells of both runs load it                             ~40 s
#   serial: worker server 12-16 s, env.json ~5 s, 12 cells: bf16 ~4-8 s, nf4 ~8-15 s
#     (load + 10 steps at 2k-4k tokens)                                         ~100-140 s
#   parallel: two servers start side by side (~16 s), then the same 12 cells on two GPUs
#     (6 rows of 2 lengths: both GPUs stay busy)                                  ~60-90 s
#   agree, show                                                                    ~5 s
# Each run is bounded (timeout 240 s; --cell-timeout 120), so one stuck phase cannot eat
# the 10-minute call; a run cut short keeps its records (continue with --resume).
#
# Rehearsal on a CPU host (what CI does, tests/test_scale_script.py):
#   LORA_HARNESS_FAKE_GPUS=2 MODEL=tiny-llama SEQ=64 GRAD_CKPT=off RUN=/tmp/scale bash scripts/h200x2-scale.sh
#   (on a CPU the parallel cells share the cores, so their tokens/s drop: agree says so)
# Exit status: 0 when both runs finished every cell and every compared metric agrees; 1 otherwise.
set -uo pipefail
RUN=${RUN:-reports/runs/h200x2-scale}
MODEL=${MODEL:-llama-3.1-8b}
SEQ=${SEQ:-2048,4096}
STEPS=${STEPS:-8}
GRAD_CKPT=${GRAD_CKPT:-off,on,offload}
CELLS=(--model "$MODEL" --precision bf16,nf4 --seq-len "$SEQ" --grad-ckpt "$GRAD_CKPT" --steps "$STEPS"
       --cell-timeout 120)
mkdir -p "$RUN"
t0=$(date +%s)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,uuid,pci.bus_id,memory.used --format=csv

echo "== synthetic checkpoint for $MODEL (once, before anything is timed)"
python3 - "$MODEL" <<'EOF'
import os, sys, time
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
import torch
from harness.core.models import get_preset
from harness.cell.build import ensure_checkpoint
t = time.time()
ensure_checkpoint(get_preset(sys.argv[1]), device="cuda:0" if torch.cuda.is_available() else "cpu")
print(f"checkpoint ready in {time.time() - t:.1f} s")
EOF

echo "== serial: --gpus 0"
timeout 240 python3 -m harness run "${CELLS[@]}" --gpus 0 --run-dir "$RUN/serial"
rc_serial=$?
echo "== parallel: --gpus 0,1"
timeout 240 python3 -m harness run "${CELLS[@]}" --gpus 0,1 --run-dir "$RUN/parallel"
rc_parallel=$?

echo "== where each parallel cell ran (pinned slot vs the GPU its NVML sampler read)"
python3 - "$RUN/parallel" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/results.jsonl") if l.strip()]
for r in recs:
    print(f"  {r['cell_id']:42s} {r['status']:8s} gpu_index={r.get('gpu_index')} uuid={r.get('gpu_uuid')} "
          f"CUDA_VISIBLE_DEVICES={r.get('cuda_visible_devices')}{'  PIN MISMATCH' if r.get('gpu_pin_mismatch') else ''}")
used = sorted({r.get("gpu_index") for r in recs if r.get("status") == "ok"}, key=str)
bad = [r["cell_id"] for r in recs if r.get("gpu_pin_mismatch")]
print(f"GPUs used: {used}; pin mismatches: {len(bad)}")
EOF
echo "== cells per hour and agreement (A = serial, B = parallel)"
python3 -m harness agree "$RUN/serial" "$RUN/parallel" --out "$RUN/agree.md"
rc_agree=$?
echo "== whole script: $(( $(date +%s) - t0 )) s (serial rc $rc_serial, parallel rc $rc_parallel, agree rc $rc_agree)"
[ "$rc_serial" = 0 ] && [ "$rc_parallel" = 0 ] && [ "$rc_agree" = 0 ]
