#!/usr/bin/env python
"""The static kernel table: every Triton kernel of gptfast.kernels compiled exactly as the GPU
runtime compiles it, for sm_90a (H100/H200) and sm_80 (A100), without a GPU.

    python scripts/static_table.py           # full table -> benchmarks/results/static/triton-<v>.{json,md}
    python scripts/static_table.py --quick   # the `make test` gate (sm_90a, bf16, default features)

Per kernel and configuration it reports registers, spill bytes, shared memory, tensor-core
instructions (HGMMA = wgmma, HMMA = mma.sync), the load path (LDGSTS = cp.async, UTMALDG = TMA,
LDG), memory barriers (MEMBAR, FENCE, CCTL), and the SASS instructions of one iteration of the
main loop, also per element of the tile that iteration computes:
    per_element = main-loop SASS instructions * threads / (product of the tile's BLOCK_* sizes,
                  BLOCK_D / BLOCK_DB / BLOCK_K, the reduction blocks, left out)
(attention: BLOCK_M * BLOCK_N score elements). How the main loop is found: scripts/sass_analysis.py.

Why it is the kernel that runs
------------------------------
The launchers themselves are called, on meta tensors (shapes, strides, dtypes and 16-byte
aligned data pointers, no memory), at realistic shapes: attention B=2, H=16, S=2048/4096,
cross-entropy 4096-16384 tokens at the GPT-2 (768 x 50257) and Llama-3 (4096 x 128256) shapes.
`kernels.configs.compile_target` makes them pick the target GPU's configs and grids, and each
`kernel[grid](...)` goes through Triton's own `JITFunction.run(..., warmup=True)`: the runtime's
argument specialization (an int equal to 1 becomes a constant, ints and pointers divisible by 16
get divisibility hints), its option parsing and its compiler, with a stand-in driver reporting
the target GPU. Nothing is launched. Registers and spills come from the ptxas log of that very
compile (a fresh Triton cache per run, so every kernel is compiled, never read from a cache),
SASS from nvdisasm on its cubin (both tools ship with Triton).

The gate (exit status 1): a kernel fails to compile or a scenario reaches no kernel, a kernel
needs more shared memory than its arch has, or, on sm_90a with default features (no optional
feature: plain or causal attention, cross-entropy without bias/softcap/smoothing/lse gradient),
a kernel spills or a kernel with 16-bit dots has no wgmma. `--strict` also fails on a spill in
any configuration.
"""
from __future__ import annotations

import os
import sys
import tempfile

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Triton chooses interpreter or compiler when a kernel is decorated: decide before import.
        os.environ.pop("TRITON_INTERPRET")
        os.execv(sys.executable, [sys.executable] + sys.argv)
    # A private, empty cache: every kernel is compiled here, so ptxas's log (registers,
    # spills) is seen for each; and the run time measured is the cold one.
    _CACHE = tempfile.TemporaryDirectory(prefix="gptfast-static-")
    os.environ["TRITON_CACHE_DIR"] = _CACHE.name

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))
import sass_analysis  # noqa: E402
from provenance import git_info, kernel_hash  # noqa: E402

from gptfast.kernels import attention as A  # noqa: E402
from gptfast.kernels import configs  # noqa: E402
from gptfast.kernels import cross_entropy as CE  # noqa: E402

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
OUT_DIR = REPO / "benchmarks" / "results" / "static"
META = torch.device("meta")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODULES = {"attention": A, "cross_entropy": CE}


class Arch(NamedTuple):
    name: str          # as the table prints it
    capability: int    # Triton's GPUTarget arch
    num_sms: int       # what launchers size grids by (H100/H200 SXM: 132, A100: 108)


ARCHS = {"sm_90a": Arch("sm_90a", 90, 132), "sm_80": Arch("sm_80", 80, 108)}


# ============================================================================================
# The stand-in driver and the launch recorder
# ============================================================================================


class StandInDriver:
    """What JITFunction.run asks of the driver before it compiles: the target, a device, a
    stream. A launch (warmup=False) would need more; none happens."""

    def __init__(self, capability: int):
        self.capability = capability

    def get_current_target(self):
        return GPUTarget("cuda", self.capability, 32)

    def get_current_device(self):
        return self.capability  # per-target JIT caches: each target gets its own "device"

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return META

    def __getattr__(self, name):
        raise RuntimeError(f"static_table: the stand-in driver has no {name!r}: something tried "
                           "to run a kernel, which needs a GPU")


class Launch(NamedTuple):
    kernel: str
    compiled: object            # triton CompiledKernel
    constexprs: Dict[str, object]
    ptxas_log: str              # ptxas -v output when this call compiled, else ""
    key: Optional[configs.ConfigKey]
    table: Optional[str]
    seconds: float


_LAUNCHES: List[Launch] = []
_LOOKUPS: List[Tuple[configs.Table, configs.ConfigKey]] = []


