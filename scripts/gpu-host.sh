#!/usr/bin/env bash
# Run the harness on the H200 test host (no network; see ../shared/GPU.md and README).
# Installs the bitsandbytes wheel carried in .whl/ (and the training stacks' wheels, where
# .whl-stacks/liger and .whl-stacks/unsloth were carried: docs/gpu-host.md, "Training
# stacks") into /tmp/site, then runs the command given, with the working tree on
# PYTHONPATH. Results are copied (tarred) into $OUT.
#   usage: scripts/gpu-host.sh RUN_DIR -- COMMAND...
#
# A fresh host pays for the synthetic checkpoints once: with WRITE_AHEAD set (e.g.
# WRITE_AHEAD="llama-3.1-8b --int8") they are written in the background while the
# command's worker server imports its libraries; cells that need them wait on their lock.
# The cache lives in /dev/shm where it has room (memory-speed writes and loads; the host
# has 128 GB of RAM), else in /tmp.
set -uo pipefail
run_dir=$1; shift; [ "${1:-}" = "--" ] && shift
wheels=$(ls .whl/*.whl .whl-stacks/liger/*.whl .whl-stacks/unsloth/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  # --no-deps: the host has torch, transformers, peft, triton; pip would try to fetch them
  # shellcheck disable=SC2086 # one word per wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    || { echo "wheel install failed: $wheels"; exit 3; }
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if [ -z "${LORA_HARNESS_CACHE:-}" ]; then
  shm_gb=$(df --output=avail -BG /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
  if [ "${shm_gb:-0}" -ge 48 ]; then LORA_HARNESS_CACHE=/dev/shm/lora-harness-cache; else LORA_HARNESS_CACHE=/tmp/lora-harness-cache; fi
fi
export LORA_HARNESS_CACHE
mkdir -p "$run_dir"
if [ -n "${WRITE_AHEAD:-}" ]; then
  # shellcheck disable=SC2086 # WRITE_AHEAD is "MODEL [--int8]"
  python3 -m harness.cell.build $WRITE_AHEAD > "$run_dir/write-ahead.log" 2>&1 &
fi
"$@" 2>&1 | tee -a "$run_dir/console.log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/run.tgz" -C "$(dirname "$run_dir")" "$(basename "$run_dir")"
  cp "$run_dir/results.jsonl" "$OUT/" 2>/dev/null
fi
exit $rc
