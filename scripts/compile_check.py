#!/usr/bin/env python
"""Compile every Triton kernel of gptfast.kernels for a GPU, without a GPU.

The CPU tests run the kernels under TRITON_INTERPRET=1, which accepts code the real compiler
rejects and says nothing about shared memory or registers. This script runs Triton's real
compiler (and, with --spills, the ptxas shipped in the triton wheel) for a target compute
capability, on exactly the launches the module's launchers make:

1. capture: each public launcher is called on tiny CPU tensors, for each dtype, head dim and
   feature combination, with every kernel's `run` replaced by a recorder. Nothing executes;
   the recorder keeps the arguments and constexprs exactly as the launcher passes them.
2. signature: each argument is typed the way the Triton runtime types it (tensor -> pointer
   to its dtype, int -> i32/i64, float -> fp32, constexpr), pointers marked 16-byte aligned
   as torch allocations are. Ints that real shapes can push past 2**31 are forced to i64.
3. config: the block sizes, num_warps and num_stages a GPU of the target capability would
   get (the modules' committed_config tables) replace the CPU launch's.
4. compile for GPUTarget("cuda", cap, 32); report shared memory against the arch's limit and,
   with --spills, ptxas registers and spill bytes.

Exit status 1 if any variant fails to compile or needs more shared memory than the arch has.
Run with TRITON_INTERPRET unset (the script re-executes itself without it).
"""
from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # Triton picks interpreter or compiler when a kernel is decorated: decide before import.
    os.environ.pop("TRITON_INTERPRET")
    os.execv(sys.executable, [sys.executable] + sys.argv)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

from gptfast.kernels import attention as A  # noqa: E402
from gptfast.kernels import cross_entropy as CE  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


# ============================================================================================
# 1. Capture the launches
# ============================================================================================


class Launch(NamedTuple):
    kernel: JITFunction
    args: Dict[str, object]     # every non-option argument, by name, as the launcher passed it
    options: Dict[str, object]  # num_warps, num_stages, ... (absent: Triton's defaults)


def _kernels_of(module) -> Dict[str, JITFunction]:
    """The module's launched kernels: JIT functions that the source launches as `name[grid]`."""
    src = inspect.getsource(module)
    return {name: fn for name, fn in vars(module).items()
            if isinstance(fn, JITFunction) and re.search(rf"\b{name}\[", src)}


@contextlib.contextmanager
def recording(module, sink: List[Launch]):
    """Within the block, launching a kernel of `module` records the launch instead."""
    kernels = _kernels_of(module)

    def recorder(fn):
        names = set(fn.arg_names)

        def run(*args, grid, warmup, **kwargs):
            options = {k: v for k, v in kwargs.items() if k not in names}
            bound = inspect.signature(fn.fn).bind(
                *args, **{k: v for k, v in kwargs.items() if k in names})
            bound.apply_defaults()
            sink.append(Launch(fn, dict(bound.arguments), options))
        return run

    for fn in kernels.values():
        fn.run = recorder(fn)  # instance attribute: JITFunction.__getitem__ calls self.run
    try:
        yield
    finally:
        for fn in kernels.values():
            del fn.run


def _attention_launches(dtypes, head_dims, flag_sets) -> List[Tuple[str, Launch]]:
    """(label, launch) for the attention launchers. flag_sets: names from ATTN_FLAGS."""
    out: List[Tuple[str, Launch]] = []
    B, Hq, Hkv, S = 1, 2, 1, 8  # GQA group of 2: the launchers' GROUP path
    for dt in dtypes:
        for d in head_dims:
            for name in flag_sets:
                f = ATTN_FLAGS[name]
                q = torch.randn(B, Hq, S, d, dtype=dt)
                k = torch.randn(B, Hkv, S, d, dtype=dt)
                v = torch.randn(B, Hkv, S, d, dtype=dt)
                extra = dict(
                    causal=f["causal"], softmax_scale=d ** -0.5,
                    alibi_slopes=torch.rand(Hq) if f["alibi"] else None,
                    window=4 if f["window"] else None,
                    key_padding_mask=torch.ones(B, S, dtype=torch.bool) if f["kpm"] else None,
                    dropout_p=0.1 if f["dropout"] else 0.0,
                    seed=torch.tensor([1], dtype=torch.int64) if f["dropout"] else None)
                sink: List[Launch] = []
                with recording(A, sink):
                    o, lse = A.attention_forward(q, k, v, **extra)
                    if d in A.HEAD_DIMS_BWD:
                        for deterministic in f["deterministic"]:
                            A.attention_backward(
                                torch.randn_like(q), q, k, v, o.zero_(), lse.zero_(), **extra,
                                dlse=torch.randn(B, Hq, S) if f["dlse"] else None,
                                deterministic=deterministic)
                out += [(f"{_dtype_name(dt)} d={d} {name}", launch) for launch in sink]
    sink = []
    with recording(A, sink):
        A.attention_dropout_keep_mask(torch.tensor([1], dtype=torch.int64), 1, 2, 8, 8, 0.1, "cpu")
    out += [("keep-mask", launch) for launch in sink]
    return out