def _install_recorders():
    """Every kernel launch compiles through the real JIT path with warmup=True and is recorded
    with the configuration key its launcher looked up."""
    lookup = configs.Table.lookup

    def recording_lookup(self, key):
        _LOOKUPS.append((self, key))
        return lookup(self, key)

    configs.Table.lookup = recording_lookup

    def recorder(fn: JITFunction):
        names = [p.name for p in fn.params]
        constexpr_names = {p.name for p in fn.params if p.is_constexpr}

        def run(*args, grid, warmup, **kwargs):
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k in names})
            out = io.StringIO()
            t0 = time.time()
            with contextlib.redirect_stdout(out):  # knobs.nvidia.dump_ptxas_log prints here
                compiled = JITFunction.run(fn, *args, grid=grid, warmup=True, **kwargs)
            key = table = None
            for i in range(len(_LOOKUPS) - 1, -1, -1):  # the launcher's own lookup: the last
                t, k = _LOOKUPS[i]                    # one for a kind of this kernel
                if t.kinds[k.kind].kernel == fn.__name__:
                    key, table = k, t.name
                    del _LOOKUPS[i]
                    break
            consts = {k: v for k, v in bound.items() if k in constexpr_names}
            consts.update({k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs})
            _LAUNCHES.append(Launch(fn.__name__, compiled, consts, out.getvalue(), key, table,
                                    time.time() - t0))
            return compiled
        return run

    for mod in MODULES.values():
        for fn in vars(mod).values():
            if isinstance(fn, JITFunction):
                fn.run = recorder(fn)  # JITFunction.__getitem__ calls self.run


def launched_kernels(mod) -> List[str]:
    """The module's kernels: JIT functions its source launches as `name[grid]`."""
    src = inspect.getsource(mod)
    return [n for n, fn in vars(mod).items()
            if isinstance(fn, JITFunction) and re.search(rf"\b{n}\[", src)]


# ============================================================================================
# Scenarios: the launchers called as the ops call them, at realistic shapes
# ============================================================================================


class Scenario(NamedTuple):
    module: str
    dtype: str
    shape: str
    features: Tuple[str, ...]
    gate: bool                  # default features: part of the make-test gate
    call: Callable[[], None]
    archs: Tuple[str, ...] = tuple(ARCHS)  # the targets it is compiled for


def describe(sc: Scenario) -> str:
    return f"{sc.module} {sc.dtype} {sc.shape} [{'+'.join(sc.features) or '-'}]"


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


def attention_scenario(dtype: str, d: int, S: int, features: Tuple[str, ...], *, B=2, H=16,
                       Hkv=None, modes=(False, True), variant: Optional[dict] = None) -> Scenario:
    """Forward, then the backward in each mode (False: atomic dQ, True: deterministic), as
    gptfast.attention calls them; q/k/v contiguous (B, H, S, d). `variant`: configurations
    that replace the table's for this scenario (`attention.config_override`: the USE_TMA and
    WARP_SPECIALIZE forms a GPU run A/Bs against the committed pointer-load configs)."""
    f = set(features)
    Hkv = Hkv or H

    def call():
        dt = DTYPES[dtype]
        q, k, v = _meta(B, H, S, d, dtype=dt), _meta(B, Hkv, S, d, dtype=dt), _meta(B, Hkv, S, d, dtype=dt)
        opts = dict(causal="causal" in f, softmax_scale=d ** -0.5,
                    alibi_slopes=_meta(H) if "alibi" in f else None,
                    window=256 if "window" in f else None,
                    key_padding_mask=_meta(B, S, dtype=torch.bool) if "kpm" in f else None,
                    dropout_p=0.1 if "dropout" in f else 0.0,
                    seed=_meta(1, dtype=torch.int64) if "dropout" in f else None,
                    softcap=50.0 if "softcap" in f else None)
        with A.config_override(**(variant or {})):
            out, lse = A.attention_forward(q, k, v, **opts)
            for deterministic in modes:
                if "fwd" in (variant or {}) and "bwd" not in variant:
                    break  # a forward-only variant
                A.attention_backward(_meta(B, H, S, d, dtype=dt), q, k, v, out, lse, **opts,
                                     dlse=_meta(B, H, S) if "dlse" in f else None,
                                     deterministic=deterministic)

    shape = f"B={B} H={H}" + (f"/{Hkv}" if Hkv != H else "") + f" S={S} d={d}"
    gate = not (f - {"causal"}) and Hkv == H and not variant
    return Scenario("attention", dtype, shape, tuple(sorted(f)), gate, call)


def keep_mask_scenario() -> Scenario:
    def call():
        A.attention_dropout_keep_mask(_meta(1, dtype=torch.int64), 2, 16, 4096, 4096, 0.1, META)
    return Scenario("attention", "-", "B=2 H=16 S=4096 keep-mask", (), False, call)


CE_SHAPES = {"gpt2": (768, 50257), "llama3": (4096, 128256)}


