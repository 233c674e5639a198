"""Triton kernels for cross-entropy on logits and for fused linear + cross-entropy.

No autograd lives here: `gptfast/ops/` wraps these launchers into custom ops.

Semantics (per row n; x = logits, all math in fp32 whatever the storage dtype)
------------------------------------------------------------------------------
    softcap c:        x <- c * tanh(x / c)                        (before anything else)
    lse              = logsumexp_j x_j
    loss_row         = (1 - eps) * (lse - x_y) + eps * (lse - mean_j x_j) + z * lse^2
    dloss/dx (row)   = g * [(1 - eps)(p - onehot_y) + eps (p - 1/V) + 2 z lse p] + g_lse * p
                     = p * (g (1 + 2 z lse) + g_lse) - g (1 - eps) onehot_y - g eps / V
    (then multiplied by 1 - tanh^2 when softcapped)
    target == ignore_index : loss 0, lse 0, gradient 0, no GEMM work in the lean kernels.
    target outside [0, V)  : loss NaN and gradient row NaN (masked loads, never an OOB read).
No launcher syncs with the host: the number of valid rows lives on the device and kernels
read it (dead row tiles run a zero-trip loop).

Fused linear cross-entropy: two schedules  (N tokens, D hidden, V vocab, b = bytes/elem)
-------------------------------------------------------------------------------------
lean (memory_budget None or <= LEAN_MAX_BUDGET = 64 MiB; the default)
    forward : one kernel, grid (row tiles, vocab splits). Each program computes logit tiles
              H[rows] @ W[vtile].T on chip (tl.dot over D, fp32 accumulator), keeps an online
              max / sum-exp / target-logit / sum-of-logits per row, and writes 4 fp32 partials
              per (row, split); a tiny kernel combines the splits into loss and lse.
              FLOPs 2NDV. Bytes: H and W re-read from L2/HBM per tile ~ b(V D N/BLOCK_N +
              N D V/BLOCK_V); extra memory 16 * N * splits bytes. The vocab split exists only
              to fill the GPU when N/BLOCK_N is small.
    backward: one kernel, grid (row tiles x vocab tiles, folded onto one axis). Each program
              recomputes its logit tile (2NDV total), forms the fp32 gradient tile G in
              registers, casts it to the input dtype for the tensor cores (fp32 accumulation),
              and for each D chunk adds G @ W[vtile] into dH and G^T @ H[rows] into dW with
              fp32 atomics (4NDV).
              FLOPs 6NDV backward, 8NDV forward + backward. Extra memory: fp32 accumulators
              for dH and dW (4(N+V)D bytes) when the inputs are 16-bit (fp32 inputs accumulate
              straight into the outputs). Atomic traffic 4 N V D (1/BLOCK_N + 1/BLOCK_V) bytes
              to L2 -- this, not the FLOPs, is the price of never storing G; the alternative
              without atomics must hold a BLOCK x D fp32 accumulator (impossible on chip for
              D in the thousands) or recompute logits once per D tile. The order of the
              atomic adds makes dH / dW non-deterministic in the last bits.
budgeted (memory_budget > LEAN_MAX_BUDGET, reduction "sum" / "mean")
    Token chunks of C rows with C * V * (4 + b') <= memory_budget (b' = 2 for a 16-bit copy
    of G, 0 for fp32 where G overwrites the logits in place):
        logits_c (fp32)  = H_c @ W^T + bias        Triton GEMM, fp32 out       2CDV
        loss, lse, G_c   = row kernels below (one online pass + one gradient pass)
        dH_c             = G_c @ W                 torch.mm (cuBLAS)           2CDV
        dW32            += G_c^T @ H_c             Triton GEMM, fp32 accumulate 2CDV
        db32            += sum_rows G_c
    FLOPs 6NDV in total (no recompute in the backward). Bytes per chunk ~ C V (4 write +
    2*4 read + b' write + 2 b' read) plus the GEMM operand traffic; memory = the budget plus
    fp32 dW / db accumulators. The gradient is computed for an upstream gradient that is
    uniform over rows (1 for "sum", 1/n_valid for "mean", n_valid counted on the device)
    and no lse gradient; the caller scales by the scalar upstream gradient. Ignored rows do
    cost GEMM work here (skipping them would need their count on the host); their G rows
    are zero. Reduction "none" returns grads=None from the lean forward: per-row upstream
    gradients are only known later, so the lean backward recomputes.
    torch.mm cannot write an fp32 result from 16-bit inputs portably (out_dtype is CUDA
    only), hence the Triton GEMM for the two products that need fp32 output.

Offsets: every row / vocab index is cast to int64 before it is multiplied by a stride, so
N*V, V*D and N*D beyond 2**31 are fine.

Precision notes: logits, lse, losses and all GEMM accumulations are fp32. The gradient tile
G is rounded to the input dtype only as a tensor-core operand (as any cuBLAS-based fused CE
does); with fp16 inputs, probabilities below ~6e-8 (fp16 subnormals) flush to zero there.
A target outside [0, V) makes its row's gradient NaN, which also reaches every dW row the
row touches (its loss is NaN anyway).

Block sizes: data in cross_entropy_configs.json (kernels/configs.py: kind, arch, dtype,
feature flags, row bucket). The sm_90 entries are reasoned defaults checked by compiling for
sm_90a without a GPU (scripts/static_table.py: registers, spills, shared memory, wgmma), NOT
tuned on hardware. Under TRITON_INTERPRET=1 small blocks keep the CPU tests fast; the kernels
themselves are identical.
"""
import collections
import math
import os

