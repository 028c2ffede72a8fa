#!/usr/bin/env bash
# Issue 7 on the H200 test host: the harness's own overhead, the NVML sampler's cost and
# the repeatability of its figures, in one call (one run folder).
#
#   scripts/gpu-host.sh reports/runs/h200-perf -- bash scripts/h200-perf.sh
#   (carry .whl: the bitsandbytes wheel, see README "Running on the H200 test host")
#
# What runs (cells: Llama-3.1-8B preset, bf16 at 2048 tokens with checkpointing off and
# on, nf4 at 2048 with checkpointing on; batch 1, LoRA r16 on all linear layers, AdamW):
#   1. benchmarks/overhead.py: per cell and repetition (3, the order of the runs rotated
#      each time) the bare loop (benchmarks/bare_lora.py, a fresh interpreter), the
#      harness cell, the harness cell with the NVML sampler off (--nvml-period-ms 0) and
#      with the sampler polling from a process of its own (--sampler-mode process: the
#      fix to adopt if the thread costs more than 1%); 3 warm-up + 15 measured steps each.
#      -> overhead/overhead.md|json (ratios vs the 3% / 1% / 1% targets)
#   2. benchmarks/repeatability.py on the overhead's harness records: 3 cells x 3 fresh
#      processes (15-step windows), sampler on and off apart (no device time).
#      -> repeatability-overhead/repeatability.md|json
#   3. benchmarks/repeatability.py at the matrix's own 2 + 5 steps: 3 cells x 3 fresh
#      processes, in the time left. -> repeatability/repeatability.md|json
#   4. lora-harness sweep-cost on both harness run folders (fixed cost per cell, phases)
#      and on the committed reference run (the "before" figures). -> */sweep-cost.md
#
# Estimated wall time on one H200 (from NOTES.md's facts and the reference run's cells):
#   overhead: worker server (imports 12-16 s, fork self-test, env.json)          ~22 s
#             synthetic 8B checkpoint for nf4, written once per machine          ~25 s
#             per repetition: bare runs (a fresh interpreter each: imports ~12 s,
#               build / load 1-3 s, 18 steps at 0.21 / 0.37 / 0.46 s)          ~19+22+26 s
#             harness: sampler thread, off, process (fixed cost 1.8 / 1.8 / 4.5 s,
#               warm-up ~1.5-2 s, 15 steps)                            3 x (6.5+9.2+13.4) s
#             3 repetitions                                                      ~460 s
#   repeatability from the overhead's records                                      ~0 s
#   repeatability at 2 + 5 steps (only if >= 70 s are left: a second worker
#     server ~22 s + 9 cells ~55 s)                                          0 or ~80 s
#   total ~8.5 min (+ the wheel install and the tar). Hard stops: the overhead driver
#   starts no run after 420 s, the repeatability driver no cell after 515 s of the job,
#   and the whole job is interrupted at 555 s (gpu-host.sh still tars the folder).
#   If only two repetitions fit, the tables say so (their run counts); the 3 x 3
#   repeatability then comes from repeatability-overhead/ (fresh processes, 15 steps).
#
# CPU rehearsal (what tests/test_perf_scripts.py runs):
#   MODEL=tiny-llama CELLS=bf16/s64/gc-off REPS=1 STEPS=2 WARMUP=1 REP_STEPS=1 RUN=/tmp/p bash scripts/h200-perf.sh
set -uo pipefail
RUN=${RUN:-reports/runs/h200-perf}
MODEL=${MODEL:-llama-3.1-8b}
CELLS=${CELLS:-bf16/s2048/gc-off,bf16/s2048/gc-on,nf4/s2048/gc-on}
REPS=${REPS:-3}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-15}
REP_STEPS=${REP_STEPS:-5}
LIMIT=${LIMIT:-555}
PY=${PY:-python3}
SAMPLER_PROCESS=${SAMPLER_PROCESS:-1}
PROC=(); [ "$SAMPLER_PROCESS" = 1 ] && PROC=(--sampler-process)
mkdir -p "$RUN"
start=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - start) )); }

timeout -s INT -k 20 "$(left)" "$PY" benchmarks/overhead.py --out "$RUN/overhead" --model "$MODEL" --cells "$CELLS" \
  --reps "$REPS" --warmup-steps "$WARMUP" --steps "$STEPS" --time-limit $(( LIMIT - 135 )) ${PROC[@]+"${PROC[@]}"}
rc=$?
echo "h200-perf: overhead exit $rc after $(( $(date +%s) - start )) s"

"$PY" benchmarks/repeatability.py --from-run "$RUN/overhead/harness-run" --out "$RUN/repeatability-overhead" \
  > /dev/null || true

budget=$(( $(left) - 40 ))
if [ "$budget" -gt 70 ]; then
  timeout -s INT -k 20 "$(left)" "$PY" benchmarks/repeatability.py --out "$RUN/repeatability" --model "$MODEL" \
    --cells "$CELLS" --reps 3 --steps "$REP_STEPS" --time-limit "$budget"
  echo "h200-perf: repeatability exit $? after $(( $(date +%s) - start )) s"
else
  echo "h200-perf: no time left for the standalone repeatability run (see repeatability-overhead/)"
fi

for d in overhead/harness-run repeatability/run; do
  [ -f "$RUN/$d/results.jsonl" ] && "$PY" -m harness sweep-cost "$RUN/$d" --out "$RUN/$(dirname "$d")" > /dev/null
done
"$PY" -m harness sweep-cost reports/reference/h200-core-2026-11-29 --out "$RUN/before" > /dev/null || true
for f in overhead/overhead.md repeatability-overhead/repeatability.md repeatability/repeatability.md \
         overhead/sweep-cost.md; do
  [ -f "$RUN/$f" ] && { echo; echo "== $f"; cat "$RUN/$f"; }
done
echo "h200-perf: done after $(( $(date +%s) - start )) s"
exit $rc
