#!/usr/bin/env bash
# The CPU figures of bench/RESULTS.md, each also written as JSON under the given folder.
# Run after `pip install --no-build-isolation .`:  bash bench/run_cpu.sh [out-folder]
set -euo pipefail
out=${1:-bench/out}
reps=${REPS:-20}
mkdir -p "$out"
run() {
  local name=$1
  shift
  echo "== lookahead-bench --device cpu --reps $reps $*"
  lookahead-bench --device cpu --reps "$reps" --json "$out/$name.json" "$@"
}
run presets-fp32
run presets-bf16 --fast-dtype bfloat16 --slow-dtype float32
# The core issue's targets: fused vs torch's foreach pair.
run op-4x4096x4096-fp32 --tensors 4 --numel 16777216 --impl fused foreach
run op-3000x64x64-fp32 --preset many-small --impl fused foreach
run op-6x2048x2048-bf16 --tensors 6 --numel 4194304 --fast-dtype bfloat16 --slow-dtype float32 \
  --impl fused foreach
# The outer-momentum (SNOO) issue's targets: fused vs its foreach form, and its 6-pass floor.
run momentum-presets --preset resnet50 gpt2 many-small --momentum 0.9
run e2e-gpt2 --e2e --preset gpt2 --k 5 --reps 5 --warmup 1
