#!/usr/bin/env bash
# Issue 6 on the H200 test host: the seed's own example as cells. Qwen2.5-VL-7B shape
# (random weights), one 448 x 448 image per sample (256 image tokens; seq_len counts text +
# image tokens), LoRA r16 on the language model's linear layers:
#   - bf16 at 1024 / 2048 / 4096 tokens with checkpointing offload (the seed's "unsloth"),
#     on (transformers') and off (the baseline for "16-bit LoRA fits <= 2048 tokens");
#   - nf4 and int8 at 2048 tokens with offload.
# 11 cells in one pytest run (one worker server start): about 2.5-3 minutes on an H200
# (server ~15 s, 9 bf16 cells ~6-8 s each, the synthetic checkpoint written once ~25 s inside
# the first quantised cell, int8 load ~20 s, nf4 load ~3 s).
#
# Run from the repository root, through the wrapper that installs bitsandbytes and tars
# the run folder into $OUT:
#   scripts/gpu-host.sh reports/runs/h200-vlm -- bash scripts/h200-vlm.sh
set -uo pipefail
RUN=${RUN:-reports/runs/h200-vlm}
MODEL=${MODEL:-qwen2.5-vl-7b}  # MODEL=tiny-qwen2.5-vl VRAM_BUDGET= rehearses the script on a CPU host

# The seed's card: every cell runs under an emulated 24 GiB budget (the fit work's
# --vram-budget); a cell that needs more is an OOM at that budget. BUDGET=() runs them
# on the whole H200 instead (then judge "24 GiB" from the NVML peak): VRAM_BUDGET= (empty)
# does that, and is how the script is rehearsed on a CPU host (budgets need a GPU).
VRAM_BUDGET=${VRAM_BUDGET-24GiB}
BUDGET=()
[ -n "$VRAM_BUDGET" ] && BUDGET=(--vram-budget "$VRAM_BUDGET")
[ ${#BUDGET[@]} -eq 0 ] && echo "no VRAM budget: judge '24 GiB' from the NVML peak (device-wide, CUDA context included)"

mkdir -p "$RUN"
start=$(date +%s)
# The cross product bf16,nf4,int8 x 1024,2048,4096 x off,on,offload is 27 cells; -k keeps
# the 9 bf16 cells and the 2 quantised cells at 2048 with offload (run.json lists all 27
# as the matrix; results.jsonl holds the 11 that ran).
python3 -m pytest suites/ -p no:cacheprovider --model "$MODEL" \
  --precision bf16,nf4,int8 --seq-len 1024,2048,4096 --grad-ckpt off,on,offload \
  -k "bf16 or (s2048 and gc-offload)" --cell-timeout 300 \
  --run-dir "$RUN" --benchmark-json "$RUN/benchmark.json" ${BUDGET[@]+"${BUDGET[@]}"}
rc=$?
echo "pytest exit code $rc after $(( $(date +%s) - start )) s"

# The closing note's table: status, NVML peak, torch peaks, tokens/s, and whether the
# device-wide peak stayed within 24 GiB.
python3 - "$RUN/results.jsonl" <<'EOF'
import json, sys
GIB = 1024 ** 3
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("| cell | status | peak VRAM (NVML) | torch peak allocated | tokens/s | text + image tokens | <= 24 GiB |")
print("|---|---|---:|---:|---:|---|---|")
for r in rows:
    g = lambda k: f"{r[k] / GIB:.1f} GiB" if r.get(k) is not None else "-"
    tps = f"{r['tokens_per_s']:,.0f}" if r.get("status") == "ok" and r.get("tokens_per_s") else "-"
    peak = r.get("peak_vram_bytes")
    fits = "-" if peak is None else ("yes" if peak <= 24 * GIB else "no")
    print(f"| {r['cell_id']} | {r['status']} | {g('peak_vram_bytes')} | {g('torch_peak_allocated_bytes')} | {tps} "
          f"| {r.get('text_tokens')} + {r.get('image_tokens')} | {fits} |")
EOF
exit $rc