import torch
import triton
import triton.language as tl

from ._grid import checked_grid
from ._interpreter import ensure_bf16
from . import configs

__all__ = [
    "cross_entropy_forward",
    "cross_entropy_backward",
    "linear_cross_entropy_forward",
    "linear_cross_entropy_backward",
    "LAUNCHES",
    "POISON_OUTPUTS",
    "LEAN_MAX_BUDGET",
]

# Incremented once per public launcher call; tests use it to prove which path ran.
LAUNCHES = collections.Counter()

# Debug: fill freshly allocated outputs with NaN so any element a kernel forgets to write
# shows up. Accumulators that must start at zero are never poisoned.
POISON_OUTPUTS = False

# memory_budget at or below this (or None) selects the lean schedule.
LEAN_MAX_BUDGET = 64 << 20


# --------------------------------------------------------------------------------------
# Block configuration
# --------------------------------------------------------------------------------------
def _interpreting():
    return configs.interpreting()


# The committed block sizes are data: cross_entropy_configs.json beside this file, keyed and
# matched as kernels/configs.py describes (kind, arch, dtype, feature flags, a power-of-two
# bucket of the rows for the lean kernels). Kinds: ce_fwd / ce_bwd (row kernels: one program
# per row, BLOCK_V elements per step), lce_fwd / lce_bwd (lean fused kernels), gemm (the
# budgeted schedule's fp32-output GEMM).
def _config(kind, device, dtype, features=(), lengths=()):
    """A fresh dict of the constexpr blocks and launch options a launch uses: the table's entry
    for its key on the GPU it runs on, or the small interpreter config."""
    table = configs.load("cross_entropy")
    target = configs.launch_target(device)
    if target is None:
        return table.interpreter[kind].kwargs()
    return table.lookup(table.key(kind, target, dtype, None, features, lengths)).kwargs()


def _on(**features):
    """The names of the features that are on."""
    return tuple(name for name, on in features.items() if on)


def _num_sms(device):
    target = configs.launch_target(device)
    return target.num_sms if target is not None else 4


def _dot_precision(dtype):
    # "ieee" keeps fp32 inputs exact (Triton's default for fp32 would be TF32); the
    # setting has no effect on 16-bit operands.
    return "ieee" if dtype == torch.float32 else "tf32"