def cross_entropy_scenario(dtype: str, model: str, N: int, features: Tuple[str, ...],
                           schedules=("lean", "logits", "budgeted")) -> Scenario:
    """The launchers as gptfast.linear_cross_entropy / cross_entropy call them in training:
    forward with reduction "none", backward with the upstream gradient of a mean (an expanded
    scalar: stride 0); the budgeted schedule with its default budget. Features beyond the
    configuration's: "filter" (gradient filtering on), "lock" (dW by lock + read-modify-write
    instead of the configured accumulation)."""
    D, V = CE_SHAPES[model]
    f = set(features)

    def call():
        dt = DTYPES[dtype]
        opts = dict(ignore_index=-100, label_smoothing=0.1 if "smoothing" in f else 0.0,
                    z_loss=1e-4, softcap=30.0 if "softcap" in f else None)
        targets = _meta(N, dtype=torch.int64)
        g = _meta(()).expand(N)
        g_lse = _meta(N) if "glse" in f else None
        h, w = _meta(N, D, dtype=dt), _meta(V, D, dtype=dt)
        bias = _meta(V, dtype=dt) if "bias" in f else None
        if "lean" in schedules:
            _, lse, _ = CE.linear_cross_entropy_forward(h, w, targets, bias, **opts,
                                                        reduction="none")
            CE.linear_cross_entropy_backward(
                g, g_lse, h, w, targets, bias, lse, **opts,
                filter_eps=2.0 ** -12 if "filter" in f else None,
                dw_accumulation="lock" if "lock" in f else None)
        if "logits" in schedules:
            logits = _meta(N, V, dtype=dt)
            _, lse = CE.cross_entropy_forward(logits, targets, **opts)
            CE.cross_entropy_backward(g, g_lse, logits, targets, lse, **opts)
        if "budgeted" in schedules:
            CE.linear_cross_entropy_forward(h, w, targets, bias, **opts, reduction="mean",
                                            memory_budget=CE.plan.DEFAULT_BUDGET)

    gate = not f
    if f & {"filter", "lock"}:
        schedules = ("lean",)
    return Scenario("cross_entropy", dtype, f"{model} N={N} D={D} V={V}", tuple(sorted(f)),
                    gate, call)


ATTN_ALL = ("causal", "window", "alibi", "kpm", "dropout", "softcap", "dlse")
ATTN_ONE_EACH = [(), ("causal",), ("causal", "window"), ("causal", "alibi"), ("causal", "kpm"),
                 ("causal", "dropout"), ("causal", "softcap"), ATTN_ALL]
ATTN_DIMS = (16, 32, 64, 80, 96, 128, 256)  # every padded width, and GPT-3 2.7B's 80
# The TMA and warp-specialized forms (not in the committed table: a GPU run A/Bs them).
TMA_VARIANTS = {
    64: {"fwd": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, USE_TMA=1),
         "bwd": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2, USE_TMA=1)},
    128: {"fwd": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, USE_TMA=1),
          "bwd": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2, USE_TMA=1)},
}
WS_VARIANTS = {
    64: {"fwd": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, USE_TMA=1,
                     WARP_SPECIALIZE=1)},
    128: {"fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2, USE_TMA=1,
                      WARP_SPECIALIZE=1)},
}
CE_ONE_EACH = [(), ("bias",), ("softcap",), ("smoothing", "glse"), ("filter",), ("lock",),
               ("bias", "softcap", "smoothing", "glse")]


def scenarios(quick: bool) -> List[Scenario]:
    if quick:  # the gate: bf16 default features on the head dims and shapes that matter most
        return ([attention_scenario("bf16", d, 4096, f) for d in (64, 128)
                 for f in ((), ("causal",))]
                + [cross_entropy_scenario("bf16", "gpt2", 4096, ()), keep_mask_scenario()])
    out = []
    h90 = ("sm_90a",)  # the detailed sweep is for Hopper; sm_80 gets defaults and all features
    # bf16: every feature on its own at d=64/128, causal and all features at the other dims.
    for d in ATTN_DIMS:
        for f in (ATTN_ONE_EACH if d in (64, 128) else [("causal",), ATTN_ALL]):
            both = f in ((), ("causal",), ATTN_ALL)
            out.append(attention_scenario("bf16", d, 4096, f)._replace(archs=tuple(ARCHS) if both else h90))
    for d in (64, 128):
        for variants in (TMA_VARIANTS, WS_VARIANTS):
            # TMA with atomic dQ spills at d=128 in every config tried: keep() admits TMA
            # there for the deterministic backward only, so only that one is compiled.
            modes = (True,) if d == 128 and variants is TMA_VARIANTS else (False, True)
            out.append(attention_scenario("bf16", d, 4096, ("causal",), variant=variants[d],
                                          modes=modes)._replace(archs=h90))
    out.append(attention_scenario("bf16", 128, 2048, ("causal",))._replace(archs=h90))  # = S=4096
    out.append(attention_scenario("bf16", 128, 4096, ("causal",), Hkv=4))  # GQA group of 4
    out.append(attention_scenario("fp16", 128, 4096, ("causal",))._replace(archs=h90))
    for d in (64, 128):
        for f in (("causal",), ATTN_ALL):
            out.append(attention_scenario("fp32", d, 4096, f))
    out.append(keep_mask_scenario())
    out.append(cross_entropy_scenario("bf16", "gpt2", 4096, ()))
    out.append(cross_entropy_scenario("bf16", "llama3", 16384, ()))
    for f in CE_ONE_EACH[1:]:
        sc = cross_entropy_scenario("bf16", "gpt2", 16384, f)
        out.append(sc if f == CE_ONE_EACH[-1] else sc._replace(archs=h90))
    out.append(cross_entropy_scenario("fp16", "gpt2", 16384, ())._replace(archs=h90))
    for f in ((), CE_ONE_EACH[-1]):
        out.append(cross_entropy_scenario("fp32", "gpt2", 16384, f))
    # Slowest first (dropout, fp32): the pool then ends with the short ones.
    return sorted(out, key=lambda sc: -(2 * ("dropout" in sc.features) + (sc.dtype == "fp32")))


