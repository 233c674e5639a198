"""bf16 under Triton's CPU interpreter (TRITON_INTERPRET=1): a start-up self-test, and the fix.

Why this exists
---------------
Triton's interpreter stores bfloat16 values as their raw 16-bit patterns in numpy `uint16`
arrays and then runs numpy on those arrays as if they were numbers (measured with Triton 3.6 and
3.8): `tl.dot` multiplies bit patterns (a 32x32x32 bf16 dot is off by ~5e10), `bf16 + bf16`,
`bf16 * 1.3`, comparisons, `tl.sum`/`tl.max`, scans and `tl.atomic_add` act on the integers,
and fp32 -> bf16 casts truncate instead of rounding. fp16 and fp32 are right. So without this
module a bf16 kernel "passes" on the CPU while computing garbage.

What gptfast does
-----------------
Every launcher in `gptfast.kernels` calls `ensure_bf16(...)` with its tensors. When the
interpreter is on and one of them is bf16, the first call decides, once per process:

1. self-test: run tiny interpreted kernels (a bf16 dot into fp32; bf16 elementwise math,
   comparisons, `where`, casts with ties; reductions; atomics) and compare with torch. If the
   installed Triton passes, nothing is patched ("native": a future Triton that fixed this).
2. otherwise patch the interpreter (below) and run the self-test again: "patched".
3. if the patch cannot be applied (the interpreter's internals are not the ones this module
   knows) or the self-test still fails, bf16 under the interpreter is refused: `ensure_bf16`
   raises `Bf16InterpreterError` and `bf16_problem()` returns the sentence saying why, which the
   backend choice (`gptfast.explain`) reports. Never silent garbage.
The decision depends on what the installed Triton does, never on its version number.

The fix
-------
The bit-pattern storage is kept (loads, stores, `where`, transposes, splats only move bits, and
stay untouched); every method of the interpreter's builder that does arithmetic is wrapped so
that, for bf16 operands, it widens them exactly to fp32, computes, and rounds results that Triton
types as bf16 back to bf16 with round-to-nearest-even:
  - `tl.dot`: bf16 operands widened to fp32, product accumulated in fp32 (what tensor cores do;
    numpy's fp32 matmul);
  - elementwise binary ops, comparisons, min/max, clamp, unary ops, fma (one rounding), casts
    to and from bf16 (fp32 -> bf16 rounds to nearest even, NaN stays NaN; rtz when asked),
    `get_bf16` constants (`tl.full`, `bf16 * 1.3`: missing from the interpreter, it crashed).
    Triton's math functions (exp, exp2, log, sqrt, ...) take only fp32/fp64, so kernels cast
    bf16 to fp32 before them; the unary wrapper would compute them in fp32 and round once;
    for +, -, *, / and sqrt the fp32 result rounded to bf16 is exactly the correctly rounded bf16
    result (fp32 has 24 >= 2*8 + 2 significand bits, so double rounding is innocuous); sources
    wider than fp32 (fp64, large ints) are rounded to fp32 with round-to-odd first, which keeps
    that exact too;
  - `tl.sum`/`tl.max`/`tl.min`/`tl.argmax`/`tl.argmin`, `tl.cumsum`/`tl.cumprod` on bf16:
    computed in fp32 and rounded once. A GPU reduces in a tree of bf16 adds, rounding at every
    step, in an order of its own: its result can be a few bf16 ulps further from the exact sum.
    gptfast's kernels never reduce bf16 (they widen to fp32 first);
  - `tl.atomic_add` on bf16 memory: one read-add-round-write per element, in element order (the
    interpreter runs programs one after the other, so this is the serial order a GPU may pick).
The wrappers delegate to the original methods for every other dtype, so fp16/fp32 behave
exactly as before. The patch is process-wide (it makes bf16 right for any interpreted kernel)
and idempotent.

What the CPU then proves, and what it cannot: see DEVELOPERS.md ("bf16 under the interpreter").
"""
from __future__ import annotations

import math
import os
import threading
from typing import List, Optional

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["Bf16InterpreterError", "ensure_bf16", "bf16_problem", "bf16_state", "interpreting"]


