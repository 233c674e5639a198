"""Source rules for csrc/ that keep the CPU execution layer honest and the build small:
  * inline asm, __CUDA_ARCH__, vendor template libraries (CUTLASS/CuTe/CUB/Thrust), __shared__
    and the CUDA intrinsics the primitives wrap live only in csrc/common/ (a kernel that used
    them directly would run on the GPU but not on the layer, or differently);
  * only the binding sees torch (kernel sources compile in seconds, and without torch);
  * kernels are templated on the dtype and the head dimension only (every other feature is a
    runtime argument: the nvcc build stays within its time budget)."""
import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE_SUFFIXES = {".cu", ".cuh", ".h", ".cpp"}
TORCH_FILES = {"binding.cpp", "sim/guards.h"}  # relative to csrc/

# pattern -> what to use instead
FORBIDDEN_OUTSIDE_COMMON = {
    r"\basm\b|__asm__": "inline asm (put it in a csrc/common/ primitive)",
    r"__CUDA_ARCH__": "__CUDA_ARCH__ (architecture branches belong in csrc/common/)",
    r"\bcutlass\b|\bcute::|#\s*include\s*[<\"]cute/|\bcub::|#\s*include\s*[<\"]cub/|\bthrust::":
        "a vendor template library",
    r"__shared__": "__shared__ (use gf::smem_arena())",
    r"__syncthreads|__syncwarp|__shfl_\w*sync|__ballot_sync|\batomicAdd\b|__ldg\b|<<<":
        "a raw CUDA intrinsic (use the gf:: primitive, which the CPU layer implements)",
}
TORCH_INCLUDE = r"#\s*include\s*[<\"](torch|ATen|c10)/"
KERNEL_TEMPLATE = re.compile(r"template\s*<([^>]*)>\s*(?:__global__|\n\s*__global__)")
ALLOWED_TEMPLATE_PARAMS = re.compile(r"^\s*(class|typename)\s+\w+\s*(,\s*int\s+(HEAD_DIM|kHeadDim|D)\s*)?$")


def sources():
    return sorted(p for p in CSRC.rglob("*") if p.suffix in SOURCE_SUFFIXES)


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def violations(rel: str, text: str) -> list:
    """Rule violations of one file (path relative to csrc/)."""
    code = strip_comments(text)
    found = []
    if not rel.startswith("common/"):
        for pattern, what in FORBIDDEN_OUTSIDE_COMMON.items():
            if re.search(pattern, code):
                found.append(f"{rel}: {what}")
    if rel not in TORCH_FILES and re.search(TORCH_INCLUDE, code):
        found.append(f"{rel}: includes torch (only {sorted(TORCH_FILES)} may)")
    for params in KERNEL_TEMPLATE.findall(code):
        if not ALLOWED_TEMPLATE_PARAMS.match(params):
            found.append(f"{rel}: kernel template <{params.strip()}> (dtype and head dim only)")
    return found


def test_sources_exist():
    rels = {p.relative_to(CSRC).as_posix() for p in sources()}
    assert {"binding.cpp", "common/gf.h", "sim/runtime.cpp",
            "cross_entropy/cross_entropy.cu", "cross_entropy/linear_cross_entropy.cu"} <= rels


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(CSRC).as_posix())
def test_source_rules(path):
    assert violations(path.relative_to(CSRC).as_posix(), path.read_text()) == []


def test_kernel_sources_include_only_the_primitives():
    for cu in CSRC.rglob("*.cu"):
        code = strip_comments(cu.read_text())
        assert '#include "common/gf.h"' in code, f"{cu.relative_to(CSRC)} must include common/gf.h"


@pytest.mark.parametrize("snippet,rule", [
    ('asm volatile("bar.sync 0;");', "inline asm"),
    ("#if __CUDA_ARCH__ >= 800\n#endif", "__CUDA_ARCH__"),
    ("#include <cute/tensor.hpp>", "vendor"),
    ("cub::BlockReduce<float, 128> r;", "vendor"),
    ("__shared__ float buf[32];", "__shared__"),
    ("__syncthreads();", "raw CUDA intrinsic"),
    ("v = __shfl_xor_sync(0xffffffff, v, 1);", "raw CUDA intrinsic"),
    ("kernel<<<grid, block>>>(p);", "raw CUDA intrinsic"),
    ("#include <torch/extension.h>", "includes torch"),
    ("template <class T, int BLOCK_N>\n__global__ void k(P p) {}", "dtype and head dim only"),
])
def test_the_rules_catch_what_they_forbid(snippet, rule):
    assert any(rule in v for v in violations("cross_entropy/new.cu", snippet))
    assert violations("cross_entropy/new.cu", "// " + snippet.replace("\n", "\n// ")) == []


def test_the_rules_allow_the_primitives_folder_and_head_dim_templates():
    assert violations("common/device.cuh", 'asm volatile("cp.async.commit_group;");') == []
    assert violations("attention/fwd.cu", "template <class T, int HEAD_DIM>\n__global__ void k() {}") == []
