#!/usr/bin/env bash
# One device-machine call: build against the machine's torch, run the tests (CUDA ones included)
# and memcheck, then the CUDA figures of bench/RESULTS.md. Writes logs and JSON under $OUT.
#   device tool:  bash bench/run_gpu.sh
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/summary.txt"; }

log "build: $(python -c 'import torch; print(torch.__version__)') $(nvcc --version | tail -1)"
TORCH_CUDA_ARCH_LIST=9.0 pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
  || { log "build failed"; tail -40 "$out/build.log"; exit 1; }
python -c 'import lookahead_cuda; print(lookahead_cuda.build_info())' | tee -a "$out/summary.txt"

log "tests"
python -m pytest -q tests 2>&1 | tail -15 | tee -a "$out/summary.txt"
log "compute-sanitizer memcheck on the CUDA tests"
compute-sanitizer --tool memcheck --error-exitcode 1 \
  python -m pytest -q -x tests/test_cuda.py tests/test_gated_ops.py -k "not two_billion and not cpu" \
  2>&1 | tail -8 | tee -a "$out/summary.txt"

log "benchmark"
lookahead-bench --reps 20 --json "$out/presets-fp32.json" | tee -a "$out/summary.txt"
lookahead-bench --reps 20 --fast-dtype bfloat16 --slow-dtype float32 \
  --json "$out/presets-bf16.json" | tee -a "$out/summary.txt"
lookahead-bench --reps 20 --tensors 4 --numel 16777216 --impl fused foreach | tee -a "$out/summary.txt"
lookahead-bench --reps 20 --tensors 10000 --numel 4096 --impl fused foreach | tee -a "$out/summary.txt"
# AdamW steps with and without Lookahead: foreach, fused, and capturable eager vs one CUDA graph.
lookahead-bench --e2e --preset gpt2 --json "$out/e2e-gpt2.json" | tee -a "$out/summary.txt"

log "kernel launches per sync (torch profiler)"
python - <<'PY' 2>&1 | tee -a "$out/summary.txt"
import torch
from torch.profiler import ProfilerActivity, profile

from lookahead_cuda import lookahead_update_
from lookahead_cuda.bench.presets import PRESETS

for name, slow_dtype, fast_dtype in (("gpt2", torch.float32, torch.float32),
                                     ("llama-7b", torch.float32, torch.bfloat16)):
    shapes = PRESETS[name].shapes
    slow = [torch.zeros(s, device="cuda", dtype=slow_dtype) for s in shapes]
    fast = [torch.ones(s, device="cuda", dtype=fast_dtype) for s in shapes]
    lookahead_update_(slow, fast, 0.5)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        lookahead_update_(slow, fast, 0.5)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"{name}: {len(shapes)} tensors, {sum(t.numel() for t in slow) / 1e9:.2f}B elements, "
          f"{len(kernels)} kernel launch(es), slow {slow_dtype} / fast {fast_dtype}")
    del slow, fast
    torch.cuda.empty_cache()
PY

log "slow weights in host memory (slow_device='cpu') against the default, gpt2 preset"
python - <<'PY' 2>&1 | tee -a "$out/summary.txt"
import time

import torch

from lookahead_cuda import Lookahead
from lookahead_cuda.bench.presets import PRESETS

params = [torch.randn(s, device="cuda", requires_grad=True) for s in PRESETS["gpt2"].shapes]
for slow_device in (None, "cpu"):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt = Lookahead(torch.optim.SGD(params, lr=0.0), slow_device=slow_device)
    opt.sync()  # takes the slow weights
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.sync()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"slow_device={slow_device}: sync median {times[5] * 1e3:.2f} ms "
          f"(min {times[0] * 1e3:.2f}), GPU memory held by Lookahead {held / 2**20:.1f} MiB")
    del opt
PY
