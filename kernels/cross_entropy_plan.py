"""Memory plans of the fused linear cross-entropy schedules (no Triton here).

The launchers in cross_entropy.py size every buffer they allocate with these functions, so a
plan is the allocation by construction; `gptfast.linear_cross_entropy_memory` reports it
without importing Triton or allocating anything. Counted: the bytes one training step
(forward with reduction mean, then backward) allocates above its inputs, the gradients of
hidden and weight included, for N rows, D hidden, V vocabulary entries, b bytes per input
element (2 for fp16/bf16, 4 for fp32).

lean (memory_budget None or <= LEAN_MAX_BUDGET)
    forward   per-row vectors (loss, lse, the valid-rows-first order: ROW_BYTES per row) and
              the vocabulary splits' partial statistics, 16 bytes per (row, split), at most
              FWD_PARTIAL_BYTES.
    backward  the gradients (N·D + V·D)·b, written in place: dW is accumulated straight into
              its own 16-bit buffer by the kernels (8-wide bf16/fp16 atomics, or a lock and a
              read-modify-write where the GPU has no 16-bit atomics); dH in fp32 for
              DH_CHUNK_BYTES worth of rows at a time (one launch per chunk), rounded into the
              gradient after each chunk; fp32 inputs accumulate straight into both gradients.
              Plus one int32 lock per (vocabulary tile, D block) in the lock mode, the fp32
              bias gradient (4·V) with a bias, and the per-row vectors.
    peak      max(forward, backward) <= gradients + DH_CHUNK_BYTES + O(N + V), whatever N, D, V.
budgeted (memory_budget > LEAN_MAX_BUDGET, reduction mean/sum): everything in the forward
    accumulators  an fp32 dW (4·V·D) when it takes at most half the budget (16-bit inputs,
              where torch has `addmm(..., out_dtype=float32)`: `fp32_dw_supported`),
              else dW accumulates in its 16-bit gradient (one rounding per chunk); with a bias,
              its fp32 gradient and one fp32 column sum per chunk (8·V).
    chunk     C rows of logits in the input dtype, rows padded to 16 bytes (V8 = V rounded up
              to 8 entries): C = (budget - accumulators - per-row vectors) // (V8·b), at least
              one row; the gradient is written over the logits in place. With the fp32 dW
              accumulator, the 16-bit dW (V·D·b) is allocated only after the last chunk is
              freed, so the chunk also gets those bytes.
    peak      <= gradients + budget (a budget under one row of logits is rounded up to one
              row), the per-row vectors included.
The backward of the budgeted schedule scales the saved gradients in place (no allocation).
Not counted: cuBLAS's and cub's workspaces (allocated once per process by PyTorch's caching
allocator), autograd's own bookkeeping, and an lse gradient under the budgeted schedule (that
part runs the lean backward and adds its result).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import configs

MiB = 1 << 20
LEAN_MAX_BUDGET = 64 * MiB      # memory_budget at or below this (or None): the lean schedule
DEFAULT_BUDGET = 384 * MiB      # a budgeted schedule's budget that keeps the GPT-2, Llama-3
                                # and Gemma-2 shapes under half of torch.compile's memory
DH_CHUNK_BYTES = 32 * MiB       # lean backward: fp32 dH rows per launch
ROW_ALIGN = 256                 # lean backward chunks start at multiples of this many rows
FWD_PARTIAL_BYTES = 8 * MiB     # lean forward: cap on the vocabulary splits' partials
ROW_BYTES = 64                  # per-row vectors: loss, lse, order, argsort's output, ...
LOGIT_ROW_ALIGN = 8             # budgeted: logits rows padded to 8 entries (16 bytes at b=2)
FP32_DW_FRACTION = 0.5          # budgeted: an fp32 dW accumulator may take half the budget
SPLIT_OVERHEAD_TILES = 1        # lean forward: a program's fixed cost, in logit tiles

# dW accumulation of the lean backward for 16-bit inputs (the `DW_ACCUM` config parameter):
DW_ATOMIC = 1   # 16-bit atomic adds straight into the gradient (8-wide on sm_90)
DW_LOCK = 2     # a lock per (vocabulary tile, D block), read-modify-write into the gradient
DW_FP32 = 3     # fp32 atomics into a full-size fp32 buffer, cast at the end (NOT lean: V·D·4
                # more bytes; kept for the accumulation microbenchmark)
DW_MODES = {"atomic": DW_ATOMIC, "lock": DW_LOCK, "fp32": DW_FP32}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- lean forward: the vocabulary splits ---------------------------------------------------------

def forward_splits(n: int, v: int, block_n: int, block_v: int, num_sms: int) -> Tuple[int, int]:
    """(splits, tiles per split) of the lean forward's grid (row tiles, splits).

    Each program computes ceil(vocab tiles / splits) logit tiles of one row tile; row tiles
    vary fastest, so the programs running together read the same weight tiles. The split
    count minimizes the time of whole waves: waves x (tiles per program + a program's fixed
    cost), one program per SM (the 16-bit tiles hold one block per SM). Old rule, ~2 programs
    per SM: 2.42 waves at N = 8192 with 128-row tiles (a third of the last wave idle); this
    gives one full wave there (128 programs on 132 SMs). The partials (16 bytes per row and
    split) stay under FWD_PARTIAL_BYTES."""
    row_tiles = max(1, _cdiv(n, block_n))
    vocab_tiles = _cdiv(v, block_v)
    cap = max(1, min(vocab_tiles, FWD_PARTIAL_BYTES // (16 * max(n, 1)), 4 * num_sms))
    best = None
    for s in range(1, cap + 1):
        per = _cdiv(vocab_tiles, s)
        splits = _cdiv(vocab_tiles, per)   # no empty split: each owns >= 1 tile
        waves = _cdiv(row_tiles * splits, num_sms)
        cost = waves * (per + SPLIT_OVERHEAD_TILES)
        if best is None or cost < best[0]:
            best = (cost, splits, per)
    return best[1], best[2]


# ---- lean backward: fp32 dH in row chunks ---------------------------------------------------------

def dh_chunk_rows(n: int, d: int) -> int:
    """Rows of fp32 dH one lean backward launch accumulates: the most that fit DH_CHUNK_BYTES,
    in multiples of ROW_ALIGN (at least ROW_ALIGN: over the limit only for D > 32768), or all
    N rows when they fit."""
    fit = DH_CHUNK_BYTES // (4 * max(d, 1))
    rows = max(ROW_ALIGN, fit // ROW_ALIGN * ROW_ALIGN)
    return max(1, min(n, rows))


def lock_count(v: int, d: int, block_v: int, block_d: int) -> int:
    """Locks of the lock mode: one per (vocabulary tile, D block) of dW."""
    return _cdiv(v, block_v) * _cdiv(d, block_d)


# ---- budgeted: accumulators and the chunk ----------------------------------------------------------

class BudgetedLayout(NamedTuple):
    chunk_rows: int      # token rows per chunk
    row_stride: int      # elements between logits rows (V padded to LOGIT_ROW_ALIGN)
    dw_fp32: bool        # dW accumulated in an fp32 buffer (else in its own gradient)
    accumulators: int    # bytes of the fp32 accumulators (dW, bias)


def budgeted_layout(n: int, d: int, v: int, dtype: torch.dtype, budget: int,
                    bias: bool, fp32_dw: bool = True) -> BudgetedLayout:
    """fp32_dw False: torch cannot add 16-bit products into an fp32 matrix on this device
    (`addmm(..., out_dtype=float32)`), so dW accumulates in its 16-bit gradient."""
    b = _itemsize(dtype)
    row_stride = _cdiv(v, LOGIT_ROW_ALIGN) * LOGIT_ROW_ALIGN
    acc = 8 * v if bias else 0          # fp32 bias gradient + one fp32 column sum per chunk
    dw32 = 4 * v * d if b < 4 else 0    # fp32 inputs accumulate in the fp32 gradient itself
    dw_fp32 = fp32_dw and dw32 > 0 and acc + dw32 <= budget * FP32_DW_FRACTION
    room = budget - acc - ROW_BYTES * n  # the per-row vectors come out of the budget too
    if dw_fp32:
        # The 16-bit dW gradient is allocated only after the last chunk is freed (it is the
        # fp32 accumulator's rounding): until then its bytes are the chunk's.
        acc += dw32
        room += v * d * b - dw32
    rows = max(1, min(n, room // (row_stride * b)))
    return BudgetedLayout(rows, row_stride, dw_fp32, acc)


_FP32_DW = {}  # (device type, dtype) -> fp32_dw_supported


def fp32_dw_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch adds 16-bit products into an fp32 matrix in place with
    `addmm(acc, a, b, out_dtype=float32, out=acc)`: CUDA in recent PyTorch (some versions
    want the added matrix in the inputs' dtype). Probed once per (device type, dtype) on 1x1
    tensors (fake and meta tensors are probed each time, never cached). The CPU has no
    out_dtype: it uses fp32 copies of the operands instead (tests only)."""
    from torch._subclasses.fake_tensor import is_fake
    key = (device.type, dtype)
    if key in _FP32_DW:
        return _FP32_DW[key]
    if device.type == "cpu" or "dtype_out" not in torch.ops.aten.addmm.overloads():
        return False
    acc = torch.zeros((1, 1), dtype=torch.float32, device=device)
    one = torch.zeros((1, 1), dtype=dtype, device=device)
    try:
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
        ok = True
    except (RuntimeError, TypeError):
        ok = False
    if device.type != "meta" and not is_fake(acc):
        _FP32_DW[key] = ok
    return ok