# ============================================================================================
# Compile one scenario for one arch (in a worker process) and read what was compiled
# ============================================================================================


_SCENARIOS: List[Scenario] = []
_ANALYZED: Dict[str, dict] = {}  # per process: kernel hash -> SASS summary


def _ptxas_usage(log: str) -> dict:
    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None
    return {"registers": num(r"Used (\d+) registers"), "spill_store": num(r"(\d+) bytes spill stores"),
            "spill_load": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([str(NVIDIA_BIN / "nvdisasm"), "-c", "-gi", f.name],
                           capture_output=True, text=True, check=True)
    return r.stdout


def _tile(constexprs: Dict[str, object]) -> int:
    n = 1
    for k, v in constexprs.items():
        if (k.startswith("BLOCK") and k not in ("BLOCK_D", "BLOCK_DB", "BLOCK_K")
                and isinstance(v, int)):
            n *= v
    return n


def _loop_warps(constexprs: Dict[str, object], compiled) -> int:
    """Warps that run the main loop: all of them, except in a warp-specialized kernel (more
    warps compiled than asked for), whose producer warpgroup (4 warps) only issues copies."""
    asked = constexprs.get("num_warps", compiled.metadata.num_warps)
    got = compiled.metadata.num_warps
    return got - 4 if constexprs.get("WARP_SPECIALIZE") and got > asked else got


def _tc_work_ratio(kernel: str, constexprs: Dict[str, object], sass: dict,
                   warps: int) -> Optional[float]:
    """Tensor-core work issued in one main-loop iteration over the work its products need:
    1.0 when no product is computed twice (the attention kernels; None elsewhere). Needed per
    iteration: forward 2 products, backward 4 (dK/dV programs) plus dQ with atomics, each
    BLOCK_M x BLOCK_N x BLOCK_D; over 128 wide (BLOCK_D = 256) the main loop is the dK
    program's (S^T, dP^T, dK, and dQ^T with atomics: 3 or 4; the dV program's has 2)."""
    ml = sass.get("main_loop") or {}
    issued = ml.get("tensor_core_macs_per_warp", 0) * warps
    if not issued or "BLOCK_M" not in constexprs or "BLOCK_D" not in constexprs:
        return None
    products = {"_attn_fwd": 2, "_attn_bwd": 5 if constexprs.get("ATOMIC_DQ") else 4}.get(kernel)
    if kernel == "_attn_bwd" and constexprs["BLOCK_D"] > 128:
        products -= 1
    if products is None:
        return None
    return round(issued / (products * constexprs["BLOCK_M"] * constexprs["BLOCK_N"]
                           * constexprs["BLOCK_D"]), 3)


def _specialization(compiled) -> dict:
    """Which non-constexpr arguments the runtime turned into constants (value 1) or gave a
    divisibility-by-16 hint: the part of the typing that a hand-written signature gets wrong."""
    src = compiled.src
    names = list(src.signature)
    params = {p.name: p for p in src.fn.params}
    const = [n for n in names if src.signature[n] == "constexpr" and not params[n].is_constexpr]
    div16 = [names[k[0]] for k, v in src.attrs.items()
             if any(a[0] == "tt.divisibility" and a[1] == 16 for a in v)]
    return {"constant_1": const, "divisible_by_16": sorted(div16)}


def compile_task(task: Tuple[str, int]) -> dict:
    arch_name, index = task
    arch = ARCHS[arch_name]
    sc = _SCENARIOS[index]
    driver.set_active(StandInDriver(arch.capability))
    del _LAUNCHES[:], _LOOKUPS[:]
    t0 = time.time()
    error = None
    try:
        with configs.compile_target(configs.Target(divmod(arch.capability, 10), arch.num_sms)):
            sc.call()
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        lines = f"{type(e).__name__}: {e}".splitlines()
        error = "\n".join(lines[:3] + ["..."] + lines[-15:] if len(lines) > 20 else lines)
    launches = []
    for ln in _LAUNCHES:
        k = ln.compiled
        if k is None:
            continue
        rec = {"kernel": ln.kernel, "hash": k.hash, "constexprs": _jsonable(ln.constexprs),
               "num_warps": k.metadata.num_warps, "num_stages": k.metadata.num_stages,
               "shared": k.metadata.shared, "seconds": round(ln.seconds, 2),
               "specialization": _specialization(k), "key": None, "entry": None}
        if ln.key is not None:
            table = configs.load(ln.table.split("_configs")[0])
            best = table.best(ln.key)
            rec["key"] = {"table": ln.table, **ln.key._asdict()}
            rec["entry"] = {"index": table.entries.index(best[0]), "arch": best[0].arch,
                            "features": list(best[0].features), "why": best[0].why}
        if ln.ptxas_log:
            rec["ptxas"] = _ptxas_usage(ln.ptxas_log)
        if k.hash not in _ANALYZED:  # a kernel launched again (budgeted chunks): read once
            _ANALYZED[k.hash] = {
                "sass": sass_analysis.summarize(_sass(k.asm["cubin"]),
                                                32 * _loop_warps(ln.constexprs, k),
                                                _tile(ln.constexprs)),
                "has_dot": "tt.dot" in k.asm.get("ttir", "")}
            _ANALYZED[k.hash]["tc_work_ratio"] = _tc_work_ratio(
                ln.kernel, ln.constexprs, _ANALYZED[k.hash]["sass"], _loop_warps(ln.constexprs, k))
        rec.update(_ANALYZED[k.hash])
        launches.append(rec)
    return {"arch": arch_name, "scenario": index, "error": error, "launches": launches,
            "seconds": round(time.time() - t0, 2)}


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in d.items()}