class Bf16InterpreterError(RuntimeError):
    """bf16 tensors were launched under a Triton interpreter that cannot compute bf16 right."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ============================================================================================
# bf16 <-> numpy conversions (exact, round-to-nearest-even)
# ============================================================================================


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact: a bf16 is the top half of an fp32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray, round_to_zero: bool = False) -> np.ndarray:
    """fp32 -> bf16 bit patterns, round-to-nearest-even (or toward zero); NaN stays (quiet) NaN."""
    shape = np.shape(x)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    u = x.view(np.uint32).astype(np.uint64)
    if round_to_zero:
        out = (u >> 16).astype(np.uint16)
    else:  # add 0x7FFF plus the lowest kept bit: ties go to the even neighbour
        out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out = np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), out)
    return out.reshape(shape)


def _f64_to_f32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """fp64 -> fp32 rounding to odd: an inexact result gets its last bit set. Rounding that to
    bf16 (8 significand bits, far fewer than 24 - 2) is the correctly rounded bf16 of x."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)
        back = f.astype(np.float64)
        inexact = (back != x) & np.isfinite(x)
        away = inexact & (np.abs(back) > np.abs(x))  # rounded away from zero: step back
    f = np.where(away, np.nextafter(f, np.float32(0)), f).astype(np.float32)
    bits = np.ascontiguousarray(f).view(np.uint32)
    return np.where(inexact, bits | np.uint32(1), bits).astype(np.uint32).view(np.float32)


def to_bf16_bits(x, round_to_zero: bool = False) -> np.ndarray:
    """Any numpy numbers -> bf16 bit patterns, correctly rounded."""
    x = np.asarray(x)
    if x.dtype in (np.float32, np.float16, np.bool_, np.int8, np.uint8, np.int16, np.uint16):
        return f32_to_bf16_bits(x.astype(np.float32), round_to_zero)  # exact in fp32
    return f32_to_bf16_bits(_f64_to_f32_round_to_odd(x.astype(np.float64)), round_to_zero)


# ============================================================================================
# The patch
# ============================================================================================

# Builder methods the patch wraps or relies on; if the installed interpreter lacks one, the patch
# is not applied (and bf16 is refused).
_BUILDER_METHODS = ("binary_op", "ternary_op", "unary_op", "create_fma", "create_erf",
                    "create_rsqrt", "create_dot", "cast_impl", "create_fp_to_fp",
                    "create_atomic_rmw", "create_masked_load", "create_masked_store")
_PATCHED_ATTR = "_gptfast_bf16_patched"


