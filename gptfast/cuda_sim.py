"""Run gptfast's CUDA C++ kernels on CPU tensors: the CPU execution layer (`csrc/sim/`).

What `TRITON_INTERPRET=1` is for the Triton kernels, `GPTFAST_CUDA_SIM=1` is for the CUDA ones:
set it before the first op call and `backend="cuda"` accepts CPU tensors, running the *same*
kernel sources (`csrc/cross_entropy/*.cu`, ...) compiled by the host C++ compiler. Each block
runs on one OS thread, its CUDA threads as fibers that switch only at barriers and warp
collectives; warp collectives (`mma.sync`, `ldmatrix`, shuffles) follow the PTX ISA's fragment
layouts; shared memory is a per-block arena with every byte's last writer tracked, so races,
missing `cp.async` waits, misalignment and skipped barriers are errors instead of passing.
`backend="auto"` never picks it (it is a test harness, far slower than the reference).

    GPTFAST_CUDA_SIM=1 python -c "import torch, gptfast; x = torch.randn(4, 100); ..."

    from gptfast import cuda_sim
    with cuda_sim.settings(thread_order="random", block_order="reverse", seed=3):
        loss = gptfast.cross_entropy(x, t, backend="cuda")

The module is compiled on first use (torch.utils.cpp_extension + ninja, about a minute) into
`build/cuda_sim/<variant>/` of the source tree and reused after that (ninja rebuilds what
`csrc/` changes touch). It needs the CUDA toolkit's headers (`cuda_bf16.h`, `cuda_fp16.h`, ...;
from `$CUDA_HOME/include`, else `/usr/local/cuda/include`), not a GPU and not nvcc. Without them
it raises; the tests then fail instead of skipping.

`GPTFAST_CUDA_SIM_SANITIZE=1` builds and loads the AddressSanitizer + UBSan variant instead; the
process must start with the ASan runtime preloaded (`make test-cuda_sanitize` does this).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Iterator

ENV = "GPTFAST_CUDA_SIM"
SANITIZE_ENV = "GPTFAST_CUDA_SIM_SANITIZE"
ORDERS = ("forward", "reverse", "random")

_COMMON_FLAGS = ["-DGPTFAST_SIM", "-Wall", "-Wno-unused-function", "-Wno-sign-compare",
                 "-Wno-unknown-pragmas"]
_VARIANTS = {
    "default": dict(cflags=["-O2"], ldflags=[]),
    # Signed overflow, misaligned and out-of-bounds accesses stop the process with a report.
    "sanitize": dict(cflags=["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                             "-fno-sanitize=vptr", "-fno-sanitize-recover=all"],
                     ldflags=["-fsanitize=address,undefined"]),
}


def enabled() -> bool:
    """Whether GPTFAST_CUDA_SIM=1 asks for backend="cuda" on CPU tensors."""
    return os.environ.get(ENV, "0") == "1"


def variant() -> str:
    return "sanitize" if os.environ.get(SANITIZE_ENV, "0") == "1" else "default"


def csrc_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "csrc"
    if not (path / "sim" / "runtime.cpp").exists():
        raise RuntimeError(f"the CUDA sim layer builds from the source tree, and {path} has no "
                           "csrc/sim/runtime.cpp (install gptfast with `pip install -e .`)")
    return path


FALLBACK_INCLUDES = [Path("/usr/local/cuda/include")]


def cuda_include_dir() -> Path:
    """The CUDA toolkit's include folder (its headers work in host code; the pip wheels'
    nvidia/*/include lack crt/host_defines.h)."""
    looked = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            looked.append(Path(os.environ[env]) / "include")
    looked += FALLBACK_INCLUDES
    for inc in looked:
        if (inc / "cuda_bf16.h").exists() and (inc / "crt" / "host_defines.h").exists():
            return inc
    raise RuntimeError("the CUDA sim layer needs the CUDA toolkit's headers (cuda_bf16.h and "
                       "crt/host_defines.h), looked in: " + ", ".join(map(str, looked))
                       + ". Install the CUDA toolkit or set CUDA_HOME.")


def kernel_sources(csrc: Path) -> list:
    """Every kernel source of csrc/ (the .cu files of all op folders, tests/ and sim/)."""
    return sorted(p for p in csrc.rglob("*.cu"))


def _asan_loaded() -> bool:
    try:
        return "libasan" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _build_dir(csrc: Path, name: str) -> Path:
    build = csrc.parent / "build" / "cuda_sim" / name
    try:
        build.mkdir(parents=True, exist_ok=True)
        return build
    except OSError:
        fallback = Path.home() / ".cache" / "gptfast" / "cuda_sim" / name
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _wrappers(csrc: Path, build: Path) -> list:
    """A .cpp per kernel .cu that #includes it: the host compiler builds the sources unchanged.
    Rewritten only when the list changes, so ninja's header tracking stays in charge."""
    out = []
    src_dir = build / "src"
    src_dir.mkdir(exist_ok=True)
    for cu in kernel_sources(csrc):
        rel = cu.relative_to(csrc)
        wrapper = src_dir / ("__".join(rel.with_suffix("").parts) + ".cpp")
        text = f'// generated by gptfast/cuda_sim.py: {rel} on the CPU execution layer\n' \
               f'#include "{cu}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        out.append(str(wrapper))
    return out


@functools.lru_cache(maxsize=None)
def load():
    """Build (first time) and import the CPU-layer module; it registers the CPU implementations
    of the gptfast::cuda_* ops. Raises RuntimeError when it cannot be built."""
    which = variant()
    if which == "sanitize" and not _asan_loaded():
        raise RuntimeError(f"{SANITIZE_ENV}=1 needs the ASan runtime preloaded: run through "
                           "`make test-cuda_sanitize`, or LD_PRELOAD=$(g++ "
                           "-print-file-name=libasan.so)")
    csrc = csrc_dir()
    include = cuda_include_dir()
    # torch.utils.cpp_extension looks for CUDA_HOME when imported; point it at the toolkit the
    # headers come from (it warns and guesses /usr/local otherwise).
    os.environ.setdefault("CUDA_HOME", str(include.parent))
    from torch.utils import cpp_extension
    name = "gptfast_cuda_sim" + ("_asan" if which == "sanitize" else "")
    build = _build_dir(csrc, name)
    sources = [str(csrc / "binding.cpp"), str(csrc / "sim" / "runtime.cpp")] + _wrappers(csrc, build)
    flags = _VARIANTS[which]
    if not (build / f"{name}.so").exists():
        print(f"gptfast: building the CUDA sim layer ({which}) in {build} (first use)",
              file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=name, sources=sources, build_directory=str(build),
        extra_cflags=_COMMON_FLAGS + flags["cflags"], extra_ldflags=flags["ldflags"],
        extra_include_paths=[str(csrc), str(include)], with_cuda=False, verbose=False)


def get_settings() -> dict:
    return dict(load().get_settings())


def set_settings(**kw) -> None:
    """thread_order / block_order ("forward", "reverse", "random"), seed, workers (OS threads
    running blocks), arch (80 or 90: the limits and kernel configurations of that GPU), num_sms,
    check_races."""
    cur = get_settings()
    unknown = set(kw) - set(cur)
    if unknown:
        raise TypeError(f"unknown CUDA sim settings {sorted(unknown)}; known: {sorted(cur)}")
    cur.update(kw)
    load().set_settings(**cur)


@contextlib.contextmanager
def settings(**kw) -> Iterator[dict]:
    """Temporarily change the layer's settings (see set_settings)."""
    before = get_settings()
    set_settings(**kw)
    try:
        yield get_settings()
    finally:
        load().set_settings(**before)


def stats() -> dict:
    """Counters since the last reset: launches, blocks, barriers, collectives, cp_async."""
    return dict(load().stats())


def reset_stats() -> None:
    load().reset_stats()