# ============================================================================================
# Merge, judge, render
# ============================================================================================


def merge(results: List[dict]) -> List[dict]:
    """One row per (arch, compiled kernel): the scenarios that reached it, and its numbers
    (ptxas's from whichever process compiled it)."""
    rows: Dict[Tuple[str, str], dict] = {}
    for res in results:
        sc = _SCENARIOS[res["scenario"]]
        for rec in res["launches"]:
            row = rows.get((res["arch"], rec["hash"]))
            if row is None:
                row = rows[(res["arch"], rec["hash"])] = {
                    "arch": res["arch"], "module": sc.module,
                    "dtype": rec["key"]["dtype"] if rec["key"] else sc.dtype,
                    "features": list(rec["key"]["features"]) if rec["key"] else list(sc.features),
                    "shapes": [], "scenario_features": [], "gate": False, **rec}
                row.pop("seconds")
            if "ptxas" in rec and "ptxas" not in row:
                row["ptxas"] = rec["ptxas"]
            if sc.shape not in row["shapes"]:
                row["shapes"].append(sc.shape)
            sf = "+".join(sc.features) or "-"
            if sf not in row["scenario_features"]:
                row["scenario_features"].append(sf)
            row["gate"] = row["gate"] or sc.gate
    out = list(rows.values())
    for row in out:
        p = row.get("ptxas") or {}
        row["registers"], row["stack"] = p.get("registers"), p.get("stack")
        row["spill"] = ([p["spill_store"], p["spill_load"]]
                        if p.get("spill_store") is not None else None)
        row["shared_limit"] = configs.shared_memory_limit(row["arch"].rstrip("a"))
        if (row.get("entry") or {}).get("arch") == "default":
            # A `default` entry also serves the GPUs without entries of their own, the
            # smallest of which (sm_86, sm_89) have 99 KiB: it must fit those too.
            row["shared_limit"] = min(row["shared_limit"], configs.DEFAULT_SHARED_MEMORY)
    order = {"_attn_fwd": 0, "_attn_bwd_preprocess": 1, "_attn_bwd": 2}
    out.sort(key=lambda r: (list(ARCHS).index(r["arch"]), r["module"], order.get(r["kernel"], 9),
                            r["kernel"], r["dtype"], r["constexprs"].get("HEAD_DIM", 0),
                            len(r["features"]), r["features"]))
    return out


# Kernels whose 16-bit dots have never run on wgmma, with the reason: known, reported in the
# table, not a gate failure (the gate catches a kernel that STOPS using wgmma).
KNOWN_NO_WGMMA: Dict[Tuple[str, int], str] = {}


def _known_no_wgmma(r: dict) -> Optional[str]:
    return KNOWN_NO_WGMMA.get((r["kernel"], r["constexprs"].get("BLOCK_D")))


# Kernels (name, BLOCK_D) that spill on sm_90a in every configuration tried, with the reason:
# reported in the table, not a gate failure (--strict still fails on them).
# None now: the d=256 backward was one until dK and dV got programs of their own.
KNOWN_GATE_SPILLS: Dict[Tuple[str, int], str] = {}


def _known_spill(r: dict) -> Optional[str]:
    return KNOWN_GATE_SPILLS.get((r["kernel"], r["constexprs"].get("BLOCK_D")))


def judge(rows: List[dict], results: List[dict], strict: bool) -> List[str]:
    problems = []
    for res in results:
        if res["error"]:
            sc = _SCENARIOS[res["scenario"]]
            problems.append(f"{res['arch']} {sc.module} {sc.dtype} {sc.shape} "
                            f"[{'+'.join(sc.features) or '-'}]: {res['error']}")
    for r in rows:
        where = f"{r['arch']} {r['kernel']} {r['dtype']} {_dim(r)} [{'+'.join(r['features']) or '-'}]"
        if r["registers"] is None:
            problems.append(f"{where}: no ptxas log (registers unknown)")
        if r["shared"] > r["shared_limit"]:
            problems.append(f"{where}: {r['shared']} B shared memory > {r['shared_limit']} B")
        spills = r["spill"] and any(r["spill"])
        if spills and (strict or (r["gate"] and r["arch"] == "sm_90a" and not _known_spill(r))):
            problems.append(f"{where}: spills {r['spill'][0]}/{r['spill'][1]} B "
                            f"({r['registers']} registers)")
        if (r["gate"] and r["arch"] == "sm_90a" and r["has_dot"] and r["dtype"] != "fp32"
                and not r["sass"]["tensor_core"].get("HGMMA") and not _known_no_wgmma(r)):
            problems.append(f"{where}: 16-bit dots without wgmma "
                            f"(tensor cores: {r['sass']['tensor_core_kind']})")
    return problems


