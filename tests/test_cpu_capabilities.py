"""The tests marked ``cpu_capability`` (their results depend on which CPU kernels torch picks: its
vectorised loops round a multiply-add once, its DEFAULT build twice) run again under every
capability this CPU supports, each in a subprocess with ``ATEN_CPU_CAPABILITY`` set, so that a
machine with AVX-512 and one with AVX2 each test all they can. The suite itself covers the
capability it runs under."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent


def _cpu_has(capability: str) -> bool:
    """Whether this CPU can run torch's kernels for ``capability``. torch does not check: asked
    for AVX512 on a CPU without it, it reports AVX512 and its AVX-512 kernels die of SIGILL."""
    if capability == "default":
        return True
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    return {"avx2": torch.cpu._is_avx2_supported, "avx512": torch.cpu._is_avx512_supported}[
        capability
    ]()


def _runs_under(capability: str) -> str:
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=_environment(capability),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def _environment(capability: str) -> dict[str, str]:
    return {**os.environ, "ATEN_CPU_CAPABILITY": capability}


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_capability_dependent_tests_pass_under(capability):
    if not _cpu_has(capability):
        pytest.skip(f"this CPU cannot run torch's {capability.upper()} kernels")
    runs_under = _runs_under(capability)
    assert runs_under == capability.upper()
    if runs_under == torch.backends.cpu.get_cpu_capability():
        pytest.skip(f"the suite itself runs under {runs_under}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "cpu_capability",
            "-p",
            "no:cacheprovider",
            str(TESTS),
        ],
        env=_environment(capability),
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    assert f"torch CPU capability: {runs_under}" in output, output[-3000:]
    assert result.returncode == 0, output[-6000:]