def _apply_patch() -> None:
    """Wrap the interpreter's arithmetic for bf16 (see the module docstring). Raises when the
    interpreter is not laid out as expected; idempotent."""
    from triton.runtime import interpreter as ti

    builder_cls = ti.InterpreterBuilder
    if getattr(builder_cls, _PATCHED_ATTR, False):
        return
    missing = [m for m in _BUILDER_METHODS if not callable(getattr(builder_cls, m, None))]
    for cls, names in ((getattr(ti, "ReduceOps", None), ("sum", "min_max")),
                       (getattr(ti, "ScanOps", None), ("cumsum", "cumprod"))):
        if cls is None:
            missing.append("ReduceOps/ScanOps")
        else:
            missing += [f"{cls.__name__}.{n}" for n in names if not callable(getattr(cls, n, None))]
    for name in ("TensorHandle", "_get_np_dtype"):
        if not hasattr(ti, name):
            missing.append(name)
    if not hasattr(ti, "_interpreter") or not hasattr(ti._interpreter, "load") \
            or not hasattr(ti._interpreter, "store"):
        missing.append("_interpreter.load/store")
    if missing:
        raise RuntimeError(f"the Triton interpreter's internals differ from the ones gptfast "
                           f"patches (missing: {', '.join(missing)})")

    TensorHandle, bf16, fp32 = ti.TensorHandle, tl.bfloat16, tl.float32

    def is_bf16(h) -> bool:
        # The dtype alone is not enough: comparison results keep their operand's dtype in some
        # interpreter versions while holding bools.
        return isinstance(h.data, np.ndarray) and h.data.dtype == np.uint16 and h.dtype == bf16

    def widen(h):
        return bf16_bits_to_f32(h.data) if is_bf16(h) else h.data

    def result(out):
        out = np.asarray(out)
        if out.dtype == np.bool_:
            return TensorHandle(out, tl.int1)
        return TensorHandle(to_bf16_bits(out), bf16)

    orig = {m: getattr(builder_cls, m) for m in _BUILDER_METHODS}

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return orig["binary_op"](self, lhs, rhs, op)
        with np.errstate(all="ignore"):
            return result(op(widen(lhs), widen(rhs)))

    def ternary_op(self, lhs, rhs, other, op):
        # np.where (select) only moves bit patterns: exact as it is.
        if op is np.where or not any(is_bf16(h) for h in (lhs, rhs, other)):
            return orig["ternary_op"](self, lhs, rhs, other, op)
        with np.errstate(all="ignore"):
            return result(op(widen(lhs), widen(rhs), widen(other)))

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return orig["unary_op"](self, arg, op)
        with np.errstate(all="ignore"):
            return result(op(widen(arg)))

    def create_fma(self, x, y, z):
        if not any(is_bf16(h) for h in (x, y, z)):
            return orig["create_fma"](self, x, y, z)
        # In fp64 the product of two bf16 is exact and the sum rounds once before bf16.
        return result(widen(x).astype(np.float64) * widen(y) + widen(z).astype(np.float64))

    def create_erf(self, arg):
        if not is_bf16(arg):
            return orig["create_erf"](self, arg)
        return result(np.vectorize(math.erf, otypes=[np.float32])(widen(arg)))

    def create_rsqrt(self, arg):
        if not is_bf16(arg):
            return orig["create_rsqrt"](self, arg)
        with np.errstate(all="ignore"):
            return result(np.float32(1) / np.sqrt(widen(arg)))

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (is_bf16(a) or is_bf16(b) or is_bf16(d)):
            return orig["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
        # Widen exactly, multiply and accumulate in fp32 (the tensor cores' accumulator).
        acc = np.matmul(widen(a).astype(np.float32), widen(b).astype(np.float32),
                        dtype=np.float32) + widen(d).astype(np.float32)
        if is_bf16(d):
            return TensorHandle(to_bf16_bits(acc), bf16)
        return TensorHandle(acc.astype(d.data.dtype), d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        dst = dst_type.scalar
        if is_bf16(src):
            if dst == bf16:
                return TensorHandle(src.data.copy(), bf16)
            # bf16 -> fp32 is exact; Triton lowers bf16 -> anything else through fp32.
            return TensorHandle(bf16_bits_to_f32(src.data).astype(ti._get_np_dtype(dst)), dst)
        if dst == bf16:
            return TensorHandle(to_bf16_bits(src.data), bf16)
        return orig["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        other = dst if is_bf16(src) else src.dtype.scalar
        if not (is_bf16(src) or dst == bf16) or other.is_fp8():
            return orig["create_fp_to_fp"](self, src, dst_type, rounding_mode)
        if is_bf16(src):
            return cast_impl(self, src, dst_type)
        # Round-to-odd on the way to fp32 keeps both nearest-even and toward-zero exact.
        rtz = rounding_mode is not None and "RTZ" in str(rounding_mode)
        return TensorHandle(to_bf16_bits(src.data, round_to_zero=rtz), bf16)

    def get_bf16(self, value):
        return TensorHandle(to_bf16_bits(np.array([value], dtype=np.float64)), bf16)

    def create_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        if not is_bf16(val):
            return orig["create_atomic_rmw"](self, rmw_op, ptr, val, mask, sem, scope)
        # Triton only allows atomic_add on bf16. Programs run one after the other here, so a
        # read-add-round-write per element is an atomic add in element order.
        shape = np.broadcast_shapes(np.shape(ptr.data), np.shape(val.data), np.shape(mask.data))
        ptrs = np.array(np.broadcast_to(ptr.data, shape)).ravel()  # writable copies: the
        add = bf16_bits_to_f32(np.array(np.broadcast_to(val.data, shape)).ravel())  # C++
        live = np.array(np.broadcast_to(mask.data, shape)).ravel().astype(bool)  # wants them
        old = np.zeros(ptrs.shape, dtype=np.uint16)
        idx = np.flatnonzero(live)
        u16 = np.dtype(np.uint16)

        def load(p):
            return ti._interpreter.load(p, np.ones(p.shape, bool),
                                        np.zeros(p.shape, np.uint16), u16)

        if len(np.unique(ptrs[idx])) == len(idx):  # distinct addresses: one vectorized step
            cur = load(ptrs[idx])
            old[idx] = cur
            new = to_bf16_bits(bf16_bits_to_f32(cur) + add[idx])
            ti._interpreter.store(ptrs[idx], new, np.ones(idx.shape, bool))
        else:
            for i in idx:
                p = ptrs[i:i + 1].copy()
                cur = load(p)
                old[i] = cur[0]
                ti._interpreter.store(p, to_bf16_bits(bf16_bits_to_f32(cur) + add[i:i + 1]),
                                      np.ones(1, bool))
        return TensorHandle(old.reshape(shape), bf16)

    reduce_sum, reduce_min_max = ti.ReduceOps.sum, ti.ReduceOps.min_max
    scan_cumsum, scan_cumprod = ti.ScanOps.cumsum, ti.ScanOps.cumprod

    def as_fp32(t):
        ty = t.type.with_element_ty(fp32) if t.type.is_block() else fp32
        return tl.core.tensor(TensorHandle(bf16_bits_to_f32(t.handle.data), fp32), ty)

    def back_to_bf16(self, t):
        ty = t.type.with_element_ty(bf16) if t.type.is_block() else bf16
        return tl.core.tensor(TensorHandle(to_bf16_bits(t.handle.data), bf16), ty)

    def red_sum(self, input):
        if not is_bf16(input.handle):
            return reduce_sum(self, input)
        return back_to_bf16(self, reduce_sum(self, as_fp32(input)))

    def red_min_max(self, input, val_reduce_op, idx_reduce_op=None):
        x = input[0] if isinstance(input, tuple) else input
        if not is_bf16(x.handle):
            return reduce_min_max(self, input, val_reduce_op, idx_reduce_op)
        out = reduce_min_max(self, as_fp32(x), val_reduce_op, idx_reduce_op)
        if val_reduce_op and idx_reduce_op:
            return back_to_bf16(self, out[0]), out[1]
        return back_to_bf16(self, out) if val_reduce_op else out

    def scan(fn):
        def wrapped(self, input):
            if not is_bf16(input.handle):
                return fn(self, input)
            return [back_to_bf16(self, t) for t in fn(self, as_fp32(input))]
        return wrapped

    for name, fn in (("binary_op", binary_op), ("ternary_op", ternary_op),
                     ("unary_op", unary_op), ("create_fma", create_fma),
                     ("create_erf", create_erf), ("create_rsqrt", create_rsqrt),
                     ("create_dot", create_dot), ("cast_impl", cast_impl),
                     ("create_fp_to_fp", create_fp_to_fp), ("get_bf16", get_bf16),
                     ("create_atomic_rmw", create_atomic_rmw)):
        setattr(builder_cls, name, fn)
    ti.ReduceOps.sum, ti.ReduceOps.min_max = red_sum, red_min_max
    ti.ScanOps.cumsum, ti.ScanOps.cumprod = scan(scan_cumsum), scan(scan_cumprod)
    setattr(builder_cls, _PATCHED_ATTR, True)


# ============================================================================================
# Self-test: tiny interpreted kernels compared with torch
# ============================================================================================

@triton.jit
def _bf16_probe(A, B, F, DOT, EW, RED, ACC, N: tl.constexpr):
    """Every kind of bf16 operation gptfast's kernels could use, on (N, N) / (N,) tiles."""
    r = tl.arange(0, N)
    a = tl.load(A + r[:, None] * N + r[None, :])  # (N, N) bf16
    b = tl.load(B + r[:, None] * N + r[None, :])
    tl.store(DOT + r[:, None] * N + r[None, :], tl.dot(a, b))  # fp32 accumulator
    x = tl.load(A + r)
    y = tl.load(B + r)
    f = tl.load(F + r)  # fp32 values on and around bf16 rounding ties
    tl.store(EW + 0 * N + r, x + y)
    tl.store(EW + 1 * N + r, x - y)
    tl.store(EW + 2 * N + r, x * y)
    tl.store(EW + 3 * N + r, x * 1.3)  # bf16 * Python float stays bf16
    tl.store(EW + 4 * N + r, tl.where(x < y, x, y))
    tl.store(EW + 5 * N + r, tl.maximum(x, y))
    tl.store(EW + 6 * N + r, -x)
    tl.store(EW + 7 * N + r, f.to(tl.bfloat16))
    tl.store(EW + 8 * N + r, x / y)
    tl.store(RED + 0, tl.sum(x, axis=0))
    tl.store(RED + 1, tl.max(x, axis=0))
    tl.store(RED + 2, tl.min(x, axis=0))
    tl.atomic_add(ACC + r % 4, x)  # 4 addresses, N / 4 adds each


def _self_test() -> List[str]:
    """Run the probe under the interpreter; returns what came out wrong (empty: all right)."""
    N = 16
    gen = torch.Generator().manual_seed(1234)
    a = torch.randn(N, N, generator=gen).to(torch.bfloat16)
    b = (torch.randn(N, N, generator=gen) + 0.1).to(torch.bfloat16)
    b[0][b[0] == 0] = 1.0  # divisor row
    # fp32 values exactly halfway between two consecutive bf16 (both parities), just off
    # halfway, and a NaN whose payload sits in the low bits (truncation would make it inf):
    # the cast must round to nearest even and keep NaN.
    hi = torch.arange(0x3F80, 0x3F80 + N, dtype=torch.int32) << 16
    lo = torch.tensor([0x8000, 0x8000, 0x8001, 0x7FFF], dtype=torch.int32).repeat(N // 4)
    f = (hi + lo).view(torch.float32).clone()
    f.view(torch.int32)[5] = 0x7F800001
    dot = torch.full((N, N), float("nan"))
    ew = torch.full((9, N), float("nan")).to(torch.bfloat16)
    red = torch.full((3,), float("nan")).to(torch.bfloat16)
    acc = torch.zeros(4, dtype=torch.bfloat16)
    _bf16_probe[(1,)](a, b, f, dot, ew, red, acc, N=N)

    fails = []
    want_dot = a.float() @ b.float()
    err = (dot - want_dot).abs().max().item()
    if not err <= 1e-4 * want_dot.abs().max().item():
        fails.append(f"tl.dot on bf16 off by {err:.3g}")
    x, y = a[0], b[0]
    want = {"bf16 + bf16": x + y, "bf16 - bf16": x - y, "bf16 * bf16": x * y,
            "bf16 * 1.3": x * torch.tensor(1.3).to(torch.bfloat16),
            "where(x < y)": torch.where(x < y, x, y), "maximum": torch.maximum(x, y),
            "negation": -x, "fp32 -> bf16 rounding": f.to(torch.bfloat16), "bf16 / bf16": x / y}
    for row, (name, w) in enumerate(want.items()):
        got = ew[row]
        if not torch.equal(torch.isnan(got), torch.isnan(w)) or \
                not torch.equal(got[~torch.isnan(w)], w[~torch.isnan(w)]):
            fails.append(name)
    # Reductions and atomics: the order of a bf16 sum is unspecified; allow a few bf16 ulps.
    ulp = 2.0 ** -7
    exact_sum = x.double().sum().item()
    if not abs(red[0].item() - exact_sum) <= 4 * ulp * max(1.0, x.double().abs().sum().item()):
        fails.append("tl.sum on bf16")
    if red[1].item() != x.max().item() or red[2].item() != x.min().item():
        fails.append("tl.max/tl.min on bf16")
    want_acc = torch.stack([x[j::4].double().sum() for j in range(4)])
    bound = 4 * ulp * torch.stack([x[j::4].double().abs().sum() for j in range(4)]).clamp_min(1)
    if not ((acc.double() - want_acc).abs() <= bound).all():
        fails.append("tl.atomic_add on bf16")
    return fails


# ============================================================================================
# The decision, once per process
# ============================================================================================

_lock = threading.Lock()
_state: Optional[str] = None    # "native" | "patched" | "refused"
_problem: Optional[str] = None  # why bf16 is refused


def _decide() -> None:
    global _state, _problem
    version = getattr(triton, "__version__", "?")
    try:
        first = _self_test()
    except Exception as e:  # noqa: BLE001 - a probe that crashes is a failed probe
        first = [f"the probe crashed ({type(e).__name__}: {e})"]
    if not first:
        _state, _problem = "native", None
        return
    try:
        _apply_patch()
        second = _self_test()
    except Exception as e:  # noqa: BLE001
        _state = "refused"
        _problem = (f"the Triton {version} interpreter computes bf16 wrongly ({'; '.join(first)})"
                    f" and gptfast's fix could not be applied: {e}")
        return
    if second:
        _state = "refused"
        _problem = (f"the Triton {version} interpreter computes bf16 wrongly, even with "
                    f"gptfast's fix ({'; '.join(second)})")
    else:
        _state, _problem = "patched", None


def bf16_problem() -> Optional[str]:
    """None when bf16 kernels compute right under this process's interpreter (running the
    self-test, and the fix when needed, on the first call); else a sentence saying why not.
    Without TRITON_INTERPRET=1 there is no interpreter to fix: None."""
    if not interpreting():
        return None
    with _lock:
        if _state is None:
            _decide()
        return _problem


def bf16_state() -> Optional[str]:
    """"native", "patched", "refused", or None before the first bf16 launch (for reports)."""
    return _state


def ensure_bf16(*tensors) -> None:
    """The launchers' hook: when the interpreter is on and a tensor is bf16, make bf16 right
    (once) or raise Bf16InterpreterError saying why it cannot be."""
    if not interpreting():
        return
    if not any(t is not None and t.dtype == torch.bfloat16 for t in tensors):
        return
    problem = bf16_problem()
    if problem is not None:
        raise Bf16InterpreterError(
            f"bf16 tensors cannot run under the Triton interpreter (TRITON_INTERPRET=1): "
            f"{problem}. Use fp16/fp32, backend='torch', or a GPU.")
