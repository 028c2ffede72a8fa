#!/usr/bin/env bash
# GPU diagnostics on the H200 test host, in one device call (<= 540 s with the wheel install
# and the tar), everything under one folder ($1):
#
#   scripts/gpu-host.sh reports/runs/h200-diag -- bash scripts/h200-diag.sh reports/runs/h200-diag
#   (carry .whl: the bitsandbytes wheel, see README "Running on the H200 test host")
#
# What runs (Llama-3.1-8B preset, batch 1, LoRA r16 on all linear layers, AdamW):
#   1. benchmarks/interleaved.py: bf16 s2048 gc-off, bf16 s2048 gc-on, nf4 s2048 gc-on; per cell
#      the bare loop, the harness cell and the harness cell with the NVML sampler off, all alive,
#      taking turns step by step (2 steps a turn, order alternating per round) for as many rounds
#      as fit in the time given (IL_LIMIT, 240 s); then one profiled step each (GPU-busy).
#      -> interleaved/interleaved.md|json: harness/bare tokens/s (>= 0.97), sampler cost (< 1%)
#         with 95% intervals and verdicts, torch peak allocated harness/bare (within 1%)
#   2. benchmarks/offload_memory.py, bf16 and nf4 at 8192 tokens: gc on, offload (today's:
#      side stream + record_stream), offload with the copy on the current stream, offload
#      holding the input until its copy is done, and on / offload with expandable segments.
#      -> offload/offload_memory.md|json: allocated vs reserved, NVML, fragmentation
#   3. benchmarks/int8_memory.py, int8 and bf16 gc-on at 8192 tokens: the live memory at the
#      step's peak and after the forward pass by allocating frame, the saved-tensor accounting.
#      -> int8/int8_memory.md|json
#
# Estimated wall time on one H200 (NOTES.md's facts: imports 12-16 s per worker server, the 8B
# synthetic checkpoint ~25 s once per machine, an 8192-token step 1-3 s):
#   interleaved: 2 worker servers side by side ~22 s, checkpoint ~25 s, 3 cells x (~20 s of
#     start, warm-up, ~20-30 rounds, ~5 s stop) in its 240 s, + ~15 s to finish   ~255 s
#   offload_memory: worker server ~22 s, 12 cells x 7-9 s (checkpoint cached)       ~125 s
#   int8_memory: worker server ~22 s, int8 cell ~35 s (conversion at load ~20 s),
#     bf16 cell ~12 s                                                                 ~70 s
#   total ~450 s of the script's LIMIT (510 s) + the wheel install (~10 s) and the tar.
#   Hard stops: each driver has a --time-limit from what is left (interleaved 240 s, the
#   diagnostics share the rest, int8 keeps INT8_SHARE = 90 s), and each runs under
#   `timeout` so the job ends by LIMIT whatever happens (gpu-host.sh still tars the folder).
#
# CPU rehearsal (what tests/test_diag_scripts.py runs):
#   MODEL=tiny-llama CELLS=bf16/s64/gc-off ROUNDS=3 K=1 WARMUP=1 SEQ=64 OFF_PRECISIONS=bf16 \
#     INT8_PRECISIONS=int8 DEVICE=cpu bash scripts/h200-diag.sh /tmp/diag
set -uo pipefail
RUN=${1:-reports/runs/h200-diag}
MODEL=${MODEL:-llama-3.1-8b}
CELLS=${CELLS:-bf16/s2048/gc-off,bf16/s2048/gc-on,nf4/s2048/gc-on}
ROUNDS=${ROUNDS:-200}
K=${K:-2}
WARMUP=${WARMUP:-3}
IL_LIMIT=${IL_LIMIT:-240}
SEQ=${SEQ:-8192}
OFF_PRECISIONS=${OFF_PRECISIONS:-bf16,nf4}
INT8_PRECISIONS=${INT8_PRECISIONS:-int8,bf16}
INT8_SHARE=${INT8_SHARE:-90}
DEVICE=${DEVICE:-auto}
LIMIT=${LIMIT:-510}
PY=${PY:-python3}
mkdir -p "$RUN"
start=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - start) )); }
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
pos() { [ "$1" -gt 1 ] && echo "$1" || echo 1; }
rc=0

# 1. the interleaved overhead: its limit, leaving the diagnostics at least ~200 s
il=$(pos "$(min "$IL_LIMIT" $(( $(left) - 200 )))")
timeout -s INT -k 15 "$(pos "$(min $(( il + 45 )) "$(left)")")" "$PY" benchmarks/interleaved.py --out "$RUN/interleaved" \
  --model "$MODEL" --cells "$CELLS" --rounds "$ROUNDS" --steps-per-turn "$K" --warmup-steps "$WARMUP" \
  --device "$DEVICE" --time-limit "$il"
r=$?; [ $r -ne 0 ] && rc=$r
echo "h200-diag: interleaved exit $r after $(( $(date +%s) - start )) s"

# 2. offload vs plain checkpointing: what is left, less the int8 diagnostic's share
off=$(pos $(( $(left) - INT8_SHARE - 10 )))
timeout -s INT -k 10 "$(pos "$(min $(( off + 20 )) "$(left)")")" "$PY" benchmarks/offload_memory.py --out "$RUN/offload" \
  --model "$MODEL" --seq-len "$SEQ" --precisions "$OFF_PRECISIONS" --device "$DEVICE" --time-limit "$off"
r=$?; [ $r -ne 0 ] && rc=$r
echo "h200-diag: offload_memory exit $r after $(( $(date +%s) - start )) s"

# 3. where int8 gc-on keeps its memory: the rest
i8=$(pos $(( $(left) - 10 )))
timeout -s INT -k 5 "$(pos "$(min $(( i8 + 5 )) "$(left)")")" "$PY" benchmarks/int8_memory.py --out "$RUN/int8" \
  --model "$MODEL" --seq-len "$SEQ" --precisions "$INT8_PRECISIONS" --device "$DEVICE" --time-limit "$i8"
r=$?; [ $r -ne 0 ] && rc=$r
echo "h200-diag: int8_memory exit $r after $(( $(date +%s) - start )) s"

for f in interleaved/interleaved.md offload/offload_memory.md int8/int8_memory.md; do
  [ -f "$RUN/$f" ] && { echo; echo "== $f"; cat "$RUN/$f"; }
done
echo "h200-diag: done after $(( $(date +%s) - start )) s"
exit $rc