def missing_kernels(rows: List[dict], archs: List[str]) -> List[str]:
    out = []
    for arch in archs:
        seen = {r["kernel"] for r in rows if r["arch"] == arch}
        for name, mod in MODULES.items():
            out += [f"{arch} {name}.{k}: launched by the module but no scenario compiled it"
                    for k in launched_kernels(mod) if k not in seen]
    return out


def _dim(r: dict) -> str:
    c = r["constexprs"]
    if "HEAD_DIM" in c:
        heads = [t for s in r["shapes"] for t in s.split() if t.startswith("H=")]
        gqa = heads and all("/" in t for t in heads)  # a kernel only GQA launches compiled
        return f"d={c['HEAD_DIM']}" + (f" {heads[0]}" if gqa else "")
    return r["shapes"][0].split(" N=")[0]


def _config_text(r: dict) -> str:
    c = r["constexprs"]
    blocks = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK")
                      and k not in ("BLOCK_D", "BLOCK_DB") and isinstance(v, int))
    if "BLOCK_D" in c and r["module"] == "cross_entropy":
        blocks += f" D{c['BLOCK_D']}"
    if "BLOCK_DB" in c:  # the lean backward's back-products step over D
        blocks += f"/{c['BLOCK_DB']}"
    if c.get("DW_LOCK"):
        blocks += " lock"
    flags = (" TMA" if c.get("USE_TMA") is True else "") + \
        (f" WS({r['num_warps']} warps)" if c.get("WARP_SPECIALIZE") is True else "")
    return f"{blocks} w{c.get('num_warps', r['num_warps'])} s{r['num_stages']}{flags}"


def _in_loops(r: dict) -> str:
    """" (n in loops)": spill instructions (STL/LDL) inside loops, where they cost every
    iteration (tables written before this count existed have none to show)."""
    n = r["sass"].get("local_memory_in_loops")
    return "" if n is None else f" ({n} in loops)"


def _counts(d: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in d.items()) or "-"


def _row_md(r: dict) -> str:
    s = r["sass"]
    ml = s["main_loop"] or {}
    spill = "?" if r["spill"] is None else ("0" if not any(r["spill"]) else
                                             f"**{r['spill'][0]}/{r['spill'][1]}**{_in_loops(r)}")
    tc_kernel = _counts(s["tensor_core"])
    feats = "+".join(r["features"]) or "-"
    if r["entry"] and r["entry"]["features"]:
        feats += " (entry: " + "+".join(r["entry"]["features"]) + ")"
    loads = _counts({k: v for k, v in ml.get("loads", {}).items() if k in ("LDGSTS", "UTMALDG", "LDG", "UBLKCP")})
    bars = _counts(ml.get("memory_barrier_opcodes", ml.get("memory_barriers", {})))
    sync = ml.get("sync", {}).get("BAR", 0)
    atom = _counts(ml.get("atomic_opcodes", {})) if ml else "-"
    site = _site_label(ml.get("call_site") or "")
    return (f"| {r['kernel']} | {r['dtype']} | {_dim(r)} | {feats} | {_config_text(r)} | "
            f"{r['registers']} | {spill} | {r['shared'] / 1024:.1f} | {tc_kernel} | "
            f"{ml.get('instructions', '-')} | {ml.get('per_element', '-')} | "
            f"{_counts(_tc(ml)) if ml else '-'} | {r.get('tc_work_ratio') or '-'} | "
            f"{loads} | {bars} | {sync} | {atom} | {site} |")


def _site_label(call_site: str) -> str:
    """"attention.py:260 acc, ... = _attn_fwd_inner(  # interior: no mask math" ->
    "attention.py:260 (interior: no mask math)": the location, and the line's comment if any."""
    where, _, text = call_site.partition(" ")
    comment = text.split("#", 1)[1].strip() if "#" in text else ""
    return f"{where} ({comment})" if comment else where


def _tc(ml: dict) -> dict:
    shapes = ml.get("tensor_core_shapes", {})
    out: Dict[str, int] = {}
    for op, n in shapes.items():
        name = op.split(".")[0] + ("." + op.split(".")[1] if op.startswith("HGMMA") else "")
        out[name] = out.get(name, 0) + n
    return out