# Feature combinations the attention launchers are called with. "deterministic": the backward
# modes compiled (False: dK/dV kernel with atomic dQ; True: dK/dV without + the dQ kernel).
ATTN_FLAGS = {
    "plain": dict(causal=False, window=False, alibi=False, kpm=False, dropout=False,
                  dlse=False, deterministic=(False, True)),
    "causal": dict(causal=True, window=False, alibi=False, kpm=False, dropout=False,
                   dlse=False, deterministic=(False, True)),
    "all": dict(causal=True, window=True, alibi=True, kpm=True, dropout=True,
                dlse=True, deterministic=(False, True)),
}


def _cross_entropy_launches(dtypes, feature_sets) -> List[Tuple[str, Launch]]:
    """(label, launch) for the cross-entropy launchers: logits CE, lean fused linear CE
    and the budgeted schedule (whose GEMMs and row kernels see fp32 logits)."""
    out: List[Tuple[str, Launch]] = []
    N, D, V = 8, 32, 64
    for dt in dtypes:
        for name in feature_sets:
            on = name == "all"
            opts = dict(ignore_index=-100, label_smoothing=0.1 if on else 0.0,
                        z_loss=1e-4 if on else 0.0, softcap=30.0 if on else None)
            logits = torch.randn(N, V, dtype=dt)
            targets = torch.randint(0, V, (N,))
            h = torch.randn(N, D, dtype=dt)
            w = torch.randn(V, D, dtype=dt)
            bias = torch.randn(V, dtype=dt) if on else None
            g = torch.ones(N)
            g_lse = torch.ones(N) if on else None
            lse = torch.zeros(N)
            lean: List[Launch] = []
            with recording(CE, lean):
                CE.cross_entropy_forward(logits, targets, **opts)
                CE.cross_entropy_backward(g, g_lse, logits, targets, lse, **opts)
                CE.linear_cross_entropy_forward(h, w, targets, bias, **opts, reduction="none")
                CE.linear_cross_entropy_backward(g, g_lse, h, w, targets, bias, lse, **opts)
            budgeted: List[Launch] = []
            with recording(CE, budgeted):
                CE.linear_cross_entropy_forward(h, w, targets, bias, **opts, reduction="mean",
                                                memory_budget=2 * CE.LEAN_MAX_BUDGET)
            out += [(f"{_dtype_name(dt)} {name}", launch) for launch in lean]
            out += [(f"{_dtype_name(dt)} {name} budgeted", launch) for launch in budgeted]
    return out


# ============================================================================================
# 2./3. Signature and target config of each launch
# ============================================================================================


class Variant(NamedTuple):
    module: str
    kernel: str
    label: str                      # dtype, head dim, scenario: for the report
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    options: Dict[str, object]


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _first_tensor_dtype(launch: Launch) -> torch.dtype:
    """Every launcher picks its config from its first tensor argument's dtype
    (q, logits, hidden, or the GEMM's A operand)."""
    return next(v.dtype for v in launch.args.values() if torch.is_tensor(v))


def attention_config(launch: Launch, cap: Tuple[int, int]):
    """(constexpr overrides, options) that attention's launchers use on a GPU of `cap`."""
    kind = {"_attn_fwd": "fwd", "_attn_bwd_dkdv": "bwd_kv", "_attn_bwd_dq": "bwd_q"}.get(
        launch.kernel.__name__)
    if kind is not None:
        c = A.committed_config(kind, launch.args["HEAD_DIM"], _first_tensor_dtype(launch), cap)
        return (dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N),
                dict(num_warps=c.num_warps, num_stages=c.num_stages))
    if launch.kernel.__name__ == "_attn_bwd_preprocess":
        return dict(BLOCK_M=A.PREPROCESS_BLOCK_M), {}
    return {}, {}  # fixed launch constants (the keep-mask kernel): as captured


