#!/usr/bin/env bash
# Run the harness on the H200 test host (no network; see ../shared/GPU.md and README).
# Installs the bitsandbytes wheel carried in .whl/ into /tmp/site, then runs the command
# given, with the working tree on PYTHONPATH. Results are copied (tarred) into $OUT.
#   usage: scripts/gpu-host.sh RUN_DIR -- COMMAND...
set -uo pipefail
run_dir=$1; shift; [ "${1:-}" = "--" ] && shift
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "bitsandbytes wheel install failed"; exit 3; }
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export LORA_HARNESS_CACHE=${LORA_HARNESS_CACHE:-/tmp/lora-harness-cache}
mkdir -p "$run_dir"
"$@" 2>&1 | tee -a "$run_dir/console.log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/run.tgz" -C "$(dirname "$run_dir")" "$(basename "$run_dir")"
  cp "$run_dir/results.jsonl" "$OUT/" 2>/dev/null
fi
exit $rc
