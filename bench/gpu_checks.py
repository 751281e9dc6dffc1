"""The GPU run's checks that are neither tests nor lookahead-bench tables (bench/run_gpu.sh).

python3 bench/gpu_checks.py build      # the build registered a CUDA kernel for every op
python3 bench/gpu_checks.py launches   # kernel launches of one sync, by the torch profiler
python3 bench/gpu_checks.py offload    # slow_device="cpu" against the default: time, memory
python3 bench/gpu_checks.py host       # many small tensors: the op's host time against its kernels'
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

import lookahead_cuda
from lookahead_cuda import Lookahead, lookahead_update_
from lookahead_cuda.bench.presets import PRESETS
from lookahead_cuda.ops import OP_NAMES, check_sync


def build() -> int:
    info = lookahead_cuda.build_info()
    print(f"build_info: {info}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    missing = [
        op
        for op in OP_NAMES
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lookahead_cuda::{op}", "CUDA")
    ]
    if not info["cuda"] or missing:
        stopping = f"THE BUILD HAS NO CUDA KERNELS for {missing or list(OP_NAMES)}: stopping"
        print(stopping, file=sys.stderr)
        return 1
    print(f"CUDA kernels registered for {', '.join(OP_NAMES)}")
    # An error message with a number in it: where the toolchain links libstdc++ statically and the
    # extension exports it, this crashed the process (setup.py, --exclude-libs).
    one = [torch.ones(1)]
    try:
        lookahead_update_(one * 2, one, 0.5)
        message = "no error"
    except ValueError as error:
        message = str(error)
    if "slow has 2 tensors but fast has 1" not in message:
        print(f"ERROR MESSAGES COME OUT BROKEN: {message!r}", file=sys.stderr)
        return 1
    print("error messages come out whole")
    return 0


def launches() -> int:
    from torch.profiler import ProfilerActivity, profile

    for name, slow_dtype, fast_dtype in (
        ("gpt2", torch.float32, torch.float32),
        ("llama-7b", torch.float32, torch.bfloat16),
    ):
        shapes = PRESETS[name].shapes
        slow = [torch.randn(s, device="cuda", dtype=slow_dtype) for s in shapes]
        fast = [torch.randn(s, device="cuda", dtype=fast_dtype) for s in shapes]
        lookahead_update_(slow, fast, 0.5)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            lookahead_update_(slow, fast, 0.5)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        elements = sum(t.numel() for t in slow) / 1e9
        print(
            f"{name}: {len(shapes)} tensors, {elements:.2f}B elements, slow {slow_dtype} / fast "
            f"{fast_dtype}: {len(kernels)} kernel launch(es) per sync"
        )
        del slow, fast
        torch.cuda.empty_cache()
    return 0


def offload() -> int:
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
        print(
            f"gpt2, slow_device={slow_device}: sync median {times[5] * 1e3:.2f} ms "
            f"(min {times[0] * 1e3:.2f}), GPU memory held by Lookahead {held / 2**20:.1f} MiB"
        )
        del opt
    return 0


def host() -> int:
    """Where a sync of many small tensors spends its time: lookahead-bench's many-small rows sit
    far above the floor, and only the host can explain that (the kernels move 200 MB)."""
    from torch.profiler import ProfilerActivity, profile

    for count in (3000, 10000):
        slow = [torch.randn(4096, device="cuda") for _ in range(count)]
        fast = [torch.randn(4096, device="cuda") for _ in range(count)]
        calls = {
            "validation alone": lambda s=slow, f=fast: check_sync(s, f, None, 0.5, 0.0),
            "lookahead_update_": lambda s=slow, f=fast: lookahead_update_(s, f, 0.5),
            "_foreach_lerp_ + copy_": lambda s=slow, f=fast: (
                torch._foreach_lerp_(s, f, 0.5),
                torch._foreach_copy_(f, s),
            ),
        }
        print(f"{count} x 4096 float32, mean of 20 calls:")
        for label, call in calls.items():
            host_ms, total_ms = _host_and_total_ms(call, 20)
            print(f"  {label}: host {host_ms:.3f} ms, until the GPU is done {total_ms:.3f} ms")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            lookahead_update_(slow, fast, 0.5)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        device_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        print(f"  lookahead_update_: {len(kernels)} kernel(s), {device_ms:.3f} ms on the device")
    return 0


def _host_and_total_ms(call: Callable[[], object], calls: int) -> tuple[float, float]:
    """Mean time per call until the host returns, and until the GPU has finished them all."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    queued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (queued - start) / calls * 1e3, (done - start) / calls * 1e3


if __name__ == "__main__":
    checks = {"build": build, "launches": launches, "offload": offload, "host": host}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        sys.exit(f"usage: python3 bench/gpu_checks.py {{{'|'.join(checks)}}}")
    sys.exit(checks[sys.argv[1]]())
