#!/usr/bin/env bash
# The tiny recipe's ogp stream sharded on $gpus ranks, one example per rank, against one process
# with the same global batch: the largest difference of any domain's adapter, into
# $out/<sharding>_parity.json. sharding=zero3 (default): DeepSpeed ZeRO-3, every LoRA tensor
# partitioned; sharding=fsdp2: the Trainer's FSDP2 (training.fsdp). Run by benchmarks/gpu_checks.sh
# (steps 5 and 6) on every GPU; on a CPU machine it runs with gloo:
#   gpus=2 sharding=fsdp2 out=/tmp/s bash benchmarks/sharded_parity.sh
set -euo pipefail
gpus=${gpus:-1}
sharding=${sharding:-zero3}
out=${out:-docs/gpu}
py=${py:-python3}
work=$(mktemp -d)
mkdir -p "$out"
$py - "$work/zero3.json" <<'PY'
import json, sys
doc = json.load(open("deepspeed_configs/zero3.json"))
doc["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # no LoRA tensor kept whole
json.dump(doc, open(sys.argv[1], "w"))
PY
common=(train recipes/tiny.yaml --set "compare=[]" --no-progress --set training.lr=1e-3
        --set "data.train_examples=$((8 * gpus))")
$py -m lora_cl.cli "${common[@]}" --set "training.batch_size=$gpus" --output "$work/one" > "$work/one.log" 2>&1 \
    || { tail -20 "$work/one.log"; exit 1; }
case "$sharding" in
  zero3) shard=(--set "training.deepspeed=$work/zero3.json") ;;
  fsdp2) shard=(--set training.fsdp=true) ;;
  *) echo "sharding must be zero3 or fsdp2, got $sharding" >&2; exit 2 ;;
esac
$py -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m lora_cl.cli "${common[@]}" \
    --set training.batch_size=1 "${shard[@]}" --output "$work/$sharding" \
    > "$work/$sharding.log" 2>&1 || { tail -20 "$work/$sharding.log"; exit 1; }
$py - "$work/one/ogp" "$work/$sharding/ogp" "$out/${sharding}_parity.json" "$gpus" "$sharding" <<'PY'
import json, sys, pathlib
import torch
from safetensors.torch import load_file
one, sharded, target, gpus = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sharding = sys.argv[5]
worst, moved = 0.0, 0.0
for ddir in sorted((one / "domains").iterdir()):
    want = load_file(str(ddir / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(sharded / "domains" / ddir.name / "adapter" / "adapter_model.safetensors"))
    worst = max(worst, max(float((got[k] - want[k]).abs().max()) for k in want))
    moved = max(moved, max(float(t.abs().max()) for t in want.values()))
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (gloo)"
result = {"sharding": sharding, "ranks": gpus, "device": device, "max_abs_diff": worst, "max_abs_weight": moved,
          "equal_within_1e-4": worst <= 1e-4 + 1e-4 * moved}
pathlib.Path(target).write_text(json.dumps(result, indent=1) + "\n")
print(f"{sharding} parity:", result)
sys.exit(0 if result["equal_within_1e-4"] else 1)
PY