def cross_entropy_config(launch: Launch, cap: Tuple[int, int]):
    """(constexpr overrides, options) that cross_entropy's launchers use on a GPU of `cap`.
    Row kernels get the full BLOCK_V (the launcher only clamps it for vocabularies smaller
    than the block)."""
    kind = {"_ce_fwd_kernel": "row", "_ce_bwd_kernel": "row", "_lce_fwd_kernel": "lce_fwd",
            "_lce_bwd_kernel": "lce_bwd", "_matmul_kernel": "gemm"}.get(launch.kernel.__name__)
    if kind is None:
        return {}, {}  # the combine kernel: fixed BLOCK, Triton's default warps/stages
    cfg = CE.committed_config(kind, _first_tensor_dtype(launch), cap)
    names = set(launch.kernel.arg_names)
    return ({k: v for k, v in cfg.items() if k in names},
            {k: v for k, v in cfg.items() if k not in names})


# Integer arguments that real shapes can push past 2**31 (the runtime then passes i64):
# attention's batch strides are Hq*S*d elements. Everything else is bounded by int32 checks
# in the launchers (attention head_span) or by a single dimension (N, V, D, strides of rows).
WIDE_INTS = {"gptfast.kernels.attention": re.compile(r"stride_\w*z$"),
             "gptfast.kernels.cross_entropy": None}

MODULES = {
    "attention": ("gptfast.kernels.attention", attention_config),
    "cross_entropy": ("gptfast.kernels.cross_entropy", cross_entropy_config),
}


def to_variant(module: str, label: str, launch: Launch, cap: Tuple[int, int],
               config: Callable) -> Variant:
    fn = launch.kernel
    const_over, options = config(launch, cap)
    options = {**launch.options, **options}
    wide = WIDE_INTS[module]
    signature, constexprs = {}, {}
    for p in fn.params:
        value = launch.args[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = const_over.get(p.name, value)
        else:
            ty = mangle_type(value)  # the runtime's typing, without value specialization
            if ty == "i32" and wide is not None and wide.match(p.name):
                ty = "i64"
            signature[p.name] = ty
    return Variant(module, fn.__name__, label, signature, constexprs, options)


# ============================================================================================
# 4. Compile
# ============================================================================================


class Result(NamedTuple):
    status: str               # OK, FAIL, SMEM>LIMIT
    shared: Optional[int]
    registers: Optional[int]
    spill: Optional[Tuple[int, int]]  # (store bytes, load bytes)
    error: str
    seconds: float


def compile_variant(v: Variant, cap: int, spills: bool) -> Result:
    t0 = time.time()
    fn = getattr(importlib.import_module(v.module), v.kernel)
    target = GPUTarget("cuda", cap, 32)
    # torch allocations are 16-byte aligned; the runtime passes that on as tt.divisibility.
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, ty in enumerate(v.signature.values()) if ty.startswith("*")}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=v.signature, constexprs=v.constexprs,
                                     attrs=attrs), target=target, options=dict(v.options))
    except Exception as e:  # noqa: BLE001 - report every compiler error, keep going
        lines = f"{type(e).__name__}: {e}".splitlines()
        if len(lines) > 24:  # keep the location and the message at the end
            lines = lines[:2] + ["..."] + lines[-20:]
        return Result("FAIL", None, None, None, "\n".join(lines), time.time() - t0)
    shared = k.metadata.shared
    status = "OK" if shared <= A._smem_limit(divmod(cap, 10)) else "SMEM>LIMIT"
    regs = spill = None
    if spills:
        regs, spill = _ptxas_usage(k.asm["ptx"], cap)
    return Result(status, shared, regs, spill, "", time.time() - t0)


