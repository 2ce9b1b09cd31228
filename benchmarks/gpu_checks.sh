#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with CUDA and lora-cl's dependencies importable:
#   bash benchmarks/gpu_checks.sh [OUTDIR]      (default docs/gpu)
# 0. a smoke run of every method of the reproduction's parts 2 and 6 on the tiny model (quick
# settings), so a device bug shows in seconds rather than after a grid's worth of device time,
# 1. optimizer parity on the device (benchmarks/gpu_parity.py), 2. optimizer-step ratios on the
# device (benchmarks/optimizer_step.py), 3. a Llama-2-7B-shaped model, bf16 and 4-bit, against the
# memory planner and against peft + fused AdamW (benchmarks/gpu_7b.py), 4. FSDP2 parity
# (tests/optim/fsdp2_worker.py over every GPU, into fsdp2_parity.json), 5. ZeRO-3 parity and
# 6. the FSDP2 stream's parity (benchmarks/sharded_parity.sh, into zero3_parity.json and
# fsdp2_stream/fsdp2_parity.json). Each has its own time limit, so one that hangs does not take
# the others' results with it, and all of them share one deadline, GPU_CHECKS_SECONDS (default
# 540: one device call may run 600 s), so the script returns inside one call: the steps run with
# the performance rows first (2 and 3, then 1, 4, 5, 6, and the smoke run 0 last), each cut to
# the time left, and a step with under 30 s left is skipped, saying so. SKIP_SMOKE=1 skips step 0.
set -uo pipefail
out=${1:-docs/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
$py - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for name in ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report and go on: a check that needs it will fail on its own
        print(name, "not importable:", exc)
PY
status=0
deadline=$((SECONDS + ${GPU_CHECKS_SECONDS:-540}))
# step NAME LIMIT CMD...: CMD under `timeout min(LIMIT, time left)`; skipped under 30 s left
step() {
  local name=$1 limit=$2 left=$((deadline - SECONDS))
  shift 2
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left}s left of GPU_CHECKS_SECONDS"; status=1; return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" || { echo "== $name: failed or timed out (exit $?)"; status=1; }
}
gpus=$($py -c 'import torch; print(max(1, torch.cuda.device_count()))')
# 2. optimizer-step ratios and host syncs on the device
step "optimizer step" 150 $py benchmarks/optimizer_step.py --device cuda --out "$out/optimizer_step_gpu.md" \
    --json "$out/optimizer_step_gpu.json"
# 3. a Llama-2-7B-shaped model: memory against the planner, ogp + 8-bit against peft + fused AdamW
step "7B" "${GPU_7B_TIMEOUT:-330}" $py benchmarks/gpu_7b.py --out "$out/gpu_7b.md" --json "$out/gpu_7b.json" \
    --steps 6
# 1. optimizer parity on the device
step "parity" 120 $py benchmarks/gpu_parity.py --out "$out/gpu_parity.md" --json "$out/gpu_parity.json"
# 4. RoutedAdamW on FSDP2 (fully_shard) DTensors over every GPU (a world of 1 on one GPU still runs
# the sharded code path, nccl): every routing and projection side against the unsharded run
step "FSDP2 parity" 180 env LORA_CL_FSDP_DEVICE=cuda PYTHONPATH="tests/optim${PYTHONPATH:+:$PYTHONPATH}" \
    $py -m torch.distributed.run --standalone --nproc_per_node "$gpus" tests/optim/fsdp2_worker.py \
    "$out/fsdp2_parity.json"
# 5. routing under DeepSpeed ZeRO-3 over every GPU (a world of 1 still runs the stage-3 path, nccl):
# the tiny recipe's ogp stream, one example per GPU, against one process with the same global batch
step "ZeRO-3 stream parity" 420 env gpus=$gpus out=$out py=$py sharding=zero3 bash benchmarks/sharded_parity.sh
# 6. the same stream under the Trainer's FSDP2 (training.fsdp; accelerate's own FSDP2 on a GPU)
step "FSDP2 stream parity" 300 env gpus=$gpus out=$out/fsdp2_stream py=$py sharding=fsdp2 \
    bash benchmarks/sharded_parity.sh
# 0. a smoke run of every method of parts 2 and 6 on the tiny model, last: the device time goes to
# the measurements first
if [ -z "${SKIP_SMOKE:-}" ]; then
  smoke=$(mktemp -d)
  for part in 2 6; do
    step "smoke part $part" 300 env PYTHON=$py bash benchmarks/reproduce_parallel.sh -w 7 -t 280 -p $part \
        -c "$smoke/cells" -l "$smoke/logs-$part" -- --quick --model tiny
  done
  done_cells=$(grep -l '"complete": true' "$smoke"/cells/*/*/*/summary.json 2>/dev/null | wc -l)
  echo "smoke: $done_cells quick tiny cells complete (parts 2 and 6: 11 + 3 methods)"
  for log in "$smoke"/logs-*/worker-*.log; do
    [ -f "$log" ] && grep -q Traceback "$log" && { echo "== $log"; grep -v -i warn "$log" | tail -6; }
  done
fi
exit $status