# ---- the plan --------------------------------------------------------------------------------------

class Plan(NamedTuple):
    schedule: str            # "lean" | "budgeted"
    gradients: int           # bytes of the gradients of hidden, weight (and bias)
    forward: int             # peak bytes above the inputs during the forward
    backward: int            # ... during the backward (the gradients included)
    peak: int                # max(forward, backward): one training step
    chunk_rows: int          # lean: rows of fp32 dH per backward launch; budgeted: rows per chunk
    splits: int              # lean: vocabulary splits of the forward (1 for budgeted)
    dw_accumulation: str     # "atomic" | "lock" | "fp32" (lean), "fp32" | "gradient" (budgeted)


def default_target() -> configs.Target:
    """The current GPU, or an H100/H200 (sm_90, 132 SMs) when there is none."""
    if torch.cuda.is_available():
        return configs._cuda_target(torch.cuda.current_device())
    return configs.Target((9, 0), 132)


def lean_configs(target: Optional[configs.Target], dtype: torch.dtype, n: int, *, bias=False,
                 softcap=False, smoothing=False, glse=False, filtered=False):
    """(forward config, backward config) dicts of the lean kernels for `target` (None: the
    interpreter's small configs)."""
    table = configs.load("cross_entropy")
    if target is None:
        return table.interpreter["lce_fwd"].kwargs(), table.interpreter["lce_bwd"].kwargs()
    fwd_feats = [f for f, on in (("bias", bias), ("softcap", softcap), ("smoothing", smoothing))
                 if on]
    bwd_feats = [f for f, on in (("bias", bias), ("softcap", softcap), ("glse", glse),
                                 ("filter", filtered)) if on]
    fwd = table.lookup(table.key("lce_fwd", target, dtype, None, fwd_feats, (n,))).kwargs()
    bwd = table.lookup(table.key("lce_bwd", target, dtype, None, bwd_feats, (n,))).kwargs()
    return fwd, bwd