def _ptxas_usage(ptx: str, cap: int) -> Tuple[Optional[int], Optional[Tuple[int, int]]]:
    """Registers and (spill store, spill load) bytes, from ptxas run as Triton runs it."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([PTXAS, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(cap)}", f.name,
                              "-o", os.devnull], capture_output=True, text=True)
    info = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", info)
    st = re.search(r"(\d+) bytes spill stores", info)
    ld = re.search(r"(\d+) bytes spill loads", info)
    return (int(regs.group(1)) if regs else None,
            (int(st.group(1)), int(ld.group(1))) if st and ld else None)


# ============================================================================================
# Driver
# ============================================================================================


def collect(only: Optional[str], quick: bool, cap: Tuple[int, int]) -> Tuple[List[Variant], List[str]]:
    """Deduplicated variants, and the launched kernels that no scenario reached."""
    variants: Dict[tuple, Variant] = {}
    missing: List[str] = []
    for short, (module, config) in MODULES.items():
        if only and short != only:
            continue
        if short == "attention":
            if quick:
                launches = _attention_launches([torch.bfloat16], (64, 128), ("plain", "all"))
            else:
                launches = _attention_launches(list(DTYPES.values()), A.HEAD_DIMS_FWD,
                                               tuple(ATTN_FLAGS))
        else:
            launches = _cross_entropy_launches(
                [torch.bfloat16] if quick else list(DTYPES.values()),
                ("all",) if quick else ("plain", "all"))
        for label, launch in launches:
            v = to_variant(module, label, launch, cap, config)
            key = (v.module, v.kernel, tuple(v.signature.items()),
                   tuple(sorted(v.constexprs.items())), tuple(sorted(v.options.items())))
            variants.setdefault(key, v)
        seen = {launch.kernel.__name__ for _, launch in launches}
        mod = importlib.import_module(module)
        missing += [f"{short}.{name}" for name in _kernels_of(mod) if name not in seen]
    return list(variants.values()), missing


def _describe(v: Variant) -> str:
    flags = [k for k, x in v.constexprs.items() if x is True]
    blocks = " ".join(f"{k}={x}" for k, x in v.constexprs.items()
                      if k.startswith("BLOCK_") or k == "GROUP_M")
    opts = " ".join(f"{k}={x}" for k, x in sorted(v.options.items()))
    return f"[{'+'.join(flags) or '-'}] {blocks} {opts}".rstrip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(MODULES))
    ap.add_argument("--quick", action="store_true",
                    help="representative subset: bf16 attention d=64,128 (features all "
                         "on / all off), each cross-entropy kernel once")
    ap.add_argument("--capability", type=int, choices=(90, 80), default=90,
                    help="target compute capability (default 90: H100/H200)")
    ap.add_argument("--spills", action="store_true",
                    help="also run ptxas -v: registers and spill bytes per variant")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    cap = divmod(args.capability, 10)

    t0 = time.time()
    variants, missing = collect(args.only, args.quick, cap)
    print(f"compile_check: {len(variants)} variants for sm_{args.capability}"
          f"{'a' if args.capability == 90 else ''} (shared memory limit "
          f"{A._smem_limit(cap)} B), {args.jobs} jobs", flush=True)

    counts = {"OK": 0, "FAIL": 0, "SMEM>LIMIT": 0}
    spilling = []
    # fork: the workers inherit the imported modules; the parent itself never compiles.
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx) as pool:
        results = pool.map(compile_variant, variants, [args.capability] * len(variants),
                           [args.spills] * len(variants))
        for v, r in zip(variants, results):  # in order, as they complete
            counts[r.status] += 1
            line = f"{r.status:10s} {v.kernel:22s} {v.label:20s} {_describe(v)}"
            if r.shared is not None:
                line += f"  smem={r.shared}"
            if r.registers is not None:
                line += f" regs={r.registers}"
            if r.spill is not None:
                line += f" spill={r.spill[0]}/{r.spill[1]}B"
                if any(r.spill):
                    spilling.append((v, r))
            line += f"  ({r.seconds:.1f}s)"
            if r.error:
                line += "".join(f"\n    | {x}" for x in r.error.splitlines())
            print(line, flush=True)

    if spilling:
        print("largest spills (store/load bytes):")
        for v, r in sorted(spilling, key=lambda vr: -sum(vr[1].spill))[:10]:
            print(f"  {v.kernel:22s} {v.label:20s} regs={r.registers} "
                  f"spill={r.spill[0]}/{r.spill[1]}B  {_describe(v)}")
    for name in missing:
        counts["FAIL"] += 1
        print(f"{'FAIL':10s} {name}: launched by the module but no scenario here reaches it")
    print(f"compile_check: {len(variants)} variants: {counts['OK']} OK, {counts['FAIL']} FAIL, "
          f"{counts['SMEM>LIMIT']} SMEM>LIMIT"
          + (f", {len(spilling)} with register spills" if args.spills else "")
          + f" ({time.time() - t0:.0f}s)")
    return 1 if counts["FAIL"] or counts["SMEM>LIMIT"] else 0


if __name__ == "__main__":
    sys.exit(main())
