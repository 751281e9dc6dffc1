#!/usr/bin/env bash
# The GPU machine's one command (bench/README.md): build against its torch, run what needs the GPU,
# memcheck, then the CUDA figures of bench/RESULTS.md. Each stage runs under its own timeout and
# writes its full log under the results folder ($OUT, else bench/out); summary.txt says which
# stages passed, so one failing stage never costs the others' results. At most 8 files, no
# sub-folders: what the device tool brings back.
#
#   bash bench/run_gpu.sh            on the GPU machine (device tool: timeout_s=480)
#   bash bench/run_gpu.sh --dry-run  on a CPU: GPU stages skipped, the rest exercised (CI runs it)
#   ONLY="build memcheck" bash bench/run_gpu.sh   a rerun of some stages (build and build-check
#                                    included where the stages need the extension)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
dry_run=0
[[ ${1:-} == --dry-run ]] && dry_run=1
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
# Stages start only while the run is inside its budget, and none may run past it.
budget=${BUDGET_S:-420}
failures=0

# stage NAME LOG LIMIT_S COMMAND...: run COMMAND, appending to LOG; one summary line.
stage() {
  local name=$1 logname=$2 log="$out/$2" limit=$3
  shift 3
  if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
    printf '%-16s %-26s\n' "$name" "skipped: not in ONLY" | tee -a "$summary"
    return 0
  fi
  local left=$((budget - SECONDS))
  if ((left < 10)); then
    printf '%-16s %-26s\n' "$name" "skipped: out of time" | tee -a "$summary"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" >>"$log"
  local begin=$SECONDS status result
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  status=$?
  case $status in
    0) result=passed ;;
    124 | 137) result="timed out after ${limit}s" ;;
    *) result="failed (exit $status)" ;;
  esac
  printf '%-16s %-26s %4ds  %s\n' "$name" "$result" $((SECONDS - begin)) "$logname" |
    tee -a "$summary"
  return $status
}

skip() { printf '%-16s %-26s\n' "$1" "skipped: $2" | tee -a "$summary"; }
counted() { "$@" || failures=$((failures + 1)); }

bench=(python3 -m lookahead_cuda.bench)

{
  # The device tool sends the working tree without .git: say the commit in COMMIT there.
  echo "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, $(date -u)"
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
              "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and
              torch.cuda.get_device_name())'
  command -v nvcc >/dev/null && nvcc --version | tail -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader
} >>"$out/build.log" 2>&1

if ((dry_run)); then
  # The installed build is the CPU one: the check must catch that it has no CUDA kernels.
  counted stage build-check build.log 60 bash -c '! python3 bench/gpu_checks.py build' 
  skip tests-cuda "dry run: no GPU"
  counted stage tests-cpu tests.log 120 python3 -m pytest -q -p no:cacheprovider tests/test_op.py \
    -k "special_values or weight_one"
  skip memcheck "dry run: no GPU"
  tiny=(--device cpu --tensors 3 --numel 5000 --reps 2 --warmup 1)
  counted stage bench-fp32 bench.log 60 "${bench[@]}" "${tiny[@]}" --json "$out/bench-fp32.json"
  counted stage bench-bf16 bench.log 60 "${bench[@]}" "${tiny[@]}" --fast-dtype bfloat16 \
    --slow-dtype float32 --json "$out/bench-bf16.json"
  counted stage e2e bench.log 60 "${bench[@]}" --e2e --device cpu --tensors 2 --numel 1000 --reps 2 \
    --warmup 1 --json "$out/e2e.json"
  skip extras "dry run: no GPU"
  # The stage runner's own check: a stage past its limit is stopped and reported as such.
  stage timeout-check bench.log 1 sleep 5
  grep -q "^timeout-check .*timed out" "$summary" || failures=$((failures + 1))