def plan(n: int, d: int, v: int, dtype: torch.dtype, memory_budget: Optional[int] = None, *,
         bias: bool = False, target: Optional[configs.Target] = None,
         fp32_dw: Optional[bool] = None) -> Plan:
    """The memory plan of one training step (see the module docstring for what is counted).
    target: the GPU whose configurations the launches use (default: `default_target()`);
    fp32_dw: whether the budgeted schedule may use an fp32 dW accumulator (None: yes, as on a
    GPU with a recent PyTorch; `fp32_dw_supported` tells for a device)."""
    b = _itemsize(dtype)
    target = target if target is not None else default_target()
    grads = (n * d + v * d) * b + (v * b if bias else 0)
    rows = ROW_BYTES * n
    if memory_budget is not None and memory_budget > LEAN_MAX_BUDGET and n > 0:
        lay = budgeted_layout(n, d, v, dtype, int(memory_budget), bias,
                              True if fp32_dw is None else fp32_dw)
        chunk = lay.chunk_rows * lay.row_stride * b
        if lay.dw_fp32:  # the chunks with dH and the fp32 dW, then dW's rounding (chunk freed)
            peak = rows + max(grads - v * d * b + chunk, grads) + lay.accumulators
        else:
            peak = rows + grads + lay.accumulators + chunk
        return Plan("budgeted", grads, peak, peak, peak, lay.chunk_rows, 1,
                    "fp32" if lay.dw_fp32 else "gradient")
    fwd_cfg, bwd_cfg = lean_configs(target, dtype, n, bias=bias)
    splits, _ = forward_splits(n, v, fwd_cfg["BLOCK_N"], fwd_cfg["BLOCK_V"], target.num_sms)
    forward = rows + 16 * splits * n
    mode = "fp32" if b == 4 else {v_: k for k, v_ in DW_MODES.items()}[bwd_cfg["DW_ACCUM"]]
    chunk = dh_chunk_rows(n, d) if b < 4 else n
    backward = rows + grads + (chunk * d * 4 if b < 4 else 0) + (4 * v if bias else 0)
    if b < 4 and mode == "lock":
        backward += 4 * lock_count(v, d, bwd_cfg["BLOCK_V"], bwd_cfg["BLOCK_DB"])
    if b < 4 and mode == "fp32":
        backward += 4 * v * d
    return Plan("lean", grads, forward, backward, max(forward, backward), chunk, splits, mode)
