"""Install gptfast; the top-level `kernels/` folder becomes `gptfast.kernels` and
`benchmarks/` becomes `gptfast.benchmarks` (so `gptfast bench` runs from an installed package).

PyPI already has an unrelated package called `kernels`, so the Triton kernels are never
installed under that name: `package_dir` maps them inside the gptfast namespace.

The CUDA C++ kernels (`csrc/`) become the extension `gptfast._C` when nvcc and a CUDA build of
torch are present (`python setup.py build_ext --inplace`, or `pip install -e .`):
  GPTFAST_CUDA_ARCHS      GPU targets, default "80;90a" (A100, H100/H200)
  MAX_JOBS                parallel compile jobs (ninja)
  GPTFAST_SKIP_CUDA_BUILD=1  skip it on purpose (`make install` does: a first install must not
                          wait on nvcc; `make build-cuda` builds it)
  GPTFAST_PTXAS_VERBOSE=1 print ptxas' registers / spills / shared memory per kernel
Without nvcc (or with a CPU-only torch) the extension is skipped with one line: installing never
fails for lack of CUDA. The CPU execution layer (gptfast/cuda_sim.py) needs none of this.
"""
import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CUDA_FALLBACKS = ["/usr/local/cuda"]  # where toolkits live when nvcc is not on PATH


def _note(msg):
    print(f"gptfast: {msg}", flush=True)


def _cuda_home():
    """The toolkit nvcc belongs to. `which nvcc` may be a wrapper script (/usr/local/bin/nvcc),
    so a candidate counts only when it has both bin/nvcc and include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += CUDA_FALLBACKS
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


def _wheel_cuda_dirs():
    """torch's pip CUDA wheels (site-packages/nvidia/cu13/{include,lib}): headers the toolkit
    may lack (cublas, ...) and its runtime library."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return None, None
    for base in map(Path, nvidia.__path__):
        for sub in ("cu13", "cu12", "cuda_runtime"):
            inc, lib = base / sub / "include", base / sub / "lib"
            if inc.is_dir() and lib.is_dir():
                return inc, lib
    return None, None


def _link_dir(home):
    """A folder with an unversioned libcudart.so for the linker. The toolkit's lib64 usually has
    one; torch's wheel only has libcudart.so.13, so the build makes its own symlink under build/
    (never in the toolkit or site-packages)."""
    for lib in (home / "lib64", home / "lib"):
        if (lib / "libcudart.so").exists():
            return None
    _, wheel_lib = _wheel_cuda_dirs()
    if wheel_lib is None:
        return None
    versioned = sorted(wheel_lib.glob("libcudart.so.*"))
    if not versioned:
        return None
    own = ROOT / "build" / "cuda-link"
    own.mkdir(parents=True, exist_ok=True)
    link = own / "libcudart.so"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(versioned[0])
    return own


def cuda_extension():
    """([gptfast._C], cmdclass) or ([], {}) with the reason printed."""
    if os.environ.get("GPTFAST_SKIP_CUDA_BUILD") == "1":
        _note("GPTFAST_SKIP_CUDA_BUILD=1: not building the CUDA extension gptfast._C")
        return [], {}
    home = _cuda_home()
    if home is None:
        _note("nvcc not found: skipping the CUDA extension gptfast._C (Triton and torch backends "
              "work without it)")
        return [], {}
    try:
        import torch
    except ImportError:
        _note("torch is not importable at build time (use --no-build-isolation): skipping gptfast._C")
        return [], {}
    if torch.version.cuda is None:
        _note(f"torch {torch.__version__} is a CPU build: skipping the CUDA extension gptfast._C")
        return [], {}
    os.environ["CUDA_HOME"] = str(home)  # read by torch.utils.cpp_extension at import
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    csrc = ROOT / "csrc"
    kernels = sorted(p.relative_to(ROOT).as_posix() for p in csrc.rglob("*.cu")
                     if "sim" not in p.relative_to(csrc).parts)  # the CPU layer's own kernels stay out
    archs = [a.strip() for a in os.environ.get("GPTFAST_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
             if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    nvcc = ["-O3", "-lineinfo", *gencode]
    if os.environ.get("GPTFAST_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    cxx = ["-O3"]
    wheel_inc, _ = _wheel_cuda_dirs()
    if wheel_inc is not None:  # for the binding: after the toolkit's headers, never instead
        cxx += ["-idirafter", str(wheel_inc)]
    link = _link_dir(home)
    ext = CUDAExtension(
        "gptfast._C", ["csrc/binding.cpp", *kernels],
        include_dirs=[str(csrc)],
        library_dirs=[str(link)] if link else [],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )
    _note(f"building gptfast._C for {', '.join('sm_' + a for a in archs)} with {home}/bin/nvcc "
          f"({len(kernels)} kernel sources, MAX_JOBS={os.environ.get('MAX_JOBS', 'default')})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="gptfast",
    version="0.1.0",
    description="Fused causal attention and fused linear cross-entropy kernels for GPT models",
    python_requires=">=3.9",
    packages=["gptfast", "gptfast.ops", "gptfast.hf", "gptfast.kernels",
              "gptfast.benchmarks"],
    package_dir={"gptfast": "gptfast", "gptfast.kernels": "kernels",
                 "gptfast.benchmarks": "benchmarks"},
    package_data={"gptfast.kernels": ["*_configs.json"]},  # the launch configuration tables
    install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout", "pytest-benchmark"],
        # gptfast.hf: patch transformers models, load/save GPT-2 and BLOOM checkpoints and their
        # tokenizers. Tested with transformers 5.17 and 5.24 (README).
        "hf": ["transformers>=5.17,<6", "safetensors>=0.4", "tokenizers>=0.21"],
    },
    entry_points={"console_scripts": ["gptfast=gptfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