else
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
  built=0
  stage build build.log 240 \
    python3 -m pip install --no-build-isolation --no-deps --no-cache-dir -v -e . &&
    stage build-check build.log 30 python3 bench/gpu_checks.py build && built=1
  if ((!built)); then
    echo "THE BUILD FAILED OR REGISTERED NO CUDA KERNELS: see build.log" | tee -a "$summary"
    exit 1
  fi
  timeout_flag=()
  python3 -c 'import pytest_timeout' 2>/dev/null && timeout_flag=(--timeout=90)
  counted stage tests-cuda tests.log 150 python3 -m pytest -q -p no:cacheprovider \
    "${timeout_flag[@]}" -m cuda tests
  # The CPU kernels' tests on the host's own capability (its header says which: AVX512 where the
  # CI machine has AVX2 only), and tests/test_cpu_capabilities.py under each one it has.
  counted stage tests-cpu tests.log 120 python3 -m pytest -q -p no:cacheprovider -m "not cuda" \
    tests/test_op.py tests/test_quantization.py tests/test_gated_ops.py tests/test_momentum.py \
    tests/test_cpu_capabilities.py
  # Every kernel under the sanitizer, once per vector width and at the edges (odd sizes, a split
  # launch, misaligned views), without -x so that every finding is listed: each test costs seconds
  # there, and all of the CUDA tests (the first run's selection) did not finish in 120 s.
  memchecked="(every_dtype_pair and 0.5) or (any_number_of_tensors and 1168)
    or (misaligned_views and 7 and (dtype0 or dtype2 or dtype5)) or non_contiguous
    or (momentum_sync and True and (dtype0 or dtype5)) or found_nonfinite_in_strided
    or (due_is_the_update and 0.5 and None and torch.ops and (dtype0 or dtype5))
    or (found_nonfinite_sees_every_element and nan and torch.ops)
    or ((quantize_matches or dequantize_mean) and 3-slow and (dtype0 or dtype5))"
  stage memcheck memcheck.log 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q \
    -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_gated_ops.py tests/test_quantization.py \
    -k "${memchecked//$'\n'/ }"
  if (($? != 0)); then
    if grep -qiE "device not supported|unable to (run|find)|error 999" "$out/memcheck.log"; then
      echo "memcheck: compute-sanitizer refused this machine's device (see memcheck.log)" |
        tee -a "$summary"
    else
      failures=$((failures + 1))
    fi
  fi
  counted stage bench-fp32 bench.log 75 "${bench[@]}" --reps 20 \
    --preset resnet50 gpt2 llama-7b-layer many-small --json "$out/bench-fp32.json"
  counted stage bench-7b bench.log 45 "${bench[@]}" --reps 10 --preset llama-7b --impl fused foreach
  counted stage bench-bf16 bench.log 75 "${bench[@]}" --reps 20 --fast-dtype bfloat16 \
    --slow-dtype float32 --preset resnet50 gpt2 llama-7b llama-7b-layer many-small \
    --impl fused foreach --json "$out/bench-bf16.json"
  counted stage bench-shapes bench.log 60 bash -c \
    "python3 -m lookahead_cuda.bench --reps 20 --tensors 4 --numel 16777216 --impl fused foreach &&
     python3 -m lookahead_cuda.bench --reps 20 --tensors 10000 --numel 4096 --impl fused foreach &&
     python3 -m lookahead_cuda.bench --reps 20 --preset gpt2 --misaligned --impl fused foreach &&
     python3 -m lookahead_cuda.bench --reps 20 --preset gpt2 many-small llama-7b-layer \
       --momentum 0.9 --impl fused foreach"
  # AdamW steps alone, in Lookahead and in SNOO: foreach, fused, capturable eager vs a CUDA graph.
  counted stage e2e bench.log 60 "${bench[@]}" --e2e --preset gpt2 --json "$out/e2e.json"
  counted stage extras bench.log 45 bash -c \
    "python3 bench/gpu_checks.py launches && python3 bench/gpu_checks.py offload &&
     python3 bench/gpu_checks.py host"
fi

echo "== ${SECONDS}s in all, ${failures} stage(s) failed; logs in $out" | tee -a "$summary"
((failures == 0))
