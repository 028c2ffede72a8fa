#!/usr/bin/env bash
# Issue 8 on the two-H200 host (kind nvidia-h200-x2): multi-GPU (torchrun) cells, into ONE
# run folder.
#
#   scripts/gpu-host.sh reports/runs/h200x2-dist -- bash scripts/h200x2-dist.sh [all|8b|70b]
#
# (from the repository root, with the bitsandbytes wheel in .whl/ carried along; gpu-host.sh
# installs it, sets PYTHONPATH, exports NCCL_NVLS_ENABLE=0 and tars the run folder into
# $OUT. The launcher sets NCCL_NVLS_ENABLE=0 for every torchrun cell anyway: NVLink
# multicast can take a shared host's GPUs out of service.)
#
# Two pytest invocations of the matrix suite (each starts one worker server, for the
# one-GPU cells and env.json; every world_size 2 cell is a fresh torchrun with two fresh
# ranks):
#   8b:  Llama-3.1-8B shape, bf16, 2048 tokens, checkpointing on: world size 1, then 2 with
#        DDP and with FSDP -> tokens/s total and per GPU, scaling efficiency vs world size 1;
#   70b: Llama-3.1-70B shape (141 GB of bf16 weights), checkpointing on, 512 and 2048
#        tokens, 3 measured steps: world size 2 with FSDP (each GPU holds half the weights)
#        for bf16 and nf4 (nf4 + FSDP is recorded unsupported by rule fsdp-quantised, at no
#        cost), and world size 1 (does 70B bf16 fit one H200? ~131 GiB of weights on a
#        ~140 GiB card: expected to fit at 512 or just fail; a world size 1 OOM at 512
#        prunes 2048). nf4 at world size 1 needs the synthetic checkpoint, 141 GB: more
#        than the host's disk, so it is recorded unsupported after a ~3 s size check.
#
# Estimated wall time on the x2 host (facts: worker server preload 12-16 s; importing
# torch + transformers + peft + bitsandbytes 21-29 s in every fresh process, so in every
# torchrun rank, ranks in parallel; an 8B bf16 cell 4-15 s):
#   wheel install                                                          ~5 s
#   8b:  worker server + env.json                                    ~20 s
#        ws1 cell (fork server)                                       ~8 s
#        ws2-ddp: rank imports ~25 s + build 1 s + 7 steps ~4 s + checksum ~40 s
#        ws2-fsdp: the same plus sharding ~3 s                        ~40 s   -> ~110 s
#   70b: worker server + env.json                                     ~20 s
#        bf16 ws1 s512: build 141 GB on one GPU ~5 s + 5 steps ~5 s   ~20 s (or an OOM in ~10 s)
#        bf16 ws2-fsdp s512: imports ~25 s + meta build and LoRA ~3 s + shard and init ~3 s
#                            + 5 steps ~1.5 s each + checksum of 207 M LoRA weights ~5 s  ~45 s
#        bf16 ws1 s2048 (or pruned)                                   ~25 s
#        bf16 ws2-fsdp s2048: 5 steps ~3-4 s each                     ~60 s
#        nf4 ws1 x2 (disk check) ~5 s each, nf4 ws2-fsdp (rule) 0 s   ~10 s   -> ~180 s
#   total ~5 min; with the slow end of every range ~7.5 min. A hard stop at 560 s (SIGINT:
#   the cell in flight is killed with its ranks, records so far are kept, gpu-host.sh still
#   tars the folder); `bash scripts/h200x2-dist.sh 70b` in a second call (carry the run
#   folder back) continues with --resume.
#
# Rehearse on a CPU host (gloo, tiny model, minutes):
#   SMALL=tiny-llama LARGE=tiny-llama LEN=64 LENS_LARGE=64,128 RUN=/tmp/dist-rehearsal \
#     OMP_NUM_THREADS=1 PATH=<venv>/bin:$PATH bash scripts/h200x2-dist.sh
set -uo pipefail
RUN=${RUN:-reports/runs/h200x2-dist}
SMALL=${SMALL:-llama-3.1-8b}
LARGE=${LARGE:-llama-3.1-70b}
LEN=${LEN:-2048}
LENS_LARGE=${LENS_LARGE:-512,2048}
part=${1:-all}
case $part in all|8b|70b) ;; *) echo "usage: bash scripts/h200x2-dist.sh [all|8b|70b]" >&2; exit 2 ;; esac
export NCCL_NVLS_ENABLE=0
mkdir -p "$RUN"
start=$(date +%s)
left() { echo $(( start + 560 - $(date +%s) )); }
rc=0
nvidia-smi --query-gpu=index,name,pci.bus_id,memory.total,memory.used --format=csv 2>/dev/null || true
df -h "${LORA_HARNESS_CACHE:-/tmp}" 2>/dev/null | tail -1

