"""Builds lookahead_cuda._C against the installed torch.

CPU kernels are always built, with OpenMP. CUDA kernels are built when torch has CUDA, the CUDA
toolkit is found, and there is a GPU or an explicit arch list. Environment switches:
  FORCE_CUDA=1            build the CUDA kernels without a GPU (TORCH_CUDA_ARCH_LIST: 9.0)
  LOOKAHEAD_CPU_ONLY=1    never build the CUDA kernels
  CUDA_HOME               the toolkit folder holding bin/nvcc and lib64
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
except ImportError:
    sys.exit(
        "lookahead_cuda compiles against your installed torch, and none was found: "
        "install torch first, then `pip install --no-build-isolation .`"
    )

CSRC = "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _toolkit_home() -> "str | None":
    """The CUDA toolkit folder; a bin/nvcc found on PATH may be a wrapper outside it."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _want_cuda() -> bool:
    if _flag("LOOKAHEAD_CPU_ONLY"):
        return False
    force = _flag("FORCE_CUDA")
    home = _toolkit_home()
    if torch.version.cuda is None or home is None:
        if force:
            sys.exit(
                "FORCE_CUDA=1 needs a CUDA build of torch and a CUDA toolkit (set CUDA_HOME); "
                f"found torch {torch.__version__} and toolkit {home}"
            )
        return False
    os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension when it is imported
    if force:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    # Without a GPU and without an arch list, cpp_extension has nothing to compile for (and fails).
    return torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))


def _cuda_header_dirs() -> "list[str]":
    """cuBLAS/cuSPARSE headers that ATen's CUDA headers include, from the nvidia wheels that a CUDA
    torch installs, for toolkits installed without them."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        for include in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if glob.glob(os.path.join(include, "cublas*.h")) or glob.glob(
                os.path.join(include, "cusparse*.h")
            ):
                found.append(include)
    return found


def _extension():
    with_cuda = _want_cuda()
    from torch.utils import cpp_extension

    # Schema and module, what every backend shares, then one file per op and backend.
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # OpenMP: ATen's parallel_for only runs in parallel when the calling code is compiled with it;
    # at load time the extension binds to the libgomp that torch already loaded (one thread pool).
    # -ffp-contract=off: the kernels choose where a multiply-add is fused (csrc/element_math.h).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    define_macros = []
    extra = {"cxx": cxx_flags}
    extension = cpp_extension.CppExtension
    include_dirs = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        define_macros.append(("LOOKAHEAD_WITH_CUDA", None))
        # No --use_fast_math: it changes the rounding that must match torch.lerp.
        # LOOKAHEAD_PTXAS_VERBOSE=1 prints each kernel's registers and spills.
        extra["nvcc"] = ["-O3"] + (["-Xptxas=-v"] if _flag("LOOKAHEAD_PTXAS_VERBOSE") else [])
        extension = cpp_extension.CUDAExtension
        include_dirs = _cuda_header_dirs()
    print(f"lookahead_cuda: building CPU kernels{' and CUDA kernels' if with_cuda else ''}")
    return extension(
        name="lookahead_cuda._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        # --exclude-libs: where a toolchain links parts of libstdc++ statically (the GPU machine's
        # /opt/gcc does), their symbols must stay private. Exported, the locale's data binds to
        # torch's libstdc++ while its functions bind to ours (Python's -Bsymbolic-functions):
        # every integer written into an error message then read the wrong facet and crashed.
        extra_link_args=["-fopenmp", "-Wl,--exclude-libs,ALL"],
    ), cpp_extension.BuildExtension


ext, build_ext = _extension()
setup(ext_modules=[ext], cmdclass={"build_ext": build_ext.with_options(use_ninja=True)})