HEADER = ("| kernel | dtype | dim | features | tile, warps, stages | regs | spill st/ld B | smem KiB "
          "| tensor cores (kernel) | loop SASS | SASS/elem | loop tensor cores | tc work / needed "
          "| loop loads | loop mem barriers | loop BAR | loop atomics | loop source |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def render_md(meta: dict, rows: List[dict], problems: List[str]) -> str:
    L = [f"# Static kernel table: Triton {meta['triton']}",
         "",
         f"Generated by `{meta['command']}` ({meta['seconds']:.0f} s, {meta['jobs']} processes) "
         f"on {meta['date']}: kernels/ hash `{meta['kernel_hash']}`, commit "
         f"`{meta['commit'][:12]}`{' (dirty)' if meta['dirty'] else ''}, Triton {meta['triton']}, "
         f"torch {meta['torch']}, {meta['ptxas']}. No GPU was used: every launcher ran on meta "
         "tensors and each kernel went through Triton's JIT (`JITFunction.run(warmup=True)`, the "
         "runtime's own argument specialization) with a stand-in driver for the target GPU. "
         "How each column is measured: `scripts/static_table.py` and `scripts/sass_analysis.py`.",
         "",
         "- **spill st/ld B**: ptxas's spill stores/loads of that compile (bold: non-zero); "
         "`(n in loops)`: spill instructions (STL/LDL) inside loops, which cost every "
         "iteration; the others run once per program (values parked across the tile loops).",
         "- **loop SASS**: instructions in one iteration of the main loop (the innermost loop "
         "with the most tensor-core ops; of equal ones the leanest, i.e. attention's unmasked "
         "interior tiles); **SASS/elem** = loop SASS x threads / tile elements "
         "(attention: BLOCK_M x BLOCK_N scores; cross-entropy: BLOCK_N x BLOCK_V logits per "
         "BLOCK_D step, or per BLOCK_DB step of the lean backward's back-products, written "
         "`D<BLOCK_D>/<BLOCK_DB>`; `lock`: dW by lock + read-modify-write).",
         "- **tc work / needed**: tensor-core multiply-adds one main-loop iteration issues "
         "(per HGMMA.64xNxK a warpgroup's 64*N*K, per HMMA.16816 a warp's 16*8*16, times the "
         "warps that run the loop) over those its products need (attention forward: 2 "
         "products of BLOCK_M x BLOCK_N x BLOCK_D; backward: 4 in the dK/dV programs, 5 with "
         "the atomic dQ; at d=256 the dK programs' 3 or 4, dV having programs of its own): "
         "1.0 = no product computed twice.",
         "- **loop mem barriers**, **loop atomics**: full opcodes. `MEMBAR.ALL.CTA` with "
         "`FENCE.VIEW.ASYNC.S` orders the threads' shared-memory stores before wgmma reads "
         "them (block scope); `MEMBAR.SC.GPU`/`MEMBAR.GPU`, `CCTL` and `ERRBAR` are the "
         "GPU-wide ordering of acquire/release atomics. `REDG` is a reduction without return "
         "(what a relaxed `atomic_add` whose result is unused becomes).",
         "- **tile, warps, stages**: `TMA` = tensor-descriptor loads (USE_TMA), `WS(n warps)` "
         "= warp-specialized (WARP_SPECIALIZE; n warps compiled, 4 of them the producer "
         "warpgroup, excluded from the per-element figure). These variants are scenarios "
         "(`config_override`), not committed entries: a GPU run A/Bs them.",
         "- **loop source**: the kernel-level source line the loop was inlined from.",
         "- **features**: the configuration key's feature flags; `(entry: ...)` when a "
         "feature-specific table entry chose the config.",
         "",
         "Static facts only: these numbers say what the compiler produced, not how fast it runs. "
         "Time, bandwidth, occupancy in practice, bank conflicts and whether the tensor cores "
         "are kept busy are GPU measurements (`make gpu-check`).",
         ""]
    L += ["## Gate", ""]
    if problems:
        L += [f"- FAIL: {p}" for p in problems]
    else:
        L += ["Passed: every kernel compiled within its arch's shared memory; on sm_90a no "
              "default-feature configuration spills and every 16-bit kernel with dots uses wgmma."]
    known = sorted({f"{r['kernel']} d={r['constexprs'].get('HEAD_DIM')}: {_known_no_wgmma(r)}"
                    for r in rows if r["arch"] == "sm_90a" and _known_no_wgmma(r)
                    and not r["sass"]["tensor_core"].get("HGMMA")})
    if known:
        L += ["", "Known, not failures (16-bit dots on mma.sync, never on wgmma yet):"]
        L += [f"- {k}" for k in known]
    known = sorted({f"{r['kernel']} d={r['constexprs'].get('HEAD_DIM')}: {_known_spill(r)}"
                    for r in rows if r["arch"] == "sm_90a" and r["gate"] and _known_spill(r)
                    and r["spill"] and any(r["spill"])})
    if known:
        L += ["", "Known, not failures (spills with default features in every config tried):"]
        L += [f"- {k}" for k in known]
    spilling = [r for r in rows if r["spill"] and any(r["spill"])]
    L += ["", f"Configurations that spill: {len(spilling)}"
          + (" (" + "; ".join(f"{r['arch']} {r['kernel']} {r['dtype']} {_dim(r)} "
                              f"[{'+'.join(r['features']) or '-'}] {r['spill'][0]}/{r['spill'][1]} B"
                              f"{_in_loops(r)}" for r in spilling) + ")" if spilling else "."), ""]
    head = [r for r in rows if r["arch"] == "sm_90a" and r["gate"] and r["dtype"] == "bf16"
            and (r["module"] == "cross_entropy" or r["constexprs"].get("HEAD_DIM") in (64, 128))]
    if head:
        L += ["## Headline: sm_90a, bf16, default features", "", HEADER]
        L += [_row_md(r) for r in head] + [""]
    for arch in ARCHS:
        arch_rows = [r for r in rows if r["arch"] == arch]
        if not arch_rows:
            continue
        limit = configs.shared_memory_limit(arch.rstrip("a"))
        L += [f"## {arch} (shared memory limit {limit} B"
              + (f"; {configs.DEFAULT_SHARED_MEMORY} B for configs from `default` entries, "
                 "which sm_86/sm_89 take too)" if limit > configs.DEFAULT_SHARED_MEMORY else ")"),
              ""]
        for module in MODULES:
            mod_rows = [r for r in arch_rows if r["module"] == module]
            if mod_rows:
                L += [f"### {module}", "", HEADER] + [_row_md(r) for r in mod_rows] + [""]
    return "\n".join(L) + "\n"


def _ptxas_version() -> str:
    try:
        out = subprocess.run([str(NVIDIA_BIN / "ptxas"), "--version"], capture_output=True,
                             text=True).stdout
        m = re.search(r"release ([\d.]+), V([\d.]+)", out)
        return f"ptxas {m.group(2)}" if m else "ptxas ?"
    except OSError:
        return "ptxas ?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="the make-test gate: sm_90a, bf16, attention d=64/128 plain and causal, "
                         "cross-entropy without options; writes nothing unless --out is given")
    ap.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=None,
                    help="targets (default: sm_90a and sm_80; --quick: sm_90a)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"folder for triton-<version>.json/.md (default: {OUT_DIR.relative_to(REPO)}"
                         " for a full run)")
    ap.add_argument("--strict", action="store_true", help="also fail on spills with features on")
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="only the scenarios whose description ('attention bf16 B=2 H=16 S=4096 "
                         "d=256 [causal]') contains one of these texts; no missing-kernel check, "
                         "writes nothing unless --out is given")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="re-judge a written table and rewrite its .md (no compiling)")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(args.render.read_text())
        rows, meta = data["rows"], data["meta"]
        # Keep scenario errors and missing kernels; judge the rows again.
        problems = [p for p in data["problems"] if not re.match(r"sm_\w+ _\w+ ", p)]
        problems += judge(rows, [], args.strict)
        data["problems"] = problems
        args.render.write_text(json.dumps(data, indent=1) + "\n")
        args.render.with_suffix(".md").write_text(render_md(meta, rows, problems))
        print("\n".join(f"FAIL {p}" for p in problems) or "no problems")
        return 1 if problems else 0
    archs = args.arch or (["sm_90a"] if args.quick else list(ARCHS))
    out_dir = args.out or (None if args.quick or args.only else OUT_DIR)

    problems = [f"{t.name}: {p}" for t in (configs.load("attention"), configs.load("cross_entropy"))
                for p in t.validate()]
    knobs.nvidia.dump_ptxas_log = True
    _install_recorders()
    _SCENARIOS[:] = scenarios(args.quick)
    if args.only:
        _SCENARIOS[:] = [sc for sc in _SCENARIOS if any(t in describe(sc) for t in args.only)]
        if not _SCENARIOS:
            ap.error(f"--only {args.only}: no scenario matches")
    tasks = [(a, i) for a in archs for i, sc in enumerate(_SCENARIOS) if a in sc.archs]
    print(f"static_table: Triton {triton.__version__}, {len(tasks)} scenario compiles for "
          f"{', '.join(archs)}, {args.jobs} processes", flush=True)
    t0 = time.time()
    results = []
    ctx = multiprocessing.get_context("fork")  # workers inherit the recorders and scenarios
    with ctx.Pool(max(1, args.jobs), maxtasksperchild=None) as pool:
        for res in pool.imap_unordered(compile_task, tasks, chunksize=1):
            sc = _SCENARIOS[res["scenario"]]
            print(f"  {res['arch']:7s} {describe(sc):60s} {len(res['launches'])} launches "
                  f"{res['seconds']:.1f}s" + (" ERROR" if res["error"] else ""), flush=True)
            results.append(res)
    seconds = time.time() - t0
    rows = merge(results)
    problems += judge(rows, results, args.strict)
    if not args.only:
        problems += missing_kernels(rows, archs)

    info = git_info()
    meta = {"triton": triton.__version__, "torch": torch.__version__, "ptxas": _ptxas_version(),
            "kernel_hash": kernel_hash(), "commit": info["commit"], "dirty": info["dirty"],
            "date": datetime.date.today().isoformat(), "seconds": round(seconds, 1),
            "jobs": args.jobs, "archs": archs, "quick": args.quick,
            "command": "python scripts/static_table.py" + (" --quick" if args.quick else "")
            + (" --only " + " ".join(repr(t) for t in args.only) if args.only else "")}
    for r in rows:
        status = "ok"
        where = f"{r['kernel']:22s} {r['dtype']:4s} {_dim(r):24s} [{'+'.join(r['features']) or '-'}]"
        ml = r["sass"]["main_loop"] or {}
        print(f"{r['arch']:7s} {where:70s} {_config_text(r):18s} regs={r['registers']} "
              f"spill={r['spill']} smem={r['shared']} tc={r['sass']['tensor_core_kind']} "
              f"loop={ml.get('instructions', '-')} /elem={ml.get('per_element', '-')} {status}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"triton-{triton.__version__}"
        (out_dir / f"{stem}.json").write_text(json.dumps(
            {"meta": meta, "problems": problems, "rows": rows}, indent=1, sort_keys=False) + "\n")
        (out_dir / f"{stem}.md").write_text(render_md(meta, rows, problems))
        print(f"static_table: wrote {out_dir / stem}.json and .md")
    for p in problems:
        print(f"FAIL {p}")
    print(f"static_table: {len(rows)} kernels compiled for {', '.join(archs)} in {seconds:.0f} s; "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