if [ "$part" != 70b ]; then
  timeout -s INT -k 30 "$(left)" python3 -m pytest suites/test_matrix.py -p no:cacheprovider -p no:benchmark -rA \
    --run-dir "$RUN" --resume --model "$SMALL" --precision bf16 --seq-len "$LEN" --grad-ckpt on \
    --world-size 1,2 --parallel ddp,fsdp --cell-timeout 240
  r=$?; [ $r -ne 0 ] && rc=$r
  echo "h200x2-dist: 8b part ended with exit code $r after $(( $(date +%s) - start )) s"
fi
if [ "$part" != 8b ] && [ "$(left)" -gt 60 ]; then
  timeout -s INT -k 30 "$(left)" python3 -m pytest suites/test_matrix.py -p no:cacheprovider -p no:benchmark -rA \
    --run-dir "$RUN" --resume --model "$LARGE" --precision bf16,nf4 --seq-len "$LENS_LARGE" --grad-ckpt on \
    --world-size 1,2 --parallel fsdp --steps 3 --cell-timeout 300
  r=$?; [ $r -ne 0 ] && rc=$r
  echo "h200x2-dist: 70b part ended with exit code $r after $(( $(date +%s) - start )) s"
fi
python3 -m harness env --from-run "$RUN" || true

# The closing table: per cell, tokens/s (total and per GPU), scaling efficiency, and each
# rank's peaks (NVML device peak / torch allocated), whether the ranks' LoRA weights agree
# and whether each rank's NVML device is its CUDA device (UUID check).
python3 - "$RUN/results.jsonl" <<'EOF'
import json, sys
GIB = 1024 ** 3
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
fmt = lambda v: "-" if v is None else f"{v / GIB:.1f}"
print("| cell | status | tokens/s | per GPU | scaling eff. | peak VRAM GiB (NVML, per rank) | torch alloc GiB | LoRA in sync | NVML = CUDA dev |")
print("|---|---|---:|---:|---:|---|---|---|---|")
for r in rows:
    ok = r.get("status") == "ok"
    tps = f"{r['tokens_per_s']:,.0f}" if ok and r.get("tokens_per_s") else "-"
    pg = r.get("per_gpu_tokens_per_s") or (r.get("tokens_per_s") if (r.get("spec") or {}).get("world_size", 1) == 1 else None)
    pg = f"{pg:,.0f}" if ok and pg else "-"
    eff = f"{r['scaling_efficiency']:.0%}" if r.get("scaling_efficiency") is not None else "-"
    vram = " / ".join(fmt(v) for v in r["per_rank_peak_vram_bytes"]) if r.get("per_rank_peak_vram_bytes") else fmt(r.get("peak_vram_bytes"))
    alloc = " / ".join(fmt(v) for v in r["per_rank_torch_peak_allocated_bytes"]) if r.get("per_rank_torch_peak_allocated_bytes") else fmt(r.get("torch_peak_allocated_bytes"))
    print(f"| {r['cell_id']} | {r['status']} | {tps} | {pg} | {eff} | {vram} | {alloc} | {r.get('lora_in_sync', '-')} "
          f"| {r.get('per_rank_nvml_uuid_match', '-')} |")
    if not ok and r.get("error"):
        print(f"|  | {str(r['error']).splitlines()[0][:200]} |||||||")
EOF
echo "h200x2-dist: done after $(( $(date +%s) - start )) s, exit code $rc"
exit $rc