def _new(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _check_options(label_smoothing, z_loss, softcap):
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")


# --------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _tanh(u):
    # tanh through exp of a non-positive argument: no overflow for any |u|, and the same
    # code on every backend (no libdevice dependency).
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _row_loss(lse, x_target, sum_x, target, V, label_smoothing, z_loss, ignore_index,
              HAS_SMOOTHING: tl.constexpr):
    """loss_row and the lse to store, from the row statistics (scalars or vectors)."""
    loss = lse - x_target
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_x / V)
    loss += z_loss * lse * lse
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)
    loss = tl.where(in_range, loss, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    lse = tl.where(ignored, 0.0, lse)
    return loss, lse


@triton.jit
def _grad_tile(x_raw, cols, target, lse, g, g_lse, V, label_smoothing, z_loss, softcap,
               HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr):
    """d loss / d x_raw for a tile. x_raw is (R, C) or (C,) fp32; the per-row values
    target, lse, g, g_lse are already broadcast to x_raw's rank by the caller."""
    if HAS_SOFTCAP:
        t = _tanh(x_raw / softcap)
        x = softcap * t
    else:
        x = x_raw
    p = tl.exp(x - lse)
    # g (1 + 2 z lse) multiplies p: (1-eps) p + eps p + 2 z lse p, all weighted by g.
    coef = g * (1.0 + 2.0 * z_loss * lse)
    if HAS_GLSE:
        coef += g_lse
    # p * coef - g(1-eps) at the target: both terms in fp32, so p_y - 1 keeps its precision.
    dx = p * coef - tl.where(cols == target, g * (1.0 - label_smoothing), 0.0)
    dx -= g * (label_smoothing / V)
    if HAS_SOFTCAP:
        dx = dx * (1.0 - t * t)
    in_range = (target >= 0) & (target < V)
    return tl.where(in_range, dx, float("nan"))


# --------------------------------------------------------------------------------------
# Cross-entropy on materialized logits: one program per row
# --------------------------------------------------------------------------------------
@triton.jit
def _ce_fwd_kernel(
    LOGITS, TARGETS, LOSS, LSE,
    V, stride_xn, ignore_index, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride_xn
    target = tl.load(TARGETS + row)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)

    # Ignored rows run zero iterations: no logits are read for them.
    n_steps = tl.where(ignored, 0, tl.cdiv(V, BLOCK_V))
    m = float("-inf")  # running max
    s = 0.0            # running sum of exp(x - m)
    sum_x = 0.0        # for label smoothing
    for step in range(0, n_steps):
        cols = step * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    # An ignored row ran no steps (s = 0): give it a finite lse before the loss formula.
    lse = tl.where(ignored, 0.0, m + tl.log(tl.where(ignored, 1.0, s)))

    # Gather the target logit directly; the mask keeps out-of-range targets from reading.
    x_target = tl.load(x_row + target, mask=in_range & (~ignored), other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x_target = softcap * _tanh(x_target / softcap)
    loss, lse = _row_loss(lse, x_target, sum_x, target, V, label_smoothing, z_loss,
                          ignore_index, HAS_SMOOTHING)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd_kernel(
    LOGITS, TARGETS, LSE, GRAD_ROWS, GRAD_LSE, DLOGITS,
    V, stride_xn, stride_dn, stride_g, stride_gl,
    ignore_index, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # DLOGITS may alias LOGITS (inplace): every element is loaded before it is stored, by
    # the same program, so the aliasing is safe.
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride_xn
    dx_row = DLOGITS + row * stride_dn
    target = tl.load(TARGETS + row)
    ignored = target == ignore_index
    lse = tl.load(LSE + row)
    g = tl.load(GRAD_ROWS + row * stride_g).to(tl.float32)
    g = tl.where(ignored, 0.0, g)
    g_lse = 0.0
    if HAS_GLSE:
        g_lse = tl.load(GRAD_LSE + row * stride_gl).to(tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask & (~ignored), other=0.0).to(tl.float32)
        dx = _grad_tile(x, cols, target, lse, g, g_lse, V, label_smoothing, z_loss, softcap,
                        HAS_SOFTCAP, HAS_GLSE)
        dx = tl.where(ignored, 0.0, dx)
        tl.store(dx_row + cols, dx.to(DLOGITS.dtype.element_ty), mask=mask)


def _ce_forward(logits, targets, loss, lse, ignore_index, label_smoothing, z_loss, softcap):
    """Launch the row forward kernel writing into loss / lse (views are fine)."""
    n, v = logits.shape
    if n == 0:
        return
    cfg = _config("ce_fwd", logits.device, logits.dtype,
                  _on(softcap=softcap is not None, smoothing=label_smoothing > 0))
    block_v = min(cfg.pop("BLOCK_V"), triton.next_power_of_2(v))
    _ce_fwd_kernel[checked_grid(n)](
        logits, targets, loss, lse,
        v, logits.stride(0), ignore_index, float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0,
        BLOCK_V=block_v, **cfg,
    )


def _ce_backward(grad_rows, grad_lse, logits, targets, lse, out, ignore_index,
                 label_smoothing, z_loss, softcap):
    n, v = logits.shape
    if n == 0:
        return
    has_glse = grad_lse is not None
    cfg = _config("ce_bwd", logits.device, logits.dtype,
                  _on(softcap=softcap is not None, glse=has_glse))
    block_v = min(cfg.pop("BLOCK_V"), triton.next_power_of_2(v))
    _ce_bwd_kernel[checked_grid(n)](
        logits, targets, lse, grad_rows, grad_lse if has_glse else lse, out,
        v, logits.stride(0), out.stride(0), grad_rows.stride(0),
        grad_lse.stride(0) if has_glse else 0,
        ignore_index, float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_GLSE=has_glse, BLOCK_V=block_v, **cfg,
    )


def _check_logits(logits, targets):
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be (N,), got {tuple(targets.shape)}")
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary (last) dimension")


def _rows_vector(t, n, name):
    """(N,) view of an upstream-gradient tensor; stride 0 (expanded) is kept as is."""
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t


def _upstream(grad_rows, grad_lse, n, device):
    """(grad_rows, grad_lse) as (N,) vectors, or None when neither carries a gradient.

    grad_rows None (only the returned lse is used in the loss) becomes a stride-0 zero vector,
    so the kernels need no variant for it; grad_lse None switches their lse term off."""
    if grad_rows is None and grad_lse is None:
        return None
    if grad_rows is None:
        grad_rows = torch.zeros((), dtype=torch.float32, device=device)
    grad_rows = _rows_vector(grad_rows, n, "grad_rows")
    if grad_lse is not None:
        grad_lse = _rows_vector(grad_lse, n, "grad_lse")
    return grad_rows, grad_lse


def cross_entropy_forward(logits, targets, *, ignore_index, label_smoothing, z_loss, softcap):
    """loss_rows (N,) fp32 and lse (N,) fp32 from logits (N, V) of any float dtype.

    The row stride is arbitrary; the vocabulary dimension must be contiguous. One online
    log-sum-exp pass per row."""
    LAUNCHES["ce_fwd"] += 1
    _check_logits(logits, targets)
    ensure_bf16(logits)
    targets = targets.contiguous()  # kernels index targets / lse with unit stride
    _check_options(label_smoothing, z_loss, softcap)
    n = logits.shape[0]
    loss = _new((n,), torch.float32, logits.device)
    lse = _new((n,), torch.float32, logits.device)
    _ce_forward(logits, targets, loss, lse, ignore_index, label_smoothing, z_loss, softcap)
    return loss, lse


def cross_entropy_backward(grad_rows, grad_lse, logits, targets, lse, *, ignore_index,
                           label_smoothing, z_loss, softcap, inplace=False):
    """dlogits (N, V) in logits' dtype. inplace=True overwrites and returns `logits`.

    grad_rows: (N,) upstream gradient of loss_rows (stride 0 allowed), or None when only the
    lse gets a gradient; grad_lse: (N,) or None."""
    LAUNCHES["ce_bwd"] += 1
    _check_logits(logits, targets)
    ensure_bf16(logits, grad_rows, grad_lse)
    targets, lse = targets.contiguous(), lse.contiguous()
    _check_options(label_smoothing, z_loss, softcap)
    n = logits.shape[0]
    out = logits if inplace else _new(logits.shape, logits.dtype, logits.device)
    grads = _upstream(grad_rows, grad_lse, n, logits.device)
    if grads is None:
        return out.zero_()
    _ce_backward(*grads, logits, targets, lse, out, ignore_index,
                 label_smoothing, z_loss, softcap)
    return out


# --------------------------------------------------------------------------------------
# Fused linear cross-entropy, lean schedule
# --------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(H, W, BIAS, rows, row_mask, cols, col_mask, D,
                 stride_hn, stride_hd, stride_wv, stride_wd,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_V) tile of H[rows] @ W[cols].T (+ bias). rows, cols are int64."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        h = tl.load(H + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        # W tile loaded as (BLOCK_D, BLOCK_V) so that the dot needs no transpose.
        w = tl.load(W + cols[None, :] * stride_wv + dd[:, None] * stride_wd,
                    mask=col_mask[None, :] & d_mask[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tile_rows(ROW_ORDER, N_VALID, TARGETS, pid_n, BLOCK_N: tl.constexpr):
    """Rows of this row tile in the compacted order (valid rows first).

    Returns (alive, rows int64, row_mask, targets): alive is False when the whole tile lies
    past the valid rows, and then the caller's loops run zero times."""
    n_valid = tl.load(N_VALID)
    slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = slots < n_valid
    rows = tl.load(ROW_ORDER + slots, mask=row_mask, other=0).to(tl.int64)
    target = tl.load(TARGETS + rows, mask=row_mask, other=0)
    alive = pid_n * BLOCK_N < n_valid
    return alive, rows, row_mask, target


@triton.jit
def _lce_fwd_kernel(
    H, W, BIAS, TARGETS, ROW_ORDER, N_VALID,
    PART_MAX, PART_SUMEXP, PART_XT, PART_SUMX,  # (splits, N) fp32, indexed by original row
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, softcap, tiles_per_split,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    alive, rows, row_mask, target = _tile_rows(ROW_ORDER, N_VALID, TARGETS, pid_n, BLOCK_N)

    first_tile = pid_s * tiles_per_split
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V, BLOCK_V) - first_tile)
    n_tiles = tl.where(alive, n_tiles, 0)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    x_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_x = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, n_tiles):
        cols = ((first_tile + t) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < V
        x = _logits_tile(H, W, BIAS, rows, row_mask, cols, col_mask, D,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        # A target outside [0, V) never matches a column: its loss is set to NaN later.
        x_target += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(col_mask[None, :], x, 0.0), axis=1)
        # Every split owns >= 1 tile with >= 1 real column, so m is finite after step 0.
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new

    part = pid_s.to(tl.int64) * N + rows
    store_mask = row_mask & alive
    tl.store(PART_MAX + part, m, mask=store_mask)
    tl.store(PART_SUMEXP + part, s, mask=store_mask)
    tl.store(PART_XT + part, x_target, mask=store_mask)
    tl.store(PART_SUMX + part, sum_x, mask=store_mask)


@triton.jit
def _lce_combine_kernel(
    PART_MAX, PART_SUMEXP, PART_XT, PART_SUMX, TARGETS, LOSS, LSE,
    N, V, n_splits, ignore_index, label_smoothing, z_loss,
    HAS_SMOOTHING: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    target = tl.load(TARGETS + rows, mask=mask, other=ignore_index)
    # Ignored rows have no partials (their tiles never ran): do not read them.
    live = mask & (target != ignore_index)
    # Split sp of a row lives at offset sp * N + row; advancing pointers by N keeps the
    # offset arithmetic in 64 bits.
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    part_max = PART_MAX + rows
    for _sp in range(0, n_splits):
        m = tl.maximum(m, tl.load(part_max, mask=live, other=0.0))
        part_max += N
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    x_target = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_x = tl.zeros((BLOCK,), dtype=tl.float32)
    part_max = PART_MAX + rows
    part_sumexp = PART_SUMEXP + rows
    part_xt = PART_XT + rows
    part_sumx = PART_SUMX + rows
    for _sp in range(0, n_splits):
        m_sp = tl.load(part_max, mask=live, other=0.0)
        s += tl.load(part_sumexp, mask=live, other=0.0) * tl.exp(m_sp - m)
        x_target += tl.load(part_xt, mask=live, other=0.0)
        sum_x += tl.load(part_sumx, mask=live, other=0.0)
        part_max += N
        part_sumexp += N
        part_xt += N
        part_sumx += N
    # Rows without partials (ignored, or past N) get a finite placeholder; _row_loss zeroes
    # the ignored ones and the rest are not stored.
    lse = m + tl.log(tl.where(live, s, 1.0))
    loss, lse = _row_loss(lse, x_target, sum_x, target, V, label_smoothing, z_loss,
                          ignore_index, HAS_SMOOTHING)
    tl.store(LOSS + rows, loss, mask=mask)
    tl.store(LSE + rows, lse, mask=mask)


@triton.jit
def _lce_bwd_kernel(
    H, W, BIAS, TARGETS, ROW_ORDER, N_VALID, LSE, GRAD_ROWS, GRAD_LSE,
    DH, DW, DB,  # fp32 accumulators, zero-initialised, contiguous
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_g, stride_gl,
    stride_dhn, stride_dwv, label_smoothing, z_loss, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One grid axis (see lean_backward_grid): row tile fastest, then vocabulary tile.
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % row_tiles
    pid_v = pid // row_tiles
    alive, rows, row_mask, target = _tile_rows(ROW_ORDER, N_VALID, TARGETS, pid_n, BLOCK_N)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(GRAD_ROWS + rows * stride_g, mask=row_mask, other=0.0).to(tl.float32)
    g_lse = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_GLSE:
        g_lse = tl.load(GRAD_LSE + rows * stride_gl, mask=row_mask, other=0.0).to(tl.float32)

    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < V
    tile_mask = row_mask[:, None] & col_mask[None, :]

    # A dead row tile (all rows ignored) runs this loop zero times: no GEMM, no atomics.
    for _once in range(0, tl.where(alive, 1, 0)):
        x = _logits_tile(H, W, BIAS, rows, row_mask, cols, col_mask, D,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        grad = _grad_tile(x, cols[None, :], target[:, None], lse[:, None], g[:, None],
                          g_lse[:, None], V, label_smoothing, z_loss, softcap,
                          HAS_SOFTCAP, HAS_GLSE)
        grad = tl.where(tile_mask, grad, 0.0)
        if HAS_BIAS:
            tl.atomic_add(DB + cols, tl.sum(grad, axis=0), mask=col_mask, sem="relaxed")
        # fp32 gradient -> input dtype for the tensor cores; the products accumulate in fp32.
        grad_op = grad.to(H.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_mask = dd < D
            w = tl.load(W + cols[:, None] * stride_wv + dd[None, :] * stride_wd,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            h = tl.load(H + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            dh = tl.dot(grad_op, w, input_precision=DOT_PRECISION)             # (BLOCK_N, BLOCK_D)
            dw = tl.dot(tl.trans(grad_op), h, input_precision=DOT_PRECISION)   # (BLOCK_V, BLOCK_D)
            tl.atomic_add(DH + rows[:, None] * stride_dhn + dd[None, :], dh,
                          mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")
            tl.atomic_add(DW + cols[:, None] * stride_dwv + dd[None, :], dw,
                          mask=col_mask[:, None] & d_mask[None, :], sem="relaxed")


def _valid_row_order(targets, ignore_index):
    """(order, n_valid): row ids with the non-ignored rows first (stable), and their count as a
    1-element device tensor. Computed on the device; nothing is read back by the host."""
    ignored = targets == ignore_index
    order = torch.argsort(ignored.to(torch.int8), stable=True)
    n_valid = (~ignored).sum(dtype=torch.int32).reshape(1)
    return order, n_valid


def _check_linear(hidden, weight, targets, bias):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, D) and weight (V, D) expected, got {tuple(hidden.shape)}"
                         f" and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,), got {tuple(targets.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError("hidden, weight and bias must share one dtype")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (V,), got {tuple(bias.shape)}")


def lean_forward_grid(n, v, block_n, block_v, num_sms):
    """((row tiles, vocab splits), vocab tiles per split) of the lean forward.

    The vocabulary is split only as much as needed to give every SM ~2 programs, so axis 1
    holds at most 2 * num_sms splits (far under CUDA's 65,535), and every split gets at least
    one tile (no split is empty, so its running max becomes finite)."""
    row_tiles = triton.cdiv(n, block_n)
    vocab_tiles = triton.cdiv(v, block_v)
    want = max(1, min(vocab_tiles, triton.cdiv(2 * num_sms, row_tiles)))
    tiles_per_split = triton.cdiv(vocab_tiles, want)
    n_splits = triton.cdiv(vocab_tiles, tiles_per_split)
    return checked_grid(row_tiles, n_splits), tiles_per_split


def lean_backward_grid(n, v, block_n, block_v):
    """Grid of the lean backward: (row tiles x vocab tiles) folded onto axis 0, row tile
    fastest (programs sharing a weight tile run together); vocabulary tiles alone pass
    65,535 from V ~ 4.2M at BLOCK_V = 64, so they cannot ride on axis 1."""
    return checked_grid(triton.cdiv(n, block_n) * triton.cdiv(v, block_v))


def _lean_forward(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap):
    n, d = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    loss = _new((n,), torch.float32, device)
    lse = _new((n,), torch.float32, device)
    if n == 0:
        return loss, lse
    cfg = _config("lce_fwd", device, hidden.dtype,
                  _on(bias=bias is not None, softcap=softcap is not None,
                      smoothing=label_smoothing > 0), (n,))
    block_n, block_v, block_d = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_V"), cfg.pop("BLOCK_D")
    order, n_valid = _valid_row_order(targets, ignore_index)

    grid, tiles_per_split = lean_forward_grid(n, v, block_n, block_v, _num_sms(device))
    n_splits = grid[1]

    parts = torch.empty((4, n_splits, n), dtype=torch.float32, device=device)
    _lce_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, targets, order, n_valid,
        parts[0], parts[1], parts[2], parts[3],
        n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(softcap) if softcap is not None else 1.0, tiles_per_split,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing > 0,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(hidden.dtype), **cfg,
    )
    combine_block = 128
    _lce_combine_kernel[checked_grid(triton.cdiv(n, combine_block))](
        parts[0], parts[1], parts[2], parts[3], targets, loss, lse,
        n, v, n_splits, ignore_index, float(label_smoothing), float(z_loss),
        HAS_SMOOTHING=label_smoothing > 0, BLOCK=combine_block,
    )
    return loss, lse


def linear_cross_entropy_backward(grad_rows, grad_lse, hidden, weight, targets, bias, lse, *,
                                  ignore_index, label_smoothing, z_loss, softcap):
    """Lean backward: (dhidden, dweight, dbias or None), recomputing the logits tile by tile.

    grad_rows: (N,) upstream gradient of loss_rows (stride 0 allowed), or None when only the
    lse gets a gradient; grad_lse: (N,) or None.
    """
    LAUNCHES["lce_bwd"] += 1
    _check_linear(hidden, weight, targets, bias)
    ensure_bf16(hidden, grad_rows, grad_lse)
    targets, lse = targets.contiguous(), lse.contiguous()
    bias = bias.contiguous() if bias is not None else None
    _check_options(label_smoothing, z_loss, softcap)
    n, d = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    grads = _upstream(grad_rows, grad_lse, n, device)  # None: zero gradients, no launch

    # Atomic accumulation needs zeroed fp32 buffers; for fp32 inputs they are the outputs.
    dh = torch.zeros((n, d), dtype=torch.float32, device=device)
    dw = torch.zeros((v, d), dtype=torch.float32, device=device)
    db = torch.zeros((v,), dtype=torch.float32, device=device) if bias is not None else None
    if n > 0 and grads is not None:
        grad_rows, grad_lse = grads
        has_glse = grad_lse is not None
        cfg = _config("lce_bwd", device, dtype,
                      _on(bias=bias is not None, softcap=softcap is not None, glse=has_glse), (n,))
        block_n, block_v, block_d = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_V"), cfg.pop("BLOCK_D")
        order, n_valid = _valid_row_order(targets, ignore_index)
        _lce_bwd_kernel[lean_backward_grid(n, v, block_n, block_v)](
            hidden, weight, bias if bias is not None else weight, targets, order, n_valid, lse,
            grad_rows, grad_lse if has_glse else grad_rows,
            dh, dw, db if db is not None else dw,
            n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            grad_rows.stride(0), grad_lse.stride(0) if has_glse else 0,
            dh.stride(0), dw.stride(0), float(label_smoothing), float(z_loss),
            float(softcap) if softcap is not None else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_GLSE=has_glse,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
            DOT_PRECISION=_dot_precision(dtype), **cfg,
        )
    if dtype != torch.float32:
        dh, dw = dh.to(dtype), dw.to(dtype)
        db = db.to(dtype) if db is not None else None
    return dh, dw, db


# --------------------------------------------------------------------------------------
# Fused linear cross-entropy, budgeted schedule
# --------------------------------------------------------------------------------------
@triton.jit
def _matmul_kernel(
    A, B, C, BIAS, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """C (+)= A @ B (+ bias[n]) with an fp32 accumulator; any strides (transposes are strides).

    ACCUMULATE reads C (fp32 for dW) and adds, so a running sum never leaves fp32."""
    pid = tl.program_id(0)
    # Grouped launch order: GROUP_M row blocks share B column blocks while they are in L2.
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = rk < K
        a = tl.load(A + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(B + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=c_mask)


def _matmul(a, b, c, bias=None, accumulate=False):
    """c (+)= a @ b (+ bias) via _matmul_kernel; a (M, K), b (K, N), c (M, N) any strides."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return c
    cfg = _config("gemm", a.device, a.dtype, _on(bias=bias is not None, accumulate=accumulate))
    bm, bn, bk, gm = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("GROUP_M")
    _matmul_kernel[checked_grid(triton.cdiv(m, bm) * triton.cdiv(n, bn))](
        a, b, c, bias if bias is not None else c, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
        DOT_PRECISION=_dot_precision(a.dtype), **cfg,
    )
    return c


def _budgeted_forward(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                      softcap, reduction, memory_budget):
    n, d = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    loss = _new((n,), torch.float32, device)
    lse = _new((n,), torch.float32, device)
    dh = _new((n, d), dtype, device)
    dw32 = torch.zeros((v, d), dtype=torch.float32, device=device)
    db32 = torch.zeros((v,), dtype=torch.float32, device=device) if bias is not None else None

    # Uniform upstream gradient per row, kept on the device (no sync): 1 or 1/n_valid.
    if reduction == "mean":
        n_valid = (targets != ignore_index).sum(dtype=torch.float32).clamp_min(1.0)
        g = torch.reciprocal(n_valid).reshape(1)
    else:
        g = torch.ones((1,), dtype=torch.float32, device=device)
    g_rows = g.expand(n)

    # fp32 logits (4 B) + a 16-bit copy of G for the tensor-core GEMMs (fp32 G overwrites
    # the logits in place).
    bytes_per_row = v * (4 + (0 if dtype == torch.float32 else dtype.itemsize))
    chunk = max(1, min(n, memory_budget // bytes_per_row))
    logits = torch.empty((chunk, v), dtype=torch.float32, device=device)
    grad = logits if dtype == torch.float32 else torch.empty((chunk, v), dtype=dtype, device=device)

    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = stop - start
        h_c, x_c, g_c = hidden[start:stop], logits[:rows], grad[:rows]
        _matmul(h_c, weight.t(), x_c, bias=bias)
        _ce_forward(x_c, targets[start:stop], loss[start:stop], lse[start:stop],
                    ignore_index, label_smoothing, z_loss, softcap)
        _ce_backward(g_rows[start:stop], None, x_c, targets[start:stop], lse[start:stop], g_c,
                     ignore_index, label_smoothing, z_loss, softcap)
        torch.mm(g_c, weight, out=dh[start:stop])
        _matmul(g_c.t(), h_c, dw32, accumulate=True)
        if db32 is not None:
            db32 += g_c.sum(dim=0, dtype=torch.float32)

    dw = dw32 if dtype == torch.float32 else dw32.to(dtype)
    db = None if db32 is None else (db32 if dtype == torch.float32 else db32.to(dtype))
    return loss, lse, (dh, dw, db)


def linear_cross_entropy_forward(hidden, weight, targets, bias, *, ignore_index, label_smoothing,
                                 z_loss, softcap, reduction, memory_budget=None):
    """(loss_rows f32 (N,), lse f32 (N,), grads) for logits = hidden @ weight.T (+ bias).

    grads is None for the lean schedule and for reduction "none"; otherwise (dhidden, dweight,
    dbias or None) for a uniform upstream gradient (1 for "sum", 1/n_valid for "mean")."""
    LAUNCHES["lce_fwd"] += 1
    _check_linear(hidden, weight, targets, bias)
    ensure_bf16(hidden)
    targets = targets.contiguous()
    bias = bias.contiguous() if bias is not None else None
    _check_options(label_smoothing, z_loss, softcap)
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    budgeted = memory_budget is not None and memory_budget > LEAN_MAX_BUDGET
    if budgeted and reduction != "none" and hidden.shape[0] > 0:
        return _budgeted_forward(hidden, weight, targets, bias, ignore_index, label_smoothing,
                                 z_loss, softcap, reduction, int(memory_budget))
    loss, lse = _lean_forward(hidden, weight, targets, bias, ignore_index, label_smoothing,
                              z_loss, softcap)
    return loss, lse, None
